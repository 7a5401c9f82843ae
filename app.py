"""The Gradio app and the OpenAI-compatible HTTP API: a thin shell over the serving engine.

    python app.py [--checkpoint DIR] [--host 127.0.0.1] [--port 7860] [--device cpu|cuda] [--compile]
    mm serve      (the same options)

Every request, from the page, Gradio's client API or `/v1/chat/completions`, goes to one
`mm.engine.Engine`, whose loop owns the model and decodes all running requests in one
batch (continuous batching): a handler submits and then only waits for its text, so
there is no model lock and simultaneous users share each forward. A user who leaves
mid-stream cancels the request and frees its row. The HTTP API is mounted on the same
FastAPI app, host and port as the page (`mm/openai_api.py`).

Bad input (no image, an unreadable or oversized upload, out-of-range options) becomes a
`gr.Error` message on the page, never a stack trace; a full queue says the server is busy.
Server options that cannot work (`--max-batch 0`, `--max-queue 0`, a port outside 1..65535
or already taken) stop start-up with the option named and status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import html
import json
import shutil
import sys
import tempfile
import time
import warnings
import weakref
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from lm import ConfigError
from mm.captioner import DEFAULT_MODEL_DIR, Captioner
from mm.engine import Engine
from mm.generate import GenerationConfig, GenerationStats
from mm.openai_api import judgement, model_id, router
from mm.protocol import problem
from vision.preprocess import DEFAULT_MAX_PIXELS, IMAGE_FORMATS, ImageError, load_image

MAX_NEW_TOKENS = 256  # this server's cap on a request's length, inside GenerationConfig's own limit
MAX_BATCH_FILES = 64
KEEP_BATCH_TABLES = 16  # the newest batch tables kept on disk for download
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
MODES = ("greedy", "beam search", "sampling")
UNTRAINED_NOTICE = ("**This model is untrained (random weights): its captions are noise.** "
                    "Train the default model with `make default-model`, or start with `--checkpoint DIR`.")
UNFAMILIAR_NOTICE = ("**This image looks unlike anything this model was trained on** (confidence {conf:.2f}, "
                     "below its calibrated threshold {threshold:.2f}), so the text is probably wrong.")


def user_error(message: str) -> gr.Error:
    """A message for the page (the modal renders HTML, so it is escaped); no server-side traceback."""
    return gr.Error(html.escape(message, quote=False), print_exception=False)


class ImageInput(gr.Image):
    """gr.Image whose unreadable or oversized uploads become a message on the page."""

    is_template = True  # reuse gr.Image's front end

    def preprocess(self, payload):
        try:
            if payload is not None and getattr(payload, "path", None):
                self._check_size(payload)
            return super().preprocess(payload)
        except Image.DecompressionBombError as e:
            raise user_error(f"This image is too large to open safely ({e}).") from None
        except (OSError, SyntaxError, ValueError) as e:  # PIL's ways of saying "not an image"
            name = getattr(payload, "orig_name", None) or "the upload"
            reason = str(e).replace(str(getattr(payload, "path", None)), name)  # no server paths on the page
            raise user_error(f"{name} is not a readable image ({reason}).") from None


    @staticmethod
    def _check_size(payload) -> None:
        """Refuse from the header, before Gradio decodes the whole picture (a 13000 x 13000 PNG
        would otherwise cost seconds and gigabytes before any check of ours ran)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(payload.path, formats=IMAGE_FORMATS) as img:  # nothing else reaches a decoder
                width, height = img.size
        if width * height > DEFAULT_MAX_PIXELS:
            name = getattr(payload, "orig_name", None) or "the upload"
            raise user_error(f"{name}: {width}x{height} = {width * height} pixels is over the limit of "
                             f"{DEFAULT_MAX_PIXELS} pixels.")


class Slider(gr.Slider):
    """gr.Slider whose out-of-range message names the control."""

    is_template = True

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except gr.Error as e:
            raise user_error(f"{self.label}: {e.message}") from None


