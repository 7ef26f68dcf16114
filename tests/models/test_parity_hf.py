"""Parity with HuggingFace ``transformers`` BLIP: small random HF models are saved with
``save_pretrained``, loaded with ``blip_fast.checkpoint.load`` and compared in fp32 (image
embeds, ITC features, ITM logits, decoder logits, greedy and beam-search token ids), plus
official <-> HF conversion round trips and save / load round trips in both formats.

Relative error here = max |ours - HF| / max |HF| over the tensor (fp32, bound 1e-5)."""

import pytest
import torch
import transformers

from blip_fast import checkpoint
from blip_fast.models import convert
from blip_fast.tokenization import tokenizer

ENC, DEC, CLS, SEP = 30523, 30522, 101, 102
REL_TOL = 1e-5
N_IMAGES = 6


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def hf_config():
    return transformers.BlipConfig(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        ),
        text_config=dict(
            vocab_size=30524,
            hidden_size=64,
            encoder_hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
        ),
        image_text_hidden_size=32,
    )


def reinit(model, seed, std=0.02):
    """HF's vision init (initializer_range 1e-10) makes everything near-constant: re-draw every
    parameter (normal ``std``; LayerNorm weights 1 + N(0, 0.1)) so parity means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(std * noise)
    return model.eval()


@pytest.fixture(scope="module")
def hf_retrieval():
    return reinit(transformers.BlipForImageTextRetrieval(hf_config()), 1)


@pytest.fixture(scope="module")
def hf_caption():
    # std 0.1: with 0.02 the image barely moves the logits and every image gets one caption;
    # a [SEP] bias of 2 makes some captions stop early and others run to max_length.
    model = reinit(transformers.BlipForConditionalGeneration(hf_config()), 2, std=0.1)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[SEP] = 2.0
    return model


@pytest.fixture(scope="module")
def hf_retrieval_dir(hf_retrieval, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_retrieval")
    hf_retrieval.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf_caption_dir(hf_caption, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_caption")
    hf_caption.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ours_retrieval(hf_retrieval_dir):
    return checkpoint.load(hf_retrieval_dir)


@pytest.fixture(scope="module")
def ours_caption(hf_caption_dir):
    return checkpoint.load(hf_caption_dir)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(N_IMAGES, 3, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def text():
    enc = tokenizer()(
        [
            "a dog on a beach",
            "two cats sleeping on a red couch",
            "a man riding a wave",
            "pizza",
            "a b c d e f g h i j k",
            "x",
        ],
        padding="longest",
    )
    return enc["input_ids"], enc["attention_mask"]


def test_load_hf_report(ours_retrieval, ours_caption):
    r = ours_retrieval.load_report
    assert (r.source_format, r.task, r.config_source) == ("hf", "retrieval", "hf config.json")
    assert r.initialised_from_online and all("_m." in k for k in r.initialised_from_online)
    assert set(r.kept_random) == {"image_queue", "text_queue", "idx_queue", "ptr_queue", "temp"}
    assert not r.missing and not r.unexpected and not r.interpolated
    assert ours_caption.load_report.task == "caption"
    assert ours_retrieval.cfg.vision.layer_norm_eps == 1e-5  # HF's value, not official 1e-6
    # momentum copies = online weights (official copy_params)
    sd = ours_retrieval.state_dict()
    assert torch.equal(
        sd["visual_encoder_m.blocks.1.attn.qkv.weight"],
        sd["visual_encoder.blocks.1.attn.qkv.weight"],
    )


@torch.no_grad()
def test_image_embeds(hf_retrieval, ours_retrieval, hf_caption, ours_caption, pixels):
    for hf, ours in ((hf_retrieval, ours_retrieval), (hf_caption, ours_caption)):
        ref = hf.vision_model(pixel_values=pixels).last_hidden_state
        got = ours.visual_encoder(pixels)
        err = rel_err(got, ref)
        print(f"image_embeds rel err {err:.3g}")
        assert err <= REL_TOL
    assert (
        rel_err(
            ours_retrieval.image_embeds(pixels),
            hf_retrieval.vision_model(pixel_values=pixels).last_hidden_state,
        )
        <= REL_TOL
    )


@torch.no_grad()
def test_itc_features(hf_retrieval, ours_retrieval, pixels, text):
    ids, mask = text
    sims = hf_retrieval(
        input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False
    ).itm_score
    # the normalised features as HF's use_itm_head=False path computes them
    img = hf_retrieval.vision_model(pixel_values=pixels).last_hidden_state
    q = hf_retrieval.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    ref_img = torch.nn.functional.normalize(hf_retrieval.vision_proj(img[:, 0]), dim=-1)
    ref_txt = torch.nn.functional.normalize(hf_retrieval.text_proj(q[:, 0]), dim=-1)
    got_img, got_txt = (
        ours_retrieval.image_features(pixels),
        ours_retrieval.text_features(ids, mask),
    )
    errs = [
        rel_err(got_img, ref_img),
        rel_err(got_txt, ref_txt),
        rel_err(got_img @ got_txt.T, sims),
    ]
    print(f"ITC image feat / text feat / sims rel err {errs}")
    assert max(errs) <= REL_TOL


@torch.no_grad()
def test_itm_logits(hf_retrieval, ours_retrieval, pixels, text):
    ids, mask = text
    enc_ids = ids.clone()
    enc_ids[:, 0] = ENC
    ref = hf_retrieval(
        input_ids=enc_ids, pixel_values=pixels, attention_mask=mask, use_itm_head=True
    ).itm_score
    got = ours_retrieval.itm_logits(ids, mask, ours_retrieval.image_embeds(pixels))
    err = rel_err(got, ref)
    print(f"ITM logits rel err {err:.3g}")
    assert err <= REL_TOL


@torch.no_grad()
def test_decoder_logits(hf_caption, ours_caption, pixels, text):
    ids, mask = text
    dec_ids = ids.clone()
    dec_ids[:, 0] = DEC
    ref = hf_caption(pixel_values=pixels, input_ids=dec_ids, attention_mask=mask).logits
    got = ours_caption.text_decoder(dec_ids, mask, ours_caption.visual_encoder(pixels))
    err = rel_err(got, ref)
    print(f"decoder logits rel err {err:.3g}")
    assert err <= REL_TOL


def _trim(row, prompt_len):
    row = row.tolist()
    for i in range(prompt_len, len(row)):
        if row[i] == SEP:
            return row[: i + 1]
    return row


@pytest.mark.parametrize("num_beams", [1, 3])
@torch.no_grad()
def test_generate_ids(hf_caption, ours_caption, pixels, num_beams):
    prompt = tokenizer()("a picture of ")["input_ids"]  # [CLS] a picture of [SEP]
    assert prompt[0, 1:].tolist() == [1037, 3861, 1997, SEP]
    ref = hf_caption.generate(
        pixels,
        input_ids=prompt.repeat(len(pixels), 1),
        num_beams=num_beams,
        max_length=20,
        min_length=5,
        do_sample=False,
    )
    got = ours_caption.generate_ids(pixels, num_beams=num_beams, max_length=20, min_length=5)
    for i in range(len(pixels)):
        assert got[i] == _trim(ref[i], 4), f"image {i}, {num_beams} beams"
        assert got[i][:4] == [DEC, 1037, 3861, 1997]
    assert len({tuple(g) for g in got}) > 1  # the images give different captions
    ends = [g[-1] == SEP for g in got]
    assert any(ends) and not all(ends)  # early stops and max_length both exercised


def _random_official(task, seed):
    torch.manual_seed(seed)
    from blip_fast.models import create_model

    model = create_model(task, "blip_tiny")
    with torch.no_grad():  # make momentum differ from online, queues non-default
        for k, v in model.state_dict().items():
            if ("_m." in k or k.endswith("queue")) and v.is_floating_point():
                v.add_(torch.randn_like(v))
        if hasattr(model, "ptr_name"):
            getattr(model, model.ptr_name)[0] = 7
    return model


@pytest.mark.parametrize("task", ["retrieval", "pretrain", "caption"])
def test_round_trip_official_hf_official(task):
    sd = _random_official(task, 0).state_dict()
    extra = {}
    hf = convert.official_to_hf(sd, extra)
    back = convert.hf_to_official(hf, extra)
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k


@pytest.mark.parametrize("kind", ["retrieval", "caption"])
def test_round_trip_hf_official_hf(kind, hf_retrieval, hf_caption):
    hf = (hf_retrieval if kind == "retrieval" else hf_caption).state_dict()
    extra = {}
    back = convert.official_to_hf(convert.hf_to_official(hf), extra)
    assert not extra
    assert back.keys() == hf.keys()
    for k in hf:
        assert torch.equal(back[k], hf[k]), k


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["official", "hf"])
def test_save_load_round_trip(fmt, ours_retrieval, ours_caption, pixels, text, tmp_path):
    ids, mask = text
    for name, model in (("retrieval", ours_retrieval), ("caption", ours_caption)):
        path = tmp_path / (f"{name}.pth" if fmt == "official" else name)
        checkpoint.save(model, path, format=fmt)
        again = checkpoint.load(path)
        assert type(again) is type(model) and again.cfg == model.cfg
        a, b = model.state_dict(), again.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        emb = model.visual_encoder(pixels)
        assert torch.equal(again.visual_encoder(pixels), emb)
        if name == "retrieval":
            assert torch.equal(again.itm_logits(ids, mask, emb), model.itm_logits(ids, mask, emb))
            assert torch.equal(again.text_features(ids, mask), model.text_features(ids, mask))
        else:
            assert again.generate_ids(pixels, num_beams=3) == model.generate_ids(
                pixels, num_beams=3
            )


def test_hf_save_is_hf_loadable_and_lossless(tmp_path, pixels):
    """official (with momentum / queues) -> HF dir -> official: every tensor bit-identical, and
    transformers loads the directory with no missing or unexpected keys."""
    model = _random_official("retrieval", 5).eval()
    out = checkpoint.save(model, tmp_path / "hf", format="hf")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "blip_fast_extra.safetensors", "vocab.txt"} <= names
    again = checkpoint.load(out)
    assert not again.load_report.initialised_from_online and not again.load_report.kept_random
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hf, info = transformers.BlipForImageTextRetrieval.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        ref = hf.eval().vision_model(pixel_values=pixels).last_hidden_state
        assert rel_err(model.visual_encoder(pixels), ref) <= REL_TOL
    # the pre-training model's shared encoder / decoder tensors survive the trip too
    pre = _random_official("pretrain", 6)
    again = checkpoint.load(checkpoint.save(pre, tmp_path / "pre", format="hf"))
    assert again.text_decoder.bert.embeddings is again.text_encoder.embeddings
    a, b = pre.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hf_safetensors_file_alone(hf_retrieval_dir, ours_retrieval):
    """An HF ``model.safetensors`` without its directory: HF keys detected and converted."""
    again = checkpoint.load(hf_retrieval_dir / "model.safetensors", config=ours_retrieval.cfg)
    assert again.load_report.source_format == "hf" and again.load_report.task == "retrieval"
    a, b = ours_retrieval.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if "queue" not in k)
