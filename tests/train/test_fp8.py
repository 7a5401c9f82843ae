"""FP8 recipe: quantisation granularity, SQNR bounds of the three GEMMs, conversion, training."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from train import fp8
from train.fp8 import quant as fp8_quant

E4M3 = torch.float8_e4m3fn


def _grads(module, x, dy):
    """Output, input grad and weight grads of module(x) for the upstream gradient dy."""
    x = x.detach().clone().requires_grad_()
    y = module(x)
    params = list(module.parameters())
    gx, *gp = torch.autograd.grad(y, [x, *params], dy)
    return y.detach(), gx, gp


# ---------------------------------------------------------------- quantisation


def test_decode_is_exact_for_every_e4m3_code():
    codes = torch.arange(256, dtype=torch.uint8).view(E4M3).reshape(2, 128)
    got = fp8.dequantize_tiles(codes, torch.ones(2, 1))
    want = codes.float()
    finite = ~want.isnan()  # 0x7F / 0xFF are NaN in e4m3fn and never produced by quantisation
    assert torch.equal(got[finite], want[finite])


def test_round_trip_sqnr_on_gaussian_data():
    x = torch.randn(256, 512)
    q, s = fp8.quantize_tiles(x)
    assert q.dtype == E4M3 and s.shape == (256, 4)
    assert torch.equal(q.float().abs().reshape(256, 4, 128).amax(-1), torch.full((256, 4), 448.0))
    assert 25 <= fp8.sqnr_db(x, fp8.dequantize_tiles(q, s)) < 35  # quantised, but finely
    qb, sb = fp8.quantize_blocks(x)
    assert sb.shape == (2, 4)
    assert 25 <= fp8.sqnr_db(x, fp8.dequantize_blocks(qb, sb)) < 35


def test_partial_tiles_and_batched_blocks():
    x = torch.randn(3, 300)  # 300 = 2 whole tiles + 44
    q, s = fp8.quantize_tiles(x)
    assert q.shape == (3, 300) and s.shape == (3, 3)
    assert torch.allclose(s[:, 2], x[:, 256:].abs().amax(-1) / 448)
    w = torch.randn(4, 200, 384)  # stacked experts; rows 128..199 form a partial block
    qw, sw = fp8.quantize_blocks(w)
    assert sw.shape == (4, 2, 3)
    assert torch.allclose(sw[2, 1, 0], w[2, 128:, :128].abs().max() / 448)
    assert fp8.sqnr_db(w, fp8.dequantize_blocks(qw, sw)) >= 25
    with pytest.raises(ValueError, match=r"must have shape \(3, 3\), found \(3, 2\)"):
        fp8.dequantize_tiles(q, s[:, :2])


def test_scales_are_per_1x128_tile_and_per_128x128_block():
    x = torch.randn(8, 512)
    q0, s0 = fp8.quantize_tiles(x)
    x[3, 130] = 1000.0  # tile (row 3, columns 128..255)
    q1, s1 = fp8.quantize_tiles(x)
    changed = s0 != s1
    assert changed[3, 1] and changed.sum() == 1
    d0, d1 = fp8.dequantize_tiles(q0, s0), fp8.dequantize_tiles(q1, s1)
    outside = torch.ones_like(x, dtype=torch.bool)
    outside[3, 128:256] = False
    assert torch.equal(d0[outside], d1[outside])
    assert not torch.equal(d0[3, 128:256], d1[3, 128:256])

    w = torch.randn(384, 512)
    q0, s0 = fp8.quantize_blocks(w)
    w[200, 300] = 1000.0  # block (rows 128..255, columns 256..383)
    q1, s1 = fp8.quantize_blocks(w)
    changed = s0 != s1
    assert changed[1, 2] and changed.sum() == 1
    d0, d1 = fp8.dequantize_blocks(q0, s0), fp8.dequantize_blocks(q1, s1)
    outside = torch.ones_like(w, dtype=torch.bool)
    outside[128:256, 256:384] = False
    assert torch.equal(d0[outside], d1[outside])


def _fake(t, tile_dim):
    """Dequantised 1x128 tiles of t running along tile_dim."""
    tt = t.movedim(tile_dim, -1)
    return fp8.dequantize_tiles(*fp8.quantize_tiles(tt)).movedim(-1, tile_dim)


def test_each_gemm_tiles_along_its_reduction_dim():
    lin = nn.Linear(256, 384, bias=False)
    layer = fp8.Fp8Linear.from_linear(lin, emulate_dtype=torch.float32)
    x, dy = torch.randn(200, 256), torch.randn(200, 384)
    y, gx, (gw,) = _grads(layer, x, dy)
    w_fake = fp8.dequantize_blocks(*fp8.quantize_blocks(lin.weight.detach()))
    assert torch.allclose(y, _fake(x, 1) @ w_fake.t(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(gx, _fake(dy, 1) @ w_fake, rtol=1e-5, atol=1e-5)
    # weight gradient: dy and x re-tiled along tokens (200 = one whole tile + a partial one)
    assert torch.allclose(gw, _fake(dy, 0).t() @ _fake(x, 0), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(gw, _fake(dy, 1).t() @ _fake(x, 1), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- Fp8Linear


@pytest.mark.parametrize("emulate_dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear_sqnr_against_fp32(emulate_dtype):
    ref = nn.Linear(256, 384)
    layer = fp8.Fp8Linear.from_linear(copy.deepcopy(ref), emulate_dtype=emulate_dtype)
    x, dy = torch.randn(4, 16, 256), torch.randn(4, 16, 384)
    y_ref, gx_ref, (gw_ref, gb_ref) = _grads(ref, x, dy)
    y, gx, (gw, gb) = _grads(layer, x, dy)
    assert y.shape == (4, 16, 384) and y.dtype == torch.float32
    assert fp8.sqnr_db(y_ref, y) >= 25
    assert fp8.sqnr_db(gx_ref, gx) >= 20
    assert fp8.sqnr_db(gw_ref, gw) >= 20
    assert torch.allclose(gb, gb_ref, atol=1e-5)  # bias is never quantised


def test_fp8_linear_under_bf16_autocast():
    ref = nn.Linear(256, 128)
    layer = fp8.Fp8Linear.from_linear(copy.deepcopy(ref))
    x = torch.randn(32, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    assert fp8.sqnr_db(ref(x), y.float()) >= 25


def test_scaled_mm_backend_refuses_cpu_tensors():
    layer = fp8.Fp8Linear(128, 128, backend="scaled_mm")
    with pytest.raises(RuntimeError, match="emulate"):
        layer(torch.randn(4, 128))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="emulate"):
            fp8.convert_to_fp8(nn.Sequential(nn.Linear(128, 128)), backend="scaled_mm")


# ---------------------------------------------------------------- conversion


class StandInExperts(nn.Module):
    """The RoutedExperts interface: stacked w1/w3 [E, inter, D], w2 [E, D, inter], grouped_linear."""

    def __init__(self, n_experts=4, dim=128, inter=256):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n_experts, inter, dim) * dim**-0.5)
        self.w2 = nn.Parameter(torch.randn(n_experts, dim, inter) * inter**-0.5)
        self.w3 = nn.Parameter(torch.randn(n_experts, inter, dim) * dim**-0.5)

    def forward(self, x_sorted, counts):
        offsets = counts.cumsum(0).to(torch.int32)
        h = F.silu(self.grouped_linear(x_sorted, self.w1, offsets))
        return self.grouped_linear(h * self.grouped_linear(x_sorted, self.w3, offsets), self.w2, offsets)

    def grouped_linear(self, x, w, offsets):
        sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
        return torch.cat([xe @ we.t() for xe, we in zip(x.split(sizes), w.unbind(0))])


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 128)
        self.blocks = nn.ModuleList([nn.ModuleDict(dict(
            up=nn.Linear(128, 256), down=nn.Linear(256, 128, bias=False),
            odd=nn.Linear(128, 96), norm=nn.LayerNorm(128))) for _ in range(1)])
        self.gate = nn.Linear(128, 128, bias=False)
        self.experts = StandInExperts()
        self.head = nn.Linear(128, 128)

    def forward(self, ids):
        b = self.blocks[0]
        h = self.embed(ids)
        h = h + b.down(F.gelu(b.up(b.norm(h)))) + F.pad(b.odd(h), (0, 32))
        counts = torch.tensor([5, 0, ids.numel() - 9, 4])  # expert 1 gets no tokens
        h = h + self.experts(h.reshape(-1, 128), counts).reshape(h.shape) * self.gate(h).sigmoid()
        return self.head(h)


def test_convert_to_fp8_report_params_and_disable():
    model = TinyModel()
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    report = fp8.convert_to_fp8(model)
    assert report.converted == ["blocks.0.up", "blocks.0.down", "experts"]
    assert [name for name, _ in report.skipped] == ["blocks.0.odd", "gate", "head"]
    assert "not multiples of 128" in dict(report.skipped)["blocks.0.odd"]
    assert isinstance(model.blocks[0].up, fp8.Fp8Linear) and type(model.head) is nn.Linear
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys

    ids = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        want = ref(ids)
        with fp8.fp8_disabled(model):
            assert torch.equal(model(ids), want)
        got = model(ids)  # FP8 again after the block
    assert not torch.equal(got, want) and fp8.sqnr_db(want, got) >= 20

    assert fp8.convert_to_fp8(model).converted == []  # already converted: nothing to do


def test_convert_to_fp8_module_filter_and_optimizer_state():
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    report = fp8.convert_to_fp8(model, module_filter=lambda name, m: name != "blocks.0.down")
    assert report.converted == ["blocks.0.up", "experts"]
    assert ("blocks.0.down", "rejected by module_filter") in report.skipped
    before = model.blocks[0].up.weight.detach().clone()
    model(torch.randint(0, 50, (2, 8))).square().mean().backward()
    opt.step()  # the optimizer built before conversion still owns the weights FP8 trains
    assert not torch.equal(model.blocks[0].up.weight, before)


def test_fp8_grouped_experts_against_fp32():
    ref = StandInExperts(n_experts=4, dim=128, inter=256)
    experts = copy.deepcopy(ref)
    assert fp8.convert_to_fp8(nn.ModuleDict(dict(experts=experts))).converted == ["experts"]
    counts = torch.tensor([70, 0, 150, 36])  # expert 1 idle
    offsets = counts.cumsum(0).to(torch.int32)
    x, dy = torch.randn(256, 128), torch.randn(256, 256)

    def one_gemm(module):
        xg = x.clone().requires_grad_()
        y = module.grouped_linear(xg, module.w1, offsets)
        gx, gw = torch.autograd.grad(y, [xg, module.w1], dy)
        return y.detach(), gx, gw

    (y_ref, gx_ref, gw_ref), (y, gx, gw) = one_gemm(ref), one_gemm(experts)
    assert fp8.sqnr_db(y_ref, y) >= 25
    assert fp8.sqnr_db(gx_ref, gx) >= 20
    assert fp8.sqnr_db(gw_ref, gw) >= 20
    assert torch.equal(gw[1], torch.zeros_like(gw[1]))
    for e, (s, t) in enumerate([(0, 70), (70, 70), (70, 220), (220, 256)]):
        if t > s:
            assert fp8.sqnr_db(gw_ref[e], gw[e]) >= 20

    # the whole SwiGLU expert stack: three chained FP8 GEMMs
    out_ref, out = ref(x, counts), experts(x, counts)
    assert fp8.sqnr_db(out_ref, out) >= 20
    with fp8.fp8_disabled(experts):
        assert torch.equal(experts(x, counts), out_ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # keeps x's dtype, like torch's grouped_mm
        assert experts.grouped_linear(x, experts.w1, offsets).dtype == torch.float32


# ---------------------------------------------------------------- training


def _train_mlp(use_fp8, steps=50):
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(128, 256), nn.Tanh(), nn.Linear(256, 128))
    x = torch.randn(256, 128)
    with torch.no_grad():
        target = teacher(x)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
    if use_fp8:
        assert fp8.convert_to_fp8(model).converted == ["0", "2"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_fp8_training_tracks_fp32():
    ref, low = _train_mlp(False), _train_mlp(True)
    assert ref[-1] < 0.1 * ref[0] and low[-1] < 0.1 * low[0]
    assert abs(low[-1] - ref[-1]) <= 0.1 * ref[-1]


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_scaled_mm_matches_emulate_on_gpu():
    torch.manual_seed(0)
    ref = nn.Linear(512, 384).cuda()
    x, dy = torch.randn(300, 512, device="cuda"), torch.randn(300, 384, device="cuda")
    emulated = fp8.Fp8Linear.from_linear(copy.deepcopy(ref), emulate_dtype=torch.float32)
    real = fp8.Fp8Linear.from_linear(copy.deepcopy(ref), backend="scaled_mm")
    (y0, gx0, g0), (y1, gx1, g1), (y2, gx2, g2) = (_grads(m, x, dy) for m in (ref, emulated, real))
    blockwise = fp8_quant._SCALED_MM_MODE.get(torch.cuda.current_device()) == "blockwise"
    for a, b, c, floor in ((y0, y1, y2, 25), (gx0, gx1, gx2, 20), (g0[0], g1[0], g2[0], 20)):
        assert fp8.sqnr_db(a, c) >= floor  # real FP8 vs fp32
        if blockwise:  # same tiles and codes as emulate: only accumulation order differs
            assert fp8.sqnr_db(b, c) >= 40
