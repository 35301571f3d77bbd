"""A faster training forward pass with the same parameters, state dict and call as the model.

Self-Flow conditions every token on its own time, and the released network computes the adaLN
modulation of every block for every token: for XL/2 that is 116 GFLOP per image per forward
pass on top of 237 of useful work (+49 %). During training a sample only ever holds two
distinct times (``t`` for the kept tokens, ``s`` for the masked ones), and the teacher one.
:class:`FastTrainingDiT` therefore computes the modulation for those (at most) two times per
sample and picks, per token, the row of its time: the same numbers, without the repeated rows.

What it changes, and what it keeps:

- **Same parameters.** It is a :class:`~selfflow.model.network.SelfFlowDiT` subclass whose blocks run a
  functional twin of :class:`~selfflow.model.network.DiTBlock` on the block's own weights; the state dict,
  DDP, FSDP2 (``fully_shard`` per block: every block is still *called*, so its hooks fire), the
  EMA copy and checkpoints are those of the plain model.
- **Same call.** ``forward(x, tau, y, *, project_layer=None, hidden_layer=None)`` as the plain
  model, so :func:`~selfflow.train.objective.self_flow_loss` uses it unchanged. The two times are
  *detected* from ``tau`` rather than passed in: per sample the smallest and the largest entry of
  ``tau (B, T)``, each token taking the row of the one it equals. A ``tau`` with more than two
  distinct times in a sample is refused (a clear error on the CPU; an asynchronous device
  assertion on CUDA, which needs no host sync). A per-sample ``tau (B,)`` (the teacher's call,
  or sampling) gives one row per sample.
- **Precision.** ``dtype=None`` follows the caller's autocast (the trainer's ``--dtype``);
  ``torch.bfloat16`` runs the pass under bf16 autocast with the float32 weights; ``torch.float32``
  disables autocast. Under autocast the matmuls and the attention (SDPA: flash attention on a
  GPU) run in bf16, LayerNorm and the residual stream stay float32.
- **Compilation.** ``compile=None`` compiles the block function with ``torch.compile`` on CUDA
  only (one graph shared by all blocks: its weights are arguments, so compiling costs one block,
  not 28); on the CPU it runs eagerly. ``True`` or ``False`` force it either way (the trainer's
  ``--compile`` / ``--no-compile``); :func:`compile_errors` turns a failed compilation into a
  one-line error that names ``--no-compile``.

The teacher's forward stops at its block (``hidden_layer``) as the plain model's does, and the
objective runs it under ``torch.no_grad()``. :func:`training_optimizer` is AdamW with the
recipe's settings, fused on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from selfflow.base.errors import ConfigurationError, SelfFlowError
from selfflow.model.network import DiTBlock, ModelConfig, SelfFlowDiT, modulate, unpatchify
from selfflow.train.objective import noised_input, representation_loss

__all__ = [
    "FastTrainingDiT",
    "split_times",
    "straightforward_loss",
    "train_step_flops",
    "training_optimizer",
]

_LN_EPS = 1e-6  # LayerNorm of the blocks: no affine parameters, eps 1e-6
_compiled_block: Callable | None = None


def split_times(tau: Tensor) -> tuple[Tensor, Tensor | None]:
    """The distinct times of each sample and, per token, which one it holds.

    ``tau (B,)`` → ``(tau[:, None], None)``. ``tau (B, T)`` with at most two distinct values per
    sample → ``times (B, 2)`` = (smallest, largest) and ``select (B, T, 1)``, True where the token
    holds the largest. Refuses a sample with a third time (see the module docstring for how).
    """
    if tau.dim() == 1:
        return tau[:, None], None
    low, high = tau.amin(dim=1), tau.amax(dim=1)
    at_high = tau == high[:, None]
    two_valued = (at_high | (tau == low[:, None])).all()
    message = (
        "FastTrainingDiT computes the modulation for at most two times per sample (Self-Flow's "
        "t and s); a sample of tau holds more. Use SelfFlowDiT for arbitrary per-token times."
    )
    if tau.is_cuda:
        torch._assert_async(two_valued, message)
    elif tau.device.type != "meta" and not bool(two_valued):  # meta: shapes only, no values
        raise ConfigurationError(message)
    return torch.stack([low, high], dim=1), at_high[..., None]


def fast_block(
    h: Tensor,
    c: Tensor,
    select: Tensor | None,
    weights: tuple[Tensor, ...],
    num_heads: int,
) -> Tensor:
    """One adaLN-Zero block with the modulation computed once per distinct time.

    ``h (B, T, D)`` the residual stream, ``c (B, K, D)`` the conditioning of the ``K`` (1 or 2)
    distinct times, ``select (B, T, 1)`` (K = 2) which row each token takes. ``weights`` are the
    block's ada, qkv, proj, fc1, fc2 weights and biases in that order. Maths of ``DiTBlock``:
    six chunks shift/scale/gate for attention then MLP, LayerNorm without affine, eps 1e-6.
    """
    ada_w, ada_b, qkv_w, qkv_b, proj_w, proj_b, fc1_w, fc1_b, fc2_w, fc2_b = weights
    mods = F.linear(F.silu(c), ada_w, ada_b)  # (B, K, 6D): K rows instead of T
    if select is not None:
        mods = torch.where(select, mods[:, 1:], mods[:, :1])  # (B, T, 6D)
    shift1, scale1, gate1, shift2, scale2, gate2 = mods.chunk(6, dim=-1)
    b, t, d = h.shape
    a = modulate(F.layer_norm(h, (d,), eps=_LN_EPS), shift1, scale1)
    qkv = F.linear(a, qkv_w, qkv_b).reshape(b, t, 3, num_heads, d // num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
    attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
    h = h + gate1 * F.linear(attended, proj_w, proj_b)
    a = modulate(F.layer_norm(h, (d,), eps=_LN_EPS), shift2, scale2)
    hidden = F.gelu(F.linear(a, fc1_w, fc1_b), approximate="tanh")
    return h + gate2 * F.linear(hidden, fc2_w, fc2_b)


def _block_function(compiled: bool) -> Callable:
    """The eager block function, or its compiled twin (built once, shared by every block)."""
    global _compiled_block
    if not compiled:
        return fast_block
    if _compiled_block is None:
        _compiled_block = torch.compile(fast_block, fullgraph=True, dynamic=False)
    return _compiled_block


def compiles(compile: bool | None, device: torch.device) -> bool:
    """Whether the block function runs compiled: as asked, else on CUDA only (one rule for the
    network and for what the trainer says about it)."""
    return device.type == "cuda" if compile is None else bool(compile)


def compile_failure(error: BaseException) -> SelfFlowError | None:
    """The one-line error to raise when ``error`` (or what it wraps) is a failure of the compiler
    itself (dynamo's ``BackendCompilerFailed``, inductor, Triton); None otherwise.

    Compilation happens inside the first step, so such failures (a node without the C compiler
    Triton needs, an inductor bug) would otherwise surface as a long traceback with no way
    around it. Dynamo's errors about the traced code itself (``Unsupported``, shape errors) are
    bugs of the step, not of the set-up, and are left as they are. The message names the
    innermost cause, where such failures say what went wrong.
    """
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = getattr(cause, "inner_exception", None) or cause.__cause__

    def from_the_compiler(e: BaseException) -> bool:
        module = type(e).__module__
        return type(e).__name__ == "BackendCompilerFailed" or module.startswith(
            ("torch._inductor", "triton")
        )

    if not any(from_the_compiler(e) for e in chain):
        return None
    root = chain[-1]
    first = next((line for line in str(root).splitlines() if line.strip()), "").strip()[:300]
    return SelfFlowError(
        f"torch.compile failed on the fast network's block ({type(root).__name__}: {first}). "
        f"Rerun with --no-compile to train the same network eagerly (slower on a GPU, the same "
        f"maths), or repair the compiler set-up: Triton, which torch.compile uses on GPUs, "
        f"needs a working C compiler"
    )


@contextlib.contextmanager
def compile_errors() -> Iterator[None]:
    """Around a training step: a compiler failure becomes :func:`compile_failure`'s error."""
    try:
        yield
    except Exception as error:
        failure = compile_failure(error)
        if failure is None:
            raise
        raise failure from error


class FastDiTBlock(DiTBlock):
    """A :class:`DiTBlock` (same parameters) whose forward takes the two-time conditioning."""

    def forward(
        self, x: Tensor, c: Tensor, select: Tensor | None = None, *, compiled: bool = False
    ) -> Tensor:
        weights = (
            self.adaLN_modulation[1].weight,
            self.adaLN_modulation[1].bias,
            self.attn.qkv.weight,
            self.attn.qkv.bias,
            self.attn.proj.weight,
            self.attn.proj.bias,
            self.mlp.fc1.weight,
            self.mlp.fc1.bias,
            self.mlp.fc2.weight,
            self.mlp.fc2.bias,
        )
        return _block_function(compiled)(x, c, select, weights, self.attn.num_heads)


class FastTrainingDiT(SelfFlowDiT):
    """:class:`SelfFlowDiT` with a faster training forward pass; see the module docstring.

    Build it like the model (``FastTrainingDiT(config, dtype=..., compile=...)``) or from one
    (:meth:`from_model`). ``forward_sit`` is inherited: it gives the blocks the plain model's
    conditioning (one row per sample or per token), which their functional twin also accepts.
    """

    def __init__(
        self,
        config: ModelConfig | None = None,
        *,
        dtype: torch.dtype | None = None,
        compile: bool | None = None,
    ) -> None:
        super().__init__(config)
        if dtype not in (None, torch.bfloat16, torch.float16, torch.float32):
            raise ConfigurationError(
                f"FastTrainingDiT dtype must be None (the caller's autocast), bfloat16, float16 "
                f"or float32; got {dtype}"
            )
        self.dtype = dtype
        self.compile = compile
        for block in self.blocks:
            # Same module, same parameters: only the forward differs, so re-class it in place
            # rather than build (and initialise) a second set of 28 blocks.
            block.__class__ = FastDiTBlock

    @classmethod
    def from_model(
        cls, model: SelfFlowDiT, *, dtype: torch.dtype | None = None, compile: bool | None = None
    ) -> FastTrainingDiT:
        """A copy of ``model``'s weights (on their device, in their dtype) in a fast module."""
        with torch.device("meta"):
            fast = cls(model.config, dtype=dtype, compile=compile)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        fast.load_state_dict(state, strict=True, assign=True)
        for src, dst in zip(model.parameters(), fast.parameters(), strict=True):
            dst.requires_grad_(src.requires_grad)
        return fast.train(model.training)

    def forward(
        self,
        x: Tensor,
        tau: Tensor,
        y: Tensor,
        *,
        project_layer: int | None = None,
        hidden_layer: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Same call and results as :meth:`SelfFlowDiT.forward` (paper convention)."""
        self._check_layers(project_layer, hidden_layer)
        self._check_inputs(x, tau, y)
        times, select = split_times(tau)
        with self._precision(x.device.type):
            return self._run(x, times, select, y, project_layer, hidden_layer)

    def _precision(self, device_type: str) -> contextlib.AbstractContextManager:
        if self.dtype is None or device_type == "meta":  # meta: shapes only, no autocast
            return contextlib.nullcontext()
        if self.dtype == torch.float32:
            return torch.autocast(device_type, enabled=False)
        return torch.autocast(device_type, dtype=self.dtype)

    def _run(
        self,
        x: Tensor,
        times: Tensor,
        select: Tensor | None,
        y: Tensor,
        project_layer: int | None,
        hidden_layer: int | None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        compiled = compiles(self.compile, x.device)
        c = self.t_embedder(1.0 - times) + self.y_embedder(y).unsqueeze(1)  # (B, K, D)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        stop = hidden_layer if hidden_layer is not None else len(self.blocks)
        features = None
        for index, block in enumerate(self.blocks[:stop], start=1):
            h = block(h, c, select, compiled=compiled)
            if index == project_layer:
                features = h
        if hidden_layer is not None:
            return h
        final = self.final_layer
        shift, scale = final.adaLN_modulation(c).chunk(2, dim=-1)
        if select is not None:
            shift = torch.where(select, shift[:, 1:], shift[:, :1])
            scale = torch.where(select, scale[:, 1:], scale[:, :1])
        out = final.linear(modulate(final.norm_final(h), shift, scale))
        cfg = self.config
        velocity = -unpatchify(out, cfg.patch_size, cfg.out_channels, cfg.in_channels)
        if project_layer is not None:
            return velocity, self.projector(features)
        return velocity


def training_optimizer(
    params: Iterable[Tensor],
    *,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW with the recipe's defaults; ``fused=None`` fuses it (one kernel for all
    parameters) when every parameter is on CUDA, the only place PyTorch's fused AdamW is fast."""
    params = list(params)
    if fused is None:
        fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(
        params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused
    )


def train_step_flops(
    config: ModelConfig,
    *,
    teacher_layer: int = 20,
    rep_weight: float = 0.8,
) -> float:
    """Useful floating-point operations of one training step per image (a multiply-add is 2).

    Student forward and backward (3 × the per-sample-adaLN forward, plus the projector) and,
    when ``rep_weight > 0``, the teacher's forward to ``teacher_layer`` (its skipped final layer,
    < 0.01 % of the step, is counted). ≈ 889 GFLOP for XL/2. Element-wise work is left out.
    """
    from selfflow.model.inference import forward_flops

    d, p, t = config.hidden_size, config.projector_dim, config.num_tokens
    student = forward_flops(config)
    if rep_weight == 0:
        return 3 * student
    projector = 2 * t * (d * p + p * d)
    teacher = forward_flops(dataclasses.replace(config, depth=teacher_layer))
    return 3 * (student + projector) + teacher


def straightforward_loss(
    student: SelfFlowDiT,
    teacher: SelfFlowDiT,
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
    """The Self-Flow loss as a straightforward trainer computes it: the baseline of the speed-up.

    Same value as :func:`~selfflow.train.objective.self_flow_loss`, computed the way the released
    model and SiT/REPA-style loops are written: the teacher runs its *whole* network (every block
    and the final layer) with ``tau_teacher`` expanded to every token (per-token modulation), and
    its block ``teacher_layer`` is caught by a forward hook; the student's features come from a
    hook too. Run it on plain :class:`SelfFlowDiT` models under the caller's autocast.
    """
    caught: dict[str, Tensor] = {}

    def catch(name: str) -> Callable:
        def hook(module, args, output) -> None:
            caught[name] = output

        return hook

    b, patch = x0.shape[0], student.config.patch_size
    per_token_teacher = tau_teacher[:, None].expand(b, tau.shape[1])
    x_tau = noised_input(x0, noise, tau, patch)
    handle = student.blocks[student_layer - 1].register_forward_hook(catch("student"))
    try:
        prediction = student(x_tau, tau, y)
    finally:
        handle.remove()
    with torch.no_grad():
        handle = teacher.blocks[teacher_layer - 1].register_forward_hook(catch("teacher"))
        try:
            teacher(noised_input(x0, noise, per_token_teacher, patch), per_token_teacher, y)
        finally:
            handle.remove()
    flow = (prediction.float() - (noise - x0).float()).square().mean()
    rep = representation_loss(student.projector(caught["student"]), caught["teacher"])
    loss = flow + rep_weight * rep
    return loss, {"flow": flow.detach(), "rep": rep.detach()}
