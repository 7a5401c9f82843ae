"""`Reference`: decoding through `Transformer.forward` with `lm.Decoder`'s interface.

The reference absorbed path (lm/attention.py) over the cache's `length`: the oracle of the
generation tests and the baseline of the benchmarks, never compiled.
"""

from __future__ import annotations

import torch

from lm.decode import DecodeOutput, DecodeSteps
from lm.model import Transformer


class Reference(DecodeSteps):
    """`Transformer.forward` behind `lm.Decoder`'s entry points (DecodeSteps). Writing at a
    position first crops the layer back to it, as a rejected draft requires."""

    compiled = False

    def __init__(self, model: Transformer):
        self.lm = model

    def embed(self, ids):
        return self.lm.embed(ids)

    def new_cache(self, batch_size, max_len):
        return self.lm.new_cache(batch_size, max_len)

    def forward(self, embeds, cache, positions, bound=None, last_only=False, compiled=True, valid=None):
        start = int(positions[0, 0])
        for i in range(cache.n_main):
            cache.layer(i).crop(start)
        out = self.lm(inputs_embeds=embeds, cache=cache, return_hidden=True)
        counts = out.expert_counts if out.expert_counts is not None else embeds.new_zeros(0, embeds.shape[0], 0)
        return DecodeOutput(out.logits[:, -1:] if last_only else out.logits, out.hidden, counts)

    __call__ = forward

    def mtp_step(self, k, hidden_prev, embeds_ahead, cache, positions, bound=None,
                 compiled=True) -> tuple[torch.Tensor, torch.Tensor]:
        cache.mtp_layer(k).crop(int(positions[0, 0]))
        return self.lm.mtp_step(k, hidden_prev, embeds_ahead, cache=cache)
