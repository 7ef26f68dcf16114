"""Image-text retrieval evaluation, the official procedure (DESIGN §3) as the reference.

Texts and images are encoded in batches; then for every image the top-k texts by cosine
similarity are re-scored with the ITM head (score = itm logit[1] + similarity), and the same
for every text over the top-k images; everything else stays -100.
"""
import time

import torch
from tqdm import tqdm

from blip_fast.eval.metrics import retrieval_metrics


@torch.no_grad()
def encode_texts(model, tokenizer, texts, batch_size=256, device="cpu", progress=False):
    """-> text_embed (n_txt, D) normalised, ids (n_txt, 35) [CLS] first, mask (n_txt, 35)."""
    embeds, ids, masks = [], [], []
    for i in tqdm(range(0, len(texts), batch_size), desc="texts", disable=not progress):
        tok = tokenizer(texts[i:i + batch_size], padding="max_length", truncation=True,
                        max_length=35).to(device)
        embeds.append(model.text_features(tok["input_ids"], tok["attention_mask"]))
        ids.append(tok["input_ids"])
        masks.append(tok["attention_mask"])
    return torch.cat(embeds), torch.cat(ids), torch.cat(masks)


@torch.no_grad()
def encode_images(model, loader, device="cpu", progress=False):
    """loader yields (pixels (B, 3, S, S), index) -> image_feats (n_img, N, W) all tokens,
    image_embed (n_img, D) normalised."""
    feats, embeds = [], []
    for pixels, _ in tqdm(loader, desc="images", disable=not progress):
        f = model.image_embeds(pixels.to(device))
        feats.append(f)
        embeds.append(model.image_features(image_embeds=f))
    return torch.cat(feats), torch.cat(embeds)


@torch.no_grad()
def reference_scores(model, image_feats, image_embed, text_embed, text_ids, text_mask,
                     k_test: int, progress=False):
    """The official re-ranking loop, one query and its k candidates at a time.
    Returns score_i2t (n_img, n_txt) and score_t2i (n_txt, n_img)."""
    sims = image_embed @ text_embed.t()
    n_img, n_txt = sims.shape
    score_i2t = sims.new_full((n_img, n_txt), -100.0)
    k = min(k_test, n_txt)
    for i in tqdm(range(n_img), desc="i2t rerank", disable=not progress):
        topk_sim, topk_idx = sims[i].topk(k)
        logits = model.itm_logits(text_ids[topk_idx], text_mask[topk_idx], image_feats[i:i + 1])
        score_i2t[i, topk_idx] = logits[:, 1] + topk_sim
    score_t2i = sims.new_full((n_txt, n_img), -100.0)
    k = min(k_test, n_img)
    for j in tqdm(range(n_txt), desc="t2i rerank", disable=not progress):
        topk_sim, topk_idx = sims[:, j].topk(k)
        logits = model.itm_logits(text_ids[j:j + 1].expand(k, -1),
                                  text_mask[j:j + 1].expand(k, -1), image_feats[topk_idx])
        score_t2i[j, topk_idx] = logits[:, 1] + topk_sim
    return score_i2t, score_t2i


def evaluate(model, dataset, tokenizer, k_test=128, batch_size=64, device="cpu", progress=False):
    """Official retrieval evaluation on a ``RetrievalEvalDataset``; returns the metric dict
    plus ``timing`` (seconds per phase) and ``pairs_scored``."""
    model.eval()
    timing = {}
    t0 = time.perf_counter()
    text_embed, text_ids, text_mask = encode_texts(model, tokenizer, dataset.text, 256, device,
                                                   progress)
    timing["texts"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    image_feats, image_embed = encode_images(model, loader, device, progress)
    timing["images"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    s_i2t, s_t2i = reference_scores(model, image_feats, image_embed, text_embed, text_ids,
                                    text_mask, k_test, progress)
    timing["rerank"] = time.perf_counter() - t0
    metrics = retrieval_metrics(s_i2t, s_t2i, dataset.txt2img, dataset.img2txt)
    n_img, n_txt = s_i2t.shape
    pairs = n_img * min(k_test, n_txt) + n_txt * min(k_test, n_img)
    return {**metrics, "timing": timing, "pairs_scored": pairs}
