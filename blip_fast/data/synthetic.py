"""A synthetic image-text data set in the official BLIP annotation formats, for tests, smoke
training and convergence checks without downloads.

Each image is a scene of 2-3 coloured shapes (6 shapes x 8 colours x 2 sizes) standing left to
right on a plain or two-tone background (4 colours); captions name every object's size, colour
and shape, their left-to-right order and, in most phrasings, the background. No scene occurs
twice in or across splits, so captions are discriminative: a small contrastive model can learn
retrieval from them. Everything derives from ``seed`` (same seed and Pillow build, same bytes).

NLVR²-style annotations pair two scenes of a split with a statement about the pair ("the left
image contains a red shape", "the left image contains a red circle", and on request "both
images contain a square", "the right image has more shapes than the left image"), half of them
true.

    python -m blip_fast.data.synthetic ROOT [--n-train 1000] [--nlvr-kinds colour,contains,more]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "DEFAULT_NLVR_KINDS",
    "NLVR_KINDS",
    "Scene",
    "make_synthetic",
    "nlvr_statements",
    "render",
    "scene_captions",
]

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 65, 225),
    "yellow": (240, 215, 25),
    "purple": (135, 45, 175),
    "orange": (250, 130, 10),
    "pink": (255, 110, 190),
    "cyan": (20, 205, 225),
}
# Disjoint from the object colours, so no object ever vanishes into its background.
BACKGROUNDS = {
    "white": (242, 242, 242),
    "black": (22, 22, 22),
    "gray": (128, 128, 128),
    "brown": (115, 70, 35),
}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
# Shape radius as a fraction of the image side: three large shapes (diameter 0.30) fit side by
# side in slots of width 1/3 with room for jitter.
RADIUS = {"small": 0.08, "large": 0.15}
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Scene:
    background: tuple[str, ...]  # one colour, or (top, bottom) for two-tone
    objects: tuple[tuple[str, str, str], ...]  # (size, colour, shape), left to right


def _random_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(2, 4))
    objects = []
    while len(objects) < n:
        obj = (
            str(rng.choice(list(SIZE_WORDS))),
            str(rng.choice(list(COLOURS))),
            str(rng.choice(SHAPES)),
        )
        if obj not in objects:  # two identical objects would make "the red circle" ambiguous
            objects.append(obj)
    bgs = list(BACKGROUNDS)
    if rng.random() < 0.5:
        background = (str(rng.choice(bgs)),)
    else:
        top, bottom = rng.choice(len(bgs), size=2, replace=False)
        background = (bgs[top], bgs[bottom])
    return Scene(background, tuple(objects))


def _jitter(rgb, rng: np.random.Generator, amount: int) -> tuple[int, ...]:
    """Colour with a per-channel offset, so a colour word names a range, not one RGB value."""
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.8 * r  # side 1.6 r: about the area of the circle of radius r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [
            (cx + r * math.cos(a), cy - r * math.sin(a))
            for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)
        ]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        return [
            (cx + rad * math.cos(a), cy - rad * math.sin(a))
            for k in range(10)
            for a, rad in [(math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else 0.45 * r)]
        ]
    if shape == "cross":
        w = 0.35 * r
        return [
            (cx - w, cy - r),
            (cx + w, cy - r),
            (cx + w, cy - w),
            (cx + r, cy - w),
            (cx + r, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + r),
            (cx - w, cy + r),
            (cx - w, cy + w),
            (cx - r, cy + w),
            (cx - r, cy - w),
            (cx - w, cy - w),
        ]
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` at ``size`` x ``size``; ``rng`` places the objects and jitters colours."""
    img = Image.new("RGB", (size, size), _jitter(BACKGROUNDS[scene.background[0]], rng, 10))
    draw = ImageDraw.Draw(img)
    if len(scene.background) == 2:
        draw.rectangle(
            (0, size // 2, size, size), fill=_jitter(BACKGROUNDS[scene.background[1]], rng, 10)
        )
    slot = size / len(scene.objects)
    for i, (obj_size, colour, shape) in enumerate(scene.objects):
        r = RADIUS[obj_size] * size
        # stay inside the slot: left-to-right order of the caption is the order of the centres
        slack = max(slot / 2 - r - 1, 0)
        cx = (i + 0.5) * slot + rng.uniform(-slack, slack)
        cy = rng.uniform(r + 1, size - r - 1)
        fill = _jitter(COLOURS[colour], rng, 20)
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(shape, cx, cy, r), fill=fill)
    return img


