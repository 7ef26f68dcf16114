"""blip_fast.checkpoint: formats, inference of task / config, what load reports, and every bad
input failing with a message that names the problem."""

import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from blip_fast import checkpoint
from blip_fast.checkpoint import CheckpointError, UnsafeCheckpointError
from blip_fast.models import BlipConfig, create_model


def tiny(task="retrieval", seed=0, image_size=None):
    torch.manual_seed(seed)
    cfg = BlipConfig.preset("blip_tiny")
    if image_size:
        cfg.vision.image_size = image_size
    return create_model(task, cfg).eval()


def save_sd(path, sd, wrap=True):
    torch.save({"model": sd} if wrap else sd, path)
    return path


def same_state(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ good inputs


@pytest.mark.parametrize("task", ["retrieval", "pretrain", "caption"])
def test_official_pth_round_trip_infers_task(task, tmp_path):
    model = tiny(task)
    path = checkpoint.save(model, tmp_path / "m.pth")
    again = checkpoint.load(path)
    assert type(again) is type(model) and again.cfg == model.cfg and same_state(again, model)
    r = again.load_report
    assert (r.task, r.source_format, r.config_source) == (task, "official", "checkpoint")
    assert not (r.initialised_from_online or r.kept_random or r.missing or r.unexpected)
    assert not again.training
    # the config is stored as plain data: weights_only loads it
    assert isinstance(torch.load(path, weights_only=True)["config"], dict)


def test_bare_state_dict_and_official_safetensors(tmp_path):
    from safetensors.torch import save_file

    model = tiny("caption")
    sd = model.state_dict()
    again = checkpoint.load(save_sd(tmp_path / "bare.pt", sd, wrap=False), config="blip_tiny")
    assert same_state(again, model) and again.load_report.config_source == "argument"
    dedup = {
        k: v.contiguous()
        for k, v in sd.items()
        if k
        not in (
            "text_decoder.cls.predictions.decoder.weight",
            "text_decoder.cls.predictions.decoder.bias",
        )
    }
    save_file(dedup, str(tmp_path / "m.safetensors"))
    again = checkpoint.load(tmp_path / "m.safetensors", config="blip_tiny")
    assert same_state(again, model) and again.load_report.source_format == "official"


def test_config_inferred_from_shapes(tmp_path):
    model = tiny("retrieval")
    again = checkpoint.load(save_sd(tmp_path / "m.pth", model.state_dict()))
    r = again.load_report
    assert r.config_source == "shapes"
    v, t = again.cfg.vision, again.cfg.text
    assert (v.width, v.depth, v.heads, v.image_size, v.patch_size) == (64, 2, 1, 64, 16)
    assert (
        t.hidden_size,
        t.num_layers,
        t.num_heads,
        t.intermediate_size,
        t.max_position_embeddings,
    ) == (64, 2, 1, 128, 64)
    assert again.cfg.embed_dim == 32 and again.cfg.queue_size == 64
    # official checkpoints carry their YAML config: training fields come from it
    official_yaml = {
        "image_size": 64,
        "vit": "base",
        "alpha": 0.3,
        "k_test": 128,
        "vit_grad_ckpt": True,
        "vit_ckpt_layer": 1,
        "negative_all_rank": True,
    }
    torch.save(
        {"model": model.state_dict(), "config": official_yaml, "epoch": 3}, tmp_path / "o.pth"
    )
    again = checkpoint.load(tmp_path / "o.pth")
    assert (
        again.cfg.alpha == 0.3 and again.cfg.negative_all_rank and again.cfg.extra["k_test"] == 128
    )
    assert again.cfg.vision.grad_checkpointing and again.cfg.vision.ckpt_layer == 1


def test_missing_momentum_copied_and_queues_kept(tmp_path):
    model = tiny("retrieval")
    sd = {
        k: v
        for k, v in model.state_dict().items()
        if "_m." not in k
        and k not in ("image_queue", "text_queue", "idx_queue", "ptr_queue", "temp")
    }
    again = checkpoint.load(save_sd(tmp_path / "m.pth", sd), config="blip_tiny")
    r = again.load_report
    assert r.initialised_from_online and all("_m." in k for k in r.initialised_from_online)
    assert set(r.kept_random) == {"image_queue", "text_queue", "idx_queue", "ptr_queue", "temp"}
    for online, momentum in again.momentum_pairs():
        for p, p_m in zip(online.parameters(), momentum.parameters()):
            assert torch.equal(p, p_m)
    assert torch.equal(again.idx_queue, torch.full_like(again.idx_queue, -100))
    assert float(again.temp.detach()) == pytest.approx(0.07)
    assert len(r.loaded) == len(sd)


def test_pos_embed_interpolated_into_larger_image(tmp_path):
    model = tiny("retrieval", image_size=64)  # 4x4 grid, 17 tokens
    path = checkpoint.save(model, tmp_path / "m.pth")
    cfg = BlipConfig.preset("blip_tiny")
    cfg.vision.image_size = 96  # 6x6 grid, 37 tokens
    again = checkpoint.load(path, config=cfg)
    assert sorted(again.load_report.interpolated) == [
        "visual_encoder.pos_embed",
        "visual_encoder_m.pos_embed",
    ]
    for name in ("visual_encoder", "visual_encoder_m"):
        old, new = getattr(model, name).pos_embed, getattr(again, name).pos_embed
        assert new.shape == (1, 37, 64)
        assert torch.equal(new[:, 0], old[:, 0])  # [CLS] kept
        grid = old[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
        want = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
        torch.testing.assert_close(
            new[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 36, 64), rtol=0, atol=0
        )
    assert again.image_embeds(torch.randn(1, 3, 96, 96)).shape == (1, 37, 64)


def test_non_strict_reports(tmp_path, caplog):
    model = tiny("retrieval")
    sd = dict(model.state_dict())
    sd["extra_head.weight"] = torch.zeros(2)
    del sd["text_proj.bias"]
    again = checkpoint.load(save_sd(tmp_path / "m.pth", sd), config="blip_tiny", strict=False)
    assert again.load_report.unexpected == ["extra_head.weight"]
    assert again.load_report.missing == ["text_proj.bias"]
    assert "text_proj.bias" in caplog.text and "extra_head.weight" in caplog.text


def test_convert_checkpoint(tmp_path):
    model = tiny("pretrain")
    src = checkpoint.save(model, tmp_path / "m.pth")
    out = checkpoint.convert_checkpoint(src, tmp_path / "hf", "hf")
    back = checkpoint.convert_checkpoint(out, tmp_path / "back.pth", "official")
    assert same_state(checkpoint.load(back), model)


# ------------------------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        checkpoint.load(tmp_path / "nope.pth")


def test_unknown_formats(tmp_path):
    (tmp_path / "junk.pth").write_text("hello world")
    with pytest.raises(CheckpointError, match=r"junk\.pth.*unknown checkpoint format.*b'hell'"):
        checkpoint.load(tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"junk\.safetensors.*unknown checkpoint format"):
        checkpoint.load(tmp_path / "junk.safetensors")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth.*got a list"):
        checkpoint.load(tmp_path / "list.pth")
    torch.save({"model": {"a.weight": torch.zeros(1), "n": 3}}, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match=r"mixed\.pth.*not tensors: n \(int\)"):
        checkpoint.load(tmp_path / "mixed.pth")
    torch.save({"encoder.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other\.pth.*neither official.*encoder\.weight"):
        checkpoint.load(tmp_path / "other.pth")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CheckpointError, match=r"emptydir.*config\.json"):
        checkpoint.load(tmp_path / "emptydir")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"noweights.*model\.safetensors"):
        checkpoint.load(tmp_path / "noweights")


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Custom:  # a harmless custom class is refused all the same
    def __init__(self):
        self.x = torch.zeros(2)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["torch_save_os_system", "raw_pickle", "custom_class"])
