"""Continuous batching: one loop owns the model and serves every request in one running batch.

Requests (image, task, decoding options) are checked and preprocessed on the caller's
thread and wait in a bounded queue; past its limit `submit` refuses with `EngineBusy`,
never dropping a request silently. At each step boundary the loop

1. drops cancelled requests, and runs beam-search requests as their own group (beams
   reorder the cache, so they do not share the running batch), as well as a speculative
   request that arrives alone;
2. admits waiting requests: their images are encoded and their prompts prefilled
   together (one task per prefill, since a task fixes the prompt length), the rows are
   copied into free rows of the engine's cache, and each request's first token chosen;
3. runs ONE decode forward over all running rows (`lm.Decoder` with per-row positions:
   rows of different tasks, lengths and ages share the batch), chooses each row's next
   token with its own options (greedy, or sampling with its own temperature, top-p,
   repetition penalty and seeded generator), streams it, and retires finished rows at
   once, moving the last running row into the hole so the running rows stay 0..n-1.

A row's tokens are exactly what `Captioner.caption` gives for the same image and options:
the same prefill, the same decode forward and the same choice functions (mm/generate.py),
only batched. A speculative (MTP) request runs with its drafts while it is the only request
(a lone user gets the speculative speed-up, as deep as the captioner's DraftPolicy has
found fastest for its task) and otherwise as a plain greedy row, which speculation
reproduces token for token anyway; in a shared batch drafts only add work.
Each request gets its own stats, expert load included, from the per-row routing counts
that every forward returns.

A request is read from a thread (`stream`, `result`) or from an event loop (`astream`,
`aresult`, which hold no thread while they wait). A failed forward fails only its requests;
if the loop itself ends, for any reason and any exception type, every request in flight or
queued, and every later `submit`, fails with `EngineClosed` saying why: nothing waits forever.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from mm.captioner import Captioner, CaptionText
from mm.confidence import chosen_logprob, confidence
from mm.generate import GenerationConfig, GenerationStats, generate, stream_tokens
from mm.sampling import choose, is_plain_greedy, make_rng, process
from vision.preprocess import load_image


class EngineBusy(RuntimeError):
    """The queue is full: the request was refused, not dropped. Try again later."""


class EngineClosed(RuntimeError):
    """The engine has stopped."""


class Cancelled(RuntimeError):
    """The request was cancelled before it finished."""


@dataclass
class RequestResult:
    text: str
    tokens: list[int]
    stats: GenerationStats
    queued_s: float  # waiting for a row
    latency_s: float  # submit -> last token


@dataclass(eq=False)  # a request is itself, not its fields: compared and hashed by identity
class Request:
    """A submitted caption: read it with `stream()` (text pieces) or `result()`; `cancel()` frees its row."""

    id: int
    task: str
    gen: GenerationConfig
    pixels: torch.Tensor | None
    submitted: float = field(default_factory=time.perf_counter)
    _events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _result: RequestResult | BaseException | None = None
    _wakers: list = field(default_factory=list, repr=False)  # (event loop, asyncio.Event) of async readers

    def cancel(self) -> None:
        self._cancelled.set()

    def _put(self, event: tuple) -> None:
        """The engine's side: one event, ("piece", text) or ("done", result or error), and a wake-up
        for async readers."""
        self._events.put(event)
        for loop, ready in list(self._wakers):
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # that reader's loop has closed: nobody is waiting there
                pass

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        """Text pieces as they are generated; raises what the request failed with."""
        while True:
            kind, value = self._events.get(timeout=timeout)
            if kind == "piece":
                yield value
            else:
                self._result = value
                self._outcome()
                return

    def result(self, timeout: float | None = None) -> RequestResult:
        if self._result is None:
            for _ in self.stream(timeout):
                pass
        return self._outcome()

    def _outcome(self) -> RequestResult:
        """The finished request's result; raises what it failed with."""
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result

    async def astream(self):
        """`stream()` for an event loop: awaits each piece without holding a thread, so a server
        can keep any number of waiting requests on one loop."""
        ready = asyncio.Event()
        waker = (asyncio.get_running_loop(), ready)
        self._wakers.append(waker)
        try:
            while True:
                try:
                    kind, value = self._events.get_nowait()
                except queue.Empty:  # `_put` sets `ready` after every event, so none is missed
                    await ready.wait()
                    ready.clear()
                    continue
                if kind == "piece":
                    yield value
                    continue
                self._result = value
                self._outcome()
                return
        finally:
            self._wakers.remove(waker)

    async def aresult(self) -> RequestResult:
        if self._result is None:
            async for _ in self.astream():
                pass
        return self._outcome()