def scene_captions(scene: Scene, rng: np.random.Generator, n: int) -> list[str]:
    """``n`` captions of ``scene`` in different phrasings (distinct templates while they last)."""

    def phrase(obj):
        obj_size, colour, shape = obj
        return f"a {SIZE_WORDS[obj_size][int(rng.integers(2))]} {colour} {shape}"

    def listed(objs):
        return ", ".join(objs[:-1]) + " and " + objs[-1]

    o = [phrase(obj) for obj in scene.objects]
    bg = scene.background
    b = f"a {bg[0]} background" if len(bg) == 1 else f"a {bg[0]} and {bg[1]} background"
    where = (
        ["on the left", "in the middle", "on the right"]
        if len(o) == 3
        else ["on the left", "on the right"]
    )
    templates = [
        lambda: f"{listed(o)} from left to right on {b}",
        lambda: f"{b} with {listed(o)} from left to right",
        lambda: " ".join(f"{x} left of" for x in o[:-1]) + f" {o[-1]}",
        lambda: " ".join(f"{x} to the right of" for x in o[:0:-1]) + f" {o[0]} on {b}",
        lambda: "there is " + listed([f"{x} {w}" for x, w in zip(o, where)]),
        lambda: f"an image of {listed(o)} on {b}, ordered left to right",
        lambda: (
            f"{o[0]} on the left and {o[-1]} on the right of {b}"
            + (f" with {o[1]} between them" if len(o) == 3 else "")
        ),
    ]
    order = rng.permutation(len(templates))
    return [templates[order[k % len(templates)]]() for k in range(n)]


# From the easiest for a small model to the hardest: a colour, a colour and shape, counts, a
# shape in both images whatever its colour.
NLVR_KINDS = ("colour", "contains", "more", "both")
# The kinds the demo's model learns in minutes (dev / test 90% from its weights, README): with
# "more" and "both" in the mix its loss sat at ln 2 for thousands of steps and ended near chance.
DEFAULT_NLVR_KINDS = NLVR_KINDS[:2]


def nlvr_statements(left: Scene, right: Scene, kind: str, label: bool) -> list[str]:
    """Every statement of ``kind`` about the pair (``left``, ``right``) whose truth is
    ``label`` (possibly none).

    Objects are named by colour ("colour") or colour and shape ("contains"), without size. A
    false "colour" or "contains" statement names a colour or an object that neither image
    holds: which image holds it is left to the other kinds, as a small model pre-trained for
    minutes learns that too slowly to show."""
    sides = (("left", left, "right", right), ("right", right, "left", left))
    if kind == "colour":
        absent = sorted(set(COLOURS) - {c for scene in (left, right) for _, c, _ in scene.objects})
        out = []
        for side, own, _, _ in sides:
            have = sorted({colour for _, colour, _ in own.objects})
            out += [f"the {side} image contains a {c} shape" for c in (have if label else absent)]
        return out
    if kind == "contains":
        pair = {(c, s) for scene in (left, right) for _, c, s in scene.objects}
        absent = sorted({(c, s) for c in COLOURS for s in SHAPES} - pair)
        out = []
        for side, own, _, _ in sides:
            have = sorted({(colour, shape) for _, colour, shape in own.objects})
            out += [f"the {side} image contains a {c} {s}" for c, s in (have if label else absent)]
        return out
    if kind == "more":
        return [
            f"the {side} image has more shapes than the {other_side} image"
            for side, own, other_side, other in sides
            if (len(own.objects) > len(other.objects)) == label
        ]
    if kind == "both":
        shapes = [{shape for _, _, shape in scene.objects} for scene in (left, right)]
        named = shapes[0] & shapes[1] if label else shapes[0] ^ shapes[1]
        return [f"both images contain a {shape}" for shape in sorted(named)]
    raise ValueError(f"unknown NLVR statement kind {kind!r}; known: {NLVR_KINDS}")


