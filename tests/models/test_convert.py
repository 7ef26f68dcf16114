"""blip_fast.models.convert: official <-> HF key mapping both ways, position_ids handling,
training-only tensors, and config translation against transformers' own BLIP classes."""

import pytest
import torch
import transformers

from blip_fast.models import BlipConfig, convert, create_model

PAIRS = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("visual_encoder.patch_embed.proj.bias", "vision_model.embeddings.patch_embedding.bias"),
    ("visual_encoder.blocks.0.norm1.weight", "vision_model.encoder.layers.0.layer_norm1.weight"),
    ("visual_encoder.blocks.11.norm2.bias", "vision_model.encoder.layers.11.layer_norm2.bias"),
    (
        "visual_encoder.blocks.3.attn.qkv.weight",
        "vision_model.encoder.layers.3.self_attn.qkv.weight",
    ),
    (
        "visual_encoder.blocks.3.attn.proj.bias",
        "vision_model.encoder.layers.3.self_attn.projection.bias",
    ),
    ("visual_encoder.blocks.7.mlp.fc1.weight", "vision_model.encoder.layers.7.mlp.fc1.weight"),
    ("visual_encoder.blocks.7.mlp.fc2.bias", "vision_model.encoder.layers.7.mlp.fc2.bias"),
    ("visual_encoder.norm.weight", "vision_model.post_layernorm.weight"),
    ("visual_encoder.norm.bias", "vision_model.post_layernorm.bias"),
    (
        "text_encoder.encoder.layer.0.crossattention.self.query.weight",
        "text_encoder.encoder.layer.0.crossattention.self.query.weight",
    ),
    (
        "text_decoder.cls.predictions.transform.dense.weight",
        "text_decoder.cls.predictions.transform.dense.weight",
    ),
    ("vision_proj.weight", "vision_proj.weight"),
    ("text_proj.bias", "text_proj.bias"),
    ("itm_head.weight", "itm_head.weight"),
]


@pytest.mark.parametrize("official,hf", PAIRS)
def test_key_pairs_both_ways(official, hf):
    t = torch.zeros(1)
    assert list(convert.official_to_hf({official: t})) == [hf]
    back = convert.hf_to_official({hf: t})
    assert list(back) == [official] and back[official] is t


def test_position_ids_dropped_checked_and_recreated():
    sd = {
        "text_encoder.embeddings.position_ids": torch.arange(8)[None],
        "text_encoder.embeddings.position_embeddings.weight": torch.zeros(8, 4),
    }
    hf = convert.official_to_hf(sd)
    assert list(hf) == ["text_encoder.embeddings.position_embeddings.weight"]
    back = convert.hf_to_official(hf)
    assert torch.equal(back["text_encoder.embeddings.position_ids"], torch.arange(8)[None])
    assert back["text_encoder.embeddings.position_ids"].dtype == torch.int64
    for bad in (
        torch.arange(8).flip(0)[None],
        torch.arange(8),
        torch.zeros(1, 8, dtype=torch.long),
    ):
        with pytest.raises(ValueError, match=r"text_encoder\.embeddings\.position_ids.*arange"):
            convert.official_to_hf({**sd, "text_encoder.embeddings.position_ids": bad})
    # old HF files that still carry position_ids are checked the same way
    with pytest.raises(ValueError, match="arange"):
        convert.hf_to_official({"text_encoder.embeddings.position_ids": torch.ones(1, 8).long()})


def test_training_only_tensors_need_a_place():
    sd = {
        "temp": torch.tensor(0.07),
        "image_queue": torch.zeros(2, 4),
        "visual_encoder_m.cls_token": torch.zeros(1, 1, 2),
        "vision_proj.weight": torch.zeros(2, 2),
    }
    with pytest.raises(
        ValueError,
        match=r"3 training-only.*image_queue, temp, "
        r"visual_encoder_m\.cls_token",
    ):
        convert.official_to_hf(sd)
    extra = {}
    hf = convert.official_to_hf(sd, extra)
    assert list(hf) == ["vision_proj.weight"]
    assert sorted(extra) == ["image_queue", "temp", "visual_encoder_m.cls_token"]
    assert convert.hf_to_official(hf, extra).keys() == sd.keys()
    assert all(convert.is_training_only(k) for k in extra)
    assert not convert.is_training_only("text_encoder.embeddings.word_embeddings.weight")


