"""Official BLIP layouts: models built with the official configs (on the meta device, no memory)
have exactly the state-dict names, shapes and dtypes of the official ViT-B/384 retrieval,
pre-training and caption models (``official_keys/*.tsv``: name, shape and dtype of every entry
of the released checkpoints), the pre-training model ties exactly the encoder / decoder tensors
official BLIP ties, and shapes alone give back the config."""

import json
from pathlib import Path

import pytest
import torch

from blip_fast import checkpoint
from blip_fast.models import BlipConfig, create_model

KEYS = Path(__file__).resolve().parent / "official_keys"

CASES = {
    "BLIP_Retrieval": ("retrieval", "blip_base_vit_b16_384"),
    "BLIP_Pretrain": ("pretrain", "blip_base_vit_b16_224"),
    "BLIP_Decoder": ("caption", "blip_base_vit_b16_384"),
}


def read_tsv(name):
    out = {}
    for line in (KEYS / f"{name}.tsv").read_text().splitlines():
        key, shape, dtype = line.split("\t")
        out[key] = (tuple(json.loads(shape)), dtype)
    return out


def layout(model):
    return {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in model.state_dict().items()
    }


@pytest.fixture(scope="module")
def meta_models():
    with torch.device("meta"):
        return {name: create_model(task, cfg) for name, (task, cfg) in CASES.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_official_layout(meta_models, name):
    want, got = read_tsv(name), layout(meta_models[name])
    assert sorted(want.keys() - got.keys()) == [], "missing official keys"
    assert sorted(got.keys() - want.keys()) == [], "keys official BLIP does not have"
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not wrong, f"(ours, official) shape/dtype: {wrong}"
    if name == "BLIP_Retrieval":
        assert len(got) == 949


@pytest.mark.parametrize("name", sorted(CASES))
def test_shapes_give_back_the_config(meta_models, name):
    """``checkpoint.infer_config`` on the official layout = the official config (architecture)."""
    task, preset = CASES[name]
    sd = meta_models[name].state_dict()
    cfg, want = checkpoint.infer_config(sd), BlipConfig.preset(preset)
    assert cfg.vision == want.vision and cfg.text == want.text and cfg.embed_dim == want.embed_dim
    assert checkpoint.infer_task(sd) == task


def test_pretrain_tied_params(meta_models):
    tied = json.loads((KEYS / "pretrain_tied.json").read_text())
    shared, not_shared = tied["shared_params"], tied["decoder_bert_params_not_shared"]
    assert (len(shared), len(not_shared)) == (196, 120)
    model = meta_models["BLIP_Pretrain"]
    enc, dec = model.text_encoder, model.text_decoder.bert
    for name in shared:
        assert enc.get_parameter(name) is dec.get_parameter(name), name
    for name in not_shared:
        assert enc.get_parameter(name) is not dec.get_parameter(name), name
    assert {n for n, _ in dec.named_parameters()} == set(shared) | set(not_shared)
    word = enc.embeddings.word_embeddings.weight
    assert model.text_decoder.cls.predictions.decoder.weight is word
    assert (
        model.text_decoder.cls.predictions.decoder.bias is model.text_decoder.cls.predictions.bias
    )
    # the LM head sits outside the shared trunk
    assert not any(n.startswith("cls.") for n in shared)


def test_caption_lm_head_tied(meta_models):
    dec = meta_models["BLIP_Decoder"].text_decoder
    assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight
    assert dec.cls.predictions.decoder.bias is dec.cls.predictions.bias


def test_large_shapes_infer_large():
    with torch.device("meta"):
        model = create_model("retrieval", "blip_large_vit_l16_384")
    cfg = checkpoint.infer_config(model.state_dict())
    assert cfg.vision == BlipConfig.preset("blip_large_vit_l16_384").vision
