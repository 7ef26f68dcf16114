import numpy as np
import torch

from blip_fast.eval.metrics import retrieval_metrics


def _official_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """Transcription of official BLIP ``itm_eval`` (stable argsort so ties are deterministic)."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score, kind="stable")[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score, kind="stable")[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    return tr + [sum(tr) / 3] + ir + [sum(ir) / 3, (sum(tr) / 3 + sum(ir) / 3) / 2]


def test_vectorised_metrics_equal_official_loop_with_ties():
    rng = np.random.default_rng(0)
    n_img, per = 30, 5
    img2txt = {i: list(range(i * per, (i + 1) * per)) for i in range(n_img)}
    txt2img = {t: t // per for t in range(n_img * per)}
    # coarse scores (many ties) and the official -100 fill outside the top-k
    s_i2t = rng.integers(0, 6, (n_img, n_img * per)).astype(np.float32)
    s_i2t[rng.random(s_i2t.shape) < 0.5] = -100
    s_t2i = rng.integers(0, 4, (n_img * per, n_img)).astype(np.float32)
    s_t2i[rng.random(s_t2i.shape) < 0.5] = -100
    got = retrieval_metrics(torch.from_numpy(s_i2t), torch.from_numpy(s_t2i), txt2img, img2txt)
    want = _official_itm_eval(s_i2t, s_t2i, txt2img, img2txt)
    np.testing.assert_allclose(list(got.values()), want, rtol=0, atol=1e-9)
    assert list(got) == [
        "txt_r1",
        "txt_r5",
        "txt_r10",
        "txt_r_mean",
        "img_r1",
        "img_r5",
        "img_r10",
        "img_r_mean",
        "r_mean",
    ]


def test_perfect_scores_give_100():
    img2txt = {0: [0, 1], 1: [2, 3]}
    txt2img = {0: 0, 1: 0, 2: 1, 3: 1}
    s = torch.tensor([[1.0, 0.9, 0.1, 0.0], [0.0, 0.1, 0.9, 1.0]])
    m = retrieval_metrics(s, s.T, txt2img, img2txt)
    assert m["txt_r1"] == 100 and m["img_r1"] == 100 and m["r_mean"] == 100