class _Row:
    """A running request's decoding state."""

    def __init__(self, req: Request, tokenizer, pos: int, load: torch.Tensor, prefill_s: float,
                 familiarity: float | None):
        self.req, self.pos = req, pos  # pos: where the next token goes
        self.familiarity, self.logprob = familiarity, 0.0  # for its confidence (mm/confidence.py)
        self.gen = req.gen
        self.rng = make_rng(req.gen, load.device)
        self.tokens: list[int] = []
        self.text = CaptionText(tokenizer)
        self.load = load  # [moe layers, E] on the device
        self.stats = GenerationStats(prefill_s=prefill_s, rows=1)
        self.started = time.perf_counter()

    @property
    def plain_greedy(self) -> bool:
        return is_plain_greedy(self.gen, len(self.tokens))


class Engine:
    """The continuous-batching loop over a Captioner's model (see the module docstring)."""

    def __init__(self, captioner: Captioner, max_batch: int = 32, max_queue: int = 256,
                 max_new_tokens: int = 256):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("max_new_tokens", max_new_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                # a batch of 0 rows never admits anyone, and queue.Queue(0) is unbounded
                raise ValueError(f"Engine: {name} must be a whole number >= 1, got {value!r}")
        self.cap, self.model, self.dec = captioner, captioner.model, captioner.decoder
        self.tok = captioner.tokenizer
        self.max_batch, self.max_new_tokens = max_batch, max_new_tokens
        self.prefix = {t: captioner.prefix(t)[0] for t in captioner.tasks}
        longest = max(len(p) for p in self.prefix.values())
        self.cache = self.dec.new_cache(max_batch, longest + max_new_tokens)
        self.rows: list[_Row] = []
        self.waiting: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._closing = threading.Lock()
        self._stopped_by = "the engine has stopped"
        self._taken: list[Request] = []  # taken from the queue by the current iteration
        self._thread = threading.Thread(target=self._loop, name="mm-engine", daemon=True)
        self._thread.start()

    # --- the caller's side ----------------------------------------------------------------

    def submit(self, image, task: str = "caption", **options) -> Request:
        """Queue one image; bad options, task or image raise here, on the caller's thread."""
        if self._stop.is_set():
            raise EngineClosed(self._stopped_by)
        gen = self.cap.generation_config(**options)
        if gen.max_new_tokens > self.max_new_tokens:
            raise ValueError(f"max_new_tokens must be at most {self.max_new_tokens} here, got {gen.max_new_tokens}")
        self.model.cfg.prompt(task)  # an unknown task names the known ones
        pixels = self.cap.transform(load_image(image))
        req = Request(next(self._ids), task, gen, pixels)
        with self._closing:
            if self._stop.is_set():
                raise EngineClosed(self._stopped_by)
            try:
                self.waiting.put_nowait(req)
            except queue.Full:
                raise EngineBusy(f"busy: {self.waiting.maxsize} requests are already waiting; try again "
                                 "shortly") from None
        return req

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def busy_rows(self) -> int:
        return len(self.rows)

    # --- the loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        stopped_by: BaseException | None = None
        try:
            while not self._stop.is_set():
                self._taken = []
                try:
                    with torch.inference_mode():
                        self._iteration()
                except Exception as e:  # a failed forward fails its requests, never the server
                    self._fail_running(e)
        except BaseException as e:  # anything else ends the loop; below, nobody is left waiting
            stopped_by = e
            print(f"mm engine: stopped by {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            self._shut(stopped_by)

    def _fail_running(self, error: BaseException) -> None:
        for req in dict.fromkeys([r.req for r in self.rows] + self._taken):
            req._put(("done", error))
        self.rows.clear()

    def _shut(self, cause: BaseException | None) -> None:
        """Refuse new requests and fail every one not finished: the loop that would serve them is gone."""
        why = "the engine has stopped" + (f" ({type(cause).__name__}: {cause})" if cause is not None else "")
        with self._closing:  # no submit slips into the queue after it was emptied
            self._stopped_by = why
            self._stop.set()
        self._fail_running(EngineClosed(f"{why} before this request finished"))
        while not self.waiting.empty():
            self.waiting.get_nowait()._put(("done", EngineClosed(why)))

    def _iteration(self) -> None:
        self._retire([r for r in self.rows if r.req.cancelled], Cancelled("cancelled"))
        new = self._taken = self._take(block=not self.rows)
        # Beams run as their own group; a speculative request runs alone while it IS alone
        # (nothing running, nothing else arriving), and as a plain greedy row under load.
        alone = [r for r in new if r.gen.num_beams > 1 or (len(new) == 1 and not self.rows
                                                           and r.gen.uses_speculation(self.model))]
        for req in alone:
            self._run_alone(req)
        new = [r for r in new if r not in alone]
        if new:
            self._admit(new)
        if self.rows:
            self._step()

    def _take(self, block: bool) -> list[Request]:
        """Waiting requests for the free rows; waits a little for the first when idle."""
        out = []
        while len(self.rows) + len(out) < self.max_batch:
            try:
                req = self.waiting.get(timeout=0.05) if block and not out else self.waiting.get_nowait()
            except queue.Empty:
                break
            if req.cancelled:
                req._put(("done", Cancelled("cancelled")))
            else:
                out.append(req)
        return out

    def _run_alone(self, req: Request) -> None:
        """Beam search or MTP speculation, decoded whole between two steps of the batch. Beams
        arrive at the end; speculation streams per verification round."""
        t0 = time.perf_counter()
        param = next(self.model.parameters())
        pixels = req.pixels[None].to(device=param.device, dtype=param.dtype)
        prefix = self.prefix[req.task][None].to(param.device)
        if req.gen.num_beams > 1:
            ids, stats = generate(self.model, pixels, prefix, req.gen, self.tok.eos_id, self.dec)
            tokens = ids[0]
            req._put(("piece", self.tok.decode(tokens).strip()))
        else:
            stats, text, tokens = GenerationStats(), CaptionText(self.tok), []
            for step in stream_tokens(self.model, pixels, prefix, req.gen, self.tok.eos_id, stats, self.dec,
                                      self.cap.draft_policy):
                if req.cancelled:
                    req._put(("done", Cancelled("cancelled")))
                    return
                tokens += step[0]
                if piece := "".join(text.push(t) for t in step[0]):
                    req._put(("piece", piece))
            if tail := text.flush():
                req._put(("piece", tail))
        req._put(("done", RequestResult(self.tok.decode(tokens).strip(), tokens, stats, t0 - req.submitted,
                                               time.perf_counter() - req.submitted)))

    def _admit(self, reqs: list[Request]) -> None:
        """Encode and prefill new requests together and give each a row. Prompts of different
        tasks differ in length: shorter ones are padded at the end, where causal attention
        keeps the padding out of every real token's view and decoding later overwrites it."""
        t0 = time.perf_counter()
        param = next(self.model.parameters())
        dev = param.device
        lengths = [len(self.prefix[r.task]) for r in reqs]
        n, m = max(lengths), len(reqs)
        prefix = torch.full((m, n), self.tok.eos_id, dtype=torch.long, device=dev)
        for i, r in enumerate(reqs):
            prefix[i, : lengths[i]] = self.prefix[r.task]
        pixels = torch.stack([r.pixels for r in reqs]).to(device=dev, dtype=param.dtype)
        image_embeds, familiarity = self.model.encode(pixels)
        familiarity = familiarity.tolist() if familiarity is not None else [None] * m
        embeds = self.model.embed(prefix, image_embeds)
        scratch = self.dec.new_cache(m, n)
        real = torch.arange(n, device=dev) < torch.tensor(lengths, device=dev)[:, None]  # [m, n]
        out = self.dec.prefill(embeds, scratch, valid=real, last_only=False)
        first = len(self.rows)
        self.cache.copy_rows(torch.arange(first, first + m, device=dev), scratch, torch.arange(m, device=dev), n)
        last = torch.tensor(lengths, device=dev) - 1
        logits = out.logits[torch.arange(m, device=dev), last]  # each row's last real token
        counts = out.counts.double()
        prefill_s = time.perf_counter() - t0
        for i, req in enumerate(reqs):  # (the padding's routing is not counted: valid=real)
            self.rows.append(_Row(req, self.tok, lengths[i], counts[:, i], prefill_s, familiarity[i]))
        self._choose_and_emit(self.rows[first:], logits)

    def _step(self) -> None:
        dev = self.cache.layers[0].buf.device
        ids = torch.tensor([r.tokens[-1] for r in self.rows], device=dev)[:, None]
        positions = torch.tensor([r.pos for r in self.rows], device=dev)[:, None]
        # the decoder pads a compiled step's batch to a power of two with the cache's spare rows
        # (their slot 0, which admission overwrites), so a handful of graphs serve every size
        out = self.dec.step(ids, self.cache, positions)
        for i, row in enumerate(self.rows):
            row.pos += 1
            row.load += out.counts[:, i]
            row.stats.forwards += 1
        self._choose_and_emit(list(self.rows), out.logits[:, -1])

    def _choose_and_emit(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Each row's next token with its own options; stream it; retire finished rows."""
        eos = self.tok.eos_id
        chosen = logits.argmax(-1)
        special = [i for i, r in enumerate(rows) if not r.plain_greedy]
        if special:
            chosen = chosen.clone()
            for i in special:
                r = rows[i]
                generated = torch.tensor([r.tokens], dtype=torch.long, device=logits.device).view(1, -1)
                scores = process(logits[i:i + 1], generated, len(r.tokens), r.gen, eos)
                chosen[i] = choose(scores, r.gen, r.rng)[0]
        finished = []
        logprob = chosen_logprob(logits, chosen).double()
        for row, (tok, lp) in zip(rows, torch.stack([chosen.double(), logprob], 1).tolist()):  # the one sync
            tok = int(tok)
            row.logprob += lp
            row.tokens.append(tok)
            row.stats.new_tokens += 1
            if piece := row.text.push(tok):
                row.req._put(("piece", piece))
            if tok == eos or len(row.tokens) >= row.gen.max_new_tokens:
                finished.append(row)
        self._retire(finished, None)

    def _retire(self, rows: list[_Row], error: BaseException | None) -> None:
        for row in rows:
            idx = self.rows.index(row)
            last = len(self.rows) - 1
            if idx != last:  # keep the running rows at 0..n-1: the last one moves into the hole
                moved = self.rows[last]
                self.cache.copy_rows(torch.tensor([idx]), self.cache, torch.tensor([last]), moved.pos)
                self.rows[idx] = moved
            self.rows.pop()
            if error is not None:
                row.req._put(("done", error))
                continue
            if tail := row.text.flush():
                row.req._put(("piece", tail))
            now = time.perf_counter()
            row.stats.decode_s = now - row.started
            row.stats.expert_load = row.load.tolist()
            fam = None if row.familiarity is None else torch.tensor([row.familiarity])
            row.stats.confidence = confidence(torch.tensor([row.logprob / len(row.tokens)]), fam).tolist()
            text = self.tok.decode(row.tokens).strip()
            row.req._put(("done", RequestResult(text, row.tokens, row.stats,
                                                       row.started - row.stats.prefill_s - row.req.submitted,
                                                       now - row.req.submitted)))
