"""VisionEncoder: token shapes, layer choice, freezing, local weights, fallbacks, speed options."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import vision.encoder as encoder_module
from vision import VisionEncoder, build_transform

VIT = "vit_tiny_patch16_224"
# timm's test_* models are the real architectures at toy width: the invariants below hold for any size
RESNET, SMALL_VIT, CONVNEXT = "test_resnet", "test_vit", "test_convnext"


@pytest.mark.parametrize(
    "name, size, grid, dim",
    [("resnet18", 96, (3, 3), 512), ("resnet18", 128, (4, 4), 512), (VIT, 224, (14, 14), 192),
     (VIT, 96, (6, 6), 192), ("convnext_atto", 64, (2, 2), 320)],
)
def test_token_shapes(name, size, grid, dim):
    enc = VisionEncoder(name, image_size=size)
    tokens = enc(torch.randn(2, 3, size, size))
    assert tokens.shape == (2, grid[0] * grid[1], dim)
    assert (enc.grid, enc.out_dim, enc.num_tokens) == (grid, dim, grid[0] * grid[1])
    assert enc.data_config["input_size"] == (3, size, size)


def test_cnn_tokens_are_the_row_major_feature_map():
    enc = VisionEncoder(RESNET, image_size=96).eval()
    x = torch.randn(1, 3, 96, 96)
    fmap = enc.model.forward_features(x)  # [1, 96, 3, 3]
    tokens = enc(x)
    for row in range(3):
        for col in range(3):
            torch.testing.assert_close(tokens[0, row * 3 + col], fmap[0, :, row, col])


def test_vit_drops_prefix_tokens_and_keeps_final_norm():
    enc = VisionEncoder(SMALL_VIT, image_size=64, model_kwargs=dict(reg_tokens=4)).eval()
    assert enc.model.num_prefix_tokens == 5  # class + 4 registers
    x = torch.randn(2, 3, 64, 64)
    ref = enc.model.forward_features(x)[:, 5:]
    torch.testing.assert_close(enc(x), ref)


def test_feature_layer_minus_two_is_the_previous_stage():
    torch.manual_seed(1)
    ref = timm.create_model(RESNET, num_classes=0, global_pool="").eval()
    enc = VisionEncoder(RESNET, image_size=64, feature_layer=-2).eval()
    missing, _ = enc.model.load_state_dict(ref.state_dict(), strict=False)
    assert not missing
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = ref.maxpool(ref.act1(ref.bn1(ref.conv1(x))))
        layer3 = ref.layer3(ref.layer2(ref.layer1(h)))  # [2, C3, 4, 4]
        torch.testing.assert_close(enc(x), layer3.flatten(2).transpose(1, 2))
    assert enc.out_dim == layer3.shape[1] and enc.grid == (4, 4)
    assert not any(n.startswith("model.layer4") for n, _ in enc.named_parameters())  # pruned

    vit = VisionEncoder(SMALL_VIT, image_size=64, feature_layer=-2).eval()
    with torch.no_grad():
        h = vit.model.norm_pre(vit.model._pos_embed(vit.model.patch_embed(x)))
        h = vit.model.blocks(h)  # pruned to the first 5 of 6 blocks; no final norm
    assert len(vit.model.blocks) == 5
    torch.testing.assert_close(vit(x), h[:, 1:])
    with pytest.raises(ValueError, match="feature_layer=-9"):
        VisionEncoder(RESNET, feature_layer=-9)


def _trainable(enc):
    return {n for n, p in enc.named_parameters() if p.requires_grad}


def test_freeze_resnet_keeps_bn_stats_and_trains_last_stage():
    enc = VisionEncoder(RESNET, image_size=64, freeze=True, unfreeze_last=1)
    layer4 = {n for n, _ in enc.named_parameters() if n.startswith("model.layer4.")}
    assert layer4 and _trainable(enc) == layer4
    enc.train()
    assert not enc.model.bn1.training and not enc.model.layer3[0].bn1.training
    assert enc.model.layer4[0].bn1.training
    stem_stats = enc.model.bn1.running_mean.clone()
    last_stats = enc.model.layer4[0].bn2.running_mean.clone()
    enc(torch.randn(2, 3, 64, 64) * 3 + 1)
    assert torch.equal(enc.model.bn1.running_mean, stem_stats)
    assert not torch.equal(enc.model.layer4[0].bn2.running_mean, last_stats)

    frozen = VisionEncoder(RESNET, image_size=64, freeze=True).train()
    assert not _trainable(frozen)
    assert not any(m.training for m in frozen.model.modules())
    with pytest.raises(ValueError, match="unfreeze_last=5 but test_resnet has 4 blocks"):
        VisionEncoder(RESNET, freeze=True, unfreeze_last=5)
    with pytest.raises(ValueError, match="needs freeze=True"):
        VisionEncoder(RESNET, unfreeze_last=1)


def test_freeze_vit_trains_last_blocks_and_final_norm():
    enc = VisionEncoder(SMALL_VIT, image_size=32, freeze=True, unfreeze_last=2).train()
    expect = {n for n, _ in enc.named_parameters() if n.startswith(("model.blocks.4.", "model.blocks.5.",
                                                                      "model.norm."))}
    assert _trainable(enc) == expect and len(expect) > 2
    assert not enc.model.blocks[3].training and enc.model.blocks[4].training
    enc(torch.randn(1, 3, 32, 32)).sum().backward()
    assert enc.model.blocks[4].attn.qkv.weight.grad is not None
    assert enc.model.patch_embed.proj.weight.grad is None


@pytest.mark.parametrize("name, suffix", [(RESNET, ".safetensors"), (CONVNEXT, ".pth")])
def test_weights_from_local_file(tmp_path, name, suffix):
    torch.manual_seed(7)
    src = timm.create_model(name).eval()  # with its classifier: the loader must drop it
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(src.state_dict(), str(path))
    else:
        torch.save(src.state_dict(), path)
    torch.manual_seed(0)
    enc = VisionEncoder(name, image_size=64, pretrained_file=str(path)).eval()
    fresh = VisionEncoder(name, image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = src.forward_features(x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(enc(x), ref)
        assert not torch.allclose(fresh(x), ref)


def test_missing_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "w.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere/w.safetensors"):
        VisionEncoder(RESNET, pretrained_file=str(missing))
    with pytest.raises(ValueError, match="num_classes"):
        VisionEncoder(RESNET, model_kwargs=dict(num_classes=10))


def test_features_only_fallback_matches(monkeypatch):
    main = VisionEncoder(RESNET, image_size=64, feature_layer=-2).eval()
    monkeypatch.setattr(encoder_module, "_has_intermediates", lambda model: False)
    fallback = VisionEncoder(RESNET, image_size=64, feature_layer=-2).eval()
    assert type(fallback.model).__name__ == "FeatureListNet"
    missing, _ = fallback.model.load_state_dict(main.model.state_dict(), strict=False)
    assert not missing
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fallback(x), main(x))
    assert (fallback.grid, fallback.out_dim) == (main.grid, main.out_dim) == ((4, 4), main(x).shape[-1])


def test_channels_last_bf16_and_grad_checkpointing():
    enc = VisionEncoder(RESNET, image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = enc(x)
        enc.to_channels_last()
        assert enc.model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(enc(x), ref, rtol=1e-4, atol=1e-4)
        enc.to(torch.bfloat16)
        out = enc(x)  # fp32 pixels into a bf16 model
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref).abs().mean() < 0.05 * ref.abs().mean()

    ckpt = VisionEncoder(RESNET, image_size=64, grad_checkpointing=True).eval()
    plain = VisionEncoder(RESNET, image_size=64).eval()
    plain.load_state_dict(ckpt.state_dict())
    assert ckpt.model.grad_checkpointing
    for enc_ in (ckpt, plain):
        enc_(x).square().mean().backward()
    torch.testing.assert_close(ckpt.model.layer2[0].conv1.weight.grad, plain.model.layer2[0].conv1.weight.grad)


def test_probe_keeps_modes_and_stats_and_transform_fits():
    enc = VisionEncoder(RESNET, image_size=64).train()
    stats = enc.model.bn1.running_mean.clone()
    assert enc.grid == (2, 2)
    assert enc.training and enc.model.bn1.training
    assert torch.equal(enc.model.bn1.running_mean, stats)
    cfg = enc.data_config
    assert cfg["mean"] == timm.data.resolve_model_data_config(enc.model)["mean"]
    tf = build_transform(cfg)
    img = Image.fromarray(np.zeros((50, 70, 3), dtype=np.uint8))
    assert enc.eval()(tf(img)[None]).shape == (1, 4, enc.out_dim)


def test_uncached_timm_weights_give_a_clear_error(monkeypatch):
    create = encoder_module._create

    def offline(name, image_size, **kwargs):  # what huggingface_hub raises with no cache and no network
        if kwargs.get("pretrained"):
            raise FileNotFoundError("cannot find the requested files in the local cache")
        return create(name, image_size, **kwargs)

    monkeypatch.setattr(encoder_module, "_create", offline)
    with pytest.raises(RuntimeError, match="'test_resnet'.*local Hugging Face cache.*pretrained_file"):
        VisionEncoder(RESNET, pretrained=True)
    assert VisionEncoder(RESNET, image_size=32).num_tokens == 1
