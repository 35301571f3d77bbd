"""The Self-Flow training objective: dual-timestep scheduling and EMA self-distillation.

Plain functions a reader can check against the paper (arXiv 2603.06507), in its time
convention: ``τ ∈ [0, 1]`` with ``τ = 1`` pure noise, the path ``x_τ = (1 − τ)·x0 + τ·ε`` and
the velocity target ``ε − x0``.

- **Dual-timestep scheduling.** Each sample draws two times ``t, s ~ U(0, 1)`` independently
  (not sorted). Each token is *masked* with probability ``mask_ratio`` (0.25 for images, a
  Bernoulli mask, so the count varies per sample); masked tokens are noised at ``s``, the others
  at ``t``, and the network is conditioned on every token's own time. A token's ``p × p`` patch
  in every latent channel shares its time.
- **Self-distillation.** The teacher (the EMA of the student) sees the same ``x0``, ``ε`` and
  labels with every token at the cleaner time ``min(t, s)``, without gradient, and its forward
  stops at block ``teacher_layer``. The student's block ``student_layer`` output goes through
  its projector, and ``L_rep`` is the mean over tokens of ``1 − cos`` between the two along the
  hidden dimension.
- **Total.** ``L = L_flow + rep_weight · L_rep`` with ``L_flow`` the MSE over every value of
  every token (masked or not). ``rep_weight = 0`` with ``mask_ratio = 0`` is plain flow matching
  (SiT), and then no teacher is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfflow.base.errors import ConfigurationError

__all__ = [
    "dual_timesteps",
    "dual_timesteps_from",
    "noised_input",
    "representation_loss",
    "self_flow_loss",
]


def dual_timesteps(
    batch_size: int,
    num_tokens: int,
    *,
    mask_ratio: float = 0.25,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token paper times ``tau (B, num_tokens)`` and the teacher's ``tau_teacher (B,)``.

    Draws, on the generator's device (the CPU when ``generator`` is None, from torch's global
    generator), in this fixed order so that a keyed generator reproduces them: ``t (B,)``, then
    ``s (B,)``, then ``u (B, num_tokens)``, all ``U[0, 1)`` in float32. Token ``k`` of sample
    ``b`` is masked iff ``u[b, k] < mask_ratio`` and then sits at ``s[b]``, else at ``t[b]``;
    ``tau_teacher = min(t, s)``. With ``mask_ratio = 0`` no token is masked (every token at
    ``t``); ``tau_teacher`` is still ``min(t, s)``, which a run without the representation loss
    never uses. The results are moved to ``device`` when given.
    """
    for name, value in (("batch_size", batch_size), ("num_tokens", num_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"{name} must be a positive integer; got {value!r}")
    _check_mask_ratio(mask_ratio)
    draw_device = generator.device if generator is not None else torch.device("cpu")
    t = torch.rand(batch_size, generator=generator, device=draw_device)
    s = torch.rand(batch_size, generator=generator, device=draw_device)
    u = torch.rand(batch_size, num_tokens, generator=generator, device=draw_device)
    tau, tau_teacher = dual_timesteps_from(t, s, u, mask_ratio=mask_ratio)
    if device is not None:
        tau, tau_teacher = tau.to(device), tau_teacher.to(device)
    return tau, tau_teacher


def dual_timesteps_from(
    t: Tensor, s: Tensor, u: Tensor, *, mask_ratio: float = 0.25
) -> tuple[Tensor, Tensor]:
    """The deterministic half of :func:`dual_timesteps`: ``tau`` and ``tau_teacher`` from the
    uniforms ``t (B,)``, ``s (B,)`` and ``u (B, num_tokens)``, however they were drawn (the
    trainer draws them from its keyed streams, :mod:`selfflow.train.streams`)."""
    _check_mask_ratio(mask_ratio)
    masked = u < mask_ratio
    tau = torch.where(masked, s[:, None], t[:, None])
    return tau, torch.minimum(t, s)


def _check_mask_ratio(mask_ratio: float) -> None:
    if isinstance(mask_ratio, bool) or not (
        isinstance(mask_ratio, (int, float)) and 0.0 <= mask_ratio <= 1.0
    ):
        raise ConfigurationError(f"mask_ratio must be a number in [0, 1]; got {mask_ratio!r}")


def noised_input(x0: Tensor, noise: Tensor, tau: Tensor, patch_size: int) -> Tensor:
    """``x_τ = (1 − τ)·x0 + τ·ε`` with each token's time spread over its patch.

    ``x0`` and ``noise`` are ``(B, C, H, W)``; ``tau`` is per sample ``(B,)`` or per token
    ``(B, T)`` with ``T = (H/p)·(W/p)`` in row-major token order (token = ``row·(W/p) + col``
    covers pixels ``[row·p, row·p + p) × [col·p, col·p + p)`` in every channel).
    """
    if x0.dim() != 4 or noise.shape != x0.shape:
        raise ConfigurationError(
            f"x0 and noise must be latents of one shape (B, C, H, W); got {tuple(x0.shape)} and "
            f"{tuple(noise.shape)}"
        )
    b, _, h, w = x0.shape
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise ConfigurationError(
            f"patch_size {patch_size} does not divide the latent size {h} × {w}"
        )
    gh, gw = h // patch_size, w // patch_size
    if tuple(tau.shape) == (b,):
        tau_map = tau.reshape(b, 1, 1, 1)
    elif tuple(tau.shape) == (b, gh * gw):
        tau_map = tau.reshape(b, 1, gh, 1, gw, 1).expand(b, 1, gh, patch_size, gw, patch_size)
        tau_map = tau_map.reshape(b, 1, h, w)
    else:
        raise ConfigurationError(
            f"tau must have shape ({b},) or ({b}, {gh * gw}) (one time per {patch_size} × "
            f"{patch_size} token); got {tuple(tau.shape)}"
        )
    tau_map = tau_map.to(x0.dtype)
    return (1 - tau_map) * x0 + tau_map * noise


def self_flow_loss(
    student: nn.Module,
    teacher: nn.Module | None,
    x0: Tensor,
    y: Tensor,
    *,
    noise: Tensor,
    tau: Tensor,
    tau_teacher: Tensor,
    rep_weight: float = 0.8,
    student_layer: int = 8,
    teacher_layer: int = 20,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The Self-Flow loss of one batch: ``(loss, {"flow": ..., "rep": ...})``.

    ``student`` and ``teacher`` are called like :class:`~selfflow.model.network.SelfFlowDiT`
    (``net(x, tau, y, project_layer=…)`` / ``net(x, tau, y, hidden_layer=…)``; a DDP-wrapped
    student works). ``x0`` clean latents ``(B, C, H, W)``, ``y`` labels with dropped ones already
    set to the null class (for student and teacher alike), ``noise`` the path's ``ε``, ``tau``
    per-token times ``(B, T)`` (or ``(B,)``), ``tau_teacher`` ``(B,)``. The patch size follows
    from the latent size and ``T``. Losses are reduced in at least float32 (a bf16 network's
    outputs are upcast first). The parts are detached scalars; ``"rep"`` is 0 when
    ``rep_weight == 0``, and then the teacher is never called (it may be None) and the student
    is called without ``project_layer``, so its projector gets no gradient (freeze it under DDP,
    which otherwise waits for that gradient).
    """
    finite = isinstance(rep_weight, (int, float)) and math.isfinite(rep_weight)
    if isinstance(rep_weight, bool) or not (finite and rep_weight >= 0):
        raise ConfigurationError(f"rep_weight must be a finite number >= 0; got {rep_weight!r}")
    patch = _patch_size(x0, tau)
    x_tau = noised_input(x0, noise, tau, patch)
    target = noise - x0
    if rep_weight == 0:
        prediction = student(x_tau, tau, y)
        flow = _mse(prediction, target)
        return flow, {"flow": flow.detach(), "rep": torch.zeros_like(flow).detach()}
    if teacher is None:
        raise ConfigurationError("rep_weight > 0 needs a teacher network; got None")
    b = x0.shape[0]
    if tuple(tau_teacher.shape) != (b,):
        raise ConfigurationError(
            f"tau_teacher must have one time per sample, shape ({b},); got {tuple(tau_teacher.shape)}"
        )
    prediction, features = student(x_tau, tau, y, project_layer=student_layer)
    with torch.no_grad():
        x_teacher = noised_input(x0, noise, tau_teacher, patch)
        targets = teacher(x_teacher, tau_teacher, y, hidden_layer=teacher_layer)
    flow = _mse(prediction, target)
    rep = representation_loss(features, targets.detach())
    loss = flow + rep_weight * rep
    return loss, {"flow": flow.detach(), "rep": rep.detach()}


def representation_loss(features: Tensor, targets: Tensor) -> Tensor:
    """Mean over tokens of ``1 − cos(features, targets)``, the cosine along the last dimension.

    Cosine rather than a distance: the paper found ℓ1 unstable late in training as the feature
    norms grow, which a cosine ignores.
    """
    if features.shape != targets.shape:
        raise ConfigurationError(
            f"student features {tuple(features.shape)} and teacher features "
            f"{tuple(targets.shape)} differ in shape"
        )
    dtype = _reduction_dtype(features)
    cosine = F.cosine_similarity(features.to(dtype), targets.to(dtype), dim=-1)
    return (1 - cosine).mean()


def _mse(prediction: Tensor, target: Tensor) -> Tensor:
    if prediction.shape != target.shape:
        raise ConfigurationError(
            f"the network returned {tuple(prediction.shape)}; expected the latent shape "
            f"{tuple(target.shape)}"
        )
    dtype = _reduction_dtype(prediction)
    return (prediction.to(dtype) - target.to(dtype)).square().mean()


def _reduction_dtype(x: Tensor) -> torch.dtype:
    """float32 for bf16/fp16/float32 tensors, float64 for float64 ones (for exact references)."""
    return torch.promote_types(x.dtype, torch.float32)


def _patch_size(x0: Tensor, tau: Tensor) -> int:
    """The patch size implied by the latent ``(B, C, H, W)`` and a per-token ``tau (B, T)``."""
    if x0.dim() != 4:
        raise ConfigurationError(f"x0 must be latents (B, C, H, W); got {tuple(x0.shape)}")
    h, w = x0.shape[-2:]
    if tau.dim() == 1:
        return 1  # one time per sample: any patch size gives the same x_τ
    tokens = tau.shape[-1]
    patch = math.isqrt(h * w // tokens) if tokens else 0
    if tau.dim() != 2 or patch < 1 or patch * patch * tokens != h * w or h % patch or w % patch:
        raise ConfigurationError(
            f"tau of shape {tuple(tau.shape)} does not tile a {h} × {w} latent into square "
            "patches; expected (B, (H/p)·(W/p)) for the model's patch size p"
        )
    return patch
