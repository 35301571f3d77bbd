"""A lean inference path for sampling, and the official release's path for comparison.

:class:`FastSelfFlow` computes the same function as :class:`~selfflow.model.network.SelfFlowDiT` with a
per-sample time, only faster on a GPU. It takes the network's weights (a state-dict round trip,
no parameters of its own) and differs from the float32 per-sample reference **only in
precision**:

- the large matmuls (qkv, attention output, MLP, adaLN modulation) run with weights and inputs
  in ``dtype`` (bf16 by default), accumulating in float32 inside the matmul kernels;
- the attention (PyTorch SDPA: flash attention on a GPU) runs in ``dtype``;
- everything else runs in float32: the residual stream, the gated residual adds, LayerNorm, the
  adaLN ``shift``/``scale``/``gate`` once computed, the patch and timestep/label embedders, and the
  final output Linear (all three are a negligible share of the work);
- the adaLN modulation of all blocks and of the final layer is one batched matmul (the rows of
  the per-block weights stacked), computed once per sample rather than once per token.

With ``dtype=torch.float32`` the operations are the reference's, so the two agree to float32
rounding; the tests use that to prove the maths is the same, not only close.

:class:`OfficialEquivalent` runs what the official release runs: fp32 weights under bf16
autocast, the adaLN modulation for every token (τ expanded to ``(B, T)``), eager. It exists for
the throughput benchmark (``benchmarks/throughput.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfflow.base.errors import ConfigurationError
from selfflow.model.checkpoint import check_keys_and_shapes
from selfflow.model.network import ModelConfig, SelfFlowDiT, patchify, timestep_features, unpatchify

__all__ = ["FastSelfFlow", "OfficialEquivalent", "forward_flops", "official_equivalent"]

_LN_EPS = 1e-6  # LayerNorm without affine parameters, eps 1e-6


def forward_flops(config: ModelConfig, *, per_token_adaln: bool = False) -> float:
    """Floating-point operations of one network evaluation of one image (a multiply-add is 2).

    Counts every matmul and the two attention products (``QKᵀ`` and ``AV``); element-wise work
    is left out. With the default per-sample adaLN this is the *useful* work (≈ 237 GFLOP for
    XL/2); ``per_token_adaln=True`` counts what the official per-token path executes
    (≈ 116 GFLOP more: the same modulation rows, and time-embedding MLP, for every token).
    """
    d, t, depth = config.hidden_size, config.num_tokens, config.depth
    patch_values = config.in_channels * config.patch_size**2
    per_token_block = 2 * d * (3 * d + d + 2 * config.mlp_hidden) + 4 * t * d
    rows = t if per_token_adaln else 1  # conditioning vectors per image
    adaln = 2 * d * (6 * d * depth + 2 * d) * rows
    embed = 2 * t * patch_values * d + 2 * (256 * d + d * d) * rows
    final = 2 * t * d * config.patch_size**2 * config.out_channels
    return float(depth * t * per_token_block + adaln + embed + final)


def _check_call(config: ModelConfig, x: Tensor, tau: Tensor, y: Tensor, *, who: str) -> None:
    """Shapes and dtypes a caller can get wrong, checked outside the compiled graph."""
    expected = (config.in_channels, config.input_size, config.input_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected or not x.is_floating_point():
        raise ConfigurationError(
            f"{who}: x must be a floating-point latent of shape (B, {', '.join(map(str, expected))}); "
            f"got {x.dtype} {tuple(x.shape)}"
        )
    b = x.shape[0]
    if tau.dim() == 2 and tuple(tau.shape) == (b, config.num_tokens):
        raise ConfigurationError(
            f"{who}: computes one adaLN modulation per sample and needs tau of shape ({b},); got a "
            f"per-token tau {tuple(tau.shape)}. Use SelfFlowDiT for per-token times."
        )
    if tuple(tau.shape) != (b,) or not tau.is_floating_point():
        raise ConfigurationError(
            f"{who}: tau must be a floating-point tensor of shape ({b},) (one time per sample); "
            f"got {tau.dtype} {tuple(tau.shape)}"
        )
    if tuple(y.shape) != (b,) or y.dtype not in (torch.int64, torch.int32):
        raise ConfigurationError(
            f"{who}: y must be int64 labels of shape ({b},); got {y.dtype} {tuple(y.shape)}"
        )
    if x.device != tau.device or x.device != y.device:
        raise ConfigurationError(
            f"{who}: x, tau and y must be on one device; got {x.device}, {tau.device}, {y.device}"
        )


def _expected_tensors(config: ModelConfig) -> dict[str, Tensor]:
    """The released keys the fast path reads (all but the projector), from a meta model."""
    with torch.device("meta"):
        reference = SelfFlowDiT(config)
    return {k: v for k, v in reference.state_dict().items() if not k.startswith("projector.")}


class FastSelfFlow(nn.Module):
    """The network's per-sample forward pass, lean: see the module docstring for the maths.

    Call ``fast(x, tau, y)`` exactly like :class:`SelfFlowDiT` (paper convention, ``tau`` of
    shape ``(B,)``, 1 = noise); it returns ``ε − x_data`` in float32. Build it with
    :meth:`from_model` or :meth:`from_state_dict`. Its tensors are non-persistent buffers in two
    precisions, so move it with ``.to(device)`` only (``.to(dtype)`` would cast the float32
    parts too).

    Options: ``compile`` (default: on CUDA only) wraps the whole forward pass in one
    ``torch.compile(fullgraph=True, dynamic=False)`` graph: the first call of each new batch
    size compiles (40–50 s for XL/2 on an H200), so keep batch sizes few (guidance doubles the batch
    inside its interval: two shapes). ``compile_mode`` is passed on (e.g.
    ``"max-autotune-no-cudagraphs"``). ``attention_backends`` orders the SDPA kernels (names from
    ``flash``, ``cudnn``, ``efficient``, ``math``; default PyTorch's choice). ``gelu_epilogue``
    computes fc1's bias and tanh-GELU in the cuBLASLt matmul epilogue, which saves writing and
    re-reading the widest activation of every block; it exists on CUDA only, so the default
    (``None``) turns it on there and off elsewhere.
    """

    def __init__(
        self,
        config: ModelConfig,
        state_dict: Mapping[str, Tensor],
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        compile: bool | None = None,
        compile_mode: str | None = None,
        attention_backends: Sequence[str] | None = None,
        gelu_epilogue: bool | None = None,
    ) -> None:
        super().__init__()
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ConfigurationError(
                f"FastSelfFlow dtype must be bfloat16, float16 or float32; got {dtype}"
            )
        self.config = config
        self.dtype = dtype
        self._load(state_dict, torch.device(device) if device is not None else None)
        self.attention_backends = _parse_backends(attention_backends)
        device_type = self.pos_embed.device.type
        if gelu_epilogue is None:
            gelu_epilogue = device_type == "cuda"
        if gelu_epilogue and device_type != "cuda":
            raise ConfigurationError(
                "gelu_epilogue needs CUDA: cuBLASLt fuses the tanh-GELU into the fc1 matmul there, "
                f"while on {device_type} torch._addmm_activation computes the erf GELU"
            )
        self.gelu_epilogue = bool(gelu_epilogue)
        self.compiled = (device_type == "cuda") if compile is None else bool(compile)
        self.compile_mode = compile_mode
        self._compiled_fn = None
        if self.compiled:
            # Inductor suggests TF32 when it sees float32 matmuls; here those are the small
            # embedders and the output layer, kept in float32 on purpose, so the advice misleads.
            warnings.filterwarnings(
                "ignore", message="TensorFloat32 tensor cores for float32 matrix multiplication"
            )
            self._compiled_fn = torch.compile(
                self._sit_velocity, fullgraph=True, dynamic=False, mode=compile_mode
            )

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_model(
        cls,
        model: SelfFlowDiT,
        dtype: torch.dtype = torch.bfloat16,
        compile: bool | None = None,
        **kwargs,
    ) -> FastSelfFlow:
        """Copy ``model``'s weights (on its device) into a lean inference module."""
        device = kwargs.pop("device", None) or model.pos_embed.device
        return cls(
            model.config, model.state_dict(), dtype=dtype, device=device, compile=compile, **kwargs
        )

    @classmethod
    def from_state_dict(
        cls, config: ModelConfig, state_dict: Mapping[str, Tensor], **kwargs
    ) -> FastSelfFlow:
        """Build straight from a released state dict, without a float32 model in between."""
        return cls(config, state_dict, **kwargs)

    def _load(self, state_dict: Mapping[str, Tensor], device: torch.device | None) -> None:
        cfg = self.config
        check_keys_and_shapes(
            state_dict,
            _expected_tensors(cfg),
            f"state dict does not match {cfg}",
            allow_unexpected=True,
        )
        if device is None:
            device = state_dict["pos_embed"].device

        def take(key: str, dtype: torch.dtype) -> Tensor:
            return state_dict[key].detach().to(device=device, dtype=dtype, copy=True)

        def stack(suffix: str, dtype: torch.dtype) -> Tensor:
            return torch.stack(
                [take(f"blocks.{i}.{suffix}", dtype) for i in range(cfg.depth)]
            ).contiguous()

        f32, low = torch.float32, self.dtype
        buffers = {
            # float32: cheap, and where precision shows in the output
            "pos_embed": take("pos_embed", f32)[0],
            "x_w": take("x_embedder.proj.weight", f32),
            "x_b": take("x_embedder.proj.bias", f32),
            "t0_w": take("t_embedder.mlp.0.weight", f32),
            "t0_b": take("t_embedder.mlp.0.bias", f32),
            "t2_w": take("t_embedder.mlp.2.weight", f32),
            "t2_b": take("t_embedder.mlp.2.bias", f32),
            "y_table": take("y_embedder.embedding_table.weight", f32),
            "out_w": take("final_layer.linear.weight", f32),
            "out_b": take("final_layer.linear.bias", f32),
            # low precision: the matmuls that are the work
            "qkv_w": stack("attn.qkv.weight", low),
            "qkv_b": stack("attn.qkv.bias", low),
            "proj_w": stack("attn.proj.weight", low),
            "proj_b": stack("attn.proj.bias", low),
            "fc1_w": stack("mlp.fc1.weight", low),
            "fc1_b": stack("mlp.fc1.bias", low),
            "fc2_w": stack("mlp.fc2.weight", low),
            "fc2_b": stack("mlp.fc2.bias", low),
            # every block's adaLN rows, then the final layer's: one matmul per evaluation
            "ada_w": torch.cat(
                [take(f"blocks.{i}.adaLN_modulation.1.weight", low) for i in range(cfg.depth)]
                + [take("final_layer.adaLN_modulation.1.weight", low)]
            ),
            "ada_b": torch.cat(
                [take(f"blocks.{i}.adaLN_modulation.1.bias", low) for i in range(cfg.depth)]
                + [take("final_layer.adaLN_modulation.1.bias", low)]
            ),
        }
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor, persistent=False)

    # -- the call -----------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, x: Tensor, tau: Tensor, y: Tensor) -> Tensor:
        """Paper convention: ``tau`` (B,) with 1 = noise; returns ``ε − x_data`` in float32."""
        _check_call(self.config, x, tau, y, who="FastSelfFlow")
        return -self._run(x, 1.0 - tau.float(), y)

    @torch.no_grad()
    def forward_sit(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Network (SiT) convention: ``t`` (B,) with 0 = noise; returns ``x_data − ε``."""
        _check_call(self.config, x, t, y, who="FastSelfFlow")
        return self._run(x, t.float(), y)

    def _run(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        fn = self._compiled_fn if self._compiled_fn is not None else self._sit_velocity
        x, y = x.float(), y.long()
        if self.attention_backends is None:
            return fn(x, t, y)
        from torch.nn.attention import sdpa_kernel

        # Entered outside the compiled graph: the backend is fixed when the graph is traced.
        with sdpa_kernel(self.attention_backends, set_priority=True):
            return fn(x, t, y)

    def _sit_velocity(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """The whole forward pass on checked inputs: x float32, t float32 (B,), y int64."""
        cfg = self.config
        b, d, depth, low = x.shape[0], cfg.hidden_size, cfg.depth, self.dtype
        h = F.linear(patchify(x, cfg.patch_size), self.x_w, self.x_b) + self.pos_embed
        t_emb = F.linear(
            F.silu(F.linear(timestep_features(t), self.t0_w, self.t0_b)), self.t2_w, self.t2_b
        )
        c = t_emb + F.embedding(y, self.y_table)  # (B, D): one conditioning vector per sample
        mods = F.linear(F.silu(c).to(low), self.ada_w, self.ada_b).float()
        block_mods = mods[:, : depth * 6 * d].reshape(b, depth, 6, 1, d)
        for i in range(depth):
            shift1, scale1, gate1, shift2, scale2, gate2 = block_mods[:, i].unbind(1)
            a = _modulate_norm(h, shift1, scale1).to(low)
            h = h + gate1 * self._attention(a, i).float()
            a = _modulate_norm(h, shift2, scale2).to(low)
            h = h + gate2 * self._mlp(a, i).float()
        shift, scale = mods[:, depth * 6 * d :].reshape(b, 2, 1, d).unbind(1)
        out = F.linear(_modulate_norm(h, shift, scale), self.out_w, self.out_b)
        return unpatchify(out, cfg.patch_size, cfg.out_channels, cfg.in_channels)

    def _attention(self, a: Tensor, i: int) -> Tensor:
        b, t, d = a.shape
        heads = self.config.num_heads
        qkv = F.linear(a, self.qkv_w[i], self.qkv_b[i]).reshape(b, t, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax scale 1/sqrt(head_dim)
        return F.linear(out.transpose(1, 2).reshape(b, t, d), self.proj_w[i], self.proj_b[i])

    def _mlp(self, a: Tensor, i: int) -> Tensor:
        if self.gelu_epilogue:
            # One cuBLASLt call: bias and tanh-GELU applied in the matmul's epilogue, which saves
            # writing and re-reading the (B·T, 4D) pre-activation (inductor keeps it as one call).
            b, t, d = a.shape
            hidden = torch._addmm_activation(
                self.fc1_b[i], a.reshape(b * t, d), self.fc1_w[i].t(), use_gelu=True
            ).reshape(b, t, -1)
        else:
            hidden = F.gelu(F.linear(a, self.fc1_w[i], self.fc1_b[i]), approximate="tanh")
        return F.linear(hidden, self.fc2_w[i], self.fc2_b[i])

    def extra_repr(self) -> str:
        return (
            f"dtype={self.dtype}, compiled={self.compiled}, compile_mode={self.compile_mode}, "
            f"attention_backends={self.attention_backends}, gelu_epilogue={self.gelu_epilogue}"
        )


def _modulate_norm(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``LN(h) · (1 + scale) + shift`` in float32 (LayerNorm without affine, eps 1e-6)."""
    return F.layer_norm(h, (h.shape[-1],), eps=_LN_EPS) * (1 + scale) + shift


def _parse_backends(names: Sequence[str] | None):
    """Names such as ``["cudnn", "flash"]`` → SDPA backends in priority order (None: PyTorch's)."""
    if names is None:
        return None
    from torch.nn.attention import SDPBackend

    table = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise ConfigurationError(
            f"attention backends must be a non-empty list from {sorted(table)}; got {list(names)}"
        )
    return [table[n] for n in names]


class OfficialEquivalent(nn.Module):
    """What the official sampler executes: fp32 weights, bf16 autocast, per-token adaLN, eager.

    Same call as the model (paper convention); a per-sample ``tau`` is expanded to every token,
    so the adaLN modulation is computed ``T`` times per sample as in the release. Returns float32.
    """

    def __init__(self, model: SelfFlowDiT, autocast_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.autocast_dtype = autocast_dtype

    @torch.no_grad()
    def forward(self, x: Tensor, tau: Tensor, y: Tensor) -> Tensor:
        if tau.dim() == 1:
            tau = tau[:, None].expand(-1, self.config.num_tokens)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            out = self.model(x, tau, y)
        return out.float()


def official_equivalent(model: SelfFlowDiT) -> OfficialEquivalent:
    """The official release's inference path around ``model`` (which should hold fp32 weights)."""
    return OfficialEquivalent(model)