def test_code_pickles_refused(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if kind == "torch_save_os_system":
        torch.save({"model": {"x": Evil(marker)}}, path)
    elif kind == "raw_pickle":
        with open(path, "wb") as f:
            pickle.dump(Evil(marker), f)
    else:
        torch.save({"model": Custom()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth.*non-tensor code objects"):
        checkpoint.load(path)
    assert not marker.exists()


def test_mis_shaped_key(tmp_path):
    sd = dict(tiny("retrieval").state_dict())
    sd["itm_head.weight"] = torch.zeros(3, 64)
    with pytest.raises(
        CheckpointError, match=r"'itm_head\.weight'.*expected \(2, 64\).*got \(3, 64\)"
    ):
        checkpoint.load(save_sd(tmp_path / "m.pth", sd), config="blip_tiny")


def test_unexpected_and_missing_under_strict(tmp_path):
    sd = dict(tiny("retrieval").state_dict())
    sd["surprise.weight"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError, match=r"does not fit task retrieval.*1 unexpected keys: surprise\.weight"
    ):
        checkpoint.load(save_sd(tmp_path / "u.pth", sd), config="blip_tiny")
    del sd["surprise.weight"], sd["text_proj.weight"], sd["visual_encoder.norm.bias"]
    with pytest.raises(
        CheckpointError,
        match=r"2 required keys missing: text_proj\.weight.*"
        r"visual_encoder\.norm\.bias",
    ):
        checkpoint.load(save_sd(tmp_path / "m.pth", sd), config="blip_tiny")


def test_partial_momentum_is_missing(tmp_path):
    sd = dict(tiny("retrieval").state_dict())
    del sd["vision_proj_m.weight"]
    with pytest.raises(CheckpointError, match=r"missing.*vision_proj_m\.weight"):
        checkpoint.load(save_sd(tmp_path / "m.pth", sd), config="blip_tiny")


def test_bad_position_ids(tmp_path):
    sd = dict(tiny("retrieval").state_dict())
    sd["text_encoder.embeddings.position_ids"] = torch.arange(64).flip(0)[None]
    with pytest.raises(ValueError, match=r"text_encoder\.embeddings\.position_ids.*arange"):
        checkpoint.load(save_sd(tmp_path / "m.pth", sd), config="blip_tiny")


def test_shared_tensors_must_agree(tmp_path):
    sd = dict(tiny("pretrain").state_dict())
    key = "text_decoder.bert.encoder.layer.0.output.dense.weight"
    sd[key] = sd[key] + 1
    with pytest.raises(
        CheckpointError,
        match=r"text_encoder\.encoder\.layer\.0\.output\.dense"
        r"\.weight.*text_decoder.*differ",
    ):
        checkpoint.load(save_sd(tmp_path / "m.pth", sd), config="blip_tiny")


def test_bad_task_and_format_arguments(tmp_path):
    model = tiny("caption")
    path = checkpoint.save(model, tmp_path / "m.pth")
    with pytest.raises(ValueError, match="unknown task 'segmentation'"):
        checkpoint.load(path, task="segmentation")
    with pytest.raises(ValueError, match="format must be"):
        checkpoint.save(model, tmp_path / "x", format="onnx")
    # a caption checkpoint has no ITM head: loading it as retrieval names what is missing
    with pytest.raises(
        CheckpointError,
        match=r"missing.*itm_head\.weight.*unexpected keys: "
        r"text_decoder",
    ):
        checkpoint.load(path, task="retrieval")
