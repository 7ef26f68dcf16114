"""NLVR² evaluation: accuracy of ``BlipNLVR`` on a split (official ``train_nlvr.evaluate``;
paper dev 82.15 / test-P 82.24 for BLIP base).

Sentences are tokenised as official (padded to the longest of the batch, no truncation:
``pre_caption`` already keeps 40 words); the prediction is the argmax of the two logits.
"""

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from blip_fast.data.nlvr import collate_nlvr

__all__ = ["accuracy", "evaluate", "predict", "tokenize"]


def tokenize(tokenizer, sentences: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, mask (B, L): [CLS] first, padded to the longest sentence, never truncated."""
    tok = tokenizer(sentences, padding="longest", truncation=False).to(device)
    return tok["input_ids"], tok["attention_mask"]


@torch.no_grad()
def predict(model, loader, tokenizer, device="cpu", progress=False):
    """(predictions (N,), labels (N,)) int64 over ``loader`` (batches of ``collate_nlvr``)."""
    preds, labels = [], []
    for images, sentences, batch_labels in tqdm(loader, desc="nlvr", disable=not progress):
        ids, mask = tokenize(tokenizer, sentences, device)
        preds.append(model(images.to(device), ids, mask).argmax(-1).cpu())
        labels.append(batch_labels)
    return torch.cat(preds), torch.cat(labels)


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Percentage of ``preds`` equal to ``labels`` (both (N,), N >= 1)."""
    if preds.shape != labels.shape or preds.numel() == 0:
        raise ValueError(
            f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} must be the same "
            f"non-empty (N,)"
        )
    return 100.0 * (preds == labels).double().mean().item()


def evaluate(
    model,
    dataset,
    tokenizer=None,
    batch_size: int = 64,
    num_workers: int = 0,
    device="cpu",
    progress=False,
) -> dict:
    """``{"acc": accuracy in %, "n": number of examples}`` of ``model`` (eval mode, no
    gradient) on ``dataset`` (an ``NLVRDataset``; its ``train=False`` keeps the image order
    and sentences as annotated). ``tokenizer`` defaults to ``blip_fast.tokenization``'s.
    Official batch size 64."""
    if tokenizer is None:
        from blip_fast.tokenization import tokenizer as make_tokenizer

        tokenizer = make_tokenizer()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_nlvr,
    )
    was_training = model.training
    model.eval()
    try:
        preds, labels = predict(model, loader, tokenizer, device, progress)
    finally:
        model.train(was_training)
    return {"acc": accuracy(preds, labels), "n": labels.numel()}