def slider_range(option: str, lo: float, hi: float) -> tuple[float, float]:
    """A slider's (min, max) for a decoding option: the page's choice of a comfortable span, which
    must lie inside the range GenerationConfig accepts (checked here, when the page is built)."""
    limit = GenerationConfig.LIMITS[option]
    if lo not in limit or hi not in limit:
        raise ValueError(f"the {option} slider's {lo}..{hi} leaves GenerationConfig's range {limit.text}")
    return lo, hi


def _whole(value):
    """A whole float (what sliders and number boxes send) as an int; anything else unchanged, for
    GenerationConfig to refuse by name."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def decoding_options(mode="greedy", num_beams=4, temperature=0.7, top_p=1.0, max_new_tokens=64,
                     repetition_penalty=1.0, speculative=True, seed=-1) -> dict:
    """The UI's decoding controls -> Captioner options, checked by GenerationConfig; raises gr.Error
    naming a bad value. The page's own rules: beam search means 2 beams or more, sampling a
    temperature above 0 (else they would silently be greedy), and a seed of -1 means random."""
    if mode not in MODES:
        raise user_error(f"decoding mode must be one of {', '.join(MODES)}; got {mode!r}")
    opts = dict(max_new_tokens=_whole(max_new_tokens), repetition_penalty=repetition_penalty,
                speculative=bool(speculative), num_beams=1, temperature=0.0, top_p=1.0)
    if mode == "beam search":
        opts["num_beams"] = _whole(num_beams)
        if opts["num_beams"] in (0, 1):
            raise user_error(f"beam search needs 2 beams or more; got {num_beams}")
    elif mode == "sampling":
        if temperature == 0:
            raise user_error("sampling needs a temperature above 0 (use greedy for 0)")
        opts.update(temperature=temperature, top_p=top_p, seed=None if seed in (None, -1) else _whole(seed))
    try:
        GenerationConfig(**opts).validate()
    except ConfigError as e:
        raise user_error(f"decoding options: {e}") from None
    return opts  # the engine holds a request to its own length cap (MAX_NEW_TOKENS) when it is submitted


def open_image(path) -> Image.Image:
    """An upload's path -> RGB image (grey and transparent images converted), or gr.Error."""
    if path is None:
        raise user_error("No image: upload one, paste one, take a webcam photo or pick an example.")
    try:
        return load_image(path)  # caps the pixel count from the header, before decoding
    except ImageError as e:
        raise user_error(f"Cannot use this image: {str(e).replace(str(path), Path(path).name)}") from None


def stats_markdown(stats: GenerationStats, wall_s: float, first_s: float | None = None,
                   threshold: float | None = None) -> str:
    """The request's figures; first, when the image was judged unlike the training data, a notice."""
    busy = stats.prefill_s + stats.decode_s
    conf = stats.confidence[0] if stats.confidence else None
    notice = ""
    if conf is not None and threshold is not None and conf < threshold:
        notice = UNFAMILIAR_NOTICE.format(conf=conf, threshold=threshold) + "\n\n"
    parts = [f"latency **{wall_s:.2f} s**"]
    if conf is not None:
        parts.insert(0, f"confidence **{conf:.2f}**")
    if first_s is not None:
        parts.append(f"first text after {first_s:.2f} s")
    parts.append(f"{stats.new_tokens} tokens, **{stats.new_tokens / busy if busy else 0:.1f} tokens/s** "
                 f"(prefill {stats.prefill_s * 1000:.0f} ms, decode {stats.decode_s * 1000:.0f} ms)")
    if stats.tokens_per_forward:
        parts.append(f"{stats.tokens_per_forward:.2f} tokens per forward")
    if stats.speculative and stats.acceptance is not None:
        parts.append(f"MTP draft acceptance {stats.acceptance:.0%}")
    return notice + " · ".join(parts)


