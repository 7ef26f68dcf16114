"""Pieces shared by the BLIP task models: backend maps, momentum encoders and feature queues."""

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from blip_fast.models.configs import BlipConfig

OPS = ("attention", "cross_attention", "gathered_cross_attention", "itc", "linear", "lm_head_loss")


def backend_map(backend: str | dict | None) -> dict:
    """``backend`` as op -> requested backend: a string applies to every op, a dict names some
    ops (the others choose automatically), None chooses automatically everywhere."""
    if backend is None:
        return {}
    if isinstance(backend, str):
        return dict.fromkeys(OPS, backend)
    unknown = set(backend) - set(OPS)
    if unknown:
        raise ValueError(f"unknown ops in backend map: {sorted(unknown)}; known: {OPS}")
    return dict(backend)


class MomentumMixin:
    """Momentum copies ``<name>_m`` of the online modules named in ``momentum_names``, updated
    as p_m = m * p_m + (1 - m) * p (official ``_momentum_update``), never trained.

    The update is two multi-tensor calls (``torch._foreach_mul_`` / ``_foreach_add_``) over
    the paired parameter lists, built once: the same two roundings per element as the official
    per-parameter loop, so the result is identical to the bit. ``foreach_momentum = False``
    runs that loop instead (one pair of kernels per parameter)."""

    momentum_names: tuple[str, ...] = ()
    foreach_momentum: bool = True
    _momentum_params: tuple[list, list] | None = None

    def _make_momentum(self):
        for name in self.momentum_names:
            model_m = copy.deepcopy(getattr(self, name))
            for p in model_m.parameters():
                p.requires_grad_(False)
            setattr(self, name + "_m", model_m)

    def momentum_pairs(self):
        return [(getattr(self, n), getattr(self, n + "_m")) for n in self.momentum_names]

    def momentum_params(self) -> tuple[list, list]:
        """(online, momentum) parameter lists in matching order, cached; dropped by ``_apply``
        (``.to()``, ``.cuda()``...) and ``load_state_dict``, which may replace parameters."""
        if self._momentum_params is None:
            online, momentum = [], []
            for model, model_m in self.momentum_pairs():
                for p, p_m in zip(model.parameters(), model_m.parameters(), strict=True):
                    online.append(p)
                    momentum.append(p_m)
            self._momentum_params = (online, momentum)
        return self._momentum_params

    def _apply(self, *args, **kwargs):
        self._momentum_params = None
        return super()._apply(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self._momentum_params = None
        return super().load_state_dict(*args, **kwargs)

    @torch.no_grad()
    def copy_params(self):
        """Momentum copies := online weights (official ``copy_params``)."""
        online, momentum = self.momentum_params()
        torch._foreach_copy_(momentum, online)

    @torch.no_grad()
    def momentum_update(self):
        m = self.cfg.momentum
        online, momentum = self.momentum_params()
        if not self.foreach_momentum:
            for p, p_m in zip(online, momentum):
                p_m.mul_(m).add_(p, alpha=1 - m)
            return
        torch._foreach_mul_(momentum, m)
        torch._foreach_add_(momentum, online, alpha=1 - m)


def itm_head(cfg: BlipConfig) -> nn.Linear:
    """The 2-way ITM classifier on the [ENC] output. ``cfg.zero_init_itm_head`` (training from
    scratch): it starts at zero, so its logit, added to every reranked score, cannot shuffle the
    ITC ranking before ITM has learned anything."""
    head = nn.Linear(cfg.text.hidden_size, 2)
    if cfg.zero_init_itm_head:
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    return head


def init_queues(module: nn.Module, cfg: BlipConfig, with_idx: bool, ptr_name: str):
    """Register the L2-normalised random feature queues (D, Q), the idx queue (1, Q) = -100 and
    the write pointer under its official name (``ptr_queue`` / ``queue_ptr``)."""
    module.register_buffer(
        "image_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0)
    )
    module.register_buffer(
        "text_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0)
    )
    if with_idx:
        module.register_buffer("idx_queue", torch.full((1, cfg.queue_size), -100, dtype=torch.long))
    module.register_buffer(ptr_name, torch.zeros(1, dtype=torch.long))


def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated in rank order (no gradient); identity without a group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def enqueue(module: nn.Module, ptr_name: str, image_feat_m, text_feat_m, idx=None):
    """Write the gathered momentum features (and idx) of every rank into the queues at the
    pointer, then advance it (official ``_dequeue_and_enqueue``). The pointer stays a device
    tensor: the columns are indexed from it on the device, so the host never waits for it."""
    image_feats, text_feats = concat_all_gather(image_feat_m), concat_all_gather(text_feat_m)
    n, size = image_feats.shape[0], module.image_queue.shape[1]
    if size % n:
        raise ValueError(f"queue_size {size} must be divisible by the global batch {n}")
    ptr = getattr(module, ptr_name)  # (1,)
    cols = (ptr + torch.arange(n, device=ptr.device)) % size
    module.image_queue.index_copy_(1, cols, image_feats.T.to(module.image_queue.dtype))
    module.text_queue.index_copy_(1, cols, text_feats.T.to(module.text_queue.dtype))
    if idx is not None:
        module.idx_queue.index_copy_(1, cols, concat_all_gather(idx.view(-1)).view(1, -1))
    ptr.add_(n).remainder_(size)
