"""Text generation over the MLA latent cache: greedy, sampling, beam search, MTP speculation.

Every decoder here prefills `<bos> <image>*N <prompt>` once into an `lm.KVCache` (which
holds only the KV latent and the rope key per token) and then feeds one token per row
per step. Rows of a batch share the prompt length (one task per call), so no padding
is needed; finished rows keep emitting `<eos>` until every row is done.

Self-speculative decoding (greedy only) uses the MTP module as the drafter: the main
model's last hidden state and the embedding of the token it just chose give a draft of
the token after that; one main forward over [token, draft] both verifies the draft and
yields the following token, so an accepted draft produces two tokens per forward. With
`draft_tokens` N > 1 the MTP module is chained on itself (its output hidden state and the
embedding of its last draft give the next draft), and one forward over [token, N drafts]
verifies them all. A module trained one step ahead only drafts the later tokens less
well; one trained on the chain (the LM's `mtp_depths`, see `mm finetune --stage mtp`)
sets the default N. The output is token-for-token that of plain greedy decoding either way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

import lm
from mm.confidence import chosen_logprob, confidence


@dataclass(frozen=True)
class Limit:
    """An option's range: lo..hi, either end open (excluded) or absent. The one statement of each
    option's limits: `GenerationConfig.validate`, the HTTP request model and the page's sliders
    all read it."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""  # shown after the range, e.g. "(0 = greedy)"

    def __contains__(self, v) -> bool:
        above = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        below = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return above and below

    @property
    def text(self) -> str:
        """How messages state the range: `in 1..4096`, `in (0, 1]`, `>= 0`."""
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_shown(self.lo)}"
        if self.lo_open or self.hi_open:
            return f"in {'(' if self.lo_open else '['}{_shown(self.lo)}, {_shown(self.hi)}{')' if self.hi_open else ']'}"
        return f"in {_shown(self.lo)}..{_shown(self.hi)}"

    @property
    def stated(self) -> str:
        """The range and its note, as a message states them: "in 0..100 (0 = greedy)"."""
        return f"{self.text} {self.note}" if self.note else self.text

    def bounds(self) -> dict:
        """As pydantic's / annotated-types' field constraints: ge/gt/le/lt."""
        out = {}
        if self.lo is not None:
            out["gt" if self.lo_open else "ge"] = self.lo
        if self.hi is not None:
            out["lt" if self.hi_open else "le"] = self.hi
        return out


def _shown(v) -> str:
    """2**64 - 1 reads better than its 20 digits."""
    if isinstance(v, int) and v > 2**32 and (v + 1) & v == 0:
        return f"2**{v.bit_length()}-1"
    return str(v)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    num_beams: int = 1
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # over the tokens generated so far (CTRL-style)
    length_penalty: float = 1.0  # beam search: score / length ** length_penalty
    speculative: bool = False  # MTP drafts; used when decoding is greedy and the model has MTP
    draft_tokens: int | None = None  # drafts per verification, chaining the MTP module beyond 1;
    #                                  None: the model's trained chain (lm mtp_depths), else 1
    seed: int | None = None

    INTS = ("max_new_tokens", "min_new_tokens", "num_beams", "top_k")
    OPTIONAL_INTS = ("draft_tokens", "seed")
    FLOATS = ("temperature", "top_p", "repetition_penalty", "length_penalty")
    # Every option's range, stated once (min_new_tokens is bounded by max_new_tokens: in validate).
    LIMITS = {
        "max_new_tokens": Limit(1, 4096),
        "num_beams": Limit(1, 16),
        "temperature": Limit(0, 100, note="(0 = greedy)"),
        "top_p": Limit(0, 1, lo_open=True),
        "top_k": Limit(0),
        "repetition_penalty": Limit(0, 100, lo_open=True),
        "length_penalty": Limit(-100, 100),
        "draft_tokens": Limit(1, 8),
        "seed": Limit(0, 2**64 - 1),
    }

    def validate(self):
        """Check every option's type and range; raises lm.ConfigError (a ValueError) naming each bad one."""
        problems = self._type_problems()
        if problems:  # ranges compare numbers: only meaningful once the types are right
            raise lm.ConfigError("; ".join(problems))
        problems = []
        for name, limit in self.LIMITS.items():
            value = getattr(self, name)
            if value is not None and value not in limit:
                problems.append(f"{name} must be {limit.stated}, got {value!r}")
        if self.min_new_tokens not in Limit(0, self.max_new_tokens):
            problems.append(f"min_new_tokens must be in 0..max_new_tokens, got {self.min_new_tokens!r}")
        if self.num_beams > 1 and self.temperature > 0:
            problems.append("beam search is deterministic: use temperature 0 with num_beams > 1")
        if problems:
            raise lm.ConfigError("; ".join(problems))
        return self

    def _type_problems(self) -> list[str]:
        """Options of the wrong type (a string "5", 2.5 for a count, NaN), by name."""
        import math

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v):
            return is_int(v) or (isinstance(v, float) and math.isfinite(v))

        values = {k: getattr(self, k) for k in self.INTS + self.OPTIONAL_INTS + self.FLOATS}
        problems = [f"{k} must be an integer, got {values[k]!r}" for k in self.INTS if not is_int(values[k])]
        problems += [f"{k} must be an integer or None, got {values[k]!r}" for k in self.OPTIONAL_INTS
                     if values[k] is not None and not is_int(values[k])]
        problems += [f"{k} must be a finite number, got {values[k]!r}" for k in self.FLOATS
                     if not is_number(values[k])]
        if not isinstance(self.speculative, bool):
            problems.append(f"speculative must be true or false, got {self.speculative!r}")
        return problems

    def drafts(self, model) -> int:
        """Draft tokens per verification: the option, else the depth the MTP was trained to."""
        return self.draft_tokens or max(model.cfg.lm.mtp_depths, 1)

    def uses_speculation(self, model) -> bool:
        return (self.speculative and self.num_beams == 1 and self.temperature == 0
                and self.repetition_penalty == 1.0 and model.cfg.lm.num_nextn_predict_layers > 0)


