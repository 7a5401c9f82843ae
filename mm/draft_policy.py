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
For each depth it keeps the decode seconds and the tokens decoded of the task's recent
requests (every single-image request without drafts counts for depth 0), and takes the
depth that has cost the least per token. Composing that figure from timed parts instead
(step costs by token count, draft cost, acceptance per chain position) was tried: single
timings on a shared CPU vary by tens of percent, and the estimates flipped the choice on
noise. Until each depth has `MIN_REQUESTS` requests the policy takes the least measured;
afterwards, on every `RETRY_EVERY`-th request, another depth in turn, so the figures
follow a machine whose load changes.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

MAX_DRAFTS = 8  # GenerationConfig's limit on draft_tokens
MIN_REQUESTS = 3  # per depth, before the fastest is chosen
WINDOW = 16  # recent requests kept per depth
RETRY_EVERY = 32  # another depth runs on every this many requests of a task


def depths(trained: int) -> tuple[int, ...]:
    """The depths tried for a model whose MTP module chains `trained` drafts, in the order first tried."""
    return tuple(dict.fromkeys((trained, 0, min(2 * trained, MAX_DRAFTS))))


@dataclass
class _Runs:
    """Recent (seconds, tokens decoded) at one depth."""

    runs: deque = field(default_factory=lambda: deque(maxlen=WINDOW))

    @property
    def seconds_per_token(self) -> float | None:
        tokens = sum(n for _, n in self.runs)
        return sum(s for s, _ in self.runs) / tokens if tokens and len(self.runs) >= MIN_REQUESTS else None


@dataclass
class _Task:
    by_depth: dict = field(default_factory=dict)  # depth -> _Runs
    requests: int = 0

    def at(self, depth: int) -> _Runs:
        return self.by_depth.setdefault(depth, _Runs())


class DraftPolicy:
    """How many drafts a round may chain, per task, from the measured seconds per token of each
    depth (see the module docstring). Shared by every request on a decoder (a Captioner keeps
    one); thread-safe."""

    def __init__(self):
        self._tasks: dict[tuple, _Task] = {}
        self._lock = threading.Lock()

    def depth(self, task: tuple, trained: int) -> int:
        """Drafts per round for a new request of `task` (its prompt ids); 0: decode plainly."""
        options = depths(trained)
        with self._lock:
            t = self._tasks.setdefault(task, _Task())
            t.requests += 1
            figures = {k: t.at(k).seconds_per_token for k in options}
            unmeasured = [k for k in options if figures[k] is None]
            if unmeasured:
                return min(unmeasured, key=lambda k: len(t.at(k).runs))
            best = min(options, key=figures.get)
            if t.requests % RETRY_EVERY:
                return best
            others = [k for k in options if k != best]
            return others[(t.requests // RETRY_EVERY) % len(others)]

    def record(self, task: tuple, depth: int, seconds: float, tokens: int) -> None:
        """A finished request: its depth, decode seconds after its first token, the tokens after it."""
        if tokens <= 0:
            return
        with self._lock:
            self._tasks.setdefault(task, _Task()).at(depth).runs.append((seconds, tokens))

    def seconds_per_token(self, task: tuple) -> dict[int, float | None]:
        """Per depth tried for `task`: its figure, None where not yet measured."""
        with self._lock:
            t = self._tasks.get(task, _Task())
            return {k: r.seconds_per_token for k, r in sorted(t.by_depth.items())}

    def measured(self, task: tuple) -> dict[int, int]:
        """Per depth tried for `task`: the requests its figure is made of."""
        with self._lock:
            t = self._tasks.get(task, _Task())
            return {k: len(r.runs) for k, r in sorted(t.by_depth.items())}
