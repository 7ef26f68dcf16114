"""Caption evaluation: generation over a split with the official decoding, the results and
ground-truth files, pycocoevalcap scoring, ``blip-fast eval-caption`` and its bad input."""

import importlib.util
import json
import sys
import urllib.error

import pytest
import torch

import blip_fast
from blip_fast.cli import main
from blip_fast.data import make_synthetic, test_transform
from blip_fast.eval import caption
from blip_fast.eval.caption import CaptionEvalDataset
from blip_fast.models.blip_caption import BlipCaption

HAVE_SCORERS = importlib.util.find_spec("pycocoevalcap") is not None
METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)  # runs before the per-test seed: the random weights are fixed here
    root = tmp_path_factory.mktemp("syn")
    paths = make_synthetic(
        root, n_train_images=1, n_test_images=5, n_val_images=1, image_size=64, seed=0
    )
    model = blip_fast.create_model("caption", "blip_tiny", backend="reference").eval()
    checkpoint = blip_fast.save(model, root / "caption_tiny.pth", format="official")
    return model, paths, checkpoint


@pytest.fixture
def offline_spice(monkeypatch):
    """SPICE's CoreNLP download fails as it does without network (and never runs in tests)."""
    if not HAVE_SCORERS:
        return

    def no_network():
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("pycocoevalcap.spice.spice.get_stanford_models", no_network)


def _write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


def test_results_have_official_ids_decoding_and_no_prompt(setup, tmp_path):
    model, paths, _ = setup
    ds = CaptionEvalDataset(paths["test"], paths["image_root"], test_transform(64))
    assert ds.image_ids == [0, 1, 2, 3, 4]  # images/test/000000.jpg ...
    results = caption.generate_captions(model, ds, batch_size=3)  # batches of 3 and 2
    assert [r["image_id"] for r in results] == ds.image_ids
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in results)
    pixels = ds[4][0][None]
    ids = model.generate_ids(pixels, num_beams=3, max_length=20, min_length=5)[0]
    text = model.tokenizer.batch_decode([ids], skip_special_tokens=True)[0]
    # the official cut: the prompt's length off the decoded text (a first "##" word piece
    # joins "of": "a picture ofpas ..." -> "as ...", as in official BLIP)
    assert 5 <= len(ids) <= 20 and text.startswith("a picture of")
    assert results[4]["caption"] == text[len("a picture of ") :]
    out = caption.write_results(results, tmp_path / "sub" / "results.json")
    assert json.loads(out.read_text()) == results


def test_image_ids_from_file_names_or_img_id(setup, tmp_path):
    assert caption.image_id_from_path("val2014/COCO_val2014_000000391895.jpg") == 391895
    assert caption.image_id_from_path("images/test/000007.jpg") == 7
    with pytest.raises(ValueError, match="no image id in file name 'dog.jpg'"):
        caption.image_id_from_path("dog.jpg")
    _, paths, _ = setup
    nocaps = _write(tmp_path, "nocaps.json", [{"image": "a.jpg", "img_id": 4}, {"image": "b.jpg"}])
    with pytest.raises(ValueError, match=r"nocaps.json: entry 1: no image id in file name 'b.jpg'"):
        CaptionEvalDataset(nocaps, tmp_path, None, need_captions=False)
    nocaps = _write(tmp_path, "nocaps.json", [{"image": "a.jpg", "img_id": "4"}])
    assert CaptionEvalDataset(nocaps, tmp_path, None, need_captions=False).image_ids == [4]
    ann = json.loads(paths["test"].read_text())
    ann[3]["image"] = "elsewhere/COCO_x_000001.jpg"
    with pytest.raises(ValueError, match="entries 1 and 3 both have image id 1"):
        CaptionEvalDataset(_write(tmp_path, "dup.json", ann), tmp_path, None)


def test_ground_truth_writer(setup, tmp_path):
    _, paths, _ = setup
    ds = CaptionEvalDataset(paths["test"], paths["image_root"], None)
    gt = json.loads(caption.write_ground_truth(ds, tmp_path / "gt.json").read_text())
    ann = json.loads(paths["test"].read_text())
    assert gt["images"] == [{"id": i} for i in range(5)]
    assert [(a["image_id"], a["caption"]) for a in gt["annotations"]] == [
        (i, c) for i, entry in enumerate(ann) for c in entry["caption"]
    ]
    assert [a["id"] for a in gt["annotations"]] == list(range(1, 26))
    bare = CaptionEvalDataset(paths["test"], paths["image_root"], None, need_captions=False)
    with pytest.raises(ValueError, match="read without captions"):
        caption.write_ground_truth(bare, tmp_path / "none.json")


GROUND_TRUTH = {
    "images": [{"id": 1}, {"id": 2}, {"id": 3}],
    "annotations": [
        {"image_id": 1, "caption": "A dog runs on the green grass.", "id": 1},
        {"image_id": 1, "caption": "a brown dog running in a park", "id": 2},
        {"image_id": 2, "caption": "a red car parked by the road", "id": 3},
        {"image_id": 2, "caption": "A red car on a street.", "id": 4},
        {"image_id": 3, "caption": "two cats sleeping on a sofa", "id": 5},
        {"image_id": 3, "caption": "Cats asleep on a couch.", "id": 6},
    ],
}
IDENTICAL = [
    {"image_id": 1, "caption": "a brown dog running in a park"},
    {"image_id": 2, "caption": "a red car parked by the road"},
    {"image_id": 3, "caption": "two cats sleeping on a sofa"},
]
UNRELATED = [
    {"image_id": 1, "caption": "a plate of pasta with tomato sauce"},
    {"image_id": 2, "caption": "an old clock tower under clouds"},
    {"image_id": 3, "caption": "people skiing down a snowy hill"},
]