def routing_figure(expert_load) -> Figure | None:
    """Heat map of each MoE layer's share of routed tokens per expert (uniform = 1/experts)."""
    if not expert_load:
        return None
    load = np.asarray(expert_load, dtype=np.float64)  # [moe layer, expert]
    share = load / np.maximum(load.sum(1, keepdims=True), 1.0)
    layers, experts = share.shape
    fig = Figure(figsize=(6.4, 1.2 + 0.45 * layers), layout="constrained")  # no pyplot: thread-safe
    ax = fig.add_subplot()
    image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xticks(range(experts))
    ax.set_yticks(range(layers), labels=[f"MoE {i}" for i in range(layers)])
    ax.set_xlabel("routed expert")
    ax.set_title(f"Routing: share of each MoE layer's {int(load[0].sum())} token-to-expert routings", fontsize=10)
    if experts * layers <= 128:  # numbers stay legible only on small grids
        for (i, j), v in np.ndenumerate(share):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if v > 0.6 * share.max() else "white")
    fig.colorbar(image, ax=ax, label="share of routings")
    return fig


def write_tables(rows: list[dict], out_dir: Path) -> tuple[str, str]:
    """Batch results as captions.csv and captions.jsonl (UTF-8, Chinese kept as is)."""
    csv_path, jsonl_path = out_dir / "captions.csv", out_dir / "captions.jsonl"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "task", "caption", "confidence", "unfamiliar", "error"])
        writer.writeheader()
        writer.writerows(rows)
    with open(jsonl_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return str(csv_path), str(jsonl_path)


class Shell:
    """The event handlers: options in, engine requests, page values out."""

    def __init__(self, cap: Captioner, engine: Engine):
        self.cap, self.engine = cap, engine
        self.tables = Path(tempfile.mkdtemp(prefix="mm-batch-"))
        weakref.finalize(self, shutil.rmtree, self.tables, True)  # gone with the app, at the latest at exit
        self._batches = 0

    def _check_task(self, task):
        if task not in self.cap.tasks:
            raise user_error(f"unknown task {task!r}; this model knows {', '.join(self.cap.tasks)}")

    def _submit(self, image, task, opts):
        """One engine request; its input errors, a full queue or a stopped engine become page
        messages, the same as the HTTP route's (mm.protocol.problem). Decodes the image: callers
        on the event loop run it in a worker thread."""
        try:
            return self.engine.submit(image, task, **opts)
        except Exception as e:
            raise user_error(problem(e).message) from None

    def _open_and_submit(self, image, task, opts):
        return self._submit(open_image(image), task, opts)

    @staticmethod
    async def _off_loop(fn, *args, requests=lambda out: [out]):
        """fn(*args), which reads uploads and submits them, in a worker thread. A handler cancelled
        meanwhile (the user left) cancels the requests fn submits as soon as they exist."""
        job = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(lambda j: j.cancelled() or j.exception() or [r.cancel() for r in requests(j.result())])
            raise

    # The handlers are coroutines: a request waiting for the engine is awaited on Gradio's event
    # loop and holds no thread (reading the upload and drawing the routing plot, which take CPU,
    # run in worker threads), as the OpenAI route's do. A user who leaves cancels the handler,
    # and its `finally` frees the engine row.

    async def stream(self, image, task, mode, num_beams, temperature, top_p, max_new_tokens,
                     repetition_penalty, speculative, seed):
        """Caption tab: yields (text so far, stats, routing plot); beam search arrives whole."""
        start = time.perf_counter()
        opts = decoding_options(mode, num_beams, temperature, top_p, max_new_tokens,
                                repetition_penalty, speculative, seed)
        self._check_task(task)
        req = await self._off_loop(self._open_and_submit, image, task, opts)
        text, first = "", None
        try:
            async for piece in req.astream():
                text += piece
                first = first if first is not None else time.perf_counter() - start
                if opts["num_beams"] == 1:
                    yield text, "generating…", gr.skip()
            stats = (await self._result(req)).stats
        except gr.Error:
            raise
        except Exception as e:  # a stopped engine or a failed forward, as `_result` words it
            raise user_error(problem(e, submitting=False).message) from None
        finally:
            req.cancel()  # a user who closed the page frees the row; no-op once finished
        figure = await asyncio.to_thread(routing_figure, stats.expert_load)
        yield text, stats_markdown(stats, time.perf_counter() - start, first, self.cap.threshold(task)), figure

    async def caption(self, image, task="caption", mode="greedy", num_beams=4, temperature=0.7, top_p=1.0,
                      max_new_tokens=64, repetition_penalty=1.0, speculative=True, seed=-1) -> str:
        """The `/caption` API endpoint: the whole text at once."""
        opts = decoding_options(mode, num_beams, temperature, top_p, max_new_tokens,
                                repetition_penalty, speculative, seed)
        self._check_task(task)
        req = await self._off_loop(self._open_and_submit, image, task, opts)
        try:
            return (await self._result(req)).text
        finally:
            req.cancel()

    @staticmethod
    async def _result(req):
        """The request's result; a stopped engine or a failed forward becomes a page message."""
        try:
            return await req.aresult()
        except Exception as e:
            raise user_error(problem(e, submitting=False).message) from None

    async def batch(self, files, task, mode, num_beams, temperature, top_p, max_new_tokens,
                    repetition_penalty, speculative, seed):
        """Batch tab: a row per file (an unreadable file gets its error, the rest are captioned)."""
        start = time.perf_counter()
        if not files:
            raise user_error("No files: choose one or more images for the batch.")
        if len(files) > MAX_BATCH_FILES:
            raise user_error(f"at most {MAX_BATCH_FILES} images per batch; got {len(files)}")
        opts = decoding_options(mode, num_beams, temperature, top_p, max_new_tokens,
                                repetition_penalty, speculative, seed)
        self._check_task(task)
        rows, pending = await self._off_loop(self._submit_files, files, task, opts,
                                             requests=lambda out: [req for _, req in out[1]])
        try:
            for row, req in pending:
                try:
                    result = await self._result(req)
                except gr.Error as e:
                    row["error"] = e.message
                    continue
                row["caption"] = result.text
                row.update(judgement(result.stats.confidence[0], self.cap, task))  # never NaN in the JSONL
        finally:
            for _, req in pending:
                req.cancel()
        tables = await asyncio.to_thread(write_tables, rows, self._table_dir())
        table = [[r["file"], r["caption"], r["confidence"], r["unfamiliar"], r["error"]] for r in rows]
        done = sum(not r["error"] for r in rows)
        summary = f"{done} of {len(rows)} images captioned in {time.perf_counter() - start:.2f} s"
        return table, summary, *tables

    def _submit_files(self, files, task, opts) -> tuple[list[dict], list]:
        """A row per file, and the engine requests of those that could be read: all submitted at
        once, so the engine batches them with everyone else's."""
        rows, pending = [], []
        for path in files:
            row = {"file": Path(path).name, "task": task, "caption": "", "confidence": None, "unfamiliar": None,
                   "error": ""}
            try:
                pending.append((row, self._submit(path, task, opts)))
            except gr.Error as e:
                row["error"] = e.message.replace(html.escape(str(path), quote=False), row["file"])
            rows.append(row)
        return rows, pending

    def _table_dir(self) -> Path:
        """A fresh folder for one batch's tables; only the newest KEEP_BATCH_TABLES stay on disk."""
        self._batches += 1
        out = self.tables / f"batch-{self._batches:06d}"
        out.mkdir()
        old = self.tables / f"batch-{self._batches - KEEP_BATCH_TABLES:06d}"
        shutil.rmtree(old, ignore_errors=True)
        return out


def _examples() -> tuple[list, list[str]]:
    """(rows, labels) from examples/index.json, written by examples/make_examples.py."""
    index = EXAMPLES_DIR / "index.json"
    if not index.is_file():
        return [], []
    items = [e for e in json.loads(index.read_text(encoding="utf-8")) if (EXAMPLES_DIR / e["file"]).is_file()]
    return [[str(EXAMPLES_DIR / e["file"]), e.get("task", "caption")] for e in items], [e["label"] for e in items]


def decoding_controls() -> list:
    """The decoding accordion's controls, in `decoding_options`' order."""
    with gr.Accordion("Decoding (both tabs)", open=True):
        with gr.Row():
            mode = gr.Radio(list(MODES), value="greedy", label="Decoding")
            speculative = gr.Checkbox(True, label="MTP speculative decoding (greedy only)")
            seed = gr.Number(-1, precision=0, label="Seed (sampling; -1 = random)")
        with gr.Row():
            # Spans chosen for the page, each checked against GenerationConfig's limits.
            max_new = Slider(*slider_range("max_new_tokens", 1, MAX_NEW_TOKENS), value=64, step=1,
                             label="Max new tokens")
            beams = Slider(*slider_range("num_beams", 2, 8), value=4, step=1, label="Beams (beam search)")
            temperature = Slider(*slider_range("temperature", 0.05, 2.0), value=0.7, step=0.05,
                                 label="Temperature (sampling)")
            top_p = Slider(*slider_range("top_p", 0.05, 1.0), value=1.0, step=0.05, label="Top-p (sampling)")
            rep = Slider(*slider_range("repetition_penalty", 0.5, 2.0), value=1.0, step=0.05,
                         label="Repetition penalty")
    return [mode, beams, temperature, top_p, max_new, rep, speculative, seed]


def build_demo(cap: Captioner, engine: Engine, untrained: bool = False) -> gr.Blocks:
    shell = Shell(cap, engine)
    with gr.Blocks(title="DeepSeek-style captioner", analytics_enabled=False) as demo:  # no network
        gr.Markdown("# DeepSeek-style image captioner\nA timm encoder and an MLA + DeepSeekMoE + MTP "
                    f"language model. Model: `{cap.path or 'random weights'}`.")
        if untrained:
            gr.Markdown(UNTRAINED_NOTICE, elem_id="untrained-notice")
        options = decoding_controls()
        with gr.Tab("Caption"):
            with gr.Row():
                with gr.Column():
                    image = ImageInput(type="filepath", image_mode=None, sources=["upload", "clipboard", "webcam"],
                                       label="Image", elem_id="image-input")
                    task = gr.Dropdown(cap.tasks, value=cap.tasks[0], label="Task")
                    run = gr.Button("Caption", variant="primary", elem_id="caption-button")
                with gr.Column():
                    text = gr.Textbox(label="Text", lines=4, interactive=False, elem_id="caption-output")
                    stats = gr.Markdown(elem_id="caption-stats")
                    routing = gr.Plot(label="Routing", show_label=False)
            rows, labels = _examples()
            if rows:
                gr.Examples(rows, [image, task], example_labels=labels, cache_examples=False)
            run.click(shell.stream, [image, task, *options], [text, stats, routing], api_name="caption_stream")
            api_button = gr.Button(visible=False)
            api_button.click(shell.caption, [image, task, *options], text, api_name="caption")
        with gr.Tab("Batch"):
            files = gr.File(file_count="multiple", file_types=["image"], label="Images")
            batch_task = gr.Dropdown(cap.tasks, value=cap.tasks[0], label="Task")
            batch_run = gr.Button("Caption all", variant="primary")
            summary = gr.Markdown()
            table = gr.Dataframe(headers=["file", "caption", "confidence", "unfamiliar", "error"], label="Captions",
                                 interactive=False)
            with gr.Row():
                csv_file, jsonl_file = gr.File(label="CSV"), gr.File(label="JSONL")
            batch_run.click(shell.batch, [files, batch_task, *options], [table, summary, csv_file, jsonl_file],
                            api_name="caption_batch")
    return demo


def untrained_captioner(device: str = "cpu", num_hidden_layers: int | None = None, seed: int = 0) -> Captioner:
    """The `tiny` preset with random weights: what the demo serves before a model is trained."""
    from mm.config import DEFAULT_TASKS, preset
    from mm.model import CaptionModel
    from mm.tokenizer import Tokenizer

    texts = [*DEFAULT_TASKS.values(), "a large red circle and a small blue square",
             "There is one shape on a white background.", "一个大的红色圆形、一个小的蓝色正方形"]
    tokenizer = Tokenizer.train(texts, vocab_size=300)
    cfg = preset("tiny")
    lm_cfg = cfg.lm.replace(vocab_size=tokenizer.vocab_size, num_hidden_layers=num_hidden_layers or cfg.lm.num_hidden_layers)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
        torch.manual_seed(seed)
        model = CaptionModel(cfg.replace(lm=lm_cfg), image_token_id=tokenizer.image_id)
    return Captioner(model.to(device), tokenizer, device=device)


def load_captioner(checkpoint=None, device=None) -> tuple[Captioner, bool]:
    """(captioner, untrained): the given checkpoint, else the default model, else random weights."""
    if checkpoint is None and not (DEFAULT_MODEL_DIR / "config.json").is_file():
        print(f"no trained default model in {DEFAULT_MODEL_DIR}: serving an UNTRAINED model "
              "(train one with `make default-model`)", file=sys.stderr)
        return untrained_captioner(device or ("cuda" if torch.cuda.is_available() else "cpu")), True
    return Captioner.from_pretrained(checkpoint, device=device), False


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together in one batch")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests; past this the server says busy")
    p.add_argument("--compile", action="store_true", help="compile the decode step (torch.compile; see README)")


