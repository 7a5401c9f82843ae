"""The inference fast path of `lm.Transformer`: the same numbers in a fraction of the ops.

A decode step of the reference path (`Transformer.forward` with a cache) is bound by
per-operation overhead on small models: about 2,700 PyTorch calls for the bundled
4-layer model, most of them views, casts and einsum plumbing around a few hundred
microseconds of arithmetic. `Decoder` keeps the weights rearranged once for inference
and runs a block in a few dozen calls:

- MLA, absorbed (DeepSeek-V2 section 2.1.2; DeepSeek-V3 section 2.1.1). With c^KV_j the latent of
  token j (kv_lora_rank wide), W^UK/W^UV the key and value halves of wkv_b per head i,
  and q^C, q^R / k^R the no-rope and rope parts (qk_nope_head_dim, qk_rope_head_dim):
      (1) k^C_{j,i} = W^UK_i c^KV_j,  v^C_{j,i} = W^UV_i c^KV_j
      (2) q_{t,i}.k_{j,i} = (W^UK_i^T q^C_{t,i}) . c^KV_j + q^R_{t,i} . k^R_j
      (3) o_{t,i} = W^UV_i sum_j softmax_j(...) c^KV_j        (v_head_dim wide)
  so keys and values never leave latent space: the query is taken into it (2) and the
  weighted latent out of it (3), one batched product over the heads each. The query,
  latent and rope projections of x are one product with columns [q_nope | kv | q_pe | k_pe];
  every head's rope part is rotated together with the shared rope key k^R. (Folding W^UK
  and W^UV into wq and wo would save two products but
  multiply those weights' bytes by kv_lora_rank / qk_nope_head_dim, and a decode step
  is bound by the bytes it reads.) A prefill, with many new tokens, instead expands the
  latent into per-head keys and values once (1), as the reference's naive path does.
  The cache holds [kv | k_pe] per token in one buffer,
  so the scores of all heads of all new tokens are ONE batched product against it: in
  latent space MLA is multi-query attention.
- Positions per row. Row b's new token t is written to cache slot positions[b, t] and
  attends to slots <= positions[b, t]. Rows of different lengths can share a batch (the
  serving engine), nothing is ever cropped (a rejected draft's slot is overwritten before
  any query can see it), and with a fixed `bound` (the slots attended) every step has
  the same shapes, so one compiled graph serves a whole generation.
- MoE: only the chosen experts run, never an empty group. On a CPU in eager mode the
  expert ids are host values already, so each chosen expert runs once on its tokens with
  its weights as views (faster there than CPU grouped_mm, which syncs per group). On an
  accelerator, and under torch.compile, few (token, expert) pairs gather their experts'
  weights into two batched products with no host synchronisation, and many pairs (a
  prefill) take the layer's sorted grouped dispatch. Routing counts per row come back in
  the output; nothing is written to the modules.

The rearranged weights are copies made when the Decoder is built (concatenations and
transposes of the model's own: about one more copy of the attention and expert weights,
two of the experts' where the gathered path runs): build a new Decoder after the model's
weights change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lm.attention import MLA
from lm.cache import KVCache
from lm.model import Block, Transformer
from lm.moe import MLP, MoE, route

LATENT_EPS = 1e-6  # MLA's latent norms, whatever rms_norm_eps says (lm/attention.py)


@dataclass
class DecodeOutput:
    logits: torch.Tensor  # [B, T, V], or [B, 1, V] with last_only
    hidden: torch.Tensor  # [B, T, D], last layer output before the final norm
    counts: torch.Tensor  # [moe layers, B, E] float: tokens of each row routed to each expert


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """lm.RMSNorm as a function: statistics in fp32, cast back, then the weight."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, R/2] -> per-dim tables [B, T, 1, R] for `rotate`: (c, c) and (-s, s) per pair."""
    c = cos.repeat_interleave(2, -1)
    s = torch.stack((-sin, sin), -1).flatten(-2)
    return c[:, :, None], s[:, :, None]


def rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """lm.apply_rope on interleaved pairs of x [B, T, H, R] in fp32: (x0 c - x1 s, x1 c + x0 s)."""
    x32 = x.float()
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) per pair
    return (x32 * c + swapped * s).to(x.dtype)


