"""The exponential moving average of the weights: Self-Flow's teacher and its evaluated model.

One float32 copy, an exact copy of the model at step 0, updated after every optimiser step as
``ema ← decay·ema + (1 − decay)·θ``. It is both the self-distillation teacher and the model that
is sampled and evaluated (the paper keeps one EMA for both roles, decay 0.9999).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    """A float32 copy that takes no gradient (built before any wrapping or sharding)."""
    ema = copy.deepcopy(model).float()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema ← decay·ema + (1 − decay)·θ`` for every parameter (buffers are fixed and equal).

    Written as ``ema ← ema + (1 − decay)·(θ − ema)``, one multi-tensor ``_foreach_lerp_`` for
    all parameters (a few kernels instead of one per parameter). ``model`` and ``ema`` must
    list their parameters in the same order with the same shapes (or the same shards under
    FSDP): both come from one construction.
    """
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    if len(ema_params) != len(params):
        raise RuntimeError("the EMA and the model have different parameter lists")
    params = [p.to(e.dtype) for e, p in zip(ema_params, params, strict=True)]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