def _nlvr_pairs(
    images: list[tuple[str, Scene]], n: int, rng: np.random.Generator, kinds: tuple[str, ...]
) -> list[dict]:
    """``n`` NLVR² entries (official format) over pairs of ``images``, their statements of
    ``kinds`` drawn uniformly: labels exactly balanced (the odd one out "True"), and within
    each kind of statement a label is as likely as the other, so the sentence alone tells
    nothing. A pair without a statement of the drawn kind and label is replaced by another
    pair (up to 100 times)."""
    if not kinds or not set(kinds) <= set(NLVR_KINDS):
        raise ValueError(f"NLVR statement kinds must be some of {NLVR_KINDS}, got {kinds}")
    if len(images) < 2:
        return []
    entries = []
    for label in rng.permutation(np.arange(n) % 2 == 0).tolist():
        kind = kinds[int(rng.integers(len(kinds)))]
        for _ in range(100):
            i, j = rng.choice(len(images), size=2, replace=False)
            statements = nlvr_statements(images[i][1], images[j][1], kind, label)
            if statements:
                break
        else:  # a split too small to hold such a pair: a "contains" statement fits any pair
            statements = nlvr_statements(images[i][1], images[j][1], "contains", label)
        entries.append(
            {
                "images": [images[i][0], images[j][0]],
                "sentence": statements[int(rng.integers(len(statements)))],
                "label": str(label),
            }
        )
    return entries


def _split(name: str, n: int, root: Path, size: int, seen: set, rng: np.random.Generator):
    """Render ``n`` new scenes as ``images/<name>/<i>.jpg``; yields (relpath, stem, scene)."""
    folder = root / "images" / name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene = _random_scene(rng)
        while scene in seen:
            scene = _random_scene(rng)
        seen.add(scene)
        stem = f"{i:06d}"
        render(scene, size, rng).save(folder / f"{stem}.jpg", "JPEG", quality=JPEG_QUALITY)
        yield f"images/{name}/{stem}.jpg", stem, scene


def _dump(obj, path: Path) -> Path:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    return path