def test_unknown_keys_are_errors_unless_kept():
    for fn, key in (
        (convert.official_to_hf, "logit_scale"),
        (convert.official_to_hf, "visual_encoder.head.weight"),
        (convert.hf_to_official, "vision_model.pooler.weight"),
        (convert.hf_to_official, "logit_scale"),
    ):
        with pytest.raises(KeyError, match=key.replace(".", r"\.")):
            fn({key: torch.zeros(1)})
    assert list(convert.hf_to_official({"logit_scale": torch.zeros(1)}, keep_unknown=True)) == [
        "logit_scale"
    ]


def test_tied_lm_head_restored():
    w, b = torch.randn(10, 4), torch.randn(10)
    back = convert.hf_to_official(
        {
            "text_decoder.bert.embeddings.word_embeddings.weight": w,
            "text_decoder.cls.predictions.bias": b,
        }
    )
    assert back["text_decoder.cls.predictions.decoder.weight"] is w
    assert back["text_decoder.cls.predictions.decoder.bias"] is b


@pytest.mark.parametrize("task", ["retrieval", "caption", "pretrain"])
def test_mapping_matches_transformers_layout(task):
    """Our model's official state dict, mapped, has exactly the keys and shapes of the HF model
    built from ``blip_to_hf_config`` (pretrain: the union of both HF classes)."""
    cfg = BlipConfig.preset("blip_tiny")
    with torch.device("meta"):
        ours = create_model(task, cfg).state_dict()
    ours = {k: v for k, v in ours.items() if not k.endswith("position_ids")}
    extra = {}
    hf_sd = convert.official_to_hf(ours, extra)
    hf_cfg = transformers.BlipConfig.from_dict(convert.blip_to_hf_config(cfg, task))
    want = {}
    for arch in convert.HF_ARCHITECTURES[task]:
        with torch.device("meta"):
            want.update(getattr(transformers, arch)(hf_cfg).state_dict())
    assert {k: tuple(v.shape) for k, v in hf_sd.items()} == {
        k: tuple(v.shape) for k, v in want.items()
    }
    assert (len(extra) > 0) == (task != "caption")


def test_config_round_trip_and_hf_defaults():
    cfg = BlipConfig.preset("blip_tiny")
    cfg.alpha, cfg.vision.drop_path_rate, cfg.extra = 0.3, 0.1, {"k_test": 128}
    d = convert.blip_to_hf_config(cfg, "retrieval")
    assert d["architectures"] == ["BlipForImageTextRetrieval"] and d["model_type"] == "blip"
    assert d["image_text_hidden_size"] == 32 and d["vision_config"]["layer_norm_eps"] == 1e-6
    t = d["text_config"]
    assert (t["bos_token_id"], t["sep_token_id"], t["pad_token_id"], t["eos_token_id"]) == (
        30522,
        102,
        0,
        2,
    )
    assert t["encoder_hidden_size"] == 64 and d["vision_config"]["intermediate_size"] == 256
    assert convert.hf_config_to_blip(d) == cfg
    # a plain HF config (no blip_fast section): HF's values, vision eps 1e-5
    hf = transformers.BlipConfig(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=96,
            patch_size=16,
        ),
        text_config=dict(
            hidden_size=64,
            encoder_hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=2,
        ),
        image_text_hidden_size=48,
    ).to_dict()
    got = convert.hf_config_to_blip(hf)
    assert (
        got.vision.width,
        got.vision.depth,
        got.vision.heads,
        got.vision.image_size,
        got.vision.mlp_ratio,
        got.vision.layer_norm_eps,
    ) == (64, 2, 2, 96, 4.0, 1e-5)
    assert (
        got.text.hidden_size,
        got.text.num_layers,
        got.text.num_heads,
        got.text.intermediate_size,
        got.text.vocab_size,
        got.text.layer_norm_eps,
    ) == (64, 3, 2, 128, 30524, 1e-12)
    assert got.embed_dim == 48
    with pytest.raises(ValueError, match="encoder_hidden_size 32"):
        convert.hf_config_to_blip(
            {"vision_config": {"hidden_size": 64}, "text_config": {"encoder_hidden_size": 32}}
        )
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        convert.hf_config_to_blip({"text_config": {"hidden_act": "relu"}})
    with pytest.raises(ValueError, match="unknown task"):
        convert.blip_to_hf_config(cfg, "segmentation")
