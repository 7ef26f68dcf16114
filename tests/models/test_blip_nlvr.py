"""BlipNLVR: the official layout (``official_keys/BLIP_NLVR.tsv``: the ViT entries of the
retrieval checkpoint plus official ``nlvr_encoder.BertModel`` and ``cls_head`` built on the meta
device), the forward against a plain transcription of the official NLVR encoder math, and
checkpoints: an NLVR checkpoint round trip, and the start from pre-training / retrieval
checkpoints (official ``load_checkpoint``: the single cross-attention copied into both twins)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _utils import TOL, assert_close_verbose

from blip_fast import checkpoint
from blip_fast.checkpoint import CheckpointError
from blip_fast.models import BlipConfig, BlipNLVR, create_model
from blip_fast.models.blip_nlvr import merges_from

ENC = 30523
OFFICIAL_KEYS = Path(__file__).resolve().parent / "official_keys" / "BLIP_NLVR.tsv"


def tiny_cfg(num_layers=4):
    cfg = BlipConfig.preset("blip_tiny")
    cfg.text.num_layers = num_layers
    return cfg


def randomised(model, std=0.2):
    """Every parameter drawn afresh: BERT's 0.02 init leaves the layers near identity maps."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


# ------------------------------------------------------------ plain reference (official math)


