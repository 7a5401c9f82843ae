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

So the policy measures the outcome itself: per task (prompt), the decode seconds and the
tokens decoded of recent requests that speculated and of recent ones that did not (every
single-image greedy or sampling request counts for the plain side), and speculates while
that has cost less per token. Composing the figure from timed parts instead (step costs by
token count, draft cost, acceptance per chain position) was tried: single timings on a
shared CPU vary by tens of percent, and the estimates flipped the decision on noise. Until
each side has `MIN_REQUESTS` requests the policy alternates; afterwards the side not taken
is tried again every `RETRY_EVERY`-th request, so the figures follow a machine whose load
changes.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

MIN_REQUESTS = 3  # per side, before the faster one is chosen
WINDOW = 16  # recent requests kept per side
RETRY_EVERY = 16  # the side not taken runs again on every this many requests of a task


@dataclass
class _Side:
    """Recent (seconds, tokens decoded) of one way of decoding a task."""

    runs: deque = field(default_factory=lambda: deque(maxlen=WINDOW))

    @property
    def seconds_per_token(self) -> float | None:
        tokens = sum(n for _, n in self.runs)
        return sum(s for s, _ in self.runs) / tokens if tokens and len(self.runs) >= MIN_REQUESTS else None


@dataclass
class _Task:
    plain: _Side = field(default_factory=_Side)
    drafted: _Side = field(default_factory=_Side)
    requests: int = 0


class DraftPolicy:
    """Speculate or not, per task, from the measured seconds per token of each (see the module
    docstring). Shared by every request on a decoder (a Captioner keeps one); thread-safe."""

    def __init__(self):
        self._tasks: dict[tuple, _Task] = {}
        self._lock = threading.Lock()

    def speculate(self, task: tuple) -> bool:
        """Whether a new request of `task` (its prompt ids) should draft."""
        with self._lock:
            t = self._tasks.setdefault(task, _Task())
            t.requests += 1
            plain, drafted = t.plain.seconds_per_token, t.drafted.seconds_per_token
            if drafted is None or plain is None:  # still measuring: the side with fewer runs
                return len(t.drafted.runs) <= len(t.plain.runs)
            faster = drafted < plain
            return faster != (t.requests % RETRY_EVERY == 0)

    def record(self, task: tuple, drafted: bool, seconds: float, tokens: int) -> None:
        """A finished request: decode seconds after its first token, and the tokens after it."""
        if tokens <= 0:
            return
        with self._lock:
            t = self._tasks.setdefault(task, _Task())
            (t.drafted if drafted else t.plain).runs.append((seconds, tokens))

    def seconds_per_token(self, task: tuple) -> tuple[float | None, float | None]:
        """(plain, speculative) for `task`, None where not yet measured."""
        with self._lock:
            t = self._tasks.get(task, _Task())
            return t.plain.seconds_per_token, t.drafted.seconds_per_token
