"""The sampler: one definition of how a next token is chosen, for every decode loop.

Plain and speculative decoding (mm/generate.py), beam search and the serving engine
(mm/engine.py) all take their logits processing (repetition penalty, minimum length),
token choice (argmax, or temperature, top-k and top-p sampling), stop rule and per-row
log-probability (the confidence's input, mm/confidence.py) from here:

    process(logits, generated, step, gen, eos_id)   # penalties and the min-length rule
    choose(logits, gen, rng)                         # argmax, or a sample
    verify(logits, drafts, step, gen, eos_id)        # the greedy choice over drafted tokens
    Sampler(gen, eos_id, batch, device)              # a batch's state: next(), accept(), score

A speculative verification applies the same rules at each drafted position as plain
greedy decoding does one step at a time, so both give the same tokens.
"""

from __future__ import annotations

import torch

from mm.confidence import chosen_logprob

MIN_TEMPERATURE = 1e-4  # below it logits / T can overflow to inf (nan probabilities); it samples the argmax anyway


def make_rng(gen, device) -> torch.Generator | None:
    """The generator a sampling request draws from (seeded when gen.seed is set); None for greedy."""
    if gen.temperature == 0:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(gen.seed if gen.seed is not None else torch.seed())
    return g


def is_plain_greedy(gen, step: int) -> bool:
    """Whether the choice at `step` (tokens already produced) is the argmax of the raw logits."""
    return gen.temperature == 0 and gen.repetition_penalty == 1.0 and step >= gen.min_new_tokens


def process(logits: torch.Tensor, generated: torch.Tensor, step: int, gen, eos_id: int) -> torch.Tensor:
    """Repetition penalty (CTRL-style, over `generated` [B, n]) and the min-length rule on
    next-token logits [B, V]; returns fp32 logits."""
    logits = logits.float()
    if gen.repetition_penalty != 1.0 and generated.shape[1]:
        prev = logits.gather(1, generated)
        prev = torch.where(prev > 0, prev / gen.repetition_penalty, prev * gen.repetition_penalty)
        logits = logits.scatter(1, generated, prev)
    if step < gen.min_new_tokens:
        logits[:, eos_id] = float("-inf")
    return logits


def choose(logits: torch.Tensor, gen, rng: torch.Generator | None) -> torch.Tensor:
    """The next token [B] from processed logits [B, V]: argmax at temperature 0, else a sample
    after temperature, top-k and top-p (the smallest set reaching top_p)."""
    if gen.temperature == 0:
        return logits.argmax(-1)
    logits = logits / max(gen.temperature, MIN_TEMPERATURE)
    if gen.top_k:
        kth = logits.topk(min(gen.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gen.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= gen.top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=rng).squeeze(1)


def verify(logits: torch.Tensor, drafts: list[int], step: int, gen, eos_id: int) -> tuple[list[int], int]:
    """Greedy verification of one row: logits [n + 1, V] read at [last token, *drafts], the
    first produced at `step`. Returns the tokens kept (the accepted drafts, then the model's
    own choice after them) and how many drafts were accepted. Speculation is greedy and
    without repetition penalty (GenerationConfig.uses_speculation); the min-length rule
    applies per position, as it would one step at a time."""
    logits = logits.float()
    early = step + torch.arange(logits.shape[0], device=logits.device) < gen.min_new_tokens
    logits[:, eos_id] = logits[:, eos_id].masked_fill(early, float("-inf"))
    best = logits.argmax(-1).tolist()
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == best[accepted]:
        accepted += 1
    return drafts[:accepted] + [best[accepted]], accepted


def cut(tokens: list[int], produced: int, gen, eos_id: int) -> list[int]:
    """The stop rule: a row's new tokens up to and including <eos>, and within max_new_tokens."""
    if eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id) + 1]
    return tokens[: max(gen.max_new_tokens - produced, 0)]


class Sampler:
    """The choice state of a batch whose rows started together: the options, the generator,
    the tokens produced per row, which rows ended and each row's summed log-probability.
    An ended row is fed <eos> and emits nothing until every row is done."""

    def __init__(self, gen, eos_id: int, batch: int, device):
        self.gen, self.eos_id = gen, eos_id
        self.rng = make_rng(gen, device)
        self.generated = torch.zeros(batch, 0, dtype=torch.long, device=device)  # for the repetition penalty
        self.produced = 0  # tokens each row has produced (an ended row counts on with <eos>)
        self.ended = [False] * batch
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)  # `ended` on the device
        self.logprob = torch.zeros(batch, device=device)  # summed over each row's tokens
        self.written = torch.zeros(batch, device=device)  # tokens counted in it

    @property
    def finished(self) -> bool:
        return all(self.ended) or self.produced >= self.gen.max_new_tokens

    def next(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
        """One token per row from next-token logits [B, V]: the tokens [B] to feed back, and
        each row's new tokens to emit (none once it has ended). One host sync."""
        gen = self.gen
        if is_plain_greedy(gen, self.produced):
            nxt = logits.argmax(-1)
        else:
            nxt = choose(process(logits, self.generated, self.produced, gen, self.eos_id), gen, self.rng)
        if any(self.ended):
            nxt = torch.where(self.done, self.eos_id, nxt)
        self.score(logits, nxt, ~self.done)
        if gen.repetition_penalty != 1.0:
            self.generated = torch.cat([self.generated, nxt[:, None]], 1)
        toks = nxt.tolist()
        new = [[] if e else [t] for e, t in zip(self.ended, toks)]
        self.ended = [e or t == self.eos_id for e, t in zip(self.ended, toks)]
        self.done |= nxt == self.eos_id
        self.produced += 1
        return nxt, new

    def accept(self, logits: torch.Tensor, drafts: list[int]) -> tuple[list[int], int]:
        """Verify one row's drafts against logits [1, len(drafts) + 1, V]; returns the tokens
        it emits (cut by the stop rule) and the accepted drafts among them."""
        new, accepted = verify(logits[0], drafts, self.produced, self.gen, self.eos_id)
        new = cut(new, self.produced, self.gen, self.eos_id)
        self.score(logits[:, : len(new)], logits.new_tensor([new], dtype=torch.long))  # new[i] read at logits i
        self.produced += len(new)
        self.ended[0] = new[-1] == self.eos_id
        return new, min(accepted, len(new))

    def score(self, logits: torch.Tensor, tokens: torch.Tensor, live: torch.Tensor | None = None) -> None:
        """Count tokens [B] (or [B, n]) chosen from logits [B, V] ([B, n, V]) in each row's
        log-probability; `live` [B] masks rows that have ended."""
        lp = chosen_logprob(logits, tokens)
        n = 1
        if lp.dim() == 2:
            lp, n = lp.sum(1), lp.shape[1]
        if live is not None:
            lp, n = lp * live, live * n
        self.logprob += lp
        self.written += n

    def mean_logprob(self) -> torch.Tensor:
        return self.logprob / self.written.clamp(min=1)