def linear(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def layer_norm(sd, name, x, eps):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def attention(sd, name, x, source, additive_mask, heads):
    """Official ``BertSelfAttention``: scores / sqrt(d) + extended mask, softmax, context."""
    B, L, H = x.shape
    d = H // heads

    def split(t):
        return t.view(B, t.shape[1], heads, d).permute(0, 2, 1, 3)

    q = split(linear(sd, name + ".query", x))
    k, v = split(linear(sd, name + ".key", source)), split(linear(sd, name + ".value", source))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if additive_mask is not None:
        scores = scores + additive_mask
    ctx = scores.softmax(-1) @ v
    return ctx.permute(0, 2, 1, 3).reshape(B, L, H)


def reference_logits(sd, cfg, ids, mask, image0, image1):
    """Official ``nlvr_encoder.BertModel`` (multimodal, eval) + ``cls_head``, line by line."""
    t, eps, p = cfg.text, cfg.text.layer_norm_eps, "text_encoder."
    ids = ids.clone()
    ids[:, 0] = ENC
    x = sd[p + "embeddings.word_embeddings.weight"][ids]
    x = x + sd[p + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = layer_norm(sd, p + "embeddings.LayerNorm", x, eps)
    extended = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(t.num_layers):
        n = f"{p}encoder.layer.{i}."
        ctx = attention(sd, n + "attention.self", x, x, extended, t.num_heads)
        x = layer_norm(
            sd,
            n + "attention.output.LayerNorm",
            linear(sd, n + "attention.output.dense", ctx) + x,
            eps,
        )
        c = n + "crossattention."
        h0 = linear(
            sd, c + "output.dense0", attention(sd, c + "self0", x, image0, None, t.num_heads)
        )
        h1 = linear(
            sd, c + "output.dense1", attention(sd, c + "self1", x, image1, None, t.num_heads)
        )
        if i >= t.num_layers // 2:  # official: layer_num >= 6, of 12 layers
            h = linear(sd, c + "output.merge_layer", torch.cat([h0, h1], dim=-1))
        else:
            h = (h0 + h1) / 2
        x = layer_norm(sd, c + "output.LayerNorm", h + x, eps)
        inter = F.gelu(linear(sd, n + "intermediate.dense", x))
        x = layer_norm(sd, n + "output.LayerNorm", linear(sd, n + "output.dense", inter) + x, eps)
    hidden = torch.relu(linear(sd, "cls_head.0", x[:, 0]))
    return linear(sd, "cls_head.2", hidden)


# ------------------------------------------------------------------------------------ tests


def test_official_layout():
    with torch.device("meta"):
        model = create_model("nlvr", "blip_base_vit_b16_384")
    want = {}
    for line in OFFICIAL_KEYS.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        want[key] = (tuple(json.loads(shape)), dtype)
    got = {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in model.state_dict().items()
    }
    assert sorted(want.keys() - got.keys()) == [], "missing official keys"
    assert sorted(got.keys() - want.keys()) == [], "keys official BLIP_NLVR does not have"
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not wrong, f"(ours, official) shape/dtype: {wrong}"
    assert model.cfg.vision.drop_path_rate == 0.1  # official BLIP_NLVR, whatever the config


@pytest.mark.parametrize("num_layers", [1, 3, 4, 12])
def test_merge_layers_are_the_second_half(num_layers):
    model = create_model("nlvr", tiny_cfg(num_layers))
    merged = [
        layer.crossattention.output.merge_layer is not None
        for layer in model.text_encoder.encoder.layer
    ]
    assert merged == [i >= num_layers // 2 for i in range(num_layers)]
    assert merges_from(12) == 6  # official hard-codes 6 for BERT-base


@pytest.mark.parametrize("num_layers", [2, 4])
def test_forward_matches_official_math(num_layers):
    cfg = tiny_cfg(num_layers)
    model = randomised(create_model("nlvr", cfg, backend="reference"))
    B, L = 3, 9
    ids = torch.randint(1000, 5000, (B, L))
    ids[:, 0] = 101  # [CLS] as tokenised: the model puts [ENC] there
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    images = torch.randn(2 * B, 3, cfg.vision.image_size, cfg.vision.image_size)
    with torch.no_grad():
        logits = model(images, ids, mask)
        image0, image1 = model.visual_encoder(images).split(B)
        want = reference_logits(model.state_dict(), cfg, ids, mask, image0, image1)
    assert logits.shape == (B, 2)
    assert_close_verbose(logits, want, **TOL[torch.float32], name="nlvr logits")
    # the twins see different images: swapping them changes the answer
    with torch.no_grad():
        swapped = model(torch.cat([images[B:], images[:B]]), ids, mask)
    assert (swapped - logits).abs().max() > 1e-3


def test_loss_and_bad_shapes():
    model = create_model("nlvr", tiny_cfg(2)).eval()
    ids, mask = torch.full((2, 5), 101), torch.ones(2, 5, dtype=torch.long)
    images = torch.randn(4, 3, 64, 64)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        want = F.cross_entropy(model(images, ids, mask), labels)
        assert torch.equal(model.loss(images, ids, mask, labels), want)
    with pytest.raises(ValueError, match=r"images must be \(2B, 3, S, S\) with B = 2 texts"):
        model(images[:3], ids, mask)


# ------------------------------------------------------------------------------ checkpoints


def same_state(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nlvr_checkpoint_round_trip(tmp_path):
    model = randomised(create_model("nlvr", tiny_cfg(2)))
    again = checkpoint.load(checkpoint.save(model, tmp_path / "nlvr.pth"))
    assert type(again) is BlipNLVR and again.cfg == model.cfg and same_state(again, model)
    r = again.load_report
    assert (r.task, r.config_source) == ("nlvr", "checkpoint")
    assert not (r.new_task_init or r.other_task_dropped or r.missing or r.unexpected)
    # an official file: {'model': state_dict} and nothing else, architecture from the shapes
    torch.save({"model": model.state_dict()}, tmp_path / "model_base_nlvr.pth")
    again = checkpoint.load(tmp_path / "model_base_nlvr.pth")
    assert again.load_report.config_source == "shapes" and same_state(again, model)
    with pytest.raises(ValueError, match="HF BLIP has no nlvr model"):
        checkpoint.save(model, tmp_path / "hf", format="hf")


@pytest.mark.parametrize("task", ["retrieval", "pretrain"])
def test_start_from_another_task_copies_cross_attention(task, tmp_path):
    source = randomised(create_model(task, tiny_cfg(4)))
    path = checkpoint.save(source, tmp_path / f"{task}.pth")
    model = checkpoint.load(path, task="nlvr")
    src, own = source.state_dict(), model.state_dict()
    copied = 0
    for key, value in own.items():
        for twin, single in (
            (".crossattention.self0.", ".crossattention.self."),
            (".crossattention.self1.", ".crossattention.self."),
            (".crossattention.output.dense0.", ".crossattention.output.dense."),
            (".crossattention.output.dense1.", ".crossattention.output.dense."),
        ):
            if twin in key:
                assert torch.equal(value, src[key.replace(twin, single)]), key
                copied += 1
    assert copied == 4 * (2 * 6 + 2 * 2)  # 4 layers x (2 twins x q/k/v + 2 dense), w and b
    trunk = [
        k
        for k in own
        if "crossattention.self" not in k and ".dense0." not in k and ".dense1." not in k
    ]
    for key in trunk:
        if key in src:
            assert torch.equal(own[key], src[key]), key
    r = model.load_report
    fresh = sorted(k for k in own if k.startswith("cls_head.") or ".merge_layer." in k)
    assert r.new_task_init == fresh
    assert len(fresh) == 4 + 2 * 2  # cls_head, merge_layer of layers 2 and 3
    assert {"itm_head.weight", "vision_proj.weight", "temp", "image_queue"} <= set(
        r.other_task_dropped
    )
    assert any(k.startswith("text_decoder.") for k in r.other_task_dropped) == (task == "pretrain")
    assert set(r.other_task_dropped) <= set(src)  # reported under the checkpoint's own names
    assert not (r.missing or r.unexpected)
    assert set(r.loaded) | set(fresh) | set(r.kept_random) == set(own)


def test_start_from_another_task_stays_strict(tmp_path):
    sd = create_model("retrieval", tiny_cfg(2)).state_dict()
    sd["text_encoder.encoder.layer.0.crossattention.self.extra.weight"] = torch.zeros(1)
    del sd["text_encoder.encoder.layer.1.output.dense.bias"]
    torch.save({"model": sd}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(tmp_path / "m.pth", task="nlvr")
    msg = str(err.value)
    assert "text_encoder.encoder.layer.1.output.dense.bias" in msg
    assert "crossattention.self0.extra.weight" in msg
