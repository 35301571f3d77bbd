"""The network against an independent float64 re-computation written from the model's equations.

The reference below never calls selfflow's layers: it reads the state dict by its released key
names and writes each formula out (explicit index loops for the patch layout, softmax attention
by hand, layer norm by hand, the tanh-GELU formula), so a wrong layout or order in the package
cannot be mirrored here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfflow.model.network import NULL_CLASS, ModelConfig, SelfFlowDiT

# ----------------------------------------------------------------------------------------------
# Reference maths, float64 numpy, straight from the model's equations


def ref_tokens(latent: np.ndarray, patch: int = 2) -> np.ndarray:
    """(C, H, W) → (T, C·p·p): token = row·G + col, value = c·p² + p1·p + p2, by loops."""
    c_count, h, _ = latent.shape
    grid = h // patch
    out = np.zeros((grid * grid, c_count * patch * patch))
    for row in range(grid):
        for col in range(grid):
            for c in range(c_count):
                for p1 in range(patch):
                    for p2 in range(patch):
                        out[row * grid + col, c * patch * patch + p1 * patch + p2] = latent[
                            c, row * patch + p1, col * patch + p2
                        ]
    return out


def ref_untokens(out: np.ndarray, patch: int, channels: int, keep: int) -> np.ndarray:
    """(T, p·p·channels) ordered (p1, p2, c) → (keep, H, W), by loops."""
    grid = math.isqrt(out.shape[0])
    image = np.zeros((keep, grid * patch, grid * patch))
    for row in range(grid):
        for col in range(grid):
            for p1 in range(patch):
                for p2 in range(patch):
                    for c in range(keep):
                        image[c, row * patch + p1, col * patch + p2] = out[
                            row * grid + col, (p1 * patch + p2) * channels + c
                        ]
    return image


def ref_pos_embed(dim: int, grid: int) -> np.ndarray:
    quarter = dim // 4
    rows = []
    for token in range(grid * grid):
        row, col = divmod(token, grid)
        feats = []
        for pos in (col, row):  # first half encodes the column, second half the row
            feats += [math.sin(pos * 10000 ** (-k / quarter)) for k in range(quarter)]
            feats += [math.cos(pos * 10000 ** (-k / quarter)) for k in range(quarter)]
        rows.append(feats)
    return np.array(rows)


def ref_time_features(t: float) -> np.ndarray:
    f = [math.exp(-math.log(10000) * k / 128) for k in range(128)]
    return np.array([math.cos(t * fk) for fk in f] + [math.sin(t * fk) for fk in f])


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def layer_norm(x: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def linear(sd: dict, name: str, x: np.ndarray) -> np.ndarray:
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def ref_block(sd: dict, prefix: str, x: np.ndarray, c: np.ndarray, heads: int) -> np.ndarray:
    """One adaLN-Zero block for one sample: x (T, D), c (T, D) per token."""
    mod = linear(sd, f"{prefix}.adaLN_modulation.1", silu(c))
    d = x.shape[1]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        mod[:, i * d : (i + 1) * d] for i in range(6)
    )
    h = layer_norm(x) * (1 + scale_msa) + shift_msa
    qkv = linear(sd, f"{prefix}.attn.qkv", h)
    hd = d // heads
    attn_out = np.zeros_like(x)
    for head in range(heads):
        q = qkv[:, 0 * d + head * hd : 0 * d + (head + 1) * hd]
        k = qkv[:, 1 * d + head * hd : 1 * d + (head + 1) * hd]
        v = qkv[:, 2 * d + head * hd : 2 * d + (head + 1) * hd]
        logits = q @ k.T / math.sqrt(hd)
        weights = np.exp(logits - logits.max(1, keepdims=True))
        weights /= weights.sum(1, keepdims=True)
        attn_out[:, head * hd : (head + 1) * hd] = weights @ v
    x = x + gate_msa * linear(sd, f"{prefix}.attn.proj", attn_out)
    h = layer_norm(x) * (1 + scale_mlp) + shift_mlp
    x = x + gate_mlp * linear(
        sd, f"{prefix}.mlp.fc2", gelu_tanh(linear(sd, f"{prefix}.mlp.fc1", h))
    )
    return x


def ref_hidden_states(
    sd: dict,
    cfg: ModelConfig,
    latent: np.ndarray,
    t_net: np.ndarray,
    label: int,
    stop: int | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Outputs of blocks 1..stop (all by default) for one sample, and its conditioning c (T, D)."""
    x = ref_tokens(latent) @ sd["x_embedder.proj.weight"].T + sd["x_embedder.proj.bias"]
    x = x + sd["pos_embed"][0]
    temb = np.stack([ref_time_features(t) for t in t_net])
    temb = linear(sd, "t_embedder.mlp.2", silu(linear(sd, "t_embedder.mlp.0", temb)))
    c = temb + sd["y_embedder.embedding_table.weight"][label]
    states = []
    for i in range(cfg.depth if stop is None else stop):
        x = ref_block(sd, f"blocks.{i}", x, c, cfg.num_heads)
        states.append(x)
    return states, c