@pytest.mark.skipif(not HAVE_SCORERS, reason="pycocoevalcap is not installed")
def test_scores_on_hand_made_captions(tmp_path, offline_spice, caplog):
    gt = _write(tmp_path, "gt.json", GROUND_TRUTH)
    same = caption.score_captions(IDENTICAL, gt)
    assert set(same) == set(METRICS)  # SPICE could not get its CoreNLP jars
    assert "SPICE not computed" in caplog.text and "stanford-corenlp-3.6.0.jar" in caplog.text
    assert same["Bleu_1"] == pytest.approx(1.0) and same["Bleu_4"] == pytest.approx(1.0)
    other = caption.score_captions(_write(tmp_path, "res.json", UNRELATED), GROUND_TRUTH, False)
    assert set(other) == set(METRICS)
    assert same["CIDEr"] > other["CIDEr"] + 1 and other["Bleu_1"] < 0.5


def test_missing_scorers_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # import fails as if absent
    with pytest.raises(ImportError, match=r"needs pycocoevalcap: pip install pycocoevalcap"):
        caption.score_captions(IDENTICAL, GROUND_TRUTH)


@pytest.mark.skipif(not HAVE_SCORERS, reason="pycocoevalcap is not installed")
def test_results_must_match_the_ground_truth():
    with pytest.raises(
        ValueError, match=r"no caption for 1 of the 3 ground-truth images \(image ids \[3\]"
    ):
        caption.score_captions(IDENTICAL[:2], GROUND_TRUTH)
    with pytest.raises(ValueError, match="result 3: image 9 is not in the ground truth"):
        caption.score_captions([*IDENTICAL, {"image_id": 9, "caption": "x"}], GROUND_TRUTH)
    with pytest.raises(ValueError, match="result 3: a second caption for image 1"):
        caption.score_captions([*IDENTICAL, IDENTICAL[0]], GROUND_TRUTH)


@pytest.mark.skipif(not HAVE_SCORERS, reason="pycocoevalcap is not installed")
def test_cli_scores_the_synthetic_split(setup, tmp_path, offline_spice, capsys):
    _, paths, checkpoint = setup
    out = tmp_path / "results.json"
    argv = ["eval-caption", str(checkpoint), "--ann", str(paths["test"])]
    argv += ["--image-root", str(paths["image_root"]), "--out", str(out), "--num-workers", "0"]
    main(argv)
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 5 and set(summary["metrics"]) == set(METRICS)
    assert [r["image_id"] for r in json.loads(out.read_text())] == [0, 1, 2, 3, 4]
    gt = json.loads((tmp_path / "results.gt.json").read_text())
    assert len(gt["images"]) == 5 and len(gt["annotations"]) == 25


def test_cli_nocaps_decodes_with_repetition_penalty(setup, tmp_path, monkeypatch, capsys):
    _, paths, checkpoint = setup
    calls = []
    generate = BlipCaption.generate

    def spy(self, pixels, **kwargs):
        calls.append(kwargs)
        return generate(self, pixels, **kwargs)

    monkeypatch.setattr(BlipCaption, "generate", spy)
    nocaps = [{"image": f"images/test/{i:06d}.jpg", "img_id": 10 + i} for i in range(3)]
    out = tmp_path / "nocaps_val.json"
    argv = ["eval-caption", str(checkpoint), "--nocaps", "--out", str(out), "--num-workers", "0"]
    argv += ["--ann", str(_write(tmp_path, "nocaps.json", nocaps))]
    main(argv + ["--image-root", str(paths["image_root"])])
    summary = json.loads(capsys.readouterr().out)
    assert "metrics" not in summary and not (tmp_path / "nocaps_val.gt.json").exists()
    assert [r["image_id"] for r in json.loads(out.read_text())] == [10, 11, 12]
    want = {"num_beams": 3, "max_length": 20, "min_length": 5, "repetition_penalty": 1.1}
    assert calls == [want]


def test_bad_annotations_are_named(setup, tmp_path, capsys):
    _, paths, checkpoint = setup
    ann = json.loads(paths["test"].read_text())
    del ann[2]["caption"]
    bad = _write(tmp_path, "no_caption.json", ann)
    with pytest.raises(KeyError, match=r"no_caption.json: entry 2 has no 'caption' key"):
        CaptionEvalDataset(bad, paths["image_root"], None)
    ann = [{"image": "images/test/000000.jpg"}, {"image": "images/test/nope_000009.jpg"}]
    argv = ["eval-caption", str(checkpoint), "--nocaps", "--out", str(tmp_path / "r.json")]
    argv += ["--ann", str(_write(tmp_path, "missing.json", ann)), "--num-workers", "0"]
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--image-root", str(paths["image_root"])])
    assert "image not found" in str(exc.value.code) and "nope_000009.jpg" in str(exc.value.code)
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--image-root", str(tmp_path), "--gt", str(bad)])
    assert "NoCaps results are scored by the NoCaps server" in str(exc.value.code)