def serve(cap: Captioner, untrained: bool = False, host: str = "127.0.0.1", port: int = 7860,
          max_batch: int = 32, max_queue: int = 256, block: bool = True, quiet: bool = False):
    """Start the engine, the page and the HTTP API on host:port -> (demo, engine, url); with
    block, serve until interrupted and then stop both."""
    engine = Engine(cap, max_batch=max_batch, max_queue=max_queue, max_new_tokens=MAX_NEW_TOKENS)
    # Handlers only wait on the engine, so Gradio may run as many at once as the engine queues.
    demo = build_demo(cap, engine, untrained).queue(default_concurrency_limit=max_batch + max_queue,
                                                    max_size=max_queue)
    try:
        _, url, _ = demo.launch(server_name=host, server_port=port, show_error=True, max_file_size="50mb",
                                ssr_mode=False, prevent_thread_lock=True, quiet=quiet,
                                max_threads=max(40, 2 * max_batch))
    except BaseException:  # e.g. the port is taken: the engine's loop must not outlive the server
        engine.close()
        raise
    demo.app.include_router(router(engine, model_id(cap)))
    if not block:
        return demo, engine, url
    try:
        demo.block_thread()
    finally:
        engine.close()
    return demo, engine, url


def check_options(args) -> None:
    """Refuse server options that cannot work, before the model loads: a batch of 0 rows never
    admits a request, a queue of 0 is unbounded, and a port outside 1..65535 cannot be bound."""
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")


def run(args) -> int:
    try:
        check_options(args)
        cap, untrained = load_captioner(args.checkpoint, args.device)
        if args.compile:
            cap.compile()
    except (OSError, ValueError) as e:  # a missing or mismatched checkpoint names its path
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        serve(cap, untrained, args.host, args.port, args.max_batch, args.max_queue)
    except OSError as e:  # the port is taken, or the host is not this machine's
        print(f"error: cannot serve on {args.host}:{args.port} ({e})", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="app.py", description="serve the captioner in the browser")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