@dataclass
class GenerationStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    new_tokens: int = 0  # tokens produced over all rows (up to and including <eos>)
    rows: int = 0  # sequences decoded
    forwards: int = 0  # per-sequence main-model forward passes after the prefill
    drafts: int = 0
    accepted: int = 0
    speculative: bool = False
    expert_load: list = field(default_factory=list)  # [moe layer][expert] tokens routed
    confidence: list = field(default_factory=list)  # per sequence, in order (mm/confidence.py)

    def add(self, other: GenerationStats) -> GenerationStats:
        """Fold another call's stats (of the same model) into these."""
        for name in ("prefill_s", "decode_s", "new_tokens", "rows", "forwards", "drafts", "accepted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.speculative = self.speculative or other.speculative
        if not self.expert_load:
            self.expert_load = [list(layer) for layer in other.expert_load]
        else:
            self.expert_load = [[a + b for a, b in zip(x, y)] for x, y in zip(self.expert_load, other.expert_load)]
        self.confidence = self.confidence + other.confidence
        return self

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafts if self.drafts else None

    @property
    def tokens_per_forward(self) -> float | None:
        steps = self.forwards + self.rows  # each prefill yields a sequence's first token
        return self.new_tokens / steps if self.new_tokens else None


class Reference:
    """Decoding through `Transformer.forward` and its cache `length` (the reference absorbed
    path), with `lm.Decoder`'s interface: the oracle of the generation tests and the
    baseline of the benchmarks. Writing at a position first crops the layer back to it."""

    compiled = False

    def __init__(self, model: lm.Transformer):
        self.lm = model

    def embed(self, ids):
        return self.lm.embed(ids)

    def new_cache(self, batch_size, max_len):
        return self.lm.new_cache(batch_size, max_len)

    def forward(self, embeds, cache, positions, bound=None, last_only=False, compiled=True):
        start = int(positions[0, 0])
        for i in range(cache.n_main):
            cache.layer(i).crop(start)
        out = self.lm(inputs_embeds=embeds, cache=cache, return_hidden=True)
        return lm.DecodeOutput(out.logits[:, -1:] if last_only else out.logits, out.hidden,
                               out.expert_counts if out.expert_counts is not None
                               else embeds.new_zeros(0, embeds.shape[0], 0))

    __call__ = forward

    def mtp_step(self, k, hidden_prev, embeds_ahead, cache, positions, bound=None, compiled=True):
        cache.mtp_layer(k).crop(int(positions[0, 0]))
        return self.lm.mtp_step(k, hidden_prev, embeds_ahead, cache=cache)


class _Session:
    """Shared plumbing: the prefill, steps at the rows' next position, and the expert-load tally.

    Rows share the prompt length (one task per call), so one position counter serves all;
    positions come from one preallocated range and the expert load is summed on the device,
    as are the log-probabilities of the tokens each row writes (its confidence).
    """

    def __init__(self, model, decoder, images, prefix_ids, max_len, stats):
        self.model, self.dec, self.stats = model, decoder, stats
        t0 = time.perf_counter()
        image_embeds, self.familiarity = model.encode(images)
        embeds = model.embed(prefix_ids, image_embeds)
        b, n = prefix_ids.shape
        self.logprob = torch.zeros(b, device=prefix_ids.device)  # sum over each row's tokens
        self.written = torch.zeros(b, device=prefix_ids.device)  # tokens counted in it
        if decoder.compiled:  # a compiled step attends the whole buffer: sizes in
            max_len = -(-max_len // 64) * 64     # steps of 64 let tasks and lengths share its graph
        self.cache = decoder.new_cache(b, max_len)
        self.positions = torch.arange(self.cache.max_len, device=prefix_ids.device)
        self.out = decoder(embeds, self.cache, self.positions[:n].expand(b, n), bound=n, last_only=True,
                           compiled=False)
        self.pos = n  # the next position of every row
        self.embeds = embeds
        self.load = self.out.counts.sum(1).double()
        stats.rows += b
        stats.prefill_s = time.perf_counter() - t0

    def step(self, ids: torch.Tensor, active: int | None = None):
        """Feed ids [B, n] at the next positions; returns their DecodeOutput. `active` rows are counted."""
        b, n = ids.shape
        self.out = self.dec(self.dec.embed(ids), self.cache, self.positions[self.pos:self.pos + n].expand(b, n),
                            bound=self.bound(self.pos + n))
        self.pos += n
        self.stats.forwards += b if active is None else active
        self.load += self.out.counts.sum(1)
        return self.out

    def bound(self, end: int) -> int:
        """Cache slots attended by a step whose last position is end - 1: exactly those, or the
        whole buffer for a compiled step, whose shapes must not change as the sequence grows."""
        return self.cache.max_len if self.dec.compiled else end

    def score(self, logits: torch.Tensor, tokens: torch.Tensor, live: torch.Tensor | None = None):
        """Count tokens [B] (or [B, n]) chosen from logits [B, V] ([B, n, V]) in each row's
        confidence; `live` [B] masks rows that have ended."""
        lp = chosen_logprob(logits, tokens)
        if lp.dim() == 2:
            lp, n = lp.sum(1), lp.shape[1]
        else:
            n = 1
        if live is not None:
            lp, n = lp * live, live * n
        self.logprob += lp
        self.written += n

    def finish(self, mean_logprob: torch.Tensor | None = None):
        """Record the expert load and each row's confidence (from `score`, or the given mean log-probs)."""
        self.stats.expert_load = self.load.tolist()
        if mean_logprob is None:
            mean_logprob = self.logprob / self.written.clamp(min=1)
        self.stats.confidence = confidence(mean_logprob, self.familiarity).tolist()


def _process(logits, generated, step, gen: GenerationConfig, eos_id):
    """Apply repetition penalty and the min-length rule to next-token logits [B, V] (fp32)."""
    logits = logits.float()
    if gen.repetition_penalty != 1.0 and generated.shape[1]:
        prev = logits.gather(1, generated)
        prev = torch.where(prev > 0, prev / gen.repetition_penalty, prev * gen.repetition_penalty)
        logits = logits.scatter(1, generated, prev)
    if step < gen.min_new_tokens:
        logits[:, eos_id] = float("-inf")
    return logits


MIN_TEMPERATURE = 1e-4  # below it logits / T can overflow to inf (nan probabilities); it samples the argmax anyway


def _choose(logits, gen: GenerationConfig, rng):
    if gen.temperature == 0:
        return logits.argmax(-1)
    logits = logits / max(gen.temperature, MIN_TEMPERATURE)
    if gen.top_k:
        kth = logits.topk(min(gen.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gen.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= gen.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=rng).squeeze(1)


def _rng(gen, device):
    if gen.temperature == 0:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(gen.seed if gen.seed is not None else torch.seed())
    return g


def stream_tokens(model, images, prefix_ids, gen: GenerationConfig, eos_id: int,
                  stats: GenerationStats, decoder=None) -> Iterator[list[list[int]]]:
    """Yield, step by step, the new token ids of each row (empty once a row has ended).

    `decoder`: an `lm.Decoder` of model.lm (built here when None) or a `Reference`.
    The tokens leaving the device are the only host synchronisation of a step.
    """
    decoder = decoder if decoder is not None else lm.Decoder(model.lm)
    if gen.uses_speculation(model):
        if images.shape[0] != 1:
            raise ValueError("speculative streaming takes one image at a time")
        yield from _speculative(model, decoder, images, prefix_ids, gen, eos_id, stats)
        return
    B = prefix_ids.shape[0]
    s = _Session(model, decoder, images, prefix_ids, prefix_ids.shape[1] + gen.max_new_tokens, stats)
    rng = _rng(gen, prefix_ids.device)
    generated = prefix_ids.new_zeros(B, 0)
    done = torch.zeros(B, dtype=torch.bool, device=prefix_ids.device)
    ended = [False] * B
    t0 = time.perf_counter()
    for step in range(gen.max_new_tokens):
        logits = s.out.logits[:, -1]
        nxt = _choose(_process(logits, generated, step, gen, eos_id), gen, rng)
        nxt = torch.where(done, eos_id, nxt)
        s.score(logits, nxt, ~done)
        toks = nxt.tolist()
        yield [[] if e else [t] for e, t in zip(ended, toks)]
        stats.new_tokens += ended.count(False)
        ended = [e or t == eos_id for e, t in zip(ended, toks)]
        if all(ended) or step == gen.max_new_tokens - 1:
            break
        generated = torch.cat([generated, nxt[:, None]], 1)
        done |= nxt == eos_id
        s.step(nxt[:, None], active=ended.count(False))
    stats.decode_s = time.perf_counter() - t0
    s.finish()


def _speculative(model, decoder, images, prefix_ids, gen, eos_id, stats):
    stats.speculative = True
    k = gen.drafts(model)
    s = _Session(model, decoder, images, prefix_ids, prefix_ids.shape[1] + gen.max_new_tokens + k + 1, stats)
    t0 = time.perf_counter()
    tok = int(s.out.logits[0, -1].argmax())
    s.score(s.out.logits[:, -1], prefix_ids.new_tensor([tok]))
    produced = 1
    yield [[tok]]
    pos = s.positions[None]

    def draft(hidden, ahead, start, compiled=True):  # MTP positions start .. start + n - 1
        end = start + hidden.shape[1]
        return decoder.mtp_step(1, hidden, ahead, s.cache, pos[:, start:end], bound=s.bound(end),
                                compiled=compiled)

    # The MTP module over the whole prefix: position i sees h_i and the embedding of token i+1.
    new, hidden = [tok], s.out.hidden
    ahead = torch.cat([s.embeds[:, 1:], decoder.embed(prefix_ids.new_tensor([new]))], 1)
    first = True
    while tok != eos_id and produced < gen.max_new_tokens:
        committed = s.pos  # main-model positions holding accepted tokens; `tok` goes next
        # (re)compute the MTP positions whose inputs `hidden` holds; the first, over the
        # prefix, has a shape of its own and stays eager under compilation
        logits, h = draft(hidden, ahead, committed - hidden.shape[1], compiled=not first)
        first = False
        drafts = [int(logits[0, -1].argmax())]
        for j in range(k - 1):  # chained drafts: the MTP module reads its own last hidden state
            logits, h = draft(h[:, -1:], decoder.embed(prefix_ids.new_tensor([drafts[-1:]])), committed + j)
            drafts.append(int(logits[0, -1].argmax()))
        out = s.step(prefix_ids.new_tensor([[tok] + drafts]))
        best = out.logits[0].argmax(-1).tolist()
        accepted = 0
        while accepted < k and drafts[accepted] == best[accepted]:
            accepted += 1
        new = drafts[:accepted] + [best[accepted]]
        s.pos = committed + accepted + 1  # the main model keeps tok and the accepted drafts
        if eos_id in new:
            new = new[: new.index(eos_id) + 1]
        new = new[: gen.max_new_tokens - produced]
        s.score(out.logits[:, : len(new)], prefix_ids.new_tensor([new]))  # new[i] was read at logits i
        stats.drafts += k
        stats.accepted += min(accepted, len(new))  # drafts past <eos> or the length limit do not count
        produced += len(new)
        tok = new[-1]
        yield [new]
        # The chain left MTP cache entries for positions committed .. committed + k - 2, built
        # from drafts d1 .. d(k-1); those whose draft was accepted hold the right token and
        # stay (their hidden input was the MTP's own, not the main model's: only the next
        # drafts can differ, never the output). The rest are recomputed from the main model.
        keep = min(accepted, k - 1, len(new) - 1)
        ahead = decoder.embed(prefix_ids.new_tensor([new[keep:]]))
        hidden = out.hidden[:, keep: len(new)]
    stats.new_tokens += produced
    stats.decode_s = time.perf_counter() - t0
    s.finish()


def beam_search(model, images, prefix_ids, gen: GenerationConfig, eos_id: int,
                stats: GenerationStats, decoder=None) -> list[list[int]]:
    """Beam search; a finished beam keeps its score and only extends with <eos> at no cost."""
    decoder = decoder if decoder is not None else lm.Decoder(model.lm)
    B, K = prefix_ids.shape[0], gen.num_beams
    s = _Session(model, decoder, images, prefix_ids, prefix_ids.shape[1] + gen.max_new_tokens, stats)
    t0 = time.perf_counter()
    s.cache.reorder(torch.arange(B, device=prefix_ids.device).repeat_interleave(K))
    logits = s.out.logits[:, -1].repeat_interleave(K, 0)
    scores = torch.full((B, K), float("-inf"), device=logits.device)
    scores[:, 0] = 0.0
    seqs = prefix_ids.new_zeros(B * K, 0)
    lengths = torch.zeros(B * K, device=logits.device)
    for step in range(gen.max_new_tokens):
        logp = _process(logits, seqs, step, gen, eos_id).log_softmax(-1)
        ended = seqs[:, -1] == eos_id if seqs.shape[1] else torch.zeros_like(lengths, dtype=torch.bool)
        logp[ended] = float("-inf")
        logp[ended, eos_id] = 0.0
        V = logp.shape[-1]
        total = (scores.view(-1, 1) + logp).view(B, K * V)
        scores, flat = total.topk(K, dim=-1)
        beam = torch.div(flat, V, rounding_mode="floor") + torch.arange(B, device=flat.device)[:, None] * K
        beam, tok = beam.view(-1), (flat % V).view(-1)
        was_ended = ended[beam]
        seqs = torch.cat([seqs[beam], tok[:, None]], 1)
        lengths = lengths[beam] + (~was_ended).float()
        stats.new_tokens += int((~was_ended).sum())
        if bool((tok == eos_id).all()):
            break
        s.cache.reorder(beam)
        logits = s.step(tok[:, None]).logits[:, -1]
    stats.decode_s = time.perf_counter() - t0
    norm = scores.view(-1) / lengths.clamp(min=1) ** gen.length_penalty
    best = norm.view(B, K).argmax(-1) + torch.arange(B, device=norm.device) * K
    s.finish(scores.view(-1)[best] / lengths[best].clamp(min=1))  # the beam's mean log-prob per token
    results = []
    for row in seqs[best].tolist():
        results.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    stats.new_tokens = sum(len(r) for r in results)
    return results


@torch.inference_mode()
def generate(model, images, prefix_ids, gen: GenerationConfig, eos_id: int, decoder=None):
    """Token ids per row (ending with <eos> unless max_new_tokens cut them) and the stats.

    `decoder`: an `lm.Decoder` of model.lm (built here when None; a Captioner keeps one)
    or `Reference(model.lm)` for the reference path."""
    gen.validate()
    decoder = decoder if decoder is not None else lm.Decoder(model.lm)
    stats = GenerationStats()
    if gen.num_beams > 1:
        return beam_search(model, images, prefix_ids, gen, eos_id, stats, decoder), stats
    if gen.uses_speculation(model) and images.shape[0] > 1:
        # Acceptance differs per row, so speculation decodes the rows one at a time.
        rows = [generate(model, images[i : i + 1], prefix_ids[i : i + 1], gen, eos_id, decoder)
                for i in range(len(images))]
        merged = GenerationStats()
        for _, st in rows:
            merged.add(st)
        return [r[0][0] for r in rows], merged
    out = [[] for _ in range(prefix_ids.shape[0])]
    for step in stream_tokens(model, images, prefix_ids, gen, eos_id, stats, decoder):
        for row, new in zip(out, step):
            row.extend(new)
    return out, stats
