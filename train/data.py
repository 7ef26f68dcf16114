"""Training data: a resumable distributed sampler, per-sample seeded augmentation and the
collate that tokenises captions as each official task does.

Everything random about a sample (crop, flip, RandAugment, which caption of a list) is drawn
from a generator seeded by (seed, epoch, index), so a batch depends neither on the number of
loader workers nor on where a run was interrupted: ``--resume`` replays the same samples.
"""

import math

import torch
from torch.utils.data import Dataset, Sampler

from blip_fast.data.corrupt_report import record_corrupt
from blip_fast.data.datasets import CorruptImage
from blip_fast.data.nlvr import collate_nlvr
from blip_fast.data.vqa import collate_vqa
from blip_fast.eval.nlvr import tokenize as tokenize_nlvr
from blip_fast.models.blip_vqa import tokenize_answers, tokenize_questions

# (padding, max_length) per task, as the official models tokenise
TOKENISATION = {
    "pretrain": ("max_length", 30),
    "retrieval": ("max_length", 35),
    "caption": ("longest", 40),
}


class TrainSampler(Sampler):
    """``DistributedSampler(shuffle=True)`` order (permutation seeded with seed + epoch, padded
    to a multiple of the world size, rank r takes every world-th index from r) that can start
    an epoch at a given batch. Yields (epoch, index) so the dataset can seed the sample."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if n < world_size * batch_size:
            raise ValueError(
                f"{n} samples cannot fill one batch of {batch_size} on each of {world_size} ranks"
            )
        self.n, self.batch_size, self.rank, self.world_size, self.seed = (
            n,
            batch_size,
            rank,
            world_size,
            seed,
        )
        self.per_rank = math.ceil(n / world_size)
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:  # the loader drops the last partial batch
        return self.per_rank // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0):
        self.epoch, self.start_batch = epoch, start_batch

    def indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order += order[: self.per_rank * self.world_size - self.n]
        return order[self.rank :: self.world_size]

    def __iter__(self):
        start = self.start_batch * self.batch_size
        return iter([(self.epoch, i) for i in self.indices(self.epoch)[start:]])

    def __len__(self) -> int:
        return self.per_rank - self.start_batch * self.batch_size


class SeededSamples(Dataset):
    """``dataset[index]`` with torch's RNG seeded by (seed, epoch, index) while it runs.

    With ``corrupt_report`` (pre-training on web data, the dataset built with
    ``skip_corrupt=True``), a missing or undecodable image is listed in that file and the next
    index takes its place: batches keep their size, which the ITC queue needs (its size must be
    a multiple of the global batch)."""

    def __init__(self, dataset, seed: int, corrupt_report=None):
        self.dataset, self.seed, self.corrupt_report = dataset, seed, corrupt_report

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        for offset in range(len(self.dataset)):
            i = (index + offset) % len(self.dataset)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + epoch) * 1_000_000_007 + i)
                item = self.dataset[i]
            if not isinstance(item, CorruptImage):
                return item
            if self.corrupt_report is None:
                raise RuntimeError(f"corrupt image at index {i} and no corrupt_report to list it")
            record_corrupt(self.corrupt_report, [item])
        raise RuntimeError("every image of the training set is missing or corrupt")


class Collate:
    """Stack images and tokenise captions for ``task``; retrieval samples carry an image idx,
    caption samples get the prompt prepended (official coco_karpathy_train).

    ``pad_to_longest`` (default): pad to the batch's longest caption (still truncated at the
    official length) instead of to that length: every text pass runs on the shorter sequence
    with the same losses, as padding takes no part in them (masked out of every attention,
    label -100); in fp32 the masked softmax weights are exactly 0, leaving only summation-order
    rounding. Done here, in the loader: finding the longest caption of a batch already on the
    device would make the host wait for the device."""

    def __init__(self, tokenizer, task: str, prompt: str = "", pad_to_longest: bool = True):
        self.tokenizer, self.task, self.prompt = tokenizer, task, prompt
        self.padding, self.max_length = TOKENISATION[task]
        if pad_to_longest:
            self.padding = "longest"

    def __call__(self, samples) -> dict:
        images = torch.stack([s[0] for s in samples])
        captions = [self.prompt + s[1] for s in samples]
        tok = self.tokenizer(
            captions, padding=self.padding, truncation=True, max_length=self.max_length
        )
        batch = {"image": images, "ids": tok["input_ids"], "mask": tok["attention_mask"]}
        if self.task == "retrieval":
            batch["idx"] = torch.tensor([s[2] for s in samples], dtype=torch.long)
        return batch


class NLVRCollate:
    """NLVR² samples (image0, image1, sentence, label) -> a batch: ``image`` (2B, 3, S, S), the
    B first images then the B second ones; ``label`` (B,); the sentences tokenised as
    evaluation does (padded to the longest, never truncated: ``pre_caption`` keeps 40 words)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, samples) -> dict:
        images, sentences, labels = collate_nlvr(samples)
        ids, mask = tokenize_nlvr(self.tokenizer, sentences, "cpu")
        return {"image": images, "ids": ids, "mask": mask, "label": labels}


class VQACollate:
    """VQA samples (image, question, answers, weights) -> the official batch (``collate_vqa``)
    tokenised as ``BlipVQA`` does: ``ids`` / ``mask`` (B, Lq) the questions, ``answer_ids`` /
    ``answer_mask`` (sum(n), La) every question's answers in turn, ``weights`` (sum(n),),
    ``n`` (B,) int64 each question's number of answers."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, samples) -> dict:
        images, questions, answers, weights, n = collate_vqa(samples)
        ids, mask = tokenize_questions(self.tokenizer, questions, "cpu")
        answer_ids, answer_mask = tokenize_answers(self.tokenizer, answers, "cpu")
        return {
            "image": images,
            "ids": ids,
            "mask": mask,
            "answer_ids": answer_ids,
            "answer_mask": answer_mask,
            "weights": weights,
            "n": torch.tensor(n, dtype=torch.long),
        }
