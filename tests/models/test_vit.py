import dataclasses

import pytest
import torch
from _utils import OpsSeen
from torch import nn

from blip_fast.models.configs import VisionConfig
from blip_fast.models.vit import VisionTransformer, interpolate_pos_embed
from blip_fast.ops import PackedLinear

CFG = dict(image_size=64, patch_size=16, width=48, depth=3, heads=2)


def test_tokens_and_shape():
    vit = VisionTransformer(VisionConfig(**CFG)).eval()
    out = vit(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 17, 48)
    assert VisionConfig(image_size=224).num_tokens == 197
    assert VisionConfig(image_size=384).num_tokens == 577


def test_bad_pixels_named():
    vit = VisionTransformer(VisionConfig(**CFG))
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\), got \(2, 3, 32, 32\)"):
        vit(torch.randn(2, 3, 32, 32))


def test_grad_checkpointing_is_exact():
    torch.manual_seed(0)
    plain = VisionTransformer(VisionConfig(**CFG)).train()
    ckpt = VisionTransformer(VisionConfig(**CFG, grad_checkpointing=True, ckpt_layer=2)).train()
    ckpt.load_state_dict(plain.state_dict())
    assert [b.grad_ckpt for b in ckpt.blocks] == [False, True, True]  # the last ckpt_layer blocks
    x = torch.randn(2, 3, 64, 64)
    a, b = plain(x), ckpt(x)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=n)


def test_drop_path_large_preset_trains_only():
    """Drop path: the large preset's linear ramp; in eval the model is the same weights
    without drop path, in training some samples skip blocks."""
    cfg = VisionConfig.preset("large", image_size=32, width=32, depth=4, heads=2)
    assert cfg.drop_path_rate == 0.1
    vit = VisionTransformer(cfg)
    assert [round(b.drop_path.p, 4) for b in vit.blocks] == [0.0, 0.0333, 0.0667, 0.1]
    plain = VisionTransformer(dataclasses.replace(cfg, drop_path_rate=0.0))
    plain.load_state_dict(vit.state_dict())
    x = torch.randn(32, 3, 32, 32)  # P(no sample drops a block) = 0.81^32 ~ 1e-3
    with torch.no_grad():
        torch.testing.assert_close(vit.eval()(x), plain.eval()(x), rtol=0, atol=0)
        assert not torch.equal(vit.train()(x), plain.train()(x))


def test_interpolate_pos_embed_keeps_cls_and_is_bicubic():
    pe = torch.randn(1, 1 + 4 * 4, 8)
    out = interpolate_pos_embed(pe, 1 + 6 * 6)
    assert out.shape == (1, 37, 8)
    torch.testing.assert_close(out[:, :1], pe[:, :1], rtol=0, atol=0)
    grid = pe[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 36, 8))
    assert interpolate_pos_embed(pe, 17) is pe
    with pytest.raises(ValueError, match="square grid"):
        interpolate_pos_embed(pe, 20)


def test_packed_copy_is_the_same_vit_with_gelu_and_residuals_inside_the_gemm():
    torch.manual_seed(0)
    vit = VisionTransformer(VisionConfig(**CFG)).eval()
    packed = vit.packed("onednn")
    mlp = packed.blocks[0].mlp
    assert isinstance(mlp.fc1, PackedLinear) and mlp.fc1.activation == "gelu"
    assert isinstance(mlp.act, nn.Identity) and isinstance(mlp.fc2, PackedLinear)
    original = vit.blocks[0].mlp  # untouched, and every other tensor shared
    assert type(original.fc1) is nn.Linear and isinstance(original.act, nn.GELU)
    assert packed.pos_embed is vit.pos_embed
    assert all(b.residual_in_gemm for b in packed.blocks)
    assert not any(b.residual_in_gemm for b in vit.blocks)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), OpsSeen() as seen:
        got = packed(x)
    assert sum("_linear_pointwise.binary" in n for n in seen.names) == 2 * len(packed.blocks)
    with torch.no_grad():
        torch.testing.assert_close(got, vit(x), rtol=1e-5, atol=1e-5)
    bf16 = vit.packed("onednn", torch.bfloat16)
    assert not any(b.residual_in_gemm for b in bf16.blocks)  # as its GELU, below
    assert bf16.norm.weight.dtype == torch.bfloat16 and vit.norm.weight.dtype == torch.float32
    # in bf16 the GELU runs apart: the GEMM's post-op rounds away from fp32's captions
    assert bf16.blocks[0].mlp.fc1.activation is None and isinstance(bf16.blocks[0].mlp.act, nn.GELU)
    assert vit.packed("reference") is vit
