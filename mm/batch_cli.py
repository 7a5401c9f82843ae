"""`mm batch IN.jsonl OUT.jsonl`: OpenAI Batch API request lines in, OpenAI Batch output lines out.

Each input line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}`;
each output line is `{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}`, in the order requests finish. The body is what the HTTP route answers: the
route of mm/openai_api.py is mounted in an in-process FastAPI app and called through
httpx's ASGI transport (no socket), so its validation, errors and response shape apply
unchanged, and its requests go through the continuous-batching engine, `--concurrency` of
them in flight at once so they share the running batch. A line that never reaches the
route (not JSON, no `custom_id`, another method or url, `stream`) gets an error line
with status 400, the OpenAI error body, and `error` set, as `vllm run-batch` does; a
route's own 4xx keeps `error` null, as OpenAI's batches do. A rerun skips the custom_ids
already in OUT whatever their status (delete a line to redo it; a line torn by a kill is
dropped first), so a killed batch resumes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from mm.shard_outputs import json_line

URL = "/v1/chat/completions"


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("input", help="OpenAI Batch API request lines (JSONL)")
    p.add_argument("output", help="output lines are appended here; custom_ids already in it are skipped")
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the bundled model)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16")
    p.add_argument("--max-batch", type=int, default=32, help="rows of the engine's running batch")
    p.add_argument("--max-tokens", type=int, default=256, help="the largest max_tokens a request may ask for")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight at once")


def answered_ids(output: Path) -> set[str]:
    """The custom_ids OUT already holds; a last line without its newline (a kill) is cut off first."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(output, "r+b") as f:
            f.truncate(len(data))
    done = set()
    for line in data.splitlines():
        try:
            done.add(json.loads(line)["custom_id"])
        except (ValueError, KeyError, TypeError):
            continue
    return done


def output_line(custom_id, status: int, body, error: dict | None = None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
            "error": error}


def bad_line(custom_id, message: str) -> dict:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return output_line(custom_id, 400, body, {"code": "invalid_request", "message": message})


def parse_line(text: str, number: int, seen: set[str]) -> tuple[str, dict] | dict:
    """(custom_id, body) to send, or the error line to write."""
    try:
        req = json.loads(text)
    except ValueError as e:
        return bad_line(None, f"line {number} is not valid JSON ({e})")
    if not isinstance(req, dict):
        return bad_line(None, f"line {number} must be a JSON object, got {type(req).__name__}")
    cid = req.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return bad_line(None, f"line {number}: custom_id must be a non-empty string")
    if cid in seen:
        return bad_line(cid, f"line {number}: custom_id {cid!r} is used by an earlier line; each must be unique")
    seen.add(cid)
    if req.get("method", "POST") != "POST":
        return bad_line(cid, f"line {number}: method must be POST, got {req.get('method')!r}")
    if req.get("url") != URL:
        return bad_line(cid, f"line {number}: unknown url {req.get('url')!r}; this batch answers {URL}")
    body = req.get("body")
    if isinstance(body, dict) and body.get("stream"):
        return bad_line(cid, f"line {number}: stream is not available in a batch; leave it out")
    return cid, body


def requests(path: Path, done: set[str]) -> Iterator[tuple[str, dict] | dict]:
    seen: set[str] = set()
    with open(path, encoding="utf-8", errors="replace") as f:  # a bad byte is a bad line, not a crash
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            item = parse_line(text, number, seen)
            custom_id = item[0] if isinstance(item, tuple) else item["custom_id"]
            if custom_id not in done:
                yield item


async def answer_all(app, items, out, concurrency: int) -> tuple[int, int]:
    """Send every request to the route, `concurrency` at a time; -> (answered, errors)."""
    import httpx

    counts = [0, 0]
    slots = asyncio.Semaphore(concurrency)

    def write(line: dict) -> None:
        out.write(json_line(line))
        out.flush()  # a line is whole on disk before the next: a kill tears at most the last one
        counts[0 if line["response"]["status_code"] == 200 else 1] += 1

    async def one(client, cid: str, body) -> None:
        try:
            r = await client.post(URL, json=body)
            write(output_line(cid, r.status_code, r.json()))
        except Exception as e:  # the app itself failed (or answered no JSON): this request, not the batch
            message = f"captioning failed: {type(e).__name__}: {e}"
            write(output_line(cid, 500, {"error": {"message": message, "type": "server_error", "param": None,
                                                   "code": None}}, {"code": "server_error", "message": message}))
        finally:
            slots.release()

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://mm-batch", timeout=None) as client:
        tasks = []
        for item in items:
            if isinstance(item, dict):
                write(item)
                continue
            await slots.acquire()
            tasks.append(asyncio.create_task(one(client, *item)))
        await asyncio.gather(*tasks)
    return counts[0], counts[1]


def run(args) -> int:
    from fastapi import FastAPI

    from mm.captioner import Captioner
    from mm.checkpoint import check_output_file
    from mm.engine import Engine
    from mm.openai_api import model_id, router

    inp, outp = Path(args.input), Path(args.output)
    try:
        if not inp.is_file():
            raise ValueError(f"{inp}: no such input file")
        check_output_file(outp, "output")
        if min(args.max_batch, args.max_tokens, args.concurrency) < 1:
            raise ValueError("--max-batch, --max-tokens and --concurrency must be >= 1")
        cap = Captioner.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype)
    except ValueError as e:  # bad options, CheckpointError, ConfigError
        print(f"mm batch: {e}", file=sys.stderr)
        return 2
    done = answered_ids(outp)
    engine = Engine(cap, max_batch=args.max_batch, max_queue=args.concurrency + 1, max_new_tokens=args.max_tokens)
    app = FastAPI()
    app.include_router(router(engine, model_id(cap), args.max_tokens))
    try:
        with open(outp, "ab") as out:
            ok, failed = asyncio.run(answer_all(app, requests(inp, done), out, args.concurrency))
    finally:
        engine.close()
    print(f"mm batch: {ok} answered, {failed} errors, {len(done)} already in {outp}", file=sys.stderr)
    return 0