def make_synthetic(
    root: str | os.PathLike,
    n_train_images: int = 1000,
    n_test_images: int = 100,
    n_val_images: int = 100,
    image_size: int = 128,
    captions_per_train_image: int = 5,
    pretrain_noise: float = 0.2,
    seed: int = 0,
    nlvr_pairs_per_image: int = 10,
    nlvr_kinds: tuple[str, ...] = DEFAULT_NLVR_KINDS,
    vqa_questions_per_image: int = 3,
) -> dict[str, Path]:
    """Write the data set under ``root`` and return its paths.

    Files (image paths are relative to ``root``, the ``image_root`` of every loader):
    - ``train.json``: ``[{"image", "caption": str, "image_id": str}]``, ``captions_per_train_image``
      entries per image (official retrieval train format);
    - ``val.json``, ``test.json``: ``[{"image", "caption": [5 str]}]`` (retrieval eval format);
    - ``pretrain.json``: ``[{"image", "caption": str}]`` over the train images, one caption each,
      where a ``pretrain_noise`` fraction of captions belong to another image (web-like noise
      for CapFilt to remove); ``pretrain_noisy.json`` lists the indices of those entries;
    - ``nlvr_train.json``, ``nlvr_dev.json``, ``nlvr_test.json``: ``[{"images": [2 paths],
      "sentence", "label": "True" | "False"}]`` (official NLVR² format), ``nlvr_pairs_per_image``
      entries per image of the train, val and test split (1,000 dev / test pairs by default:
      +-3 points at 50%), statements of ``nlvr_kinds`` (some of ``NLVR_KINDS``; default
      ``DEFAULT_NLVR_KINDS``), drawn from their own random stream: every other file is the same
      with or without them;
    - ``vqa_train.json``, ``vqa_test.json``, ``answer_list.json``: official VQA files,
      ``vqa_questions_per_image`` questions per train / test image (``synthetic_vqa``), from
      a random stream of their own as well.
    Test scenes come first, so they depend only on ``seed`` and ``n_test_images``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # a SeedSequence's n-th child is the same however many are spawned: streams 4 (NLVR²) and
    # 5 (VQA) were added without changing the others
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)]
    seen: set[Scene] = set()
    paths = {"root": root, "image_root": root}
    scenes = {}
    for name, n, rng in (("test", n_test_images, rngs[0]), ("val", n_val_images, rngs[1])):
        ann, scenes[name] = [], []
        for rel, _, scene in _split(name, n, root, image_size, seen, rng):
            ann.append({"image": rel, "caption": scene_captions(scene, rng, 5)})
            scenes[name].append((rel, scene))
        paths[name] = _dump(ann, root / f"{name}.json")
    train, images = [], []
    for rel, stem, scene in _split("train", n_train_images, root, image_size, seen, rngs[2]):
        train += [
            {"image": rel, "caption": c, "image_id": f"train_{stem}"}
            for c in scene_captions(scene, rngs[2], captions_per_train_image)
        ]
        images.append((rel, scene))
    paths["train"] = _dump(train, root / "train.json")

    rng = rngs[3]
    pretrain = [
        {"image": rel, "caption": scene_captions(scene, rng, 1)[0]} for rel, scene in images
    ]
    n_noisy = int(round(pretrain_noise * len(images))) if len(images) > 1 else 0
    noisy = sorted(int(i) for i in rng.choice(len(images), size=n_noisy, replace=False))
    for i in noisy:  # another image's caption: every scene is unique, so it never fits this one
        j = (i + 1 + int(rng.integers(len(images) - 1))) % len(images)
        pretrain[i]["caption"] = scene_captions(images[j][1], rng, 1)[0]
    paths["pretrain"] = _dump(pretrain, root / "pretrain.json")
    paths["pretrain_noisy"] = _dump(noisy, root / "pretrain_noisy.json")

    for split, name in (("train", "train"), ("val", "dev"), ("test", "test")):
        split_images = images if split == "train" else scenes[split]
        n_pairs = nlvr_pairs_per_image * len(split_images)
        pairs = _nlvr_pairs(split_images, n_pairs, rngs[4], tuple(nlvr_kinds))
        paths[f"nlvr_{name}"] = _dump(pairs, root / f"nlvr_{name}.json")
    from blip_fast.data.synthetic_vqa import write_synthetic_vqa  # it imports this module

    paths.update(
        write_synthetic_vqa(root, images, scenes["test"], rngs[5], vqa_questions_per_image)
    )
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--captions-per-train-image", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--nlvr-kinds",
        default=",".join(DEFAULT_NLVR_KINDS),
        help=f"comma-separated NLVR² statement kinds, some of {', '.join(NLVR_KINDS)} "
        f"(default: {','.join(DEFAULT_NLVR_KINDS)})",
    )
    a = p.parse_args(argv)
    paths = make_synthetic(
        a.root,
        a.n_train,
        a.n_test,
        a.n_val,
        a.image_size,
        a.captions_per_train_image,
        seed=a.seed,
        nlvr_kinds=tuple(a.nlvr_kinds.split(",")),
    )
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))


if __name__ == "__main__":
    main()
