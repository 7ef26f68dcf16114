"""Image captioning evaluation, the official procedure (COCO Karpathy val/test, NoCaps).

Every image of the split is captioned by beam search (3 beams; max 20, min 5 tokens counted
with the prompt) and the prompt "a picture of " is cut from the text, as official
``train_caption.py`` does; NoCaps decodes the same way with repetition penalty 1.1
(``eval_nocaps.py``) and its results go to the NoCaps evaluation server unscored. Results are
``[{"image_id": int, "caption": str}]``, one per image in annotation order.

Scoring runs pycocoevalcap's scorers as its ``COCOEvalCap.evaluate`` does (PTB tokenisation of
references and results, then BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE over every ground-truth
image) against COCO caption-format ground truth (``coco_karpathy_test_gt.json``, or one written
from the annotation's captions by ``write_ground_truth``). pycocoevalcap is an optional
dependency (``pip install 'blip-fast[caption]'``); its tokenizer and METEOR run ``java``. SPICE
also needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use: where that fails
the other metrics are reported and a warning says what is missing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from blip_fast.data.datasets import MissingKeyError, _read_json, load_annotations
from blip_fast.data.images import load_image
from blip_fast.data.transforms import test_transform

__all__ = [
    "CaptionEvalDataset",
    "evaluate",
    "generate_captions",
    "image_id_from_path",
    "require_scorers",
    "score_captions",
    "write_ground_truth",
    "write_results",
]

# official caption_coco.yaml / nocaps.yaml generation settings
NUM_BEAMS, MAX_LENGTH, MIN_LENGTH = 3, 20, 5
NOCAPS_REPETITION_PENALTY = 1.1
INSTALL_HINT = "pip install pycocoevalcap  (or: pip install 'blip-fast[caption]')"
log = logging.getLogger("blip_fast")


def image_id_from_path(image: str) -> int:
    """The official Karpathy image id: the digits after the last '_' of the file name
    (``val2014/COCO_val2014_000000391895.jpg`` -> 391895, ``images/test/000007.jpg`` -> 7)."""
    digits = PurePosixPath(image).stem.rsplit("_", 1)[-1]
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(
            f"no image id in file name {image!r}: expected digits after its last '_' "
            "(COCO_val2014_000000391895.jpg) or an 'img_id' key"
        )
    return int(digits)


def _entry_image_id(entry: dict, where: str) -> int:
    """``img_id`` where the entry has one (NoCaps), else the id in the file name."""
    if "img_id" not in entry:
        try:
            return image_id_from_path(entry["image"])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    value = entry["img_id"]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise TypeError(f"{where}: 'img_id' must be an integer, got {value!r}")


class CaptionEvalDataset(Dataset):
    """One item per image: (transform(image), image_id).

    ``ann_file``: ``[{"image": relpath, "caption": [str, ...]}]`` (Karpathy val/test, the
    synthetic val/test), or with ``need_captions=False`` any list of ``{"image", ...}``
    entries (NoCaps: ``{"image", "img_id"}``). Image ids: ``img_id`` where given, else parsed
    from the file name (``image_id_from_path``); two entries with one id are an error.
    ``captions[i]``: the reference captions of entry i, None without ``need_captions``.
    """

    def __init__(self, ann_file, image_root, transform, need_captions: bool = True):
        path = Path(ann_file)
        if need_captions:
            self.annotation = load_annotations(path, caption="list")
        else:
            self.annotation = _read_json(path)
            if not self.annotation:
                raise ValueError(f"annotation file {path} has no entries")
            for i, entry in enumerate(self.annotation):
                if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                    raise MissingKeyError(f"{path}: entry {i} needs an 'image' path (str)")
        self.image_root, self.transform = Path(image_root), transform
        self.captions = [e["caption"] for e in self.annotation] if need_captions else None
        self.image_ids: list[int] = []
        first: dict[int, int] = {}
        for i, entry in enumerate(self.annotation):
            image_id = _entry_image_id(entry, f"{path}: entry {i}")
            if image_id in first:
                raise ValueError(
                    f"{path}: entries {first[image_id]} and {i} both have image id {image_id}"
                )
            first[image_id] = i
            self.image_ids.append(image_id)

    def __len__(self) -> int:
        return len(self.annotation)

    def __getitem__(self, index: int):
        image = load_image(self.image_root / self.annotation[index]["image"])
        return self.transform(image), self.image_ids[index]


@torch.no_grad()
def generate_captions(
    model,
    dataset: CaptionEvalDataset,
    batch_size: int = 32,
    device="cpu",
    num_workers: int = 0,
    repetition_penalty: float = 1.0,
    progress: bool = False,
) -> list[dict]:
    """Caption every image of ``dataset`` with ``model.generate`` (``BlipCaption``) and the
    official beam search; -> ``[{"image_id": int, "caption": str}]`` in dataset order."""
    device = torch.device(device)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    results = []
    for pixels, image_ids in tqdm(loader, desc="captions", disable=not progress):
        captions = model.generate(
            pixels.to(device, non_blocking=True),
            num_beams=NUM_BEAMS,
            max_length=MAX_LENGTH,
            min_length=MIN_LENGTH,
            repetition_penalty=repetition_penalty,
        )
        results += [
            {"image_id": i, "caption": c} for i, c in zip(image_ids.tolist(), captions, strict=True)
        ]
    return results


def _write_json(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) + "\n", encoding="utf-8")
    return path


def write_results(results: list[dict], path) -> Path:
    """The results file that pycocotools' ``loadRes`` and the NoCaps server read."""
    return _write_json(results, path)


