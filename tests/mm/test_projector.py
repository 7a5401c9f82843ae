"""Projector: shapes, pixel-shuffle grouping and order, position embedding, errors."""

import pytest
import torch

from mm.projector import Projector, pixel_shuffle


def test_shapes_with_and_without_pixel_shuffle():
    x = torch.randn(2, 8 * 6, 32)
    plain = Projector(32, 48, grid=(8, 6))
    assert plain.num_tokens == 48 and plain(x).shape == (2, 48, 48)
    shuffled = Projector(32, 48, grid=(8, 6), pixel_shuffle=True, hidden_mult=2)
    assert shuffled.num_tokens == 12 and shuffled(x).shape == (2, 12, 48)
    assert shuffled.fc1.in_features == 128 and shuffled.fc1.out_features == 96
    assert shuffled.pos_embed.shape == (12, 48)


def test_pixel_shuffle_groups_each_2x2_neighbourhood_in_order():
    h, w, c = 4, 6, 3
    # token (r, col) carries the value 100*r + col in every channel, plus the channel index / 10
    rows = torch.arange(h)[:, None, None] * 100
    cols = torch.arange(w)[None, :, None]
    chans = torch.arange(c)[None, None, :] / 10
    tokens = (rows + cols + chans).reshape(1, h * w, c).float()
    out = pixel_shuffle(tokens, (h, w))
    assert out.shape == (1, (h // 2) * (w // 2), 4 * c)
    for i in range(h // 2):
        for j in range(w // 2):
            got = out[0, i * (w // 2) + j].reshape(4, c)
            for k, (dr, dc) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
                expect = 100 * (2 * i + dr) + (2 * j + dc) + torch.arange(c) / 10
                torch.testing.assert_close(got[k], expect.float())


def test_pixel_shuffle_is_a_permutation():
    tokens = torch.randn(3, 16, 5)
    out = pixel_shuffle(tokens, (4, 4))
    assert torch.equal(out.flatten(1).sort(dim=1).values, tokens.flatten(1).sort(dim=1).values)


def test_position_embedding_is_per_token_and_optional():
    torch.manual_seed(0)
    with_pos = Projector(8, 16, grid=(2, 2))
    without = Projector(8, 16, grid=(2, 2), pos_embed=False)
    without.load_state_dict({k: v for k, v in with_pos.state_dict().items() if k != "pos_embed"})
    assert without.pos_embed is None
    assert 0 < with_pos.pos_embed.std() < 0.05
    x = torch.randn(2, 4, 8)
    delta = with_pos(x) - without(x)
    torch.testing.assert_close(delta, with_pos.pos_embed.expand(2, -1, -1))
    # identical input tokens at different positions come out different only because of the embedding
    same = torch.ones(1, 4, 8)
    assert not torch.allclose(with_pos(same)[0, 0], with_pos(same)[0, 1])
    torch.testing.assert_close(without(same)[0, 0], without(same)[0, 1])


def test_mlp_is_two_linear_layers_with_gelu():
    proj = Projector(4, 6, grid=(1, 1), pos_embed=False)
    x = torch.randn(1, 1, 4)
    ref = proj.fc2(torch.nn.functional.gelu(proj.fc1(x)))
    torch.testing.assert_close(proj(x), ref)
    assert sum(isinstance(m, torch.nn.Linear) for m in proj.modules()) == 2


def test_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"even token grid, got \(h, w\) = \(3, 4\)"):
        Projector(8, 8, grid=(3, 4), pixel_shuffle=True)
    proj = Projector(8, 8, grid=(4, 4))
    with pytest.raises(ValueError, match=r"expected tokens \[B, 16, 8\].*got \(2, 9, 8\)"):
        proj(torch.randn(2, 9, 8))
    with pytest.raises(ValueError, match="even grid"):
        pixel_shuffle(torch.randn(1, 15, 2), (5, 3))


def test_gradients_reach_every_parameter():
    proj = Projector(8, 8, grid=(2, 2), pixel_shuffle=True)
    proj(torch.randn(2, 4, 8)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
