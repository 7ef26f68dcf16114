"""The training step's speed levers keep its math: no host synchronisation inside a step,
multi-tensor momentum updates (identical to the bit), text padded to the batch's longest caption
(same losses and gradients within fp32 rounding), image cross-attention keys / values projected
once per distinct image for every text pass (same losses and gradients), and optional
image-token dropout (0 is the official ViT; > 0 changes the objective, so only its mechanics
are checked)."""

import contextlib
import copy
import dataclasses
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import blip_fast
from blip_fast import create_model, tokenizer
from blip_fast.models import med
from blip_fast.models.configs import BlipConfig, VisionConfig
from blip_fast.models.vit import VisionTransformer
from blip_fast.ops import _backend
from blip_fast.train.data import Collate
from blip_fast.train.distributed import DistInfo
from blip_fast.train.loop import LoopConfig, Trainer, negative_uniforms
from blip_fast.train.main import build_trainer
from blip_fast.train.optim import LRSchedule, build_optimizer
from blip_fast.train.task import CaptionTask, ContrastiveTask

B = 4
CAPTIONS = [
    "a red circle",
    "two big blue squares on a white background next to a small green triangle",
    "a dog",
    "three yellow stars above a purple line",
]
# aten ops that make the host wait for a CUDA device: reading a value (item, float(), bool(),
# int()), or an output whose size depends on the data.
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2"}


def _model(task: str, dropout: float = 0.0, backend=None):
    cfg = BlipConfig.preset("blip_tiny")
    text = dataclasses.replace(cfg.text, hidden_dropout=dropout, attention_dropout=dropout)
    torch.manual_seed(0)
    model = create_model(task, dataclasses.replace(cfg, text=text, queue_size=4 * B), backend)
    if task != "caption":
        model.copy_params()
    return model


def _samples(step: int = 0) -> list:
    g = torch.Generator().manual_seed(step)
    images = torch.randn(B, 3, 64, 64, generator=g)
    return [(images[i], CAPTIONS[(i + step) % B], (i + step) % 3) for i in range(B)]


def _trainer(model, tmp_path, task: str) -> Trainer:
    return Trainer(
        ContrastiveTask(model, lm=task == "pretrain"),
        None,
        None,
        build_optimizer(model, 1e-4),
        LRSchedule("cosine", 1e-4),
        LoopConfig(max_epoch=1, alpha_ramp=False, seed=3),
        DistInfo(device=torch.device("cpu")),
        tmp_path,
    )