class _Attention:
    """One MLA layer's weights, rearranged for the absorbed path (module docstring, eqs. 1-3)."""

    def __init__(self, attn: MLA, dtype: torch.dtype):
        n_heads, rank, rope = attn.n_heads, attn.kv_lora_rank, attn.qk_rope_head_dim
        nope, v_dim = attn.qk_nope_head_dim, attn.v_head_dim
        self.n_heads, self.kv_lora_rank, self.qk_rope_head_dim = n_heads, rank, rope
        self.qk_nope_head_dim, self.v_head_dim, self.q_lora_rank = nope, v_dim, attn.q_lora_rank
        self.scale = attn.softmax_scale
        wkv_b = attn.wkv_b.weight.detach().view(n_heads, nope + v_dim, rank)
        self.w_uk = wkv_b[:, :nope].to(dtype)  # [H, nope, C]: W^UK, a head's query into latent space (eq. 2)
        self.w_uv_t = wkv_b[:, nope:].transpose(1, 2).to(dtype)  # [H, C, v]: W^UV, latent out to the values (eq. 3)
        self._fuse_down_projections(attn, dtype)
        self.kv_norm = attn.kv_norm.weight.detach().to(dtype)
        self.wkv_b = attn.wkv_b.weight.detach().to(dtype)
        # Past this many new tokens (a prefill) expanding the latent into per-head keys and values
        # once costs less than attending in latent space (kv_lora_rank per head per pair).
        self.expand_from = (nope + v_dim) // 2
        self.w_o = attn.wo.weight.detach().to(dtype)
        self.b_o = None if attn.wo.bias is None else attn.wo.bias.detach().to(dtype)

    def _fuse_down_projections(self, attn: MLA, dtype: torch.dtype) -> None:
        """The products of x in one weight: rows [q_nope | kv | q_pe | k_pe] (or, with a query
        LoRA, [q_a | kv | k_pe] and the up-projection [q_nope | q_pe])."""
        n_heads, rank, nope = self.n_heads, self.kv_lora_rank, self.qk_nope_head_dim
        rope = self.qk_rope_head_dim
        wq = (attn.wq_b if self.q_lora_rank else attn.wq).weight.detach()
        wq = wq.view(n_heads, nope + rope, wq.shape[-1])
        q_nope, q_pe = wq[:, :nope].flatten(0, 1), wq[:, nope:].flatten(0, 1)  # all heads' nope rows, then rope
        wkv_a, bkv_a = attn.wkv_a.weight.detach(), attn.wkv_a.bias
        if self.q_lora_rank:
            self.w_a = torch.cat([attn.wq_a.weight.detach(), wkv_a]).to(dtype)  # [q_lora + C + R, D]
            self.b_a = None if bkv_a is None else torch.cat([attn.wq_a.bias, bkv_a]).detach().to(dtype)
            self.q_norm = attn.q_norm.weight.detach().to(dtype)
            self.w_qb = torch.cat([q_nope, q_pe]).to(dtype)  # [H*nope + H*R, q_lora]
            return
        # the heads' rope queries sit next to the rope key: one rotation for all of them
        self.w_a = torch.cat([q_nope, wkv_a[:rank], q_pe, wkv_a[rank:]]).to(dtype)
        self.b_a = None
        if bkv_a is not None:
            zeros = bkv_a.new_zeros(n_heads * max(nope, rope))
            self.b_a = torch.cat([zeros[: n_heads * nope], bkv_a[:rank], zeros[: n_heads * rope],
                                  bkv_a[rank:]]).detach().to(dtype)

    def __call__(self, x, c, s, buf, rows, positions, mask_bias, bound, last_only: bool = False):
        """Writes every new token's latent and rope key to the cache; attends for every new
        token, or (last_only) for the last one alone."""
        b, t, _ = x.shape
        n_heads, rank, rope, nope = self.n_heads, self.kv_lora_rank, self.qk_rope_head_dim, self.qk_nope_head_dim
        if self.q_lora_rank:
            qa, kv, k_pe = F.linear(x, self.w_a, self.b_a).split([self.q_lora_rank, rank, rope], -1)
            q_nope, q_pe = F.linear(rms_norm(qa, self.q_norm, LATENT_EPS), self.w_qb).split(
                [n_heads * nope, n_heads * rope], -1)
            pe = torch.cat([q_pe, k_pe], -1)
        else:
            q_nope, kv, pe = F.linear(x, self.w_a, self.b_a).split([n_heads * nope, rank, (n_heads + 1) * rope], -1)
        pe = rotate(pe.view(b, t, n_heads + 1, rope), c, s)  # the heads' rope queries and the shared rope key
        buf.index_put_((rows, positions), torch.cat([rms_norm(kv, self.kv_norm, LATENT_EPS), pe[:, :, n_heads]], -1))
        if last_only:
            q_nope, pe, mask_bias, t = q_nope[:, -1:], pe[:, -1:], mask_bias[:, -1:], 1
        if t > self.expand_from:
            return self._expanded(q_nope, pe, buf[:, :bound], mask_bias)
        # eq. 2: W^UK_i^T q^C_{t,i}, each head's query in latent space
        q_lat = torch.bmm(q_nope.reshape(b * t, n_heads, nope).transpose(0, 1), self.w_uk)  # [H, B*T, C]
        q = torch.cat([q_lat.view(n_heads, b, t, rank).permute(1, 2, 0, 3), pe[:, :, :n_heads]], -1)
        keys = buf[:, :bound]  # [B, S, C + R]: [c^KV_j | k^R_j]
        scores = torch.bmm(q.view(b, t * n_heads, rank + rope), keys.transpose(1, 2)).float()
        probs = (scores.view(b, t, n_heads, bound) * self.scale + mask_bias).softmax(-1).to(x.dtype)
        out = torch.bmm(probs.view(b, t * n_heads, bound), keys[..., :rank])  # [B, T*H, C]: values are the latent
        out = torch.bmm(out.view(b * t, n_heads, rank).transpose(0, 1), self.w_uv_t)  # eq. 3: [H, B*T, v]
        return F.linear(out.transpose(0, 1).reshape(b, t, n_heads * self.v_head_dim), self.w_o, self.b_o)

    def _expanded(self, q_nope, pe, keys, mask_bias):
        """The naive path (lm.MLA._naive) over the cached slots: per-head keys and values from the
        latent (eq. 1), then scaled-dot-product attention."""
        b, t, _ = q_nope.shape
        n_heads, rank, nope, s = self.n_heads, self.kv_lora_rank, self.qk_nope_head_dim, keys.shape[1]
        kv = F.linear(keys[..., :rank], self.wkv_b).view(b, s, n_heads, nope + self.v_head_dim)
        k_nope, v = kv.split([nope, self.v_head_dim], -1)
        k = torch.cat([k_nope, keys[:, :, None, rank:].expand(b, s, n_heads, self.qk_rope_head_dim)], -1)
        q = torch.cat([q_nope.view(b, t, n_heads, nope), pe[:, :, :n_heads]], -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask_bias.transpose(1, 2).to(q.dtype), scale=self.scale)
        return F.linear(out.transpose(1, 2).reshape(b, t, n_heads * self.v_head_dim), self.w_o, self.b_o)


