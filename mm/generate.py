"""Text generation over the MLA latent cache: greedy, sampling, beam search, MTP speculation.

Every decoder here prefills `<bos> <image>*N <prompt>` once into an `lm.KVCache` (which
holds only the KV latent and the rope key per token) and then feeds one token per row
per step, through the decoder's entry points (`prefill`, `step`, `draft`), which own the
shapes and the compiled graphs. Rows of a batch share the prompt length (one task per
call), so no padding is needed; finished rows keep emitting `<eos>` until every row is
done. Every token is chosen by the sampler (mm/sampling.py).

Plain and speculative decoding are one loop (`stream_tokens`); beam search is its own.
Self-speculative decoding (greedy only) uses the MTP module as the drafter: the main
model's last hidden state and the embedding of the token it just chose give a draft of
the token after that; the module chained on itself (its output hidden state and the
embedding of its last draft) gives the drafts after it, up to `draft_tokens` (default: the
chain the LM was trained on, its `mtp_depths`, see `mm finetune --stage mtp`) and only
while each draft's probability reaches DRAFT_MIN_PROB. One main forward over
[token, drafts] verifies them all and yields the token after the accepted ones, with the
same rules plain greedy decoding applies one step at a time (the minimum length
included), so the output is token-for-token that of plain greedy decoding. Where the
caller keeps a `DraftPolicy` (a Captioner does; mm/draft_policy.py) and `draft_tokens` is
not given, each task drafts as deep as has measured fastest per token on this machine:
not at all, the trained chain, or twice it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

import lm
from mm.confidence import confidence
from mm.draft_policy import MAX_DRAFTS, DraftPolicy
from mm.sampling import Sampler, process


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
        "draft_tokens": Limit(1, MAX_DRAFTS),
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
        """MTP speculation runs for greedy decoding without repetition penalty (the penalty
        would change each drafted position's logits by the drafts before it) on a model with
        an MTP module; every other option is honoured by the verification (mm.sampling.verify)."""
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
    depth: int = 0  # the most drafts a round could chain (0: no drafting; the deepest over folded calls)
    expert_load: list = field(default_factory=list)  # [moe layer][expert] tokens routed
    confidence: list = field(default_factory=list)  # per sequence, in order (mm/confidence.py)

    def add(self, other: GenerationStats) -> GenerationStats:
        """Fold another call's stats (of the same model) into these."""
        for name in ("prefill_s", "decode_s", "new_tokens", "rows", "forwards", "drafts", "accepted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.depth = max(self.depth, other.depth)
        if not self.expert_load:
            self.expert_load = [list(layer) for layer in other.expert_load]
        else:
            self.expert_load = [[a + b for a, b in zip(x, y)] for x, y in zip(self.expert_load, other.expert_load)]
        self.confidence = self.confidence + other.confidence
        return self

    @property
    def speculative(self) -> bool:
        """Whether drafts were verified (in any of the folded calls)."""
        return self.depth > 0

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafts if self.drafts else None

    @property
    def tokens_per_forward(self) -> float | None:
        steps = self.forwards + self.rows  # each prefill yields a sequence's first token
        return self.new_tokens / steps if self.new_tokens else None


DRAFT_MIN_PROB = 0.4  # the draft policy: the chain stops at a draft the MTP module gives less than this


class _Session:
    """Shared plumbing: the prefill, steps at the rows' next position, and the expert-load tally.

    Rows share the prompt length (one task per call), so one position counter serves all;
    the decoder's entry points choose the shapes (and the compiled graph) of each step.
    """

    def __init__(self, model, decoder, images, prefix_ids, max_len, stats):
        self.model, self.dec, self.stats = model, decoder, stats
        t0 = time.perf_counter()
        image_embeds, self.familiarity = model.encode(images)
        self.embeds = model.embed(prefix_ids, image_embeds)
        b, n = prefix_ids.shape
        self.cache = decoder.new_cache(b, max_len)
        self.out = decoder.prefill(self.embeds, self.cache)
        self.pos = n  # the next position of every row
        self.load = self.out.counts.sum(1).double()
        stats.rows += b
        stats.prefill_s = time.perf_counter() - t0

    def step(self, ids: torch.Tensor, active: int | None = None):
        """Feed ids [B, n] at the next positions; returns their DecodeOutput. `active` rows are counted."""
        self.out = self.dec.step(ids, self.cache, self.pos)
        self.pos += ids.shape[1]
        self.stats.forwards += ids.shape[0] if active is None else active
        self.load += self.out.counts.sum(1)
        return self.out

    def finish(self, mean_logprob: torch.Tensor):
        """Record the expert load and each row's confidence from its mean log-probability."""
        self.stats.expert_load = self.load.tolist()
        self.stats.confidence = confidence(mean_logprob, self.familiarity).tolist()


class _Drafter:
    """MTP self-speculation for one row: proposes a chain of drafts each round (the module
    over the main model's last hidden state, then over its own), stopping at `depth` drafts
    or after a draft whose probability is below DRAFT_MIN_PROB (the drafts after it are
    unlikely to be accepted, and each chained step costs a fraction of a main forward) or
    after a drafted <eos> (nothing after it is ever emitted)."""

    def __init__(self, session: _Session, first: int, depth: int, eos_id: int):
        self.s, self.dec, self.depth, self.eos_id = session, session.dec, depth, eos_id
        # The first round covers the whole prefix: position i sees h_i and the embedding of token i+1.
        self.hidden = session.out.hidden
        self.ahead = torch.cat([session.embeds[:, 1:], self.dec.embed(self._ids([first]))], 1)
        self.chained = 0

    def _ids(self, tokens: list[int]) -> torch.Tensor:
        return torch.tensor([tokens], device=self.s.embeds.device)

    def propose(self) -> list[int]:
        committed, drafts = self.s.pos, []  # main-model positions holding accepted tokens
        d = self.dec.draft(self.hidden, self.ahead, self.s.cache, committed - self.hidden.shape[1])
        self.chained = 0
        while True:  # the first draft always: verifying two tokens costs little more than one
            drafts.append(int(d.tokens[0]))
            if len(drafts) == self.depth or drafts[-1] == self.eos_id or float(d.probs[0]) < DRAFT_MIN_PROB:
                break
            d = self.dec.draft(d.hidden, self._ids(drafts[-1:]), self.s.cache, committed + self.chained)
            self.chained += 1
        return drafts

    def keep(self, out, new: list[int], accepted: int) -> None:
        """After a verification: the main model keeps the last token and the accepted drafts.
        Chain step j left the MTP cache entry of position committed + j, built from drafts[j];
        those whose draft was accepted hold the right token and stay (their hidden input was
        the module's own, not the main model's: only later drafts can differ, never the
        output). The rest are recomputed from the main model's hidden states next round."""
        keep = min(accepted, self.chained, len(new) - 1)
        self.s.pos -= out.logits.shape[1] - accepted - 1
        self.ahead, self.hidden = self._ids(new[keep:]), out.hidden[:, keep:len(new)]


def stream_tokens(model, images, prefix_ids, gen: GenerationConfig, eos_id: int, stats: GenerationStats,
                  decoder=None, policy: DraftPolicy | None = None) -> Iterator[list[list[int]]]:
    """Yield, step by step, the new token ids of each row (empty once a row has ended).

    One loop for plain and speculative decoding: a speculative step feeds the last token
    with the drafts proposed for after it, and keeps the ones the sampler accepts (greedy,
    so the tokens are plain greedy's). `decoder`: an `lm.Decoder` of model.lm (built here
    when None) or an `lm.Reference`. `policy` (a Captioner keeps one) chooses how deep a
    speculative request without `draft_tokens` drafts (0: not at all) and learns from the
    timing of every single-row request; without one, speculation drafts the trained chain.
    The tokens leaving the device are a step's host sync.
    """
    decoder = decoder if decoder is not None else lm.Decoder(model.lm)
    speculative = gen.uses_speculation(model)
    if speculative and images.shape[0] != 1:
        raise ValueError("speculative streaming takes one image at a time")
    policy = policy if prefix_ids.shape[0] == 1 else None
    task = tuple(prefix_ids[0].tolist()) if policy is not None else None  # the policy's key: the prompt
    depth = gen.drafts(model) if speculative else 0
    if speculative and gen.draft_tokens is None and policy is not None:  # (a depth asked for is used as is)
        depth = policy.depth(task, depth)
    s = _Session(model, decoder, images, prefix_ids, prefix_ids.shape[1] + gen.max_new_tokens + depth + 1, stats)
    sampler = Sampler(gen, eos_id, prefix_ids.shape[0], prefix_ids.device)
    t0 = time.perf_counter()
    fed, new = sampler.next(s.out.logits[:, -1])
    drafter = _Drafter(s, new[0][0], depth, eos_id) if depth else None
    stats.depth, produced = depth, 0
    while True:
        yield new
        stats.new_tokens += sum(map(len, new))
        produced += sum(map(len, new))
        if sampler.finished:
            break
        if drafter is None:
            out = s.step(fed[:, None], active=sampler.ended.count(False))
            fed, new = sampler.next(out.logits[:, -1])
            continue
        drafts = drafter.propose()
        out = s.step(prefix_ids.new_tensor([new[0][-1:] + drafts]))
        kept, accepted = sampler.accept(out.logits, drafts)
        drafter.keep(out, kept, accepted)
        stats.drafts += len(drafts)
        stats.accepted += accepted
        new = [kept]
    stats.decode_s = time.perf_counter() - t0
    if policy is not None and not (speculative and gen.draft_tokens is not None):
        policy.record(task, depth, stats.decode_s, produced - 1)
    s.finish(sampler.mean_logprob())


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
        logp = process(logits, seqs, step, gen, eos_id).log_softmax(-1)
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
def generate(model, images, prefix_ids, gen: GenerationConfig, eos_id: int, decoder=None,
             policy: DraftPolicy | None = None):
    """Token ids per row (ending with <eos> unless max_new_tokens cut them) and the stats.

    `decoder`: an `lm.Decoder` of model.lm (built here when None; a Captioner keeps one)
    or `Reference(model.lm)` for the reference path; `policy`: as for `stream_tokens`."""
    gen.validate()
    decoder = decoder if decoder is not None else lm.Decoder(model.lm)
    stats = GenerationStats()
    if gen.num_beams > 1:
        return beam_search(model, images, prefix_ids, gen, eos_id, stats, decoder), stats
    if gen.uses_speculation(model) and images.shape[0] > 1:
        if policy is not None and gen.draft_tokens is None:  # a batch decodes together: mm/draft_policy.py
            gen = replace(gen, speculative=False)
        else:  # acceptance differs per row, so the rows draft one at a time
            rows = [generate(model, images[i : i + 1], prefix_ids[i : i + 1], gen, eos_id, decoder, policy)
                    for i in range(len(images))]
            merged = GenerationStats()
            for _, st in rows:
                merged.add(st)
            return [r[0][0] for r in rows], merged
    out = [[] for _ in range(prefix_ids.shape[0])]
    for step in stream_tokens(model, images, prefix_ids, gen, eos_id, stats, decoder, policy):
        for row, new in zip(out, step):
            row.extend(new)
    return out, stats
