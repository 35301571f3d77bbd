"""Where a run's first weights come from: the seed-keyed initialisation or ``--init-from``.

Every process builds the same initial weights from a generator keyed by the run's seed (no
broadcast needed), and ``--init-from`` is read and checked key by key and shape by shape
against the model being trained before any work, so a wrong file stops the run at once.
"""

from __future__ import annotations

import torch

from selfflow.base.seeds import torch_seed
from selfflow.model.network import SelfFlowDiT
from selfflow.train.config import ResolvedConfig


def read_init(resolved: ResolvedConfig, init_from: str | None) -> dict[str, torch.Tensor] | None:
    """The weights of ``--init-from`` (the released checkpoint or any export), checked key by
    key and shape by shape against the model being trained, before any work."""
    if init_from is None:
        return None
    from selfflow.model.checkpoint import read_checkpoint, validate_state_dict

    state, *_ = read_checkpoint(init_from, mmap=True)  # copied into the model once
    with torch.device("meta"):
        model = SelfFlowDiT(resolved.model)
    validate_state_dict(state, model, f"--init-from {init_from}")
    return state


def initial_model(
    resolved: ResolvedConfig, init_state: dict[str, torch.Tensor] | None
) -> SelfFlowDiT:
    """DiT's initialisation drawn from a generator keyed by the seed (every process builds the
    same weights), or the ``--init-from`` weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed(resolved.settings.seed, 0, "init"))
        model = SelfFlowDiT(resolved.model)
    if init_state is not None:
        model.load_state_dict(init_state, strict=True)
    return model.float().train()
