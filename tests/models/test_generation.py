import logging

import pytest
import torch

from blip_fast.models import blip_caption, create_model
from blip_fast.models.configs import BlipConfig
from blip_fast.models.generation import _exact_top, _Stepper, _topk, beam_search, sample
from blip_fast.ops.linear import PackedLinear, native_bf16


def _model():
    torch.manual_seed(1)
    m = create_model("caption", "blip_tiny", backend="reference").eval()
    with torch.no_grad():  # a peaked LM head so sequences end before max_length sometimes
        m.text_decoder.cls.predictions.bias[102] += 3.0
    return m


def test_greedy_equals_full_recompute_argmax():
    m = _model()
    img = m.visual_encoder(torch.randn(2, 3, 64, 64))
    prompt = m.prompt_ids(2, "cpu")
    got = sample(m.text_decoder, img, prompt, max_length=12, min_length=6)
    for b in range(2):
        seq = prompt[b : b + 1]
        while seq.shape[1] < 12:
            logits = m.text_decoder(seq, torch.ones_like(seq), img[b : b + 1])[0, -1]
            if seq.shape[1] < 6:
                logits[102] = -float("inf")
            nxt = int(logits.argmax())
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
            if nxt == 102:
                break
        assert got[b] == seq[0].tolist()
        assert len(got[b]) >= 6


@pytest.mark.parametrize("v", [30524, 91572, 1000, 40])
def test_topk_equals_torch_topk(v):
    x = torch.randn(7, v)
    x[:, 5] = -float("inf")  # eos forbidden by min_length
    x[0, v - 1] = 10.0  # the winner in the tail that the strided groups leave out
    x[1, :6] = 10.0 + torch.arange(6.0)  # every winner in one group
    want, got = torch.topk(x, 6), _topk(x, 6)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_exact_top_recomputes_each_rows_largest_logits_in_fp32():
    hidden, weight, bias = torch.randn(4, 32), torch.randn(1000, 32), torch.randn(1000)
    exact = torch.addmm(bias, hidden, weight.t())
    approx = exact.bfloat16().float()
    top = _topk(approx, 16)[1]
    got = approx.clone()
    _exact_top(got, hidden, weight, bias, 16)
    torch.testing.assert_close(got.gather(1, top), exact.gather(1, top), rtol=1e-6, atol=1e-5)
    rest = torch.ones_like(got, dtype=torch.bool).scatter(1, top, False)
    assert torch.equal(got[rest], approx[rest]) and not torch.equal(approx[~rest], got[~rest])


def test_beam_search_respects_lengths_and_prompt():
    m = _model()
    img = m.visual_encoder(torch.randn(3, 3, 64, 64))
    prompt = m.prompt_ids(3, "cpu")
    beams = beam_search(m.text_decoder, img, prompt, 3, 10, 5)
    assert len(beams) == 3
    for s in beams:
        assert s[:4] == prompt[0].tolist() and 5 <= len(s) <= 10
        assert 102 not in s[4:-1] and (s[-1] == 102 or len(s) == 10)


def test_generate_strips_prompt_and_sampling_is_seeded():
    m = _model()
    px = torch.randn(2, 3, 64, 64)
    caps = m.generate(px, num_beams=3, max_length=10, min_length=5)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    g = torch.Generator().manual_seed(3)
    a = m.generate_ids(px, sample=True, generator=g, repetition_penalty=1.1)
    g = torch.Generator().manual_seed(3)
    assert a == m.generate_ids(px, sample=True, generator=g, repetition_penalty=1.1)


needs_bf16 = pytest.mark.skipif(not native_bf16(), reason="CPU without AMX / AVX512-BF16")


def _fast_model():
    """``_model``'s weights on the default backends (oneDNN linear layers on CPU)."""
    ref = _model()
    m = create_model("caption", "blip_tiny").eval()
    m.load_state_dict(ref.state_dict())
    return m, ref


def test_cross_attention_kv_projected_once_per_image(monkeypatch):
    m = _model()
    rows = []
    for layer in m.text_decoder.bert.encoder.layer:
        cross = layer.crossattention.self
        project = cross.kv
        monkeypatch.setattr(
            cross, "kv", lambda x, project=project: rows.append(len(x)) or project(x)
        )
    m.generate_ids(torch.randn(2, 3, 64, 64), num_beams=3, max_length=10)
    assert rows == [2] * len(m.text_decoder.bert.encoder.layer)


