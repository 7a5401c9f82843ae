"""Load test for the Gradio app: many simultaneous API clients on `/caption`.

    python benchmarks/app_load.py [--url URL | --checkpoint DIR] [--clients 16] [--requests 4]
        [--sweep 1 4 16 64 --plot benchmarks/app_load.png] [--compile]

Baseline in the same run: every (image, task) pair is first captioned once, one
request at a time, through the same endpoint. Then `clients` threads, each with
its own gradio_client, send `requests` requests at once (after a barrier, so
they really overlap). Every answer must equal the baseline answer for its pair:
the queue may reorder and interleave requests, but it must never mix them up.
Prints p50/p95 latency of both phases and a final JSON line
`{"bench": "app_load", ...}`; the exit status is 1 if any request failed or differed.
Without --url the app is started as its own process (`python app.py`) on a free
127.0.0.1 port (default model, or random weights while none is trained), so the client
threads here do not compete with the server for one interpreter.
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
    """Start `app.py` in its own process (so the clients here do not share its interpreter lock)
    -> (close, url, captioner); the captioner, loaded here, counts each answer's tokens."""
    import subprocess
    import urllib.request

    sys.path.insert(0, str(ROOT))
    import app

    port = free_port()
    cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--device", "cpu", "--max-batch", str(max_batch)]
    cmd += (["--checkpoint", checkpoint] if checkpoint else []) + (["--compile"] if compile else [])
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 900  # a compiled server warms up first
    while True:
        try:
            urllib.request.urlopen(url + "v1/models", timeout=5).close()
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise SystemExit(f"the app did not start: {' '.join(cmd)}") from None
            time.sleep(0.5)
    cap, _ = app.load_captioner(checkpoint, "cpu")

    def close():
        server.terminate()
        server.wait(30)

    return close, url, cap


def default_jobs() -> list[tuple[str, str]]:
    """Every example image with every task."""
    images = sorted(str(p) for p in (ROOT / "examples").glob("*") if p.suffix in (".png", ".jpg"))
    if not images:
        raise SystemExit(f"no example images in {ROOT / 'examples'}: run examples/make_examples.py")
    return [(img, task) for img in images for task in TASKS]


class GradioAPI:
    """One client of the app's `/caption` endpoint (gradio_client)."""

    def __init__(self, url: str):
        from gradio_client import Client

        self.client = Client(url, verbose=False)

    def caption(self, job, max_new_tokens: int) -> str:
        from gradio_client import handle_file

        return self.client.predict(handle_file(job[0]), task=job[1], max_new_tokens=max_new_tokens,
                                   api_name="/caption")


def _caption(api, job, max_new_tokens: int) -> tuple[str, float]:
    t0 = time.perf_counter()
    text = api.caption(job, max_new_tokens)
    return text, time.perf_counter() - t0


def baseline(url: str, jobs, max_new_tokens: int, api=GradioAPI) -> tuple[dict, list[float]]:
    """One request at a time: the reference text of each job and the latencies."""
    client = api(url)
    texts, latencies = {}, []
    for job in dict.fromkeys(jobs):
        texts[job], seconds = _caption(client, job, max_new_tokens)
        latencies.append(seconds)
    return texts, latencies


def hammer(url: str, jobs, clients: int, requests: int, max_new_tokens: int, api=GradioAPI) -> list[dict]:
    """`clients` threads x `requests` each, started together; one record per request."""
    start = threading.Barrier(clients)

    def worker(i: int) -> list[dict]:
        client = api(url)
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


def summarize(records: list[dict], reference: dict, base_latencies: list[float], wall_s: float,
              tokens: dict | None = None) -> dict:
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
        "tokens_per_s": round(sum(tokens[r["job"]] for r in ok) / wall_s, 1) if tokens else None,
        "errors": sorted({r["error"] for r in records if r["error"]})[:3],
        "mismatches": [{"job": r["job"], "got": r["text"], "want": reference[r["job"]]} for r in wrong[:3]],
    }


def run_load(url: str, jobs, clients: int = 16, requests: int = 4, max_new_tokens: int = 32, api=GradioAPI,
             reference=None, tokens=None) -> dict:
    """Baseline (unless given) then the concurrent phase; the summary with the answers checked."""
    if reference is None:
        reference = baseline(url, jobs, max_new_tokens, api)
    t0 = time.perf_counter()
    records = hammer(url, jobs, clients, requests, max_new_tokens, api)
    result = summarize(records, reference[0], reference[1], time.perf_counter() - t0, tokens)
    return {"bench": "app_load", "api": api.__name__, "clients": clients, "requests_per_client": requests,
            "max_new_tokens": max_new_tokens, **result}


def plot(rows: list[dict], path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.2), layout="constrained")
    ax = fig.add_subplot()
    clients = [r["clients"] for r in rows]
    ax.plot(clients, [r["throughput_rps"] for r in rows], "o-", label="requests/s")
    ax.axhline(rows[0]["baseline_rps"], color="gray", ls="--", label="one at a time")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("requests/s")
    ax2 = ax.twinx()
    ax2.plot(clients, [r["p95_s"] for r in rows], "s:", color="tab:red", label="p95 latency (s)")
    ax2.set_ylabel("p95 latency (s)")
    fig.legend(loc="upper left", fontsize=8)
    fig.savefig(path, dpi=110)


def main(argv=None, api=GradioAPI, name: str = "app_load") -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running app (default: launch one here)")
    p.add_argument("--checkpoint", default=None, help="checkpoint for the launched app (default: bundled model)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32, help="the launched app's engine batch")
    p.add_argument("--compile", action="store_true", help="the launched app compiles its decode step")
    p.add_argument("--sweep", type=int, nargs="*", default=[], help="also run these client counts (a table)")
    p.add_argument("--plot", default=None, help="with --sweep: save throughput and p95 vs clients here (PNG)")
    args = p.parse_args(argv)
    close, url, cap = (None, args.url, None) if args.url else launch(args.checkpoint, args.max_batch, args.compile)
    jobs = default_jobs()
    try:
        reference = baseline(url, jobs, args.max_new_tokens, api)
        # tokens per answer, for tokens/s: counted by the same model in this process (greedy: the same text)
        tokens = {job: cap.run(job[0], job[1], max_new_tokens=args.max_new_tokens).stats.new_tokens
                  for job in dict.fromkeys(jobs)} if cap is not None else None
        result = run_load(url, jobs, args.clients, args.requests, args.max_new_tokens, api, reference, tokens)
        sweep = [run_load(url, jobs, n, args.requests, args.max_new_tokens, api, reference, tokens)
                 for n in args.sweep]
    finally:
        if close is not None:
            close()
    for r in [result, *sweep]:
        print(f"{r['clients']:3} clients: {r['ok']}/{r['requests']} ok, {r['correct']} correct; "
              f"p50 {r['p50_s']:.3f} s, p95 {r['p95_s']:.3f} s, {r['throughput_rps']} req/s "
              f"({r['tokens_per_s']} tokens/s) = "
              f"{r['throughput_rps'] / r['baseline_rps']:.1f}x one at a time "
              f"(p50 {r['baseline_p50_s']:.3f} s, {r['baseline_rps']} req/s)")
    if sweep and args.plot:
        plot(sweep, args.plot)
    print(json.dumps({**result, "bench": name, "sweep": sweep}, ensure_ascii=False))
    return 0 if all(r["correct"] == r["requests"] for r in [result, *sweep]) else 1


if __name__ == "__main__":
    sys.exit(main())