class _MLP:
    """SwiGLU with w1 and w3 in one product."""

    def __init__(self, mlp: MLP, dtype: torch.dtype):
        self.w13 = torch.cat([mlp.w1.weight, mlp.w3.weight]).detach().to(dtype)
        self.w2 = mlp.w2.weight.detach().to(dtype)

    def __call__(self, x):
        a, g = F.linear(x, self.w13).chunk(2, -1)
        return F.linear(F.silu(a) * g, self.w2)


class _MoE:
    """Routed experts plus the shared experts; three ways to run the routed ones (see __call__)."""

    def __init__(self, moe: MoE, dtype: torch.dtype, gather_limit: int):
        self.moe, self.cfg = moe, moe.gate.cfg
        self.n_experts = moe.n_experts
        self.gate = moe.gate.weight.detach().float()
        self.bias = moe.gate.bias
        ex = moe.experts
        self.w13 = torch.cat([ex.w1, ex.w3], 1).detach().to(dtype)  # [E, 2I, D]
        self.w2 = ex.w2.detach().to(dtype)  # [E, D, I]
        self.w13_t = self.w2_t = None  # the gathered path's layout, made only where it runs (gather_layout)
        if self.w13.device.type != "cpu":
            self.gather_layout()
        self.shared = _MLP(moe.shared_experts, dtype) if moe.shared_experts is not None else None
        self.gather_limit = gather_limit

    def __call__(self, x, valid=None):
        b, t, d = x.shape
        flat = x.view(-1, d)
        weights, idx, _ = route(F.linear(flat.float(), self.gate), self.bias, self.cfg)
        n, k = idx.shape
        few = n * k <= self.gather_limit
        if flat.device.type == "cpu" and (not few or not torch.compiler.is_compiling()):
            # (compiled, many pairs: the host ids break the graph here; CPU grouped_mm does not compile)
            y = self._by_views(flat, weights, idx)
        elif few:
            y = self._gathered(flat, weights, idx)
        else:  # a prefill: the layer's sorted grouped dispatch
            y, _ = self.moe.dispatch(flat, weights, idx)
        if self.shared is not None:
            y = y + self.shared(flat)
        counts = flat.new_zeros(b, self.n_experts, dtype=torch.float32)
        ones = counts.new_ones(1).expand(b, t * k) if valid is None else \
            valid.view(b, t, 1).expand(b, t, k).reshape(b, t * k).float()
        counts.scatter_add_(1, idx.view(b, t * k), ones)
        return y.view(b, t, d), counts

    def gather_layout(self) -> None:
        """[E, D, 2I] and [E, I, D] copies: a gathered expert is then the right operand of a
        row-vector product. Another copy of the experts, so only for accelerators and compiling."""
        if self.w13_t is None:
            self.w13_t, self.w2_t = self.w13.transpose(1, 2).contiguous(), self.w2.transpose(1, 2).contiguous()

    def _gathered(self, x, weights, idx):
        """Each (token, expert) pair's weights gathered, two batched row-vector products: shapes
        fixed by the token count and no host synchronisation (compiled graphs, GPUs)."""
        n, k = idx.shape
        pick = idx.flatten()
        inp = x[:, None].expand(n, k, x.shape[-1]).reshape(n * k, 1, -1)
        a, g = torch.bmm(inp, self.w13_t.index_select(0, pick)).chunk(2, -1)  # [n*k, 1, I] each
        y = torch.bmm(F.silu(a) * g, self.w2_t.index_select(0, pick)).view(n, k, -1)
        return (y * weights[..., None].to(y.dtype)).sum(1)

    def _by_views(self, x, weights, idx):
        """CPU: the expert ids are already host values (reading them waits for no device), so
        each chosen expert runs on its rows with its weights as views, copying no weights."""
        y = torch.zeros_like(x)
        w = weights.to(x.dtype)
        pairs: dict[int, tuple[list[int], list[int]]] = {}  # expert -> (tokens, top-k slots)
        for i, row in enumerate(idx.tolist()):
            for j, e in enumerate(row):
                tokens, slots = pairs.setdefault(e, ([], []))
                tokens.append(i)
                slots.append(j)
        for e, (tokens, slots) in pairs.items():
            if x.shape[0] == 1:  # one token: each expert appears once in its top-k
                a, g = F.linear(x, self.w13[e]).chunk(2, -1)
                y += F.linear(F.silu(a) * g, self.w2[e]) * w[:, slots[0]:slots[0] + 1]
                continue
            r = torch.tensor(tokens, device=x.device)
            a, g = F.linear(x[r], self.w13[e]).chunk(2, -1)
            y.index_add_(0, r, F.linear(F.silu(a) * g, self.w2[e]) * w[r, slots][:, None])
        return y