@needs_bf16
@pytest.mark.parametrize("fp32_layers", [False, True])
@torch.no_grad()
def test_bf16_decoder_step_matches_fp32_reference(fp32_layers):
    """bf16 logits within bf16 rounding of fp32's; with ``fp32_layers`` the layers' keys /
    values (the cache) are fp32's within fp32 rounding, without it they are bf16."""
    m, ref = _fast_model()
    # image tokens as the bf16 ViT hands them over, so that both decoders read the same ones
    img = ref.visual_encoder(torch.randn(3, 3, 64, 64)).bfloat16().float()
    prompt = ref.prompt_ids(3, "cpu")
    want_step = _Stepper(ref.text_decoder, img)
    want = want_step(prompt)
    _, decoder, dtype, _ = m._inference_modules("bf16", "cpu")
    assert dtype == torch.bfloat16 and isinstance(decoder.cls.predictions.decoder, PackedLinear)
    got_step = _Stepper(decoder, img.bfloat16(), dtype, fp32_layers)
    got = got_step(prompt)
    assert got.dtype == torch.float32
    assert float((got - want).abs().max() / want.abs().max()) < 1e-2
    for key in ("self_k", "cross_v"):
        k_got, k_want = got_step.cache[-1][key], want_step.cache[-1][key]
        if fp32_layers:
            torch.testing.assert_close(k_got, k_want, rtol=1e-5, atol=1e-5)
        else:
            assert k_got.dtype == torch.bfloat16


def test_bf16_decoder_layers_only_where_they_weigh_beside_the_lm_head():
    share = {
        name: blip_caption.decoder_layer_share(BlipConfig.preset(name).text)
        for name in ("blip_demo", "blip_small_demo", "blip_base_vit_b16_224")
    }
    assert share == pytest.approx(
        {"blip_demo": 0.059, "blip_small_demo": 0.47, "blip_base_vit_b16_224": 4.23}, rel=0.01
    )
    fp32 = {name: s < blip_caption.BF16_LAYERS_MIN_SHARE for name, s in share.items()}
    assert fp32 == {"blip_demo": True, "blip_small_demo": False, "blip_base_vit_b16_224": False}


@needs_bf16
def test_the_caption_model_chooses_fp32_layers_by_their_share(monkeypatch):
    m, _ = _fast_model()
    assert m._inference_modules("bf16", "cpu")[3]  # blip_tiny: share 0.04
    monkeypatch.setattr(blip_caption, "BF16_LAYERS_MIN_SHARE", 0.01)
    assert not m._inference_modules("bf16", "cpu")[3]
    assert m._inference_modules("fp32", "cpu")[2:] == (None, False)


@needs_bf16
def test_bf16_vit_is_an_all_bf16_copy_within_bf16_tolerance():
    """The CPU bf16 ViT runs on bf16 weights end to end (no autocast casts), the model's own
    stays fp32, and the tokens it gives the decoder are fp32's within bf16 rounding."""
    m, ref = _fast_model()
    vit, decoder, *_ = m._inference_modules("bf16", "cpu")
    assert {p.dtype for p in vit.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in m.parameters()} == {p.dtype for p in decoder.parameters()}
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want, got = ref.visual_encoder(px), vit(px.bfloat16())
    assert got.dtype == torch.bfloat16 and not got.isnan().any()
    assert float((got.float() - want).abs().max() / want.abs().max()) < 2e-2


@needs_bf16
def test_bf16_generation_runs_and_repacks_after_a_weight_change():
    m, _ = _fast_model()
    px = torch.randn(2, 3, 64, 64)
    for kwargs in (dict(num_beams=3), dict(num_beams=1), dict(sample=True)):
        ids = m.generate_ids(px, max_length=10, min_length=5, precision="bf16", **kwargs)
        prompt = m.prompt_ids(1, "cpu")[0].tolist()
        assert all(s[: len(prompt)] == prompt and 5 <= len(s) <= 10 for s in ids)
    packed = m._inference_modules("bf16", "cpu")[1]
    assert m._inference_modules("bf16", "cpu")[1] is packed  # cached while weights stand
    with torch.no_grad():
        m.visual_encoder.patch_embed.proj.weight.mul_(2)
    assert m._inference_modules("bf16", "cpu")[1] is not packed


def test_bf16_falls_back_to_fp32_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(blip_caption, "native_bf16", lambda: False)
    m = _model()
    px = torch.randn(2, 3, 64, 64)
    with caplog.at_level(logging.WARNING, logger="blip_fast"):
        got = [m.generate_ids(px, max_length=10, precision="bf16") for _ in range(2)]
    assert got[0] == got[1] == m.generate_ids(px, max_length=10)
    lines = [r for r in caplog.records if "bf16" in r.getMessage()]
    assert len(lines) == 1 and "fp32" in lines[0].getMessage()


def test_precision_is_checked():
    with pytest.raises(ValueError, match="precision must be one of"):
        _model().generate_ids(torch.randn(1, 3, 64, 64), precision="fp16")
