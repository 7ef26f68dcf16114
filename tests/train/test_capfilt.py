"""CapFilt on synthetic data with small random models: output format and counts, decisions
equal to a direct ITM computation, corrupt images skipped, and resume equivalence, for a
pre-training JSON and for webdataset shards (through the CLI, alone and as 2 gloo ranks under
torchrun)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import blip_fast
from blip_fast.cli import main as cli_main
from blip_fast.data import load_image, make_synthetic, test_transform
from blip_fast.data.images import decode_image
from blip_fast.data.shards import ShardDataset, write_shards
from blip_fast.text import pre_caption
from blip_fast.train import capfilt as capfilt_mod
from blip_fast.train.capfilt import capfilt, itm_match_prob

N_IMAGES, CHUNK, BATCH = 10, 4, 3  # 3 chunks, the last one short; batches cross no chunk
BAD = 4  # shard input: sample 4 (first of the second input shard) is not an image


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("capfilt")
    paths = make_synthetic(
        root / "data",
        n_train_images=N_IMAGES - 1,
        n_test_images=1,
        n_val_images=1,
        image_size=64,
        captions_per_train_image=1,
    )
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
    return capfilt(
        models["caption"],
        models["retrieval"],
        blip_fast.tokenizer(),
        root / "web.json",
        out,
        image_root=image_root,
        chunk_size=CHUNK,
        batch_size=BATCH,
        num_workers=0,
        max_length=10,
        min_length=3,
        **kw,
    )  # short captions: a quick test


@pytest.fixture(scope="module")
def full_run(setup):
    out = setup[0] / "full"
    return out, _run(setup, out)


def _entries(out):
    return [
        e
        for c in sorted((out / "chunks").glob("*.json"))
        for e in json.loads(c.read_text())["entries"]
    ]


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
        direct = itm_match_prob(
            filt, tok, texts, filt.image_embeds(pixels).expand(len(texts), -1, -1)
        )
        torch.testing.assert_close(
            torch.tensor(e["p_web"] + [e["p_synthetic"]]), direct, atol=1e-5, rtol=0
        )
        probs += direct.tolist()
    # random models put every probability near one value: filter at its median, then compare
    threshold = sorted(probs)[len(probs) // 2]
    summary = capfilt_mod._merge(out, -(-N_IMAGES // CHUNK), threshold)
    boot = json.loads((out / "bootstrapped.json").read_text())
    expect = []
    for e in entries:
        kept = [
            t
            for t, p in zip(e["web"] + [e["synthetic"]], e["p_web"] + [e["p_synthetic"]])
            if p > threshold
        ]
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
    assert (
        len(corrupt) == 1
        and corrupt[0].startswith(f"{N_IMAGES - 1}\t")
        and "missing.jpg" in corrupt[0]
    )
    entry = _entries(out)[0]
    assert len(entry["web"]) == len(entry["p_web"]) == 2 and isinstance(entry["synthetic"], str)
    # the bootstrapped JSON is a pre-training JSON
    assert blip_fast.data.PretrainDataset(out / "bootstrapped.json", setup[1])[0][1]


def _interrupt_then_resume(monkeypatch, out, run):
    """``run()`` killed once chunk 0 is written, then run again: -> the batches redone."""
    write, written = capfilt_mod.write_json_atomic, []

    def killed_after_first_chunk(path, obj):
        if path.parent.name == "chunks":
            if written:
                raise KeyboardInterrupt
            written.append(path.name)
        write(path, obj)

    monkeypatch.setattr(capfilt_mod, "write_json_atomic", killed_after_first_chunk)
    with pytest.raises((KeyboardInterrupt, SystemExit)) as interrupted:
        run()
    assert interrupted.type is KeyboardInterrupt or interrupted.value.code == 130  # CLI: Ctrl-C
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["000000.json"]
    monkeypatch.setattr(capfilt_mod, "write_json_atomic", write)
    redone, process_batch = [], capfilt_mod._process_batch
    monkeypatch.setattr(
        capfilt_mod, "_process_batch", lambda *a: redone.append(a[4]) or process_batch(*a)
    )
    run()
    assert min(i for batch in redone for i in batch) >= CHUNK  # chunk 0 was not redone


def test_resume_after_interrupt_is_identical(setup, full_run, monkeypatch):
    full, _ = full_run
    out = setup[0] / "resumed"
    _interrupt_then_resume(monkeypatch, out, lambda: _run(setup, out))
    for name in ("bootstrapped.json", "summary.json", "corrupt.tsv"):
        assert (out / name).read_bytes() == (full / name).read_bytes(), name
    for chunk in (full / "chunks").iterdir():
        assert (out / "chunks" / chunk.name).read_bytes() == chunk.read_bytes(), chunk.name
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        _run(setup, out, seed=1)


# --- webdataset shards in, bootstrapped shards out (through the CLI) --------------------------


@pytest.fixture(scope="module")
def shard_spec(setup):
    """The JSON's 9 readable images as 3 shards of 4, 4, 2 samples (sample 0's caption a JSON
    list of two web texts), sample BAD's image bytes replaced by garbage."""
    root, image_root, _ = setup
    ann = json.loads((root / "web.json").read_text())[: N_IMAGES - 1]
    samples = [
        (f"{i:06d}", (image_root / a["image"]).read_bytes(), a["caption"])
        for i, a in enumerate(ann)
    ]
    samples.insert(BAD, (f"{N_IMAGES - 1:06d}", b"not an image", "a broken image"))
    write_shards(samples, str(root / "web-%06d.tar"), per_shard=4)
    return str(root / "web-{000000..000002}.tar")