class _Block:
    def __init__(self, block: Block, dtype: torch.dtype, gather_limit: int):
        self.attn_norm, self.ffn_norm = block.attn_norm.weight.detach().to(dtype), block.ffn_norm.weight.detach().to(dtype)
        self.eps = block.attn_norm.eps
        self.attn = _Attention(block.attn, dtype)
        self.is_moe = isinstance(block.ffn, MoE)
        self.ffn = _MoE(block.ffn, dtype, gather_limit) if self.is_moe else _MLP(block.ffn, dtype)

    def __call__(self, x, c, s, buf, rows, positions, mask_bias, bound, valid=None, last_only: bool = False):
        """The block over new tokens x [B, T, D]; last_only: every token's cache entry, but the
        attention and the FFN (and the output) only for the last token."""
        a = self.attn(rms_norm(x, self.attn_norm, self.eps), c, s, buf, rows, positions, mask_bias, bound, last_only)
        x = (x[:, -1:] if last_only else x) + a
        h = rms_norm(x, self.ffn_norm, self.eps)
        if self.is_moe:
            y, counts = self.ffn(h, valid)
            return x + y, counts
        return x + self.ffn(h), None


class MTPLayer(NamedTuple):
    """One MTP module's weights for decoding (lm.mtp.MTPModule): h' = M(W [enorm(e); hnorm(h)])."""

    enorm: torch.Tensor  # RMSNorm weight over the embedding of the token ahead
    hnorm: torch.Tensor  # RMSNorm weight over the previous depth's hidden state
    eh_proj: torch.Tensor  # [D, 2D]: the projection of their concatenation
    block: _Block
    norm: torch.Tensor  # the final RMSNorm before the shared head