def write_ground_truth(dataset: CaptionEvalDataset, path) -> Path:
    """COCO caption-format ground truth from the dataset's own captions, for splits that ship
    none: ``{"images": [{"id"}], "annotations": [{"image_id", "caption", "id"}]}``."""
    if dataset.captions is None:
        raise ValueError("no ground truth to write: the dataset was read without captions")
    annotations = [
        {"image_id": image_id, "caption": caption}
        for image_id, captions in zip(dataset.image_ids, dataset.captions, strict=True)
        for caption in captions
    ]
    for n, ann in enumerate(annotations, 1):
        ann["id"] = n
    images = [{"id": image_id} for image_id in dataset.image_ids]
    return _write_json({"images": images, "annotations": annotations}, path)


def require_scorers() -> None:
    """Raise, naming what to install, unless pycocoevalcap and java are both there."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise ImportError(f"caption scoring needs pycocoevalcap: {INSTALL_HINT}") from None
    if shutil.which("java") is None:
        raise RuntimeError(
            "caption scoring runs java (pycocoevalcap's PTB tokenizer and METEOR): no java on "
            "PATH; install a Java runtime (e.g. apt-get install default-jre)"
        )


def _load(obj, what: str):
    """(parsed JSON, name for messages) of a path, or (obj, ``what``) for an in-memory one."""
    if not isinstance(obj, (str, os.PathLike)):
        return obj, what
    path = Path(obj)
    try:
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON in {what} file {path}: {err}") from err


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _references(ground_truth) -> dict[int, list[str]]:
    """image id -> its reference captions, in the order of the ground truth's ``images``."""
    gt, where = _load(ground_truth, "ground truth")
    if not (
        isinstance(gt, dict)
        and isinstance(gt.get("images"), list)
        and isinstance(gt.get("annotations"), list)
    ):
        raise ValueError(
            f"{where}: expected COCO caption format, an object with 'images' [{{'id'}}] and "
            "'annotations' [{'image_id', 'caption'}] lists"
        )
    refs: dict[int, list[str]] = {}
    for i, image in enumerate(gt["images"]):
        if not (isinstance(image, dict) and _is_int(image.get("id"))):
            raise ValueError(f"{where}: images[{i}] needs an integer 'id', got {image!r}")
        refs[image["id"]] = []
    for i, ann in enumerate(gt["annotations"]):
        if not (isinstance(ann, dict) and isinstance(ann.get("caption"), str)):
            raise ValueError(f"{where}: annotations[{i}] needs a 'caption' (str), got {ann!r}")
        if ann.get("image_id") not in refs:
            raise ValueError(
                f"{where}: annotations[{i}]: image_id {ann.get('image_id')!r} is not in 'images'"
            )
        refs[ann["image_id"]].append(ann["caption"])
    bare = [image_id for image_id, captions in refs.items() if not captions]
    if bare:
        raise ValueError(f"{where}: images without a reference caption: {bare[:5]}")
    if not refs:
        raise ValueError(f"{where}: no images")
    return refs


def _hypotheses(results, refs: dict[int, list[str]]) -> dict[int, str]:
    """image id -> its generated caption; every ground-truth image needs exactly one."""
    results, where = _load(results, "results")
    if not isinstance(results, list):
        raise ValueError(f"{where}: expected a list of {{'image_id', 'caption'}}")
    hyps: dict[int, str] = {}
    for i, res in enumerate(results):
        if not (
            isinstance(res, dict)
            and _is_int(res.get("image_id"))
            and isinstance(res.get("caption"), str)
        ):
            raise ValueError(
                f"{where}: result {i} must be {{'image_id': int, 'caption': str}}, got {res!r}"
            )
        if res["image_id"] in hyps:
            raise ValueError(f"{where}: result {i}: a second caption for image {res['image_id']}")
        if res["image_id"] not in refs:
            raise ValueError(
                f"{where}: result {i}: image {res['image_id']} is not in the ground truth"
            )
        hyps[res["image_id"]] = res["caption"]
    missing = [image_id for image_id in refs if image_id not in hyps]
    if missing:  # the official score covers every ground-truth image
        raise ValueError(
            f"{where}: no caption for {len(missing)} of the {len(refs)} ground-truth images "
            f"(image ids {missing[:5]}{' ...' if len(missing) > 5 else ''})"
        )
    return hyps