def _cli_args(setup, spec, out, *extra):
    root = setup[0]
    return [
        "capfilt",
        "--captioner",
        str(root / "caption.pth"),
        "--filter",
        str(root / "retrieval.pth"),
        "--shards",
        spec,
        "--out",
        str(out),
        "--chunk-size",
        str(CHUNK),
        "--batch-size",
        str(BATCH),
        "--num-workers",
        "0",
        "--per-shard",
        "3",
        *extra,
    ]


def _cli(setup, spec, out, *extra):
    """One process, one thread: the numerics of the OMP_NUM_THREADS=1 torchrun ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli_main(_cli_args(setup, spec, out, *extra))
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def shard_run(setup, shard_spec):
    out = setup[0] / "shards_full"
    return out, _cli(setup, shard_spec, out)


def _outputs(out) -> dict:
    """Every file a run leaves, as bytes (chunks, settings, summary, corrupt list, shards)."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
    }


def test_shard_input_corrupt_sample_reported_and_skipped(shard_run, shard_spec):
    out, summary = shard_run
    assert summary["entries"] == N_IMAGES and summary["corrupt_images"] == 1
    assert summary["web"]["kept"] + summary["web"]["removed"] == N_IMAGES  # sample 0 has two
    assert summary["synthetic"]["kept"] + summary["synthetic"]["removed"] == N_IMAGES - 1
    bad_shard = ShardDataset(shard_spec).shards[1]
    (line,) = (out / "corrupt.tsv").read_text().splitlines()
    index, name, error = line.split("\t")
    assert (index, name) == (str(BAD), f"{bad_shard}:{N_IMAGES - 1:06d}") and name in error
    assert not (out / "bootstrapped.json").exists()
    assert sorted(p.name for p in out.glob("bootstrapped-*.tar")) == summary["shards"]


