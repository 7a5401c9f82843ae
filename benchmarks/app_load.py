"""Load test for the Gradio app: many simultaneous API clients on `/caption`.

    python benchmarks/app_load.py [--url URL | --checkpoint DIR] [--clients 16] [--requests 4]

Baseline in the same run: every (image, task) pair is first captioned once, one
request at a time, through the same endpoint. Then `clients` threads, each with
its own gradio_client, send `requests` requests at once (after a barrier, so
they really overlap). Every answer must equal the baseline answer for its pair:
the queue may reorder and interleave requests, but it must never mix them up.
Prints p50/p95 latency of both phases and a final JSON line
`{"bench": "app_load", ...}`; the exit status is 1 if any request failed or differed.
Without --url the app is launched in this process on a free 127.0.0.1 port
(default model, or random weights while none is trained).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("caption", "describe", "caption_zh", "describe_zh")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(checkpoint=None, max_batch: int = 32, compile: bool = False):
    """Start the app in this process; -> (close, url)."""
    sys.path.insert(0, str(ROOT))
    import app

    cap, untrained = app.load_captioner(checkpoint, "cpu")
    if compile:
        cap.compile()
    demo, engine, url = app.serve(cap, untrained, port=free_port(), max_batch=max_batch, block=False, quiet=True)

    def close():
        demo.close()
        engine.close()

    return close, url


def default_jobs() -> list[tuple[str, str]]:
    """Every example image with every task."""
    images = sorted(str(p) for p in (ROOT / "examples").glob("*") if p.suffix in (".png", ".jpg"))
    if not images:
        raise SystemExit(f"no example images in {ROOT / 'examples'}: run examples/make_examples.py")
    return [(img, task) for img in images for task in TASKS]


def _caption(client, job, max_new_tokens: int) -> tuple[str, float]:
    from gradio_client import handle_file

    t0 = time.perf_counter()
    text = client.predict(handle_file(job[0]), task=job[1], max_new_tokens=max_new_tokens, api_name="/caption")
    return text, time.perf_counter() - t0


def baseline(url: str, jobs, max_new_tokens: int) -> tuple[dict, list[float]]:
    """One request at a time: the reference text of each job and the latencies."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    texts, latencies = {}, []
    for job in dict.fromkeys(jobs):
        texts[job], seconds = _caption(client, job, max_new_tokens)
        latencies.append(seconds)
    return texts, latencies


def hammer(url: str, jobs, clients: int, requests: int, max_new_tokens: int) -> list[dict]:
    """`clients` threads x `requests` each, started together; one record per request."""
    from gradio_client import Client

    start = threading.Barrier(clients)

    def worker(i: int) -> list[dict]:
        client = Client(url, verbose=False)
        start.wait()
        out = []
        for j in range(requests):
            job = jobs[(i * requests + j) % len(jobs)]
            try:
                text, seconds = _caption(client, job, max_new_tokens)
                out.append({"job": job, "text": text, "seconds": seconds, "error": None})
            except Exception as e:  # a failed request is a result to report, not a crash
                out.append({"job": job, "text": None, "seconds": None, "error": f"{type(e).__name__}: {e}"})
        return out

    with ThreadPoolExecutor(clients) as pool:
        return [r for rs in pool.map(worker, range(clients)) for r in rs]


def summarize(records: list[dict], reference: dict, base_latencies: list[float], wall_s: float) -> dict:
    ok = [r for r in records if r["error"] is None]
    wrong = [r for r in ok if r["text"] != reference[r["job"]]]
    lat = np.array([r["seconds"] for r in ok]) if ok else np.array([np.nan])
    base = np.array(base_latencies)
    return {
        "requests": len(records), "ok": len(ok), "correct": len(ok) - len(wrong),
        "p50_s": round(float(np.percentile(lat, 50)), 4), "p95_s": round(float(np.percentile(lat, 95)), 4),
        "max_s": round(float(lat.max()), 4), "throughput_rps": round(len(ok) / wall_s, 3),
        "baseline_p50_s": round(float(np.percentile(base, 50)), 4),
        "baseline_rps": round(len(base) / float(base.sum()), 3),
        "errors": sorted({r["error"] for r in records if r["error"]})[:3],
        "mismatches": [{"job": r["job"], "got": r["text"], "want": reference[r["job"]]} for r in wrong[:3]],
    }


def run_load(url: str, jobs, clients: int = 16, requests: int = 4, max_new_tokens: int = 32) -> dict:
    reference, base_latencies = baseline(url, jobs, max_new_tokens)
    t0 = time.perf_counter()
    records = hammer(url, jobs, clients, requests, max_new_tokens)
    result = summarize(records, reference, base_latencies, time.perf_counter() - t0)
    return {"bench": "app_load", "clients": clients, "requests_per_client": requests,
            "max_new_tokens": max_new_tokens, **result}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running app (default: launch one here)")
    p.add_argument("--checkpoint", default=None, help="checkpoint for the launched app (default: bundled model)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32, help="the launched app's engine batch")
    args = p.parse_args(argv)
    close, url = (None, args.url) if args.url else launch(args.checkpoint, args.max_batch)
    try:
        result = run_load(url, default_jobs(), args.clients, args.requests, args.max_new_tokens)
    finally:
        if close is not None:
            close()
    print(f"{result['ok']}/{result['requests']} ok, {result['correct']} correct; "
          f"p50 {result['p50_s']:.3f} s, p95 {result['p95_s']:.3f} s, {result['throughput_rps']} req/s "
          f"(one at a time: p50 {result['baseline_p50_s']:.3f} s, {result['baseline_rps']} req/s)")
    print(json.dumps(result, ensure_ascii=False))
    return 0 if result["correct"] == result["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
