"""Training forward passes, one ``nn.Module`` per task so DDP and torch.compile wrap them whole.

A batch is a dict: ``image`` (B, 3, S, S), ``ids`` / ``mask`` (B, L) tokenised with [CLS] first,
``idx`` (B,) image ids (retrieval fine-tuning), ``alpha`` (float, ITC distillation weight) and
``neg_u`` (2, B) uniform numbers that draw the hard negatives, ``itc_only`` (bool, optional:
an ITC warm-up step, ITM and LM skipped). NLVR² batches hold two images per text: ``image``
(2B, 3, S, S), the B first images then the B second ones, and ``label`` (B,) int64, 1 = "True".
VQA batches hold the questions as ``ids`` / ``mask`` ([ENC] first) and their answers as
``answer_ids`` / ``answer_mask`` (sum(n), La), ``weights`` (sum(n),) and ``n`` (B,).
``forward(batch)`` returns the losses (``loss`` = their sum) and, in the contrastive tasks,
``queue``: this rank's momentum features (and idx) to enqueue once the backward pass no longer
reads the queues.

The contrastive task runs in three phases so a test can stand in for the collectives and
simulate several ranks in one process: ``encode`` (this rank's features), ``exchange`` (the
features every rank needs from the others), ``objectives``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from blip_fast.train import objectives
from blip_fast.train.distributed import all_gather_with_grad, concat_all_gather


class ContrastiveTask(nn.Module):
    """ITC + ITM (+ LM): pre-training (``BlipPretrain``, in-batch negatives, LM on) or
    retrieval fine-tuning (``BlipRetrieval``, idx positives, negatives from every rank when
    ``negative_all_rank``).

    ``image_token_drop`` (FLIP-style, default 0 = the official objective): in training, the
    online ViT sees a random ``1 - image_token_drop`` of the patch tokens (+ [CLS]), and ITC,
    ITM and LM read those tokens. The momentum ViT still sees every token: its features are the
    distillation targets and the queue entries, which stay the full-image features retrieval
    ranks with (FLIP itself has no momentum encoder).

    ``share_image_kv`` (default): the ITM rows and the LM pass (whose cross-attention is the
    text encoder's, tied) read cross-attention keys / values projected once per distinct image
    (``BertModel.image_kv``) instead of once per row: B images instead of 4B rows in
    pre-training, 2B instead of 3B with negatives from every rank. Same math; off, every pass
    projects its own rows, as the official code does.

    ``itm_enc_only`` (default): the ITM pass's last text layer computes the [ENC] token alone,
    the only one the ITM head reads (``BlipITMMixin.itm_logits``). Same losses and gradients;
    with dropout, other masks are drawn (fewer of them) from the same distribution."""

    def __init__(
        self,
        model,
        negative_all_rank: bool = False,
        lm: bool = False,
        image_token_drop: float = 0.0,
        share_image_kv: bool = True,
        itm_enc_only: bool = True,
    ):
        super().__init__()
        if not 0.0 <= image_token_drop < 1.0:
            raise ValueError(f"image_token_drop must be in [0, 1), got {image_token_drop}")
        self.model = model
        self.negative_all_rank = negative_all_rank
        self.lm = lm
        self.image_token_drop = image_token_drop
        self.share_image_kv = share_image_kv
        self.itm_enc_only = itm_enc_only

    def encode(self, batch) -> dict:
        m = self.model
        token_drop = self.image_token_drop if self.training else 0.0
        image_embeds = m.image_embeds(batch["image"], token_drop)
        out = {
            "image_embeds": image_embeds,
            "ids": batch["ids"],
            "mask": batch["mask"],
            "idx": batch.get("idx"),
            "image_feat": m.image_features(image_embeds=image_embeds),
            "text_feat": m.text_features(batch["ids"], batch["mask"]),
        }
        with torch.no_grad():
            out["image_feat_m"] = F.normalize(
                m.vision_proj_m(m.visual_encoder_m(batch["image"])[:, 0]), dim=-1
            )
            out["text_feat_m"] = F.normalize(
                m.text_proj_m(m.text_encoder_m(batch["ids"], batch["mask"], mode="text")[:, 0]),
                dim=-1,
            )
        return out

    def exchange(self, local: dict) -> dict:
        """Negative candidates: this rank's batch, or every rank's (rank order) in fine-tuning
        with ``negative_all_rank`` (image embeds gathered with their gradient)."""
        if not self.negative_all_rank:
            return local
        world = {
            k: concat_all_gather(local[k].detach())
            for k in ("image_feat", "text_feat", "ids", "mask", "idx")
        }
        world["image_embeds"] = all_gather_with_grad(local["image_embeds"])
        return world

    def objectives(self, local: dict, world: dict, batch) -> dict:
        m, idx = self.model, local["idx"]
        itc = m.itc_loss(
            local["image_feat"],
            local["text_feat"],
            local["image_feat_m"],
            local["text_feat_m"],
            batch["alpha"],
            idx,
        )
        queue = (local["image_feat_m"], local["text_feat_m"], idx)
        if batch.get("itc_only"):
            return {"itc": itc, "loss": itc, "queue": queue}
        if world["ids"].shape[0] < 2:
            raise ValueError(
                "ITM draws each sample's hard negative from the other samples of its batch"
                + (" (on every rank)" if self.negative_all_rank else "")
                + f": a batch of {world['ids'].shape[0]} has none; train with batch_size >= 2"
            )
        with torch.no_grad():
            temp = m.temp.detach()
            if idx is None:  # pre-training: the ITC student logits of the batch columns
                sim_i2t = local["image_feat"] @ local["text_feat_m"].T / temp
                sim_t2i = local["text_feat"] @ local["image_feat_m"].T / temp
                pos = torch.eye(sim_i2t.shape[0], dtype=torch.bool, device=sim_i2t.device)
                w_i2t, w_t2i = objectives.negative_weights(sim_i2t, sim_t2i, pos, pos, 1e-4)
            else:
                sim_i2t = local["image_feat"] @ world["text_feat"].T / temp
                sim_t2i = local["text_feat"] @ world["image_feat"].T / temp
                pos = idx[:, None] == world["idx"][None, :]
                w_i2t, w_t2i = objectives.negative_weights(sim_i2t, sim_t2i, pos, pos)
            neg_image = objectives.sample_rows(w_t2i, batch["neg_u"][0])
            neg_text = objectives.sample_rows(w_i2t, batch["neg_u"][1])
        images = self._itm_images(local, world, neg_image)
        itm = objectives.itm_loss(
            m,
            local["ids"],
            local["mask"],
            world["ids"][neg_text],
            world["mask"][neg_text],
            **images,
            enc_only=self.itm_enc_only,
        )
        losses = {"itc": itc, "itm": itm}
        if self.lm:
            # the LM pass reads the ITM's projections when its cross-attention is the encoder's
            shared = "image_kv" in images and _decoder_cross_attention_is_tied(m)
            losses["lm"] = objectives.caption_loss(
                m.text_decoder,
                local["ids"],
                local["mask"],
                None if shared else local["image_embeds"],
                0,
                m.cfg.label_smoothing,
                images["image_kv"].at(self._own_rows(local)) if shared else None,
            )
        losses["loss"] = sum(losses.values())
        losses["queue"] = queue
        return losses

    def _own_rows(self, local):
        """Where this rank's images are among the sources of ``_itm_images``' projections:
        rows 0..B-1 (None: exactly the sources, read without an index)."""
        if not self.negative_all_rank:
            return None
        B = local["image_embeds"].shape[0]
        return torch.arange(B, device=local["image_embeds"].device)

    def _itm_images(self, local, world, neg_image) -> dict:
        """The images of the 3B ITM rows (positive, hard-negative image, hard-negative text) as
        ``objectives.itm_loss`` takes them."""
        embeds = local["image_embeds"]
        if not self.share_image_kv:
            return {"image_embeds": torch.cat([embeds, world["image_embeds"][neg_image], embeds])}
        own = torch.arange(embeds.shape[0], device=embeds.device)
        if self.negative_all_rank:  # project the B drawn negatives, not every rank's images
            sources = torch.cat([embeds, world["image_embeds"][neg_image]])
            neg_image = own + embeds.shape[0]
        else:  # the negatives are this batch's images
            sources = embeds
        kv = self.model.text_encoder.image_kv(sources)
        return {"image_kv": kv.at(torch.cat([own, neg_image, own]))}

    def forward(self, batch) -> dict:
        local = self.encode(batch)
        return self.objectives(local, self.exchange(local), batch)


def _decoder_cross_attention_is_tied(model) -> bool:
    encoder, decoder = model.text_encoder.encoder.layer, model.text_decoder.bert.encoder.layer
    return all(e.crossattention is d.crossattention for e, d in zip(encoder, decoder, strict=True))


class CaptionTask(nn.Module):
    """Caption fine-tuning (``BlipCaption``): LM with label smoothing, prompt masked."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        # [DEC] + the prompt's tokens (official: len(tokenizer(prompt).input_ids) - 1)
        self.prompt_length = model.prompt_ids(1, "cpu").shape[1]

    def forward(self, batch) -> dict:
        m = self.model
        lm = objectives.caption_loss(
            m.text_decoder,
            batch["ids"],
            batch["mask"],
            m.visual_encoder(batch["image"]),
            self.prompt_length,
            m.cfg.label_smoothing,
        )
        return {"lm": lm, "loss": lm}


class NLVRTask(nn.Module):
    """NLVR² fine-tuning (``BlipNLVR``): cross-entropy of ``cls_head``'s two logits, as
    official ``train_nlvr``; ``acc`` (the batch's accuracy, not a loss) is logged beside it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch) -> dict:
        logits = self.model(batch["image"], batch["ids"], batch["mask"])
        ce = F.cross_entropy(logits.float(), batch["label"])
        with torch.no_grad():
            acc = (logits.argmax(-1) == batch["label"]).float().mean()
        return {"nlvr": ce, "loss": ce, "acc": acc}


class VQATask(nn.Module):
    """VQA fine-tuning (``BlipVQA``): the official weighted answer loss, sum over every
    (question, answer) row of weight x the answer's summed label-smoothed token cross-entropy,
    divided by the batch size (official ``BLIP_VQA.forward`` with ``train=True``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch) -> dict:
        vqa = self.model.token_loss(
            batch["image"],
            batch["ids"],
            batch["mask"],
            batch["answer_ids"],
            batch["answer_mask"],
            batch["n"],
            batch["weights"],
        )
        return {"vqa": vqa, "loss": vqa}