def _spice():
    """pycocoevalcap's SPICE scorer, or None with a warning naming the Stanford CoreNLP jars
    it lacks when they are absent and their download fails."""
    from pycocoevalcap.spice import get_stanford_models as corenlp
    from pycocoevalcap.spice.spice import Spice

    try:
        return Spice()  # downloads the CoreNLP jars on first use
    except OSError as err:
        jars = os.path.join(corenlp.SPICEDIR, corenlp.SPICELIB)
        log.warning(
            "SPICE not computed: it needs Stanford CoreNLP 3.6.0 (%s.jar and %s-models.jar in "
            "%s), which pycocoevalcap downloads from http://nlp.stanford.edu/software/%s.zip, "
            "and the download failed (%s). Put the two jars there to score SPICE.",
            corenlp.JAR,
            corenlp.JAR,
            jars,
            corenlp.CORENLP,
            err,
        )
        return None


def score_captions(results, ground_truth, spice: bool = True) -> dict[str, float]:
    """pycocoevalcap metrics of ``results`` (list or results file) against ``ground_truth``
    (COCO caption-format dict or file): ``Bleu_1`` .. ``Bleu_4``, ``METEOR``, ``ROUGE_L``,
    ``CIDEr``, ``SPICE`` (omitted, with a warning, where SPICE cannot run), as fractions
    (paper tables show 100x). The scorers' own chatter goes to stderr."""
    require_scorers()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = _references(ground_truth)
    hyps = _hypotheses(results, refs)
    metrics: dict[str, float] = {}
    with contextlib.redirect_stdout(sys.stderr):
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({i: [{"caption": c} for c in refs[i]] for i in refs})
        res = tokenizer.tokenize({i: [{"caption": hyps[i]}] for i in refs})
        scorers = [
            (Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
            (Meteor(), ["METEOR"]),
            (Rouge(), ["ROUGE_L"]),
            (Cider(), ["CIDEr"]),
        ]
        spice_scorer = _spice() if spice else None
        if spice_scorer is not None:
            scorers.append((spice_scorer, ["SPICE"]))
        for scorer, names in scorers:
            try:
                score, _ = scorer.compute_score(gts, res)
            except subprocess.CalledProcessError as err:  # only SPICE runs a java command
                log.warning("%s not computed: its java process failed (%s)", names[0], err)
                continue
            scores = score if len(names) > 1 else [score]
            metrics.update({name: float(s) for name, s in zip(names, scores, strict=True)})
    return metrics


def evaluate(
    checkpoint,
    ann_file,
    image_root,
    out,
    ground_truth=None,
    nocaps: bool = False,
    batch_size: int = 32,
    num_workers: int = 0,
    device=None,
    progress: bool = False,
) -> dict:
    """Caption the split of ``ann_file`` with the caption model at ``checkpoint``, write the
    results to ``out`` and, unless ``nocaps``, score them against ``ground_truth`` (written
    beside ``out`` as ``<out>.gt.json`` from the annotation's captions when None).
    -> ``{"results_file", "images", "metrics"?, "ground_truth"?}``."""
    from blip_fast.checkpoint import load

    if nocaps and ground_truth is not None:
        raise ValueError("NoCaps results are scored by the NoCaps server: no ground truth to give")
    if not nocaps:
        require_scorers()  # before an hour of generation, not after
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load(checkpoint, task="caption").to(device).eval()
    transform = test_transform(model.cfg.vision.image_size)
    dataset = CaptionEvalDataset(ann_file, image_root, transform, need_captions=not nocaps)
    results = generate_captions(
        model,
        dataset,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        repetition_penalty=NOCAPS_REPETITION_PENALTY if nocaps else 1.0,
        progress=progress,
    )
    summary = {"results_file": str(write_results(results, out)), "images": len(results)}
    if nocaps:
        return summary
    if ground_truth is None:
        ground_truth = write_ground_truth(dataset, Path(out).with_suffix(".gt.json"))
    summary["ground_truth"] = str(ground_truth)
    summary["metrics"] = score_captions(results, ground_truth)
    return summary