def ref_final(sd: dict, cfg: ModelConfig, x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Final layer on the last block's output: SiT-convention velocity (keep, H, W)."""
    mod = linear(sd, "final_layer.adaLN_modulation.1", silu(c))
    d = cfg.hidden_size
    shift, scale = mod[:, :d], mod[:, d:]
    out = linear(sd, "final_layer.linear", layer_norm(x) * (1 + scale) + shift)
    return ref_untokens(out, cfg.patch_size, cfg.out_channels, cfg.in_channels)


def ref_projector(sd: dict, h: np.ndarray) -> np.ndarray:
    """The self-distillation head: Linear → SiLU → Linear."""
    return linear(sd, "projector.linear2", silu(linear(sd, "projector.linear1", h)))


def ref_forward(
    sd: dict, cfg: ModelConfig, latent: np.ndarray, t_net: np.ndarray, label: int
) -> np.ndarray:
    """SiT-convention velocity for one sample; t_net holds one network time per token."""
    states, c = ref_hidden_states(sd, cfg, latent, t_net, label)
    return ref_final(sd, cfg, states[-1], c)


def numpy_state(model: SelfFlowDiT) -> dict:
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------


def test_xl2_state_dict_matches_released_keys_and_shapes():
    with torch.device("meta"):
        model = SelfFlowDiT(ModelConfig.xl_2())
    sd = model.state_dict()
    assert len(sd) == 296
    assert sum(v.numel() for v in sd.values()) == 680_441_504
    expected = {
        "pos_embed": (1, 256, 1152),
        "x_embedder.proj.weight": (1152, 16),
        "t_embedder.mlp.0.weight": (1152, 256),
        "t_embedder.mlp.2.weight": (1152, 1152),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "blocks.27.attn.qkv.weight": (3456, 1152),
        "blocks.27.attn.proj.bias": (1152,),
        "blocks.27.mlp.fc1.weight": (4608, 1152),
        "blocks.27.mlp.fc2.weight": (1152, 4608),
        "blocks.27.adaLN_modulation.1.weight": (6912, 1152),
        "final_layer.linear.weight": (32, 1152),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
        "projector.linear1.weight": (2304, 1152),
        "projector.linear2.weight": (1152, 2304),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key


def test_fresh_pos_embed_follows_facts_formula():
    cfg = ModelConfig(input_size=8, hidden_size=32, depth=1, num_heads=2, projector_dim=8)
    model = SelfFlowDiT(cfg)
    np.testing.assert_allclose(model.pos_embed[0].double().numpy(), ref_pos_embed(32, 4), atol=1e-6)


def test_forward_matches_float64_reference_per_sample(tiny_model):
    model = tiny_model.double()
    cfg = model.config
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    tau = torch.tensor([0.9, 0.35, 0.0], dtype=torch.float64)
    y = torch.tensor([5, 999, NULL_CLASS])
    with torch.no_grad():
        got = model(x, tau, y).numpy()
    sd = numpy_state(model)
    for i in range(3):
        t_net = np.full(cfg.num_tokens, 1.0 - tau[i].item())
        want = -ref_forward(sd, cfg, x[i].numpy(), t_net, int(y[i]))  # paper velocity = −v
        np.testing.assert_allclose(got[i], want, rtol=1e-9, atol=1e-10)


def test_forward_matches_float64_reference_per_token(tiny_model):
    model = tiny_model.double()
    cfg = model.config
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    tau = torch.rand(2, cfg.num_tokens, generator=gen, dtype=torch.float64)
    y = torch.tensor([17, 1])
    with torch.no_grad():
        got = model(x, tau, y).numpy()
    sd = numpy_state(model)
    for i in range(2):
        want = -ref_forward(sd, cfg, x[i].numpy(), 1.0 - tau[i].numpy(), int(y[i]))
        np.testing.assert_allclose(got[i], want, rtol=1e-9, atol=1e-10)


def test_patch_layout_round_trip_by_loops():
    from selfflow.model.network import patchify, unpatchify

    latent = torch.arange(4 * 8 * 8, dtype=torch.float64).reshape(1, 4, 8, 8)
    np.testing.assert_array_equal(patchify(latent, 2)[0].numpy(), ref_tokens(latent[0].numpy()))
    # A final-layer output whose value encodes its own (token, p1, p2, c) position.
    out = torch.arange(16 * 32, dtype=torch.float64).reshape(1, 16, 32)
    np.testing.assert_array_equal(
        unpatchify(out, 2, 8, 4)[0].numpy(), ref_untokens(out[0].numpy(), 2, 8, 4)
    )


def test_per_token_equal_times_match_per_sample_float32(tiny_model):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 4, 8, 8, generator=gen)
    tau = torch.rand(4, generator=gen)
    y = torch.tensor([0, 10, 500, NULL_CLASS])
    with torch.no_grad():
        per_sample = tiny_model(x, tau, y)
        per_token = tiny_model(x, tau[:, None].expand(4, tiny_model.config.num_tokens), y)
    rel = (per_token - per_sample).norm() / per_sample.norm()
    assert rel < 1e-6


def test_per_token_times_change_only_through_conditioning(tiny_model):
    """Different per-token times must actually change the output (the path is live)."""
    x = torch.randn(1, 4, 8, 8)
    tau = torch.full((1, 16), 0.5)
    tau2 = tau.clone()
    tau2[0, 3] = 0.9
    y = torch.tensor([3])
    with torch.no_grad():
        assert not torch.allclose(tiny_model(x, tau, y), tiny_model(x, tau2, y))


@pytest.mark.parametrize(
    ("x_shape", "t_shape", "y", "match"),
    [
        ((2, 3, 8, 8), (2,), [1, 2], "x must have shape"),
        ((2, 4, 16, 16), (2,), [1, 2], "x must have shape"),
        ((2, 4, 8, 8), (3,), [1, 2], "t must have shape"),
        ((2, 4, 8, 8), (2, 15), [1, 2], "t must have shape"),
        ((2, 4, 8, 8), (2,), [1], "y must be int64"),
    ],
)
def test_bad_inputs_are_refused(tiny_model, x_shape, t_shape, y, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(torch.zeros(x_shape), torch.zeros(t_shape), torch.tensor(y))


def test_float_labels_are_refused(tiny_model):
    with pytest.raises(ValueError, match="int64"):
        tiny_model(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1))


def test_config_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(hidden_size=100, num_heads=16)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"hidden": 3})
