"""The Self-Flow network: a SiT/DiT transformer with per-token timestep conditioning.

The released ImageNet 256 model is SiT-XL/2 (``ModelConfig.xl_2()``). Parameter names and
shapes mirror the released state dict exactly so a checkpoint
loads strictly, key for key.

Two time conventions meet here. Inside the network (SiT) ``t = 0`` is noise and ``t = 1`` is
data, and the network predicts ``v = x_data − ε``. The paper and this package's public call use
``τ = 1 − t`` (``τ = 1`` is noise) and the velocity ``ε − x_data``. :meth:`SelfFlowDiT.forward`
takes τ and returns ``ε − x_data``; :meth:`SelfFlowDiT.forward_sit` speaks the network's own
convention.

Self-Flow trains with a *different* timestep per token, so ``t`` may have shape
``(B, num_tokens)``. At sampling time every token shares one t; then the adaLN modulation is
identical for all tokens, and computing it once per sample (``t`` of shape ``(B,)``) saves
about a third of the FLOPs. Both paths run the same modules and are tested against each other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NULL_CLASS = 1000
"""Label of the unconditional ("null") row of the label table."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Self-Flow DiT. Every field changes the state dict or the function."""

    input_size: int = 32  # latent height = width
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # the label table has num_classes + 1 rows (the last is null)
    learn_sigma: bool = (
        True  # the final layer predicts 2 × in_channels; only the first half is used
    )
    projector_dim: int = (
        2304  # hidden width of the self-distillation projector (unused at inference)
    )

    @classmethod
    def xl_2(cls) -> ModelConfig:
        """The released ImageNet 256 model (SiT-XL/2, 675 M parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> ModelConfig:
        """A model small enough for CPU tests: 8 × 8 latents, 16 tokens, 2 blocks."""
        return cls(input_size=8, hidden_size=64, depth=2, num_heads=4, projector_dim=128)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown ModelConfig fields {unknown}; expected a subset of {sorted(known)}"
            )
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def null_class(self) -> int:
        """Label of the unconditional ("null") row: the last row of the label table."""
        return self.num_classes

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def __post_init__(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos embedding)"
            )


# ----------------------------------------------------------------------------------------------
# Fixed embeddings


def sincos_pos_embed(hidden_size: int, grid_size: int) -> Tensor:
    """2-D sin-cos position embedding, ``(grid_size**2, hidden_size)`` in float64.

    The first half of the features encodes the token's column, the second half its row; each
    half is ``[sin(pos·ω_k)…, cos(pos·ω_k)…]`` with ``ω_k = 10000^(−k/(hidden/4))``.
    """
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # token index = row * grid + col

    def encode(p: Tensor) -> Tensor:
        angles = p.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1)


def timestep_features(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of the network time ``t`` in [0, 1] (not scaled by 1000).

    Returns ``[cos(t·f_k)…, sin(t·f_k)…]`` with ``f_k = exp(−ln(max_period)·k/(dim/2))``, in
    float32 (or float64 if t is), shape ``t.shape + (dim,)``.
    """
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half
    )
    angles = t.to(dtype)[..., None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


# ----------------------------------------------------------------------------------------------
# Layers (names match the released state dict)


class PatchEmbed(nn.Module):
    """Cuts the latent into ``patch × patch`` tokens and projects each with a Linear."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.in_channels * config.patch_size**2, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(patchify(x, self.config.patch_size))


def patchify(x: Tensor, patch: int) -> Tensor:
    """``(B, C, H, W)`` → ``(B, T, C·p·p)``; token = ``row·(W/p) + col``, value = ``c·p² + p1·p + p2``."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: Tensor, patch: int, channels: int, keep: int) -> Tensor:
    """Final-layer tokens ``(B, T, p·p·channels)`` ordered ``(p1, p2, c)`` → ``(B, keep, H, W)``.

    Only the first ``keep`` channels survive (the learned-sigma half is dropped).
    """
    b, t, _ = tokens.shape
    grid = math.isqrt(t)
    x = tokens.reshape(b, grid, grid, patch, patch, channels)[..., :keep]
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, keep, grid * patch, grid * patch)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t, then Linear → SiLU → Linear."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: Tensor) -> Tensor:
        features = timestep_features(t, self.frequency_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """A table of ``num_classes + 1`` rows; the last row is the null (unconditional) label."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (bias) and no q/k normalisation."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, hidden_size * 3)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax scale 1/sqrt(head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block.

    ``c`` is either ``(B, 1, D)`` (one modulation per sample, broadcast over tokens) or
    ``(B, T, D)`` (per token); the maths is the same.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, config.num_heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, config.mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, config.patch_size**2 * config.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class Projector(nn.Module):
    """Self-distillation head used in training only (Linear → SiLU → Linear); kept so that
    released checkpoints load strictly."""

    def __init__(self, hidden_size: int, projector_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, projector_dim)
        self.linear2 = nn.Linear(projector_dim, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(F.silu(self.linear1(x)))


# ----------------------------------------------------------------------------------------------
# The network


class SelfFlowDiT(nn.Module):
    """Self-Flow class-conditional DiT.

    Call ``model(x, tau, y)``: latents ``x (B, C, H, W)``, paper time ``tau`` (1 = noise,
    0 = data) of shape ``(B,)`` or per token ``(B, num_tokens)`` in row-major token order,
    labels ``y (B,)`` int64 with ``config.null_class`` (1000 for the released model, i.e.
    ``NULL_CLASS``) for unconditional. Returns the paper's velocity ``ε − x_data``, shaped like
    ``x``; see :meth:`forward` for the hidden states training asks for.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ModelConfig.xl_2()
        self.x_embedder = PatchEmbed(config)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size)
        self.register_buffer(
            "pos_embed",
            sincos_pos_embed(config.hidden_size, config.grid_size).float().unsqueeze(0),
        )
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(config)
        self.projector = Projector(config.hidden_size, config.projector_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's training initialisation: Xavier linears, zeroed adaLN and output (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- conventions --------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        tau: Tensor,
        y: Tensor,
        *,
        project_layer: int | None = None,
        hidden_layer: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Paper convention: ``tau`` = 1 is noise; returns ``ε − x_data``.

        Training needs a block's hidden state as well, and it is asked for here rather than
        through separate methods so that DDP's and FSDP's hooks see every call:

        - ``project_layer=l`` (1-based) returns ``(velocity, projector(h_l))``, where ``h_l``
          ``(B, T, D)`` is the output of block ``l``: the student's self-distillation features;
        - ``hidden_layer=l`` returns the raw ``h_l`` and runs only blocks ``1..l`` (neither the
          later blocks nor the final layer): the teacher's features, at the cost of ``l`` blocks.
        """
        self._check_layers(project_layer, hidden_layer)
        t = 1.0 - tau
        self._check_inputs(x, t, y)
        c = self.conditioning(t, y)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        stop = hidden_layer if hidden_layer is not None else len(self.blocks)
        features = None
        for index, block in enumerate(self.blocks[:stop], start=1):
            h = block(h, c)
            if index == project_layer:
                features = h
        if hidden_layer is not None:
            return h
        velocity = -self._velocity(h, c)
        if project_layer is not None:
            return velocity, self.projector(features)
        return velocity

    def forward_sit(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Network (SiT) convention: ``t`` = 0 is noise; returns ``v = x_data − ε``."""
        self._check_inputs(x, t, y)
        c = self.conditioning(t, y)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            h = block(h, c)
        return self._velocity(h, c)

    def _velocity(self, h: Tensor, c: Tensor) -> Tensor:
        """Final layer on the last block's output: the SiT velocity ``x_data − ε``, like ``x``."""
        out = self.final_layer(h, c)
        cfg = self.config
        return unpatchify(out, cfg.patch_size, cfg.out_channels, cfg.in_channels)

    def _check_layers(self, project_layer: object, hidden_layer: object) -> None:
        """The training options of :meth:`forward`: at most one, a 1-based block number."""
        if project_layer is not None and hidden_layer is not None:
            raise ValueError(
                "pass project_layer or hidden_layer, not both: the first returns the velocity "
                "and projected features, the second stops at a block and returns its raw output"
            )
        depth = len(self.blocks)
        for name, layer in (("project_layer", project_layer), ("hidden_layer", hidden_layer)):
            if layer is None:
                continue
            if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= depth:
                raise ValueError(
                    f"{name} must be a block number in 1..{depth} (1-based, this model has "
                    f"{depth} blocks); got {layer!r}"
                )

    def conditioning(self, t: Tensor, y: Tensor) -> Tensor:
        """``c = t_emb + y_emb``: ``(B, 1, D)`` for a per-sample t, ``(B, T, D)`` per token."""
        c = self.t_embedder(t)
        y_emb = self.y_embedder(y)
        if t.dim() == 1:
            return (c + y_emb).unsqueeze(1)
        return c + y_emb.unsqueeze(1)

    def _check_inputs(self, x: Tensor, t: Tensor, y: Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"x must have shape (B, {', '.join(map(str, expected))}); got {tuple(x.shape)}"
            )
        b = x.shape[0]
        if tuple(t.shape) not in ((b,), (b, cfg.num_tokens)):
            raise ValueError(
                f"t must have shape ({b},) or ({b}, {cfg.num_tokens}) (per token); got {tuple(t.shape)}"
            )
        if tuple(y.shape) != (b,) or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"y must be int64 labels of shape ({b},); got {y.dtype} {tuple(y.shape)}"
            )