def test_shard_decisions_equal_direct_itm_and_output_loads(setup, shard_spec, shard_run, tmp_path):
    models, web = setup[2], ShardDataset(shard_spec)
    out = tmp_path / "refiltered"  # a copy: filtered again below with another threshold
    shutil.copytree(shard_run[0], out)
    entries = [e for e in _entries(out) if "error" not in e]
    assert [e["index"] for e in entries] == [i for i in range(N_IMAGES) if i != BAD]
    filt, tok = models["retrieval"], blip_fast.tokenizer()
    probs = []
    for e in entries:  # direct: one image at a time, through the official PIL test transform
        shard, key, _, data, caption = web.raw(e["index"])
        assert e["image"] == f"{shard}:{key}"
        assert e["web"] == ([caption] if isinstance(caption, str) else caption)
        pixels = test_transform(64)(decode_image(data, key))[None]
        texts = [pre_caption(t, 30) for t in e["web"] + [e["synthetic"]]]
        direct = itm_match_prob(
            filt, tok, texts, filt.image_embeds(pixels).expand(len(texts), -1, -1)
        )
        torch.testing.assert_close(
            torch.tensor(e["p_web"] + [e["p_synthetic"]]), direct, atol=1e-5, rtol=0
        )
        probs += direct.tolist()
    assert len(entries[0]["web"]) == 2  # the JSON list caption: both web texts scored
    # random models put every probability near one value: filter at the median (a rerun only
    # merges again: every chunk is there), 2 samples a shard
    threshold = sorted(probs)[len(probs) // 2]
    summary = _cli(setup, shard_spec, out, "--threshold", repr(threshold), "--per-shard", "2")
    expect = []
    for e in entries:
        kept = [
            t
            for t, p in zip(e["web"] + [e["synthetic"]], e["p_web"] + [e["p_synthetic"]])
            if p > threshold
        ]
        expect += [(e["index"], kept)] if kept else []
    assert 0 < len(expect) < len(entries) and summary["images_kept"] == len(expect)
    names = [f"bootstrapped-{i:06d}.tar" for i in range(-(-len(expect) // 2))]
    assert summary["shards"] == names  # the first merge's 3-sample shards replaced, none stale
    assert sorted(p.name for p in out.glob("bootstrapped-*.tar")) == names
    boot = ShardDataset(str(out / "bootstrapped-*.tar"))
    assert len(boot) == len(expect)
    for i, (index, kept) in enumerate(expect):
        _, key, ext, data, caption = boot.raw(i)
        _, web_key, web_ext, web_data, _ = web.raw(index)
        assert (key, ext, data, caption) == (web_key, web_ext, web_data, kept)
        image, text = boot[i]  # a pre-training item: one of the kept texts
        assert image.size == (64, 64) and text in [pre_caption(t, 30) for t in kept]
    n_web_kept = sum(p > threshold for e in entries for p in e["p_web"])
    assert summary["web"] == {"kept": n_web_kept, "removed": N_IMAGES - n_web_kept}
    assert summary["noise_ratio"] == pytest.approx((N_IMAGES - n_web_kept) / N_IMAGES)


def test_shard_resume_after_interrupt_is_identical(setup, shard_spec, shard_run, monkeypatch):
    out = setup[0] / "shards_resumed"
    _interrupt_then_resume(monkeypatch, out, lambda: _cli(setup, shard_spec, out))
    assert _outputs(out) == _outputs(shard_run[0])


def test_shard_two_gloo_ranks_under_torchrun_equal_one_process(setup, shard_spec, shard_run):
    out = setup[0] / "shards_torchrun"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "blip_fast.cli",
        *_cli_args(setup, shard_spec, out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout) == shard_run[1]  # rank 0 prints the summary, rank 1 nothing
    assert _outputs(out) == _outputs(shard_run[0])
    for rank, n_chunks in ((0, 2), (1, 1)):  # chunk c computed by rank c mod 2 alone
        line = f"capfilt rank {rank} of 2: {n_chunks} chunks to compute, 0 already written, of 3"
        assert line in proc.stderr


def test_cli_needs_exactly_one_input(setup, shard_spec, tmp_path, capsys):
    args = _cli_args(setup, shard_spec, tmp_path / "x")
    neither = args[:5] + args[7:]
    for argv, message in (
        (neither, "one of the arguments --ann --shards is required"),
        (args + ["--ann", "web.json"], "not allowed with argument"),
    ):
        with pytest.raises(SystemExit):
            cli_main(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="either annotation files or shards"):
        capfilt(None, None, None, None, tmp_path / "x")
