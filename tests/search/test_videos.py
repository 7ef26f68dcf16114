"""Videos in an image index: feature = official BLIP's video feature (mean of 8 frames'
projected [CLS], normalised), ITM over the concatenated frame tokens; text search over images
and videos together equals brute force."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from blip_fast import tokenizer
from blip_fast.data import load_image, test_transform
from blip_fast.search import Index

pytest.importorskip("av")

from blip_fast.data.synthetic_video import make_synthetic_videos  # noqa: E402
from blip_fast.data.video import read_frames  # noqa: E402

QUERY = "a small blue triangle on the left of a red circle"


@pytest.fixture
def media(synthetic_images, tmp_path):
    """Three videos (10 frames, 64 px) among three images, and a file that is no video."""
    folder = tmp_path / "media"
    folder.mkdir()
    clips = make_synthetic_videos(tmp_path / "clips", n_videos=3, num_frames=10, size=64)
    for i in range(3):
        shutil.copy(clips["video_root"] / f"video{i}.mp4", folder / f"b{i}.mp4")
        shutil.copy(synthetic_images[i], folder / f"a{i}.jpg")
    (folder / "c.webm").write_bytes(b"\x1a\x45\xdf\xa3 not really a video")
    return folder


def _tokens(model, path):
    """(ITC feature (D,), ITM tokens (L, W)) of an image or a video, by hand."""
    is_video = path.endswith(".mp4")
    frames = read_frames(path, 8) if is_video else [load_image(path)]
    with torch.no_grad():
        tokens = model.image_embeds(torch.stack([test_transform(64)(f) for f in frames]))
        feature = F.normalize(model.vision_proj(tokens[:, 0]).mean(0), dim=-1)
    return feature, tokens.flatten(0, 1)


def test_videos_are_indexed_and_reranked_with_images_as_brute_force(model, media, tmp_path):
    assert len(Index.build(model, media, tmp_path / "images", progress=False)) == 3
    index = Index.build(
        model, media, tmp_path / "index", videos=True, batch_size=4, chunk_size=4, progress=False
    )
    names = ["a0.jpg", "a1.jpg", "a2.jpg", "b0.mp4", "b1.mp4", "b2.mp4"]
    assert index.paths == [str(media / n) for n in names]
    assert [p for p, _ in index.skipped] == [str(media / "c.webm")]
    by_hand = [_tokens(model, p) for p in index.paths]
    want = torch.stack([f for f, _ in by_hand]).half()
    torch.testing.assert_close(index.features(), want, rtol=0, atol=1e-3)

    tok = tokenizer()(QUERY)
    with torch.no_grad():
        query = model.text_features(tok["input_ids"], tok["attention_mask"])
        itc = (query @ index.features().float().T)[0]
        itm = torch.cat(
            [
                model.itm_logits(tok["input_ids"], tok["attention_mask"], tokens[None])[:, 1]
                for _, tokens in by_hand
            ]
        )
    scores = itm + itc
    order = scores.argsort(descending=True)
    hits = index.search(QUERY, k=6, candidates=6)
    assert [h.path for h in hits] == [index.paths[i] for i in order]
    torch.testing.assert_close(
        torch.tensor([h.score for h in hits]), scores[order], atol=1e-5, rtol=0
    )

    # a video as the query: its first frame, ranked by ITC
    first = read_frames(media / "b1.mp4", 1)[0]
    with torch.no_grad():
        sims = model.image_features(test_transform(64)(first)[None]) @ index.features().float().T
    hits = index.search(media / "b1.mp4", k=3)
    assert [h.path for h in hits] == [index.paths[i] for i in sims[0].topk(3).indices]


def test_videos_with_stored_tokens_are_refused(model, media, tmp_path):
    with pytest.raises(ValueError, match="store_tokens keeps image tokens: not with videos"):
        Index.build(model, media, tmp_path / "index", store_tokens="fp16", videos=True)
