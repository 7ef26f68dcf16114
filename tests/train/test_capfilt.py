"""CapFilt on synthetic data with small random models: output format and counts, decisions
equal to a direct ITM computation, corrupt images skipped, and resume equivalence."""
import json
import shutil

import pytest
import torch

import blip_fast
from blip_fast.data import load_image, make_synthetic, test_transform
from blip_fast.text import pre_caption
from blip_fast.train import capfilt as capfilt_mod
from blip_fast.train.capfilt import capfilt, itm_match_prob

N_IMAGES, CHUNK, BATCH = 10, 4, 3  # 3 chunks, the last one short; batches cross no chunk


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("capfilt")
    paths = make_synthetic(root / "data", n_train_images=N_IMAGES - 1, n_test_images=1,
                           n_val_images=1, image_size=64, captions_per_train_image=1)
    ann = json.loads(paths["pretrain"].read_text())
    ann.append({"image": "images/train/missing.jpg", "caption": "a lost image"})
    ann[0]["caption"] = [ann[0]["caption"], "a second web caption"]
    (root / "web.json").write_text(json.dumps(ann))
    torch.manual_seed(0)
    models = {}
    for task in ("caption", "retrieval"):  # through save / load, as the CLI gets them
        blip_fast.save(blip_fast.create_model(task, "blip_tiny"), root / f"{task}.pth")
        models[task] = blip_fast.load(root / f"{task}.pth", task=task).eval()
    return root, paths["root"], models


def _run(setup, out, **kw):
    root, image_root, models = setup
    return capfilt(models["caption"], models["retrieval"], blip_fast.tokenizer(), root / "web.json",
                   out, image_root=image_root, chunk_size=CHUNK, batch_size=BATCH, num_workers=0,
                   max_length=10, min_length=3, **kw)  # short captions: a quick test


@pytest.fixture(scope="module")
def full_run(setup):
    out = setup[0] / "full"
    return out, _run(setup, out)


def _entries(out):
    return [e for c in sorted((out / "chunks").glob("*.json"))
            for e in json.loads(c.read_text())["entries"]]


def test_decisions_equal_direct_itm(setup, full_run, tmp_path):
    root, image_root, models = setup
    out = tmp_path / "refiltered"  # a copy: merged again below with another threshold
    shutil.copytree(full_run[0], out)
    entries = [e for e in _entries(out) if "error" not in e]
    assert [e["index"] for e in entries] == list(range(N_IMAGES - 1))
    # direct: one image at a time, through the official PIL test transform
    filt, tok = models["retrieval"], blip_fast.tokenizer()
    probs = []
    for e in entries:
        pixels = test_transform(64)(load_image(image_root / e["image"]))[None]
        texts = [pre_caption(t, 30) for t in e["web"] + [e["synthetic"]]]
        direct = itm_match_prob(filt, tok, texts, filt.image_embeds(pixels).expand(len(texts), -1, -1))
        torch.testing.assert_close(torch.tensor(e["p_web"] + [e["p_synthetic"]]), direct,
                                   atol=1e-5, rtol=0)
        probs += direct.tolist()
    # random models put every probability near one value: filter at its median, then compare
    threshold = sorted(probs)[len(probs) // 2]
    summary = capfilt_mod._merge(out, -(-N_IMAGES // CHUNK), threshold)
    boot = json.loads((out / "bootstrapped.json").read_text())
    expect = []
    for e in entries:
        kept = [t for t, p in zip(e["web"] + [e["synthetic"]], e["p_web"] + [e["p_synthetic"]])
                if p > threshold]
        expect += [{"image": e["image"], "caption": kept}] if kept else []
    assert boot == expect
    n_web_kept = sum(p > threshold for e in entries for p in e["p_web"])
    assert summary["web"] == {"kept": n_web_kept, "removed": N_IMAGES - n_web_kept}  # 10 web texts
    assert summary["noise_ratio"] == pytest.approx((N_IMAGES - n_web_kept) / N_IMAGES)
    assert 0 < summary["synthetic"]["kept"] < N_IMAGES - 1


def test_output_format_and_counts(setup, full_run):
    out, summary = full_run
    assert summary["entries"] == N_IMAGES and summary["corrupt_images"] == 1
    assert summary["threshold"] == 0.5
    counts = summary["web"]["kept"] + summary["web"]["removed"]
    assert counts == N_IMAGES  # 9 images, one with two web captions; the missing one scores none
    assert summary["synthetic"]["kept"] + summary["synthetic"]["removed"] == N_IMAGES - 1
    corrupt = (out / "corrupt.tsv").read_text().splitlines()
    assert len(corrupt) == 1 and corrupt[0].startswith(f"{N_IMAGES - 1}\t") and "missing.jpg" in corrupt[0]
    entry = _entries(out)[0]
    assert len(entry["web"]) == len(entry["p_web"]) == 2 and isinstance(entry["synthetic"], str)
    # the bootstrapped JSON is a pre-training JSON
    assert blip_fast.data.PretrainDataset(out / "bootstrapped.json", setup[1])[0][1]


def test_resume_after_interrupt_is_identical(setup, full_run, monkeypatch):
    full, _ = full_run
    out = setup[0] / "resumed"
    write = capfilt_mod.write_json_atomic
    written = []

    def killed_after_first_chunk(path, obj):
        if path.parent.name == "chunks":
            if written:
                raise KeyboardInterrupt
            written.append(path.name)
        write(path, obj)

    monkeypatch.setattr(capfilt_mod, "write_json_atomic", killed_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        _run(setup, out)
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["000000.json"]
    monkeypatch.setattr(capfilt_mod, "write_json_atomic", write)
    redone, process_batch = [], capfilt_mod._process_batch
    monkeypatch.setattr(capfilt_mod, "_process_batch",
                        lambda *a: redone.append(a[4]) or process_batch(*a))
    _run(setup, out)
    assert min(i for batch in redone for i in batch) >= CHUNK  # chunk 0 was not redone
    for name in ("bootstrapped.json", "summary.json", "corrupt.tsv"):
        assert (out / name).read_bytes() == (full / name).read_bytes(), name
    for chunk in (full / "chunks").iterdir():
        assert (out / "chunks" / chunk.name).read_bytes() == chunk.read_bytes(), chunk.name
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        _run(setup, out, seed=1)
