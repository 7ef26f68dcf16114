"""The BLIP training objectives beyond ITC: ITM with hard negatives and LM (docs/architecture.md,
"Training objectives").

ITC is ``BlipITMMixin.itc_loss`` (the fused op, reading the queues in place)."""

import torch
import torch.nn.functional as F

from blip_fast.models.blip_caption import BOS_TOKEN_ID, PAD_TOKEN_ID


def sample_rows(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One column per row drawn with probability proportional to ``weights`` (R, N) >= 0, by
    inverting the row's CDF at ``u`` (R,) uniform in [0, 1): the distribution of
    ``torch.multinomial(weights, 1)``, but the randomness is an input, so the draw is the same
    eager or compiled, and reproducible from the step's seed alone."""
    cdf = weights.cumsum(1)
    # a row of zeros has nothing to draw (official torch.multinomial raises too); checked on the
    # device, so the host never waits for it
    torch._assert_async(
        (cdf[:, -1] > 0).all(),
        "hard-negative sampling: a row has no candidate of positive weight (every sample of the "
        "batch is a positive of it, e.g. all captions of one image): nothing to draw",
    )
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    return pick.clamp_(max=weights.shape[1] - 1)  # u * total rounding up to the total


@torch.no_grad()
def negative_weights(sim_i2t, sim_t2i, positive_i2t, positive_t2i, smoothing: float = 0.0):
    """Hard-negative sampling weights: softmax of the similarities (+ ``smoothing``, 1e-4 in
    official pre-training) with every positive pair set to 0."""
    w_i2t = (F.softmax(sim_i2t.float(), dim=1) + smoothing).masked_fill_(positive_i2t, 0)
    w_t2i = (F.softmax(sim_t2i.float(), dim=1) + smoothing).masked_fill_(positive_t2i, 0)
    return w_i2t, w_t2i


def itm_loss(
    model,
    ids,
    mask,
    neg_text_ids,
    neg_text_mask,
    image_embeds=None,
    image_kv=None,
    enc_only=False,
):
    """CE over 3B pairs: B positives (text b, image b), B (text b, its hard negative image),
    B (hard negative text of image b, image b); ``itm_head`` on the [ENC] output, one pass.
    The rows' images: ``image_embeds`` (3B, Li, W) in that order, or ``image_kv`` (``ImageKV``
    whose index gives each row's image). ``enc_only``: see ``BlipITMMixin.itm_logits``."""
    B = ids.shape[0]
    logits = model.itm_logits(  # replaces the first token by [ENC]
        torch.cat([ids, ids, neg_text_ids]),
        torch.cat([mask, mask, neg_text_mask]),
        image_embeds,
        image_kv,
        enc_only,
    )
    # made on the device: copying a host tensor there would make the host wait
    labels = torch.zeros(3 * B, dtype=torch.long, device=logits.device)
    labels[:B] = 1
    return F.cross_entropy(logits.float(), labels)


def decoder_labels(ids, prompt_length: int = 0):
    """(decoder input ids with [DEC] first, labels): padding and the first ``prompt_length``
    positions ([DEC] + prompt tokens) are -100."""
    dec = ids.clone()
    dec[:, 0] = BOS_TOKEN_ID
    labels = dec.masked_fill(dec == PAD_TOKEN_ID, -100)
    labels[:, :prompt_length] = -100
    return dec, labels


def caption_loss(
    decoder, ids, mask, image_embeds, prompt_length: int, label_smoothing: float, image_kv=None
):
    dec, labels = decoder_labels(ids, prompt_length)
    return decoder.loss(dec, mask, image_embeds, labels, label_smoothing, image_kv)
