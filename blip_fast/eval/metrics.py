"""Retrieval metrics of the official ``itm_eval``, vectorised (no Python loop over rows).

Ranks: i2t = best position of any ground-truth text in the descending order of the image's row;
t2i = position of the text's image. Ties are ordered as a stable ascending argsort reversed
(the later index first), so the result is deterministic and identical for every score source.
"""

import numpy as np
import torch

KEYS = (
    "txt_r1",
    "txt_r5",
    "txt_r10",
    "txt_r_mean",
    "img_r1",
    "img_r5",
    "img_r10",
    "img_r_mean",
    "r_mean",
)


def _positions(scores: torch.Tensor, gt_score: torch.Tensor, gt_index: torch.Tensor):
    """Position of column gt_index in each row's descending order. scores (N, M); gt (N, G)."""
    cols = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores[:, None, :] > gt_score[..., None]) | (
        (scores[:, None, :] == gt_score[..., None]) & (cols > gt_index[..., None])
    )
    return ahead.sum(-1)  # (N, G)


def ranks_i2t(scores_i2t: torch.Tensor, img2txt) -> np.ndarray:
    """scores_i2t (n_img, n_txt) -> best rank of each image's ground-truth texts.
    img2txt: image id -> list of text ids (dict or list)."""
    img2txt = [list(img2txt[i]) for i in range(scores_i2t.shape[0])]
    g = max(len(t) for t in img2txt)
    idx = torch.tensor([t + [t[0]] * (g - len(t)) for t in img2txt], device=scores_i2t.device)
    gt = torch.gather(scores_i2t, 1, idx)
    out = []
    for start in range(0, scores_i2t.shape[0], 256):  # bounded (rows, G, n_txt) temporaries
        sl = slice(start, start + 256)
        out.append(_positions(scores_i2t[sl], gt[sl], idx[sl]).min(1).values)
    return torch.cat(out).cpu().numpy()


def ranks_t2i(scores_t2i: torch.Tensor, txt2img) -> np.ndarray:
    """scores_t2i (n_txt, n_img) -> rank of each text's image. txt2img: text id -> image id."""
    idx = torch.tensor([txt2img[t] for t in range(scores_t2i.shape[0])], device=scores_t2i.device)[
        :, None
    ]
    gt = torch.gather(scores_t2i, 1, idx)
    return _positions(scores_t2i, gt, idx)[:, 0].cpu().numpy()


def retrieval_metrics(scores_i2t, scores_t2i, txt2img, img2txt) -> dict:
    """The official metric dict (percentages): txt_r1 ... r_mean."""
    r_i2t = ranks_i2t(torch.as_tensor(scores_i2t).float(), img2txt)
    r_t2i = ranks_t2i(torch.as_tensor(scores_t2i).float(), txt2img)
    tr = [100.0 * float(np.mean(r_i2t < k)) for k in (1, 5, 10)]
    ir = [100.0 * float(np.mean(r_t2i < k)) for k in (1, 5, 10)]
    tr_mean, ir_mean = sum(tr) / 3, sum(ir) / 3
    return dict(zip(KEYS, [*tr, tr_mean, *ir, ir_mean, (tr_mean + ir_mean) / 2]))