class Draft(NamedTuple):
    """An MTP step's proposal at its last position, and its hidden state there for the next depth."""

    tokens: torch.Tensor  # [B] the argmax
    probs: torch.Tensor  # [B] its probability, for the draft policy
    hidden: torch.Tensor  # [B, 1, D]: the module's output at the last position


COMPILED_TOKENS = 16  # new tokens per row up to which a compiled step runs its graph; more is a prefill
#                       (lm.Decoder lowers it to what the gathered MoE path takes: see compiled_tokens)
CACHE_ROUND = 64  # a compiled step attends the whole cache: lengths in steps of 64 share graphs


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class DecodeSteps:
    """The entry points of a decode loop, over `forward` and `mtp_step` (lm.Decoder, lm.Reference).

    They own the compile policy: a compiled decoder gets caches rounded up to CACHE_ROUND
    slots, steps that attend the whole buffer, and batches and token counts padded to
    powers of two (where the cache has room), so a few graphs serve every request.
    """

    compiled = False
    compiled_tokens = COMPILED_TOKENS

    def cache_len(self, n: int) -> int:
        return -(-n // CACHE_ROUND) * CACHE_ROUND if self.compiled else n

    def prefill(self, embeds: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None,
                last_only: bool = True) -> DecodeOutput:
        """embeds [B, T, D] at positions 0..T-1 of every row (eager: a one-off shape)."""
        b, t = embeds.shape[:2]
        positions = torch.arange(t, device=embeds.device).expand(b, t)
        return self.forward(embeds, cache, positions, bound=t, last_only=last_only, compiled=False, valid=valid)

    def step(self, ids: torch.Tensor, cache: KVCache, positions: int | torch.Tensor) -> DecodeOutput:
        """ids [B, T] written at `positions`: [B, T] per row, or an int, every row's first.
        Rows of the cache past B are scratch that a compiled step may write."""
        b, t = ids.shape
        start = positions if isinstance(positions, int) else None
        compiled = self.compiled and t <= self.compiled_tokens
        m, tp = b, t
        if compiled:
            m = min(_pow2(b), cache.batch_size)
            tp = _pow2(t) if start is not None and start + _pow2(t) <= cache.max_len else t
        if start is not None:
            positions = torch.arange(start, start + tp, device=ids.device).expand(b, tp)
        if (m, tp) != (b, t):  # padding: token 0 at the next slots of the rows, at slot 0 of spare rows
            ids = F.pad(ids, (0, tp - t, 0, m - b))
            positions = F.pad(positions, (0, 0, 0, m - b))
        bound = cache.max_len if compiled else (start + t if start is not None else None)
        valid = None if tp == t else (torch.arange(tp, device=ids.device) < t).expand(m, tp)  # routing counts
        out = self.forward(self.embed(ids), cache if cache.batch_size == m else cache.rows(m), positions,
                           bound=bound, compiled=compiled, valid=valid)
        if (m, tp) == (b, t):
            return out
        return DecodeOutput(out.logits[:b, :t], out.hidden[:b, :t], out.counts[:, :b])

    def draft(self, hidden: torch.Tensor, ahead: torch.Tensor, cache: KVCache, start: int,
              depth: int = 1) -> Draft:
        """MTP `depth` over aligned positions start.. of hidden [B, n, D] and the tokens ahead
        (ids [B, n], or their embeddings [B, n, D]); the proposal at the last position."""
        b, n = hidden.shape[:2]
        if not ahead.is_floating_point():
            ahead = self.embed(ahead)
        compiled = self.compiled and n <= self.compiled_tokens
        positions = torch.arange(start, start + n, device=hidden.device).expand(b, n)
        logits, h = self.mtp_step(depth, hidden, ahead, cache, positions,
                                  bound=cache.max_len if compiled else start + n, compiled=compiled)
        probs, tokens = logits[:, -1].float().softmax(-1).max(-1)
        return Draft(tokens, probs, h[:, -1:])


class Decoder(DecodeSteps):
    """`Transformer` inference with fused weights and per-row positions (see the module docstring).

    Decode loops call the entry points `prefill`, `step` and `draft` (DecodeSteps), which
    choose the shapes and whether the compiled graph runs. forward(embeds [B, T, D], cache,
    positions [B, T]) is the step underneath: it writes the T new tokens of each row at
    their positions in the cache's main layers and returns their logits and hidden states;
    `bound` (default: the largest position + 1) is how many cache slots attention reads,
    and a fixed bound keeps the shapes of every step equal.
    """

    def __init__(self, model: Transformer, gather_limit: int | None = None):
        cfg = model.cfg
        self.cfg = cfg
        p = model.embed.weight
        self.dtype, self.device = p.dtype, p.device
        # Gathering copies k expert weights per token; past about one copy of every expert
        # the sorted grouped dispatch, which reads each used expert once, is cheaper.
        limit = gather_limit if gather_limit is not None else max(cfg.n_routed_experts, 16)
        with torch.no_grad():
            self.embed_w = p.detach()
            self.blocks = [_Block(b, self.dtype, limit) for b in model.layers]
            self.norm, self.eps = model.norm.weight.detach(), model.norm.eps
            self.head = model.head.weight.detach()
            self.mtp = [MTPLayer(m.enorm.weight.detach(), m.hnorm.weight.detach(), m.eh_proj.weight.detach(),
                                 _Block(m.block, self.dtype, limit), m.norm.weight.detach()) for m in model.mtp]
        self.rope = model.rope
        self.n_main = len(self.blocks)
        self._rows: dict[int, torch.Tensor] = {}
        self._slots = torch.arange(cfg.max_position_embeddings, device=self.device)
        # A compiled step must take the gathered MoE path (the by-views one breaks the graph on
        # host expert ids and recompiles per routing): at most gather_limit (token, expert) pairs.
        self.compiled_tokens = max(1, limit // cfg.num_experts_per_tok)
        self.compiled = False
        self._forward, self._mtp, self._draft = self._forward_eager, self._mtp_eager, self._draft_eager

    def compile(self, mode: str | None = None) -> Decoder:
        """Compile the main step and the MTP step with static shapes (inductor; mode
        "reduce-overhead" adds CUDA graphs on a GPU). Each distinct (batch, new tokens, bound)
        compiles once; the entry points keep those few (DecodeSteps)."""
        for block in [*self.blocks, *(m.block for m in self.mtp)]:
            if block.is_moe:
                block.ffn.gather_layout()
        # graphs per step function: batch sizes x token counts x cache lengths (DecodeSteps)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self._forward = torch.compile(self._forward_eager, dynamic=False, mode=mode)
        self._mtp = torch.compile(self._mtp_eager, dynamic=False, mode=mode)
        self._draft = torch.compile(self._draft_eager, dynamic=False, mode=mode)
        self.compiled = True
        return self

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed_w)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache for max_len tokens per row (more when compiled: `cache_len`)."""
        return KVCache(self.n_main, len(self.mtp), batch_size, self.cache_len(max_len), self.cfg.kv_lora_rank,
                       self.cfg.qk_rope_head_dim, device=self.device, dtype=self.dtype)

    def _inputs(self, cache_len: int, positions: torch.Tensor, bound: int | None):
        b = positions.shape[0]
        if bound is None:
            bound = int(positions.max()) + 1
        if bound > cache_len:
            raise ValueError(f"Decoder: positions up to {bound - 1} do not fit a cache of max_len {cache_len}")
        if b not in self._rows:
            self._rows[b] = torch.arange(b, device=self.device)[:, None]
        slots = self._slots[:bound] if bound <= len(self._slots) else torch.arange(bound, device=self.device)
        return self._rows[b], slots, bound

    def forward(self, embeds: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                bound: int | None = None, last_only: bool = False, compiled: bool = True,
                valid: torch.Tensor | None = None) -> DecodeOutput:
        """valid [B, T] bool: the tokens that count in the routing counts (None: all)."""
        rows, slots, bound = self._inputs(cache.max_len, positions, bound)
        bufs = [cache.layer(i).buf for i in range(self.n_main)]
        fn = self._forward if compiled else self._forward_eager
        logits, hidden, counts = fn(embeds, bufs, rows, positions, slots, last_only, valid)
        return DecodeOutput(logits, hidden, counts)

    __call__ = forward

    def _prepare(self, positions, slots):
        cos, sin = self.rope(positions)
        c, s = rope_tables(cos, sin)
        mask_bias = torch.zeros(positions.shape + slots.shape, device=positions.device)
        mask_bias.masked_fill_(slots > positions[..., None], float("-inf"))
        return c, s, mask_bias[:, :, None]  # [B, T, 1, S]: the same for every head

    def _forward_eager(self, x, bufs, rows, positions, slots, last_only: bool, valid=None):
        c, s, mask_bias = self._prepare(positions, slots)
        bound = slots.shape[0]
        counts = []
        for block, buf in zip(self.blocks, bufs):
            x, n = block(x, c, s, buf, rows, positions, mask_bias, bound, valid)
            if n is not None:
                counts.append(n)
        h = x[:, -1:] if last_only else x
        logits = F.linear(rms_norm(h, self.norm, self.eps), self.head)
        counts = torch.stack(counts) if counts else x.new_zeros(0, x.shape[0], 0, dtype=torch.float32)
        return logits, x, counts

    def mtp_step(self, k: int, hidden_prev: torch.Tensor, embeds_ahead: torch.Tensor, cache: KVCache,
                 positions: torch.Tensor, bound: int | None = None,
                 compiled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP depth k (1-based) on aligned [B, n, D] inputs at `positions` of its own cache layer
        -> (logits [B, n, V], hidden [B, n, D]); as Transformer.mtp_step."""
        if not 1 <= k <= len(self.mtp):
            raise ValueError(f"mtp_step: depth {k} not in 1..{len(self.mtp)} (num_nextn_predict_layers)")
        rows, slots, bound = self._inputs(cache.max_len, positions, bound)
        fn = self._mtp if compiled else self._mtp_eager
        return fn(k - 1, hidden_prev, embeds_ahead, cache.mtp_layer(k).buf, rows, positions, slots)

    def draft(self, hidden: torch.Tensor, ahead: torch.Tensor, cache: KVCache, start: int,
              depth: int = 1) -> Draft:
        """As DecodeSteps.draft, in one function (compiled with the main step): every position's
        cache entry, but the attention, FFN, head and proposal only at the last position."""
        b, n = hidden.shape[:2]
        if not ahead.is_floating_point():
            ahead = self.embed(ahead)
        compiled = self.compiled and n <= self.compiled_tokens
        if compiled:  # slices of a longer hidden state: standard strides, one graph per shape
            hidden = hidden.clone(memory_format=torch.contiguous_format)
            ahead = ahead.clone(memory_format=torch.contiguous_format)
        positions = torch.arange(start, start + n, device=hidden.device).expand(b, n)
        rows, slots, _ = self._inputs(cache.max_len, positions, cache.max_len if compiled else start + n)
        fn = self._draft if compiled else self._draft_eager
        return Draft(*fn(depth - 1, hidden, ahead, cache.mtp_layer(depth).buf, rows, positions, slots))

    def _mtp_hidden(self, i: int, hidden_prev, embeds_ahead, buf, rows, positions, slots, last_only: bool = False):
        """MTP module i's block output: M(W [enorm(e); hnorm(h)]) at `positions` of its cache
        (last_only: at the last of them, every position's cache entry still written)."""
        m = self.mtp[i]
        c, s, mask_bias = self._prepare(positions, slots)
        x = F.linear(torch.cat([rms_norm(embeds_ahead, m.enorm, self.eps), rms_norm(hidden_prev, m.hnorm, self.eps)],
                               -1), m.eh_proj)
        h, _ = m.block(x, c, s, buf, rows, positions, mask_bias, slots.shape[0], last_only=last_only)
        return h

    def _mtp_eager(self, i: int, hidden_prev, embeds_ahead, buf, rows, positions, slots):
        h = self._mtp_hidden(i, hidden_prev, embeds_ahead, buf, rows, positions, slots)
        return F.linear(rms_norm(h, self.mtp[i].norm, self.eps), self.head), h

    def _draft_eager(self, i: int, hidden_prev, embeds_ahead, buf, rows, positions, slots):
        # Only the last position's output is ever read (the proposal, and the next depth's input):
        # the others need only their cache entries, so their attention and FFN are skipped.
        h = self._mtp_hidden(i, hidden_prev, embeds_ahead, buf, rows, positions, slots, last_only=True)
        logits = F.linear(rms_norm(h[:, -1], self.mtp[i].norm, self.eps), self.head)
        probs, tokens = logits.float().softmax(-1).max(-1)
        return tokens, probs, h