class _HostReads(TorchDispatchMode):
    """Records every aten call that would make the host wait for a CUDA device and, patched
    in while active, every Python-level conversion of a tensor to host values: those the
    dispatcher never sees on a CPU tensor (tolist, numpy, cpu) and those made inside an op's
    Python implementation, which runs with the mode off."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        masked = name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in (args[1] or ())
        )
        if name in _SYNC_OPS or masked:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def patched(self):
        names = ("tolist", "numpy", "cpu", "item", "__float__", "__int__", "__bool__", "__index__")
        originals = {n: getattr(torch.Tensor, n) for n in names}

        def recorder(name):
            def call(t, *a, **k):
                self.reads.append(f"Tensor.{name}")
                return originals[name](t, *a, **k)

            return call

        for name in originals:
            setattr(torch.Tensor, name, recorder(name))
        try:
            with self:
                yield self.reads
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize(
    "read",
    [
        lambda t: float(t[0]),
        lambda t: bool(t[1] > 0),
        lambda t: range(10)[t.long()[0]],
        lambda t: t.tolist(),
        lambda t: t.cpu(),
        lambda t: t[t > 0],
        lambda t: torch.nonzero(t),
    ],
)
def test_host_read_detector_sees_each_kind_of_read(read):
    t = torch.tensor([1.0, -2.0])
    with _HostReads().patched() as reads:
        t + 1
    assert reads == []
    with _HostReads().patched() as reads:
        read(t)
    assert reads


@pytest.mark.parametrize("task", ["retrieval", "pretrain"])
def test_step_reads_nothing_back_from_the_device(task, tmp_path):
    trainer = _trainer(_model(task), tmp_path, task)
    collate = Collate(tokenizer(), task)
    trainer.step(collate(_samples(0)))  # AdamW state created
    with _HostReads().patched() as reads:
        stats = trainer.step(collate(_samples(1)))
    assert reads == []
    assert all(isinstance(stats[k], torch.Tensor) for k in ("temp", "itc", "itm", "loss"))


@pytest.mark.gpu
def test_cuda_step_never_synchronises(tmp_path):
    model = _model("pretrain").cuda()
    trainer = _trainer(model, tmp_path, "pretrain")
    trainer.dist = DistInfo(device=torch.device("cuda"))
    collate = Collate(tokenizer(), "pretrain")
    for step in range(2):  # kernel selection and autotuning may synchronise once
        trainer.step(collate(_samples(step)))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.step(collate(_samples(2)))
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("late", [False, True], ids=["at_once", "one_step_late"])
def test_every_step_is_logged_in_order(late, tiny_config, tmp_path):
    trainer = build_trainer("retrieval", tiny_config, tmp_path, num_workers=0, max_steps=5)
    trainer.log_one_step_late = late  # late: as on a GPU, after the next step is queued
    trainer.cfg.save_every = 2  # a checkpoint logs the step it holds first
    stats = trainer.train()
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["global_step"] for r in log] == [1, 2, 3, 4, 5]
    assert all(isinstance(r[k], float) for r in log for k in ("temp", "itc", "itm", "loss"))
    assert stats == {k: v for k, v in log[-1].items() if k in stats} and "loss" in stats


def test_step_stats_are_the_task_losses_and_the_queue_is_written_as_official(tmp_path):
    model = _model("retrieval")
    reference = copy.deepcopy(model)
    trainer = _trainer(model, tmp_path, "retrieval")
    collate = Collate(tokenizer(), "retrieval")
    task = ContrastiveTask(reference)
    queue = reference.image_queue.clone()
    for step in range(6):  # 6 writes of 4 into 16 columns: wraps around
        batch = collate(_samples(step))
        stats = trainer.step(batch)
        reference.clamp_temp()
        reference.momentum_update()
        out = task({**batch, "alpha": 0.4, "neg_u": negative_uniforms(3, 0, step, B)})
        for k in ("itc", "itm", "loss"):
            torch.testing.assert_close(stats[k], out[k].detach(), rtol=1e-5, atol=1e-6, msg=k)
        trainer.global_step += 1
        # the official _dequeue_and_enqueue, reading the pointer on the host
        ptr = 4 * step % 16
        queue[:, ptr : ptr + B] = out["queue"][0].T
        with torch.no_grad():
            reference.load_state_dict(model.state_dict())
        torch.testing.assert_close(model.image_queue, queue, rtol=0, atol=0)
    assert int(model.ptr_queue) == 6 * B % 16


def test_foreach_momentum_update_equals_the_loop_to_the_bit():
    fast = _model("pretrain")
    loop = copy.deepcopy(fast)
    loop.foreach_momentum = False
    for _ in range(3):
        with torch.no_grad():
            for m in (loop, fast):
                torch.manual_seed(1)  # the same online weights in both
                for p in m.parameters():
                    if p.requires_grad:
                        p.add_(0.01 * torch.randn_like(p))
        loop.momentum_update()
        fast.momentum_update()
    momentum = [k for k in loop.state_dict() if "_m." in k]
    assert len(momentum) > 50
    for k in momentum:
        assert torch.equal(fast.state_dict()[k], loop.state_dict()[k]), k
    assert not torch.equal(fast.visual_encoder_m.cls_token, fast.visual_encoder.cls_token)
    fast.copy_params()
    assert torch.equal(fast.visual_encoder_m.cls_token, fast.visual_encoder.cls_token)


def test_momentum_lists_follow_a_dtype_change():
    model = _model("retrieval")
    model.momentum_params()
    model.to(torch.float64)
    model.momentum_update()
    assert model.visual_encoder_m.cls_token.dtype == torch.float64
    online, momentum = model.momentum_params()
    assert all(p.dtype == torch.float64 for p in online + momentum)


def _step_losses_and_grads(model, task, batch, seed: int = 5):
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks in both runs
    if isinstance(task, ContrastiveTask):  # one rank: the world is this batch
        local = task.encode(batch)
        out = task.objectives(local, local, batch)
    else:
        out = task(batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v for k, v in out.items() if k != "queue"}, grads


def _assert_same_step(expected, got, lm: bool):
    (loss_a, grad_a), (loss_b, grad_b) = expected, got
    assert loss_a.keys() == loss_b.keys() and ("lm" in loss_a) == lm
    for k, v in loss_a.items():
        torch.testing.assert_close(loss_b[k], v, rtol=1e-5, atol=0, msg=k)
    assert grad_a.keys() == grad_b.keys() and len(grad_a) > 50
    largest = max(float(g.abs().max()) for g in grad_a.values())
    for n, g in grad_a.items():
        if n.endswith("key.bias"):  # softmax is shift-invariant: gradient 0 + rounding noise
            assert max(g.abs().max(), grad_b[n].abs().max()) < 1e-9 * largest, n
            continue
        scale = float(g.abs().max())
        torch.testing.assert_close(grad_b[n], g, rtol=1e-5, atol=1e-5 * scale, msg=n)


@pytest.mark.parametrize("task", ["retrieval", "pretrain"])
def test_text_padded_to_the_longest_caption_gives_the_padded_losses_and_gradients(task):
    model = _model(task)
    samples = _samples(0)
    trimmed = Collate(tokenizer(), task)(samples)
    padded = Collate(tokenizer(), task, pad_to_longest=False)(samples)
    longest = int(padded["mask"].sum(1).max())
    assert trimmed["ids"].shape == (B, longest) and longest < padded["ids"].shape[1]
    assert torch.equal(padded["ids"][:, :longest], trimmed["ids"])
    task_module = ContrastiveTask(model, lm=task == "pretrain")
    extra = {"alpha": 0.4, "neg_u": negative_uniforms(0, 0, 0, B)}
    results = [
        _step_losses_and_grads(model, task_module, {**b, **extra}) for b in (padded, trimmed)
    ]
    _assert_same_step(*results, lm=task == "pretrain")


@pytest.mark.parametrize("negative_all_rank", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("task", ["retrieval", "pretrain"])
def test_image_kv_projected_once_gives_the_per_row_losses_and_gradients(
    task, dropout, negative_all_rank, monkeypatch
):
    """The ITM rows read the shared K / V through the gathered op (its default backend: the C++
    kernel where built), attention dropout included: its counter hash drops the same elements
    as the per-row cross-attention kernel's. With ``negative_all_rank`` the drawn negatives are
    projected beside the batch's images."""
    model = _model(task, dropout)
    batch = {**Collate(tokenizer(), task)(_samples(0)), "alpha": 0.4}
    batch["neg_u"] = negative_uniforms(0, 0, 0, B)
    projected = []
    original = type(model.text_encoder).image_kv

    def image_kv(encoder, image_embeds):
        projected.append(image_embeds.shape[0])
        return original(encoder, image_embeds)

    monkeypatch.setattr(type(model.text_encoder), "image_kv", image_kv)
    results = []
    for share in (False, True):
        task_module = ContrastiveTask(
            model, negative_all_rank, lm=task == "pretrain", share_image_kv=share
        )
        results.append(_step_losses_and_grads(model, task_module, batch))
    # one projection for ITM and LM together: B images, or B + B drawn negatives
    assert projected == [2 * B if negative_all_rank else B]
    _assert_same_step(*results, lm=task == "pretrain")


