"""Whether MTP speculation pays, per task, measured on the machine that decodes.

A round of k drafts costs k MTP steps and one main step over k + 1 tokens, and yields the
accepted drafts plus one token. Whether that beats plain decoding depends on the hardware
as much as on the model. On a GPU a main step over a few tokens costs about what one token
does, and speculation pays wherever drafts are accepted. On a CPU a step over k + 1 tokens
computes k + 1 times as much, and the tokens of a verification together route to more of a
MoE's experts than one token does (five tokens of the bundled model reach most of its 8
experts, one token reaches 2), so the same chain can be slower than plain decoding; and
short outputs (a few tokens) never repay the MTP pass over the prompt that the first draft
needs. Acceptance differs by task, costs by machine and load. And speculation decodes one
image at a time: a batch of images decodes faster together, rows sharing each step, than
row by row with drafts (the bundled model on a 2-core CPU: 115 images/s against 30 for 32
captions), so where a policy is kept a batch never drafts unless `draft_tokens` asks to.

So the policy measures the outcome itself. It chooses, per task (prompt), how many drafts a
round may chain: 0 (plain decoding), the depth the MTP module was trained to chain, or
twice that (up to MAX_DRAFTS; a module trained to chain 4 often chains well past 4, and a
longer chain saves rounds); the chain still stops at an unlikely draft or a drafted <eos>.
It keeps the decode seconds and the tokens decoded of each depth's recent requests (every
single-image request without drafts counts for depth 0). Plain decoding costs about the
same per token whatever the length, so its seconds per token price any request plainly;
a drafting request's speed-up is that price of its tokens over its own seconds (so a
depth is not judged by the lengths of the images it happened to get: a short caption
pays the prompt's MTP pass over fewer tokens). Those speed-ups vary by tens of percent
from request to request (lengths, and timings on a shared machine), so the policy drafts
only at depths whose mean speed-up less one standard error of that mean is above 1, and of
those at the one with the best mean; with none, it decodes plainly. A depth that is
clearly faster is taken after a few requests; one within noise of plain decoding (a
short output) is not taken on luck. Composing the figures from timed parts instead (step costs by token
count, draft cost, acceptance per chain position) was tried and flipped on that noise.
Until each depth has `MIN_REQUESTS` requests the policy takes the least measured;
afterwards, on every `RETRY_EVERY`-th request, another depth in turn, so the figures
follow a machine whose load changes.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from dataclasses import dataclass, field

MAX_DRAFTS = 8  # GenerationConfig's limit on draft_tokens
MIN_REQUESTS = 4  # per depth, before one is chosen
WINDOW = 16  # recent requests kept per depth
RETRY_EVERY = 32  # another depth runs on every this many requests of a task


def depths(trained: int) -> tuple[int, ...]:
    """The depths tried for a model whose MTP module chains `trained` drafts, in the order first tried."""
    return tuple(dict.fromkeys((trained, 0, min(2 * trained, MAX_DRAFTS))))


@dataclass
class _Task:
    runs: dict = field(default_factory=dict)  # depth -> deque of (seconds, tokens decoded)
    requests: int = 0

    def at(self, depth: int):
        """The recent (seconds, tokens) of `depth`; empty when none was recorded."""
        return self.runs.get(depth, ())

    def plain_seconds_per_token(self) -> float | None:
        plain = self.at(0)
        return sum(s for s, _ in plain) / sum(n for _, n in plain) if len(plain) >= MIN_REQUESTS else None

    def speedup(self, depth: int) -> tuple[float, float] | None:
        """Over `depth`'s recent requests, the mean of (their tokens at the plain price) / (their
        seconds) and the standard error of that mean; None while too few are measured."""
        price, runs = self.plain_seconds_per_token(), self.at(depth)
        if depth == 0:
            return None if price is None else (1.0, 0.0)
        if price is None or len(runs) < MIN_REQUESTS:
            return None
        ratios = [n * price / s for s, n in runs]
        return statistics.fmean(ratios), statistics.stdev(ratios) / len(ratios) ** 0.5


class DraftPolicy:
    """How many drafts a round may chain, per task, from the measured speed-up of each depth
    over plain decoding and how sure it is (see the module docstring). Shared by every
    request on a decoder (a Captioner keeps one); thread-safe."""

    def __init__(self):
        self._tasks: dict[tuple, _Task] = {}
        self._lock = threading.Lock()

    def depth(self, task: tuple, trained: int) -> int:
        """Drafts per round for a new request of `task` (its prompt ids); 0: decode plainly."""
        options = depths(trained)
        with self._lock:
            t = self._tasks.setdefault(task, _Task())
            t.requests += 1
            speedups = {k: t.speedup(k) for k in options}
            unmeasured = [k for k in options if speedups[k] is None]
            if unmeasured:
                return min(unmeasured, key=lambda k: len(t.at(k)))
            sure = [k for k in options if k and speedups[k][0] - speedups[k][1] > 1.0]
            best = max(sure, key=lambda k: speedups[k][0]) if sure else 0
            if t.requests % RETRY_EVERY:
                return best
            others = [k for k in options if k != best]
            return others[(t.requests // RETRY_EVERY) % len(others)]

    def record(self, task: tuple, depth: int, seconds: float, tokens: int) -> None:
        """A finished request: its depth, decode seconds after its first token, the tokens after it."""
        if tokens <= 0 or seconds <= 0:
            return
        with self._lock:
            self._tasks.setdefault(task, _Task()).runs.setdefault(depth, deque(maxlen=WINDOW)).append((seconds, tokens))

    def speedups(self, task: tuple) -> dict[int, tuple[float, float] | None]:
        """Per depth tried for `task`: its measured speed-up over plain decoding and the standard
        error of it, None while unmeasured."""
        with self._lock:
            t = self._tasks.get(task, _Task())
            return {k: t.speedup(k) for k in sorted(t.runs)}

    def measured(self, task: tuple) -> dict[int, int]:
        """Per depth tried for `task`: the requests its figure is made of."""
        with self._lock:
            t = self._tasks.get(task, _Task())
            return {k: len(r) for k, r in sorted(t.runs.items())}
