"""ITM hard negatives and LM labels, and the contrastive task's losses against the
official formulas written out in eager PyTorch."""

import torch
import torch.nn.functional as F

from blip_fast import create_model
from blip_fast.train import objectives
from blip_fast.train.task import ContrastiveTask


def test_sample_rows_follows_the_weights_and_never_draws_zero_weight():
    w = torch.tensor([[0.0, 1.0, 3.0, 0.0], [2.0, 0.0, 0.0, 2.0]])
    u = torch.rand(200_000)
    picks = torch.stack(
        [objectives.sample_rows(w[i : i + 1].expand(len(u), -1), u) for i in range(2)]
    )
    freq = torch.stack([torch.bincount(p, minlength=4) for p in picks]).float() / len(u)
    torch.testing.assert_close(freq, w / w.sum(1, keepdim=True), atol=5e-3, rtol=0)
    assert freq[0, 0] == freq[0, 3] == freq[1, 1] == freq[1, 2] == 0
    edge = objectives.sample_rows(w, torch.tensor([0.0, 1.0 - 1e-7]))  # both ends of [0, 1)
    assert edge.tolist() == [1, 3]


def test_negative_weights_mask_positives_and_smooth():
    sim = torch.randn(3, 5)
    pos = torch.zeros(3, 5, dtype=torch.bool)
    pos[0, 1] = pos[2, 4] = True
    w_i2t, _ = objectives.negative_weights(sim, sim, pos, pos, smoothing=1e-4)
    expected = (F.softmax(sim, 1) + 1e-4).masked_fill(pos, 0)
    torch.testing.assert_close(w_i2t, expected)


def test_decoder_labels_mask_padding_and_prompt():
    ids = torch.tensor([[101, 1037, 3861, 1997, 2417, 102, 0], [101, 1037, 3861, 1997, 102, 0, 0]])
    dec, labels = objectives.decoder_labels(ids, prompt_length=4)
    assert dec[:, 0].tolist() == [30522, 30522] and torch.equal(dec[:, 1:], ids[:, 1:])
    assert labels.tolist() == [
        [-100, -100, -100, -100, 2417, 102, -100],
        [-100, -100, -100, -100, 102, -100, -100],
    ]


def _official_losses(model, batch, neg_image, neg_text):
    """Official BLIP_Retrieval.forward (negative_all_rank False), written out: ITC over
    concatenated [batch ; queue] columns with idx targets, ITM on given negatives."""
    m, temp, alpha, idx = model, model.temp, batch["alpha"], batch["idx"].view(-1, 1)
    image_embeds = m.visual_encoder(batch["image"])
    image_feat = F.normalize(m.vision_proj(image_embeds[:, 0]), dim=-1)
    text = m.text_encoder(batch["ids"], batch["mask"], mode="text")
    text_feat = F.normalize(m.text_proj(text[:, 0]), dim=-1)
    idx_all = torch.cat([idx.t(), m.idx_queue], dim=1)
    pos = torch.eq(idx, idx_all).float()
    targets = pos / pos.sum(1, keepdim=True)
    with torch.no_grad():
        image_feat_m = F.normalize(
            m.vision_proj_m(m.visual_encoder_m(batch["image"])[:, 0]), dim=-1
        )
        text_feat_m = F.normalize(
            m.text_proj_m(m.text_encoder_m(batch["ids"], batch["mask"], mode="text")[:, 0]), dim=-1
        )
        image_all = torch.cat([image_feat_m.t(), m.image_queue], dim=1)
        text_all = torch.cat([text_feat_m.t(), m.text_queue], dim=1)
        t_i2t = alpha * F.softmax(image_feat_m @ text_all / temp, 1) + (1 - alpha) * targets
        t_t2i = alpha * F.softmax(text_feat_m @ image_all / temp, 1) + (1 - alpha) * targets
    loss_i2t = -(F.log_softmax(image_feat @ text_all / temp, 1) * t_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(text_feat @ image_all / temp, 1) * t_t2i).sum(1).mean()
    ids_enc = batch["ids"].clone()
    ids_enc[:, 0] = 30523
    out_pos = m.text_encoder(ids_enc, batch["mask"], image_embeds, mode="multimodal")
    out_neg = m.text_encoder(
        torch.cat([ids_enc, ids_enc[neg_text]]),
        torch.cat([batch["mask"], batch["mask"][neg_text]]),
        torch.cat([image_embeds[neg_image], image_embeds]),
        mode="multimodal",
    )
    logits = m.itm_head(torch.cat([out_pos[:, 0], out_neg[:, 0]]))
    B = idx.shape[0]
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long()
    return (loss_i2t + loss_t2i) / 2, F.cross_entropy(logits, labels)


def test_retrieval_losses_match_the_official_formulas():
    model = create_model("retrieval", "blip_tiny", backend="reference").eval()  # no dropout
    model.copy_params()
    with torch.no_grad():  # momentum weights differ from online ones, queues hold idx
        for p in model.visual_encoder_m.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.idx_queue.copy_(torch.randint(0, 6, model.idx_queue.shape))
    B, L = 6, 10
    ids = torch.randint(1000, 5000, (B, L))
    ids[:, 0] = 101
    mask = (torch.arange(L)[None] < torch.tensor([10, 4, 7, 10, 5, 8])[:, None]).long()
    batch = {
        "image": torch.randn(B, 3, 64, 64),
        "ids": ids * mask,
        "mask": mask,
        "idx": torch.tensor([0, 1, 0, 2, 3, 1]),
        "alpha": 0.4,
        "neg_u": torch.rand(2, B),
    }
    out = ContrastiveTask(model)(batch)
    # the negatives the task drew, from the official weights and the same uniforms
    with torch.no_grad():
        image_feat = model.image_features(batch["image"])
        text_feat = model.text_features(batch["ids"], batch["mask"])
        pos = batch["idx"][:, None] == batch["idx"][None, :]
        w_i2t = F.softmax(image_feat @ text_feat.T / model.temp, 1).masked_fill(pos, 0)
        w_t2i = F.softmax(text_feat @ image_feat.T / model.temp, 1).masked_fill(pos, 0)
    neg_image = objectives.sample_rows(w_t2i, batch["neg_u"][0])
    neg_text = objectives.sample_rows(w_i2t, batch["neg_u"][1])
    assert not pos[torch.arange(B), neg_image].any() and not pos[torch.arange(B), neg_text].any()
    itc, itm = _official_losses(model, batch, neg_image, neg_text)
    torch.testing.assert_close(out["itc"], itc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["itm"], itm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], itc + itm, rtol=1e-5, atol=1e-6)
