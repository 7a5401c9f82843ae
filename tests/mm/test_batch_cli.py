"""`mm batch`: each output body is what the HTTP route answers for the same request; bad lines,
unknown urls and bad bodies give error lines; a rerun skips the custom_ids already answered."""

import base64
import io
import json

from fastapi import FastAPI
from fastapi.testclient import TestClient

from mm.captioner import Captioner
from mm.cli import main
from mm.engine import Engine
from mm.openai_api import router
from train.data.scenes import render, sample_rng, sample_scene


def _body(i: int, task: str = "caption", **extra) -> dict:
    buf = io.BytesIO()
    render(sample_scene(sample_rng("test", 5, i))).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": task}]
    return {"model": "mm", "messages": [{"role": "user", "content": content}], **extra}


def _line(cid, body, url="/v1/chat/completions") -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def _stable(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}  # per-response id and clock


def test_batch_answers_as_the_route_does_and_resumes(trained_micro, tmp_path, capsys):
    good = {f"r{i}": _body(i, task) for i, task in enumerate(["caption", "describe", "caption", "describe"])}
    lines = [_line(c, b) for c, b in good.items()] + [
        "{not json",
        _line("u1", good["r0"], url="/v1/embeddings"),
        _line("b1", {"messages": []}),
        _line("b2", _body(9, temperature=-1)),
        _line("r0", good["r0"]),  # a repeated custom_id
        _line("s1", _body(9, stream=True)),
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    assert main(["batch", str(inp), str(out), "--checkpoint", str(trained_micro), "--max-batch", "4"]) == 0
    got = {}
    for x in out.read_text().splitlines():
        row = json.loads(x)
        got.setdefault(row["custom_id"], []).append(row)
    assert sorted(got, key=str) == sorted(["r0", "r1", "r2", "r3", None, "u1", "b1", "b2", "s1"], key=str)

    cap = Captioner.from_pretrained(trained_micro, device="cpu")
    engine = Engine(cap, max_batch=4)
    app = FastAPI()
    app.include_router(router(engine, f"mm-{cap.path.name}", 256))
    try:
        with TestClient(app) as client:
            for cid in ["r0", "r1", "r2", "r3", "b1", "b2"]:
                body = good[cid] if cid in good else json.loads(lines[6 if cid == "b1" else 7])["body"]
                want = client.post("/v1/chat/completions", json=body)
                answer = next(r["response"] for r in got[cid] if r["error"] is None)  # r0's twin is an error
                assert answer["status_code"] == want.status_code
                assert _stable(answer["body"]) == _stable(want.json())
    finally:
        engine.close()
    assert got["r0"][0]["response"]["status_code"] + got["r0"][1]["response"]["status_code"] == 600  # 200 + 400
    for cid, says in [(None, "is not valid JSON"), ("u1", "unknown url '/v1/embeddings'"),
                      ("s1", "stream is not available")]:
        (row,) = got[cid]
        assert row["response"]["status_code"] == 400 and says in row["response"]["body"]["error"]["message"]
        assert row["error"]["message"] == row["response"]["body"]["error"]["message"]
    refused = got["b1"][0]["response"]["body"]["error"]
    assert got["b1"][0]["error"] is None and refused["param"] == "messages" and "at least 1 item" in refused["message"]

    before = out.read_text()
    with open(out, "a") as f:
        f.write('{"custom_id": "torn", "respo')  # a line cut by a kill
    inp.write_text("\n".join(lines[:4] + [_line("r9", _body(4))]) + "\n")
    capsys.readouterr()
    assert main(["batch", str(inp), str(out), "--checkpoint", str(trained_micro)]) == 0
    after = out.read_text()
    assert after.startswith(before)
    (new,) = [json.loads(x) for x in after[len(before):].splitlines()]
    assert new["custom_id"] == "r9" and new["response"]["status_code"] == 200
    assert "1 answered, 0 errors" in capsys.readouterr().err
