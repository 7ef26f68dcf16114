"""Training data plumbing: DistributedSampler order with resume, per-sample seeding that does
not depend on loader workers, tokenisation per task."""

import torch
from torch.utils.data import DataLoader, DistributedSampler

from blip_fast import tokenizer
from blip_fast.data import RetrievalTrainDataset, train_transform
from blip_fast.train.data import Collate, SeededSamples, TrainSampler


def test_sampler_matches_distributed_sampler_and_resumes_mid_epoch():
    n, batch, world = 23, 3, 2
    for rank in range(world):
        ours = TrainSampler(n, batch, rank, world, seed=4)
        theirs = DistributedSampler(range(n), world, rank, shuffle=True, seed=4)
        for epoch in (0, 3):
            theirs.set_epoch(epoch)
            ours.set_epoch(epoch)
            assert [i for _, i in ours] == list(theirs)
            ours.set_epoch(epoch, start_batch=2)
            assert list(ours) == [(epoch, i) for i in list(theirs)[2 * batch :]]
        assert ours.batches_per_epoch == 12 // batch


def test_samples_do_not_depend_on_workers(synthetic_train):
    ds = SeededSamples(
        RetrievalTrainDataset(
            synthetic_train["train"], synthetic_train["image_root"], train_transform(64)
        ),
        9,
    )
    sampler = TrainSampler(len(ds), 4, seed=1)
    collate = Collate(tokenizer(), "retrieval")

    def run(workers):
        loader = DataLoader(
            ds,
            batch_size=4,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            drop_last=True,
        )
        return [b["image"] for b in loader]

    a, b = run(0), run(2)
    assert len(a) == len(b) == len(ds) // 4
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(ds[(0, 0)][0], ds[(1, 0)][0])  # a new epoch, a new augmentation


def test_collate_tokenises_as_the_official_tasks():
    img = torch.zeros(3, 8, 8)
    samples = [(img, "a red circle", 3), (img, "two big blue squares on a white background", 5)]
    tok = tokenizer()
    r = Collate(tok, "retrieval", pad_to_longest=False)(samples)
    assert r["ids"].shape == (2, 35) and r["idx"].tolist() == [3, 5]
    assert r["ids"][0, :5].tolist() == [101, 1037, 2417, 4418, 102]
    c = Collate(tok, "caption", prompt="a picture of ")(samples)
    assert c["ids"].shape[1] == int(c["mask"].sum(1).max())  # padded to the longest
    assert c["ids"][0, :4].tolist() == [101, 1037, 3861, 1997]  # prompt first
    assert "idx" not in c
    assert Collate(tok, "pretrain", pad_to_longest=False)(samples[:1])["ids"].shape == (1, 30)
