import pytest
import torch

from blip_fast.models import BlipConfig, create_model
from blip_fast.models.med import lm_loss
from blip_fast.ops import PackedLinear, available, resolve


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("retrieval", "blip_tiny", backend="reference").eval()


def _text(b=3, L=9):
    ids = torch.randint(1000, 2000, (b, L))
    mask = torch.ones(b, L, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


def test_text_mode_ignores_image_multimodal_uses_it(model):
    ids, mask = _text()
    enc = model.text_encoder
    img_a, img_b = torch.randn(3, 5, 64), torch.randn(3, 5, 64)
    t = enc(ids, mask, mode="text")
    torch.testing.assert_close(t, enc(ids, mask, img_a, mode="text"), rtol=0, atol=0)
    m_a, m_b = enc(ids, mask, img_a, mode="multimodal"), enc(ids, mask, img_b, mode="multimodal")
    assert (m_a - m_b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs image_embeds"):
        enc(ids, mask, mode="multimodal")
    with pytest.raises(ValueError, match="mode must be one of"):
        enc(ids, mask, mode="fusion")


def test_padding_is_masked(model):
    ids, mask = _text()
    out = model.text_encoder(ids, mask, mode="text")
    ids2 = ids.clone()
    ids2[1, 6:] = torch.randint(2000, 3000, (3,))
    out2 = model.text_encoder(ids2, mask, mode="text")
    torch.testing.assert_close(out[1, :6], out2[1, :6], rtol=1e-5, atol=1e-6)


def test_decoder_is_causal_and_kv_cache_exact():
    torch.manual_seed(0)
    dec = create_model("caption", "blip_tiny", backend="reference").eval().text_decoder
    ids, mask = _text(2, 8)
    mask[:] = 1
    img = torch.randn(2, 17, 64)
    full = dec(ids, mask, img)
    ids2 = ids.clone()
    ids2[:, 5:] = 7
    torch.testing.assert_close(dec(ids2, mask, img)[:, :5], full[:, :5], rtol=1e-5, atol=1e-5)
    cache = [dict() for _ in dec.bert.encoder.layer]
    steps = [dec(ids[:, :3], mask[:, :3], img, cache=cache)]
    for t in range(3, 8):
        steps.append(dec(ids[:, t : t + 1], mask[:, : t + 1], img, cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_lm_loss_shift_smoothing_and_ignore():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 3:] = -100
    got = lm_loss(logits, labels, 0.1)
    lp = logits[:, :-1].log_softmax(-1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    nll = -lp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    want = ((0.9 * nll - 0.1 * lp.mean(-1))[keep]).mean()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(lm_loss(logits[:, :-1], labels, 0.1), want)
    with pytest.raises(ValueError, match=r"logits \(2, 3, 11\) must be"):
        lm_loss(logits[:, :3], labels)


def test_initializer_range_sets_text_init_std():
    """TextConfig.initializer_range (BertConfig's name) is the std of every text Linear /
    Embedding weight at random init, encoder and decoder (incl. its LM head transform)."""
    import dataclasses

    cfg = BlipConfig.preset("blip_tiny")
    for std in (0.02, 0.1):
        torch.manual_seed(0)
        text = dataclasses.replace(cfg.text, initializer_range=std)
        m = create_model("caption", dataclasses.replace(cfg, text=text))
        weights = [
            mod.weight
            for mod in m.text_decoder.modules()
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding))
        ]
        assert len(weights) > 10
        for w in weights:
            assert abs(float(w.std()) / std - 1) < 0.15, (std, tuple(w.shape), float(w.std()))


def test_scratch_init_flags_uniform_attention_and_silent_itm_head():
    """``text.zero_init_encoder_self_attention_qk``: the text encoder's self-attention query /
    key weights start at zero, so at init each token attends uniformly to the unmasked tokens
    ([CLS]'s context is the mean of their values); the cross-attention and the decoder's
    self-attention keep the random init (zero query and key get no gradient, so they would stay
    uniform for good). ``zero_init_itm_head``: the ITM logits start at exactly zero. Both off by
    default; a stored config's ``zero_init_attention_qk`` (the flag's former name) reads as it."""
    import dataclasses

    cfg = BlipConfig.preset("blip_tiny")
    text = dataclasses.replace(cfg.text, zero_init_encoder_self_attention_qk=True)
    torch.manual_seed(0)
    model = create_model(
        "pretrain",
        dataclasses.replace(cfg, text=text, zero_init_itm_head=True),
        backend="reference",
    ).eval()
    for layer in model.text_encoder.encoder.layer:
        attn = layer.attention.self
        assert not attn.query.weight.any() and not attn.key.weight.any()
        assert attn.value.weight.std() > 0
        assert layer.crossattention.self.query.weight.std() > 0
        assert layer.crossattention.self.key.weight.std() > 0
    for layer in model.text_decoder.bert.encoder.layer:
        assert layer.attention.self.query.weight.std() > 0
        assert layer.attention.self.key.weight.std() > 0
    assert not model.itm_head.weight.any() and not model.itm_head.bias.any()
    ids, mask = _text(2, 9)
    mask[1, 6:] = 0
    attn = model.text_encoder.encoder.layer[0].attention.self
    x = model.text_encoder.embeddings(ids, 0)
    with torch.no_grad():
        got = attn(x, x, mask.bool())[:, 0]
        keep = mask.float()[..., None]
        want = (attn.value(x) * keep).sum(1) / keep.sum(1)
    torch.testing.assert_close(got, want)
    default = create_model("pretrain", cfg)
    assert default.text_encoder.encoder.layer[0].attention.self.query.weight.any()
    assert default.itm_head.weight.any()
    stored = cfg.to_dict()
    stored["text"]["zero_init_attention_qk"] = True
    assert BlipConfig.from_dict(stored).text == text


def test_decoder_loss_equals_lm_loss_of_logits():
    """``loss`` shifts the hidden states instead of the logits: same value and gradients."""
    torch.manual_seed(0)
    dec = create_model("caption", "blip_tiny", backend="reference").text_decoder
    dec.train(False)
    ids, mask = _text(3, 9)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    img = torch.randn(3, 17, 64)
    want = lm_loss(dec(ids, mask, img), labels, 0.1)
    want_grad = torch.autograd.grad(want, dec.bert.embeddings.word_embeddings.weight)[0]
    got = dec.loss(ids, mask, img, labels, 0.1)
    got_grad = torch.autograd.grad(got, dec.bert.embeddings.word_embeddings.weight)[0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert want_grad.abs().max() > 0
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "backends",
    [
        {"attention": "sdpa", "cross_attention": "sdpa"},
        pytest.param(
            {"attention": "sdpa", "cross_attention": "cpu"},
            marks=pytest.mark.skipif(
                not available("cross_attention", "cpu", "cpu"), reason="blip_fast._C not built"
            ),
        ),
    ],
)
def test_attention_backend_switch_keeps_itm_logits(backends):
    torch.manual_seed(0)
    ref = create_model("retrieval", "blip_tiny", backend="reference").eval()
    fast = create_model("retrieval", "blip_tiny", backend=backends).eval()
    fast.load_state_dict(ref.state_dict())
    ids, mask = _text()
    px = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        a = ref.itm_logits(ids, mask, ref.image_embeds(px))
        b = fast.itm_logits(ids, mask, fast.image_embeds(px))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_itm_replaces_first_token_with_enc_and_broadcasts(model):
    ids, mask = _text()
    img = torch.randn(1, 17, 64)
    with torch.no_grad():
        a = model.itm_logits(ids, mask, img)
        ids_enc = ids.clone()
        ids_enc[:, 0] = 30523
        out = model.text_encoder(ids_enc, mask, img.expand(3, -1, -1), mode="multimodal")
        torch.testing.assert_close(a, model.itm_head(out[:, 0]), rtol=0, atol=0)
    assert ids[0, 0] != 30523  # caller's ids untouched


def test_official_yaml_keys(tmp_path):
    y = tmp_path / "retrieval_flickr.yaml"
    y.write_text(
        "image_root: x\nvit: large\nimage_size: 384\nvit_grad_ckpt: True\n"
        "vit_ckpt_layer: 10\nqueue_size: 57600\nalpha: 0.4\nk_test: 128\n"
        "negative_all_rank: False\ninit_lr: 1e-5\n"
    )
    cfg = BlipConfig.from_yaml(y)
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.heads) == (1024, 24, 16)
    assert cfg.vision.grad_checkpointing and cfg.vision.ckpt_layer == 10
    assert cfg.extra == {"image_root": "x", "k_test": 128, "init_lr": 1e-5}
    with pytest.raises(ValueError, match="vit must be one of"):
        BlipConfig.from_official({"vit": "huge"})


def test_model_compiles_fullgraph_with_automatic_backends():
    torch.manual_seed(0)
    m = create_model("retrieval", "blip_tiny").eval()  # automatic: C++ cross-attention on CPU

    def step(px, ids, mask):
        embeds = m.image_embeds(px)
        return m.itm_logits(ids, mask, embeds), m.text_features(ids, mask)

    ids, mask = _text()
    px = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        want = step(px, ids, mask)
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(px, ids, mask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    resolve("itc", "cpu") == "reference", reason="no ITC kernel built: automatic is the reference"
)
def test_task_models_route_itc_through_the_dispatch():
    torch.manual_seed(0)
    feats = [torch.nn.functional.normalize(torch.randn(4, 32), dim=-1) for _ in range(4)]
    for task in ("retrieval", "pretrain"):
        ref = create_model(task, "blip_tiny", backend="reference")
        auto = create_model(task, "blip_tiny")
        auto.load_state_dict(ref.state_dict())
        idx = torch.tensor([0, 1, 1, 2]) if task == "retrieval" else None
        want = ref.itc_loss(*feats, 0.4, idx)
        got = auto.itc_loss(*feats, 0.4, idx)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_packed_copy_is_the_same_encoder_with_gelu_inside_the_gemm(model):
    enc = model.text_encoder
    packed = enc.packed("onednn")
    layer = packed.encoder.layer[0]
    assert isinstance(layer.intermediate, PackedLinear) and layer.intermediate.activation == "gelu"
    assert isinstance(layer.attention.self.query, PackedLinear)
    assert type(enc.encoder.layer[0].intermediate.dense) is torch.nn.Linear  # untouched
    ids, mask = _text()
    image = torch.randn(3, 5, 64)
    with torch.no_grad():
        for mode in ("text", "multimodal"):
            want = enc(ids, mask, image, mode=mode)
            got = packed(ids, mask, image, mode=mode)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=mode)
            first = packed(ids, mask, image, mode=mode, first_token_only=True)
            torch.testing.assert_close(first, want[:, :1], rtol=1e-5, atol=1e-5, msg=mode)
    assert enc.packed("reference") is enc