IMAGE_TOKENS = (64 // 16) ** 2 + 1  # blip_tiny: 64 px, 16 px patches, [CLS]


@pytest.mark.parametrize("fused", [True, False])
def test_cross_attention_dropout_runs_where_the_lever_says(fused, monkeypatch):
    """With ``fused_attention_dropout`` every cross-attention of a pre-training step (ITM over
    the shared K / V, the LM pass) drops probabilities inside a fused op and no attention op
    runs on image keys; without it, they all go to the attention op (F.dropout on the
    materialised probabilities, as official BERT) and the fused ops run without dropout."""
    model = _model("pretrain", dropout=0.1)
    for module in model.modules():
        if hasattr(module, "fused_dropout"):
            module.fused_dropout = fused
    calls = []
    for name in ("cross_attention", "gathered_cross_attention", "attention"):
        original = getattr(med.ops, name)

        def spy(q, k, *args, _name=name, _original=original, **kwargs):
            p = kwargs.get("dropout_p", args[2] if len(args) > 2 and _name != "attention" else 0)
            cross = k.shape[-2] == IMAGE_TOKENS != q.shape[-2]  # text queries, image keys
            calls.append((_name, cross, float(p)))
            return _original(q, k, *args, **kwargs)

        monkeypatch.setattr(med.ops, name, spy)
    batch = {**Collate(tokenizer(), "pretrain")(_samples(0)), "alpha": 0.4}
    batch["neg_u"] = negative_uniforms(0, 0, 0, B)
    assert batch["ids"].shape[1] != IMAGE_TOKENS  # lengths tell cross- from self-attention
    _step_losses_and_grads(model, ContrastiveTask(model, lm=True), batch)
    cross = {(name, p) for name, is_cross, p in calls if is_cross}
    if fused:  # the LM pass reads the shared K / V too where its cross-attention is tied
        assert ("gathered_cross_attention", 0.1) in cross
        assert cross <= {("gathered_cross_attention", 0.1), ("cross_attention", 0.1)}
    else:
        assert cross == {("attention", 0.1)}


@pytest.mark.parametrize("task", ["retrieval", "pretrain"])
def test_itm_last_layer_for_enc_alone_gives_every_tokens_losses_and_gradients(task):
    """The ITM head reads the [ENC] output only: the last text layer computing that token
    alone changes no loss and no gradient (the tokens it skips feed nothing else)."""
    model = _model(task)
    batch = {**Collate(tokenizer(), task)(_samples(0)), "alpha": 0.4}
    batch["neg_u"] = negative_uniforms(0, 0, 0, B)
    tokens = []  # tokens through the last text layer's FFN, per pass
    model.text_encoder.encoder.layer[-1].intermediate.register_forward_hook(
        lambda module, args, out: tokens.append(args[0].shape[1])
    )
    results = []
    for enc_only in (False, True):
        step = ContrastiveTask(model, lm=task == "pretrain", itm_enc_only=enc_only)
        results.append(_step_losses_and_grads(model, step, batch))
        tokens.append(None)
    L = batch["ids"].shape[1]
    lm = [L] if task == "pretrain" else []  # the decoder's FFN is the encoder's, tied
    assert tokens == [L, L, *lm, None, L, 1, *lm, None]  # ITC text pass, ITM pass, LM pass
    _assert_same_step(*results, lm=task == "pretrain")


@pytest.mark.parametrize("task", ["pretrain", "retrieval", "caption"])
def test_fast_step_gives_the_official_steps_losses_and_gradients(task):
    """Every lever and every default kernel at once against the official step (reference
    kernels, text padded to the official length, K / V projected per row), same batch."""
    samples = _samples(0)
    if task == "caption":
        samples = [(image, caption) for image, caption, _ in samples]
    prompt = "a picture of " if task == "caption" else ""
    results = []
    for fast in (False, True):
        model = _model(task, backend=None if fast else "reference")
        batch = Collate(tokenizer(), task, prompt, pad_to_longest=fast)(samples)
        if task == "caption":
            step = CaptionTask(model)
        else:
            step = ContrastiveTask(
                model, lm=task == "pretrain", share_image_kv=fast, itm_enc_only=fast
            )
            batch = {**batch, "alpha": 0.4, "neg_u": negative_uniforms(0, 0, 0, B)}
        if fast:  # the C++ kernels are the CPU default where built
            assert _backend.resolve("cross_attention", "cpu") == "cpu" or not blip_fast.HAS_C
        results.append(_step_losses_and_grads(model, step, batch))
    _assert_same_step(*results, lm=task != "retrieval")


def _official_vit_tokens(vit, pixels):
    """A block-less ViT's output written out as official ``VisionTransformer.forward``."""
    x = vit.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + vit.pos_embed
    return vit.norm(x)


def test_image_token_drop_keeps_cls_and_a_random_subset_of_position_embedded_patches():
    # no blocks: every output token is its own input token, so the kept ones can be found
    vit = VisionTransformer(VisionConfig(image_size=64, width=32, depth=0, heads=2))
    pixels = torch.randn(3, 3, 64, 64)
    full = _official_vit_tokens(vit, pixels)  # (3, 17, 32)
    assert torch.equal(vit(pixels), full)
    kept = vit(pixels, token_drop=0.75)
    assert kept.shape == (3, 1 + 4, 32)
    for b in range(3):
        match = (kept[b, :, None] == full[b, None]).all(-1)  # (5, 17): kept token == source
        assert (match.sum(1) == 1).all()  # each kept token is exactly one input token
        source = match.float().argmax(1)
        assert source[0] == 0 and (source[1:] > 0).all() and len(set(source.tolist())) == 5
    assert not torch.equal(vit(pixels, token_drop=0.75), kept)  # a new subset per call
    with pytest.raises(ValueError, match="token_drop must be in"):
        vit(pixels, token_drop=1.0)


def test_image_token_drop_trains_the_online_vit_on_fewer_tokens_only(tmp_path):
    model = _model("pretrain")
    task = ContrastiveTask(model, lm=True, image_token_drop=0.5)
    batch = {**Collate(tokenizer(), "pretrain")(_samples(0)), "alpha": 0.4}
    batch["neg_u"] = negative_uniforms(0, 0, 0, B)
    local = task.encode(batch)
    assert local["image_embeds"].shape[1] == 1 + 8  # 16 patches of 64 px, half kept
    with torch.no_grad():  # the momentum ViT saw every token
        full = model.visual_encoder_m(batch["image"])
        feat_m = torch.nn.functional.normalize(model.vision_proj_m(full[:, 0]), dim=-1)
    torch.testing.assert_close(local["image_feat_m"], feat_m, rtol=0, atol=0)
    out = task.objectives(local, local, batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.visual_encoder.pos_embed.grad is not None
    # evaluation and image_token_drop = 0 are the official path
    task.eval()
    assert task.encode(batch)["image_embeds"].shape[1] == 17
    with pytest.raises(ValueError, match="image_token_drop must be in"):
        ContrastiveTask(model, image_token_drop=-0.1)
