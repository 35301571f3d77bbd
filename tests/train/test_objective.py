"""The Self-Flow objective against an independent float64 re-computation of the paper's recipe.

The reference re-states the recipe: the noised latent by explicit loops over tokens and their
2 × 2 patches, the network block by block in float64 numpy (the reference of
``tests/test_model.py``, which never calls selfflow's layers), the cosine by hand. It shares
with the package only the random inputs and the weights.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from selfflow.model.network import NULL_CLASS, ModelConfig, SelfFlowDiT
from selfflow.sampling.pipeline import SamplerSettings, SelfFlowPipeline
from selfflow.train import dual_timesteps, noised_input, self_flow_loss
from tests.conftest import randomize_
from tests.test_model import numpy_state, ref_final, ref_hidden_states, ref_projector

# ----------------------------------------------------------------------------------------------
# Reference maths, float64 numpy


def ref_noised(x0: np.ndarray, noise: np.ndarray, tau: np.ndarray, patch: int) -> np.ndarray:
    """One sample: x0, noise (C, H, W), tau (T,) per token; loops over tokens and pixels."""
    channels, h, w = x0.shape
    grid_w = w // patch
    out = np.full_like(x0, np.nan)
    for token, time_ in enumerate(tau):
        row, col = divmod(token, grid_w)
        for c in range(channels):
            for p1 in range(patch):
                for p2 in range(patch):
                    i, j = row * patch + p1, col * patch + p2
                    out[c, i, j] = (1 - time_) * x0[c, i, j] + time_ * noise[c, i, j]
    assert not np.isnan(out).any()
    return out


def ref_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (math.sqrt(np.dot(a, a)) * math.sqrt(np.dot(b, b))))


def ref_self_flow_loss(
    student: dict,
    teacher: dict,
    cfg: ModelConfig,
    x0: np.ndarray,
    noise: np.ndarray,
    labels: list[int],
    tau: np.ndarray,
    tau_teacher: np.ndarray,
    *,
    rep_weight: float,
    student_layer: int,
    teacher_layer: int,
) -> tuple[float, float, float]:
    """(loss, flow, rep) of a batch, written from the paper's recipe (τ = 1 noise)."""
    squared_errors, one_minus_cos = [], []
    for b, label in enumerate(labels):
        x_tau = ref_noised(x0[b], noise[b], tau[b], cfg.patch_size)
        # The network speaks SiT time t = 1 − τ and predicts x0 − ε; the paper's target is ε − x0.
        states, c = ref_hidden_states(student, cfg, x_tau, 1.0 - tau[b], label)
        prediction = -ref_final(student, cfg, states[-1], c)
        squared_errors.append(((prediction - (noise[b] - x0[b])) ** 2).ravel())
        if rep_weight == 0:
            continue
        features = ref_projector(student, states[student_layer - 1])
        every_token = np.full(cfg.num_tokens, tau_teacher[b])
        x_teacher = ref_noised(x0[b], noise[b], every_token, cfg.patch_size)
        teacher_states, _ = ref_hidden_states(
            teacher, cfg, x_teacher, 1.0 - every_token, label, stop=teacher_layer
        )
        target = teacher_states[teacher_layer - 1]
        one_minus_cos += [1 - ref_cosine(features[k], target[k]) for k in range(cfg.num_tokens)]
    flow = float(np.concatenate(squared_errors).mean())
    rep = float(np.mean(one_minus_cos)) if one_minus_cos else 0.0
    return flow + rep_weight * rep, flow, rep


def random_pair(cfg: ModelConfig, dtype=torch.float64) -> tuple[SelfFlowDiT, SelfFlowDiT]:
    """A student and a teacher with different random weights (every layer live)."""
    student = randomize_(SelfFlowDiT(cfg), seed=11).to(dtype)
    teacher = randomize_(SelfFlowDiT(cfg), seed=12).to(dtype)
    return student, teacher


def batch(cfg: ModelConfig, size: int, seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    shape = (size, cfg.in_channels, cfg.input_size, cfg.input_size)
    x0 = torch.randn(shape, generator=gen, dtype=dtype)
    noise = torch.randn(shape, generator=gen, dtype=dtype)
    labels = torch.randint(cfg.num_classes, (size,), generator=gen)
    labels[-1] = cfg.null_class  # a dropped label
    tau, tau_teacher = dual_timesteps(size, cfg.num_tokens, mask_ratio=0.25, generator=gen)
    return x0, noise, labels, tau.to(dtype), tau_teacher.to(dtype)


def check_against_reference(cfg: ModelConfig, size: int, student_layer: int, teacher_layer: int):
    student, teacher = random_pair(cfg)
    x0, noise, labels, tau, tau_teacher = batch(cfg, size, seed=5)
    assert len(set(tau[0].tolist())) == 2, "the batch should mix two times in a sample"
    kwargs = dict(rep_weight=0.8, student_layer=student_layer, teacher_layer=teacher_layer)
    loss, parts = self_flow_loss(
        student, teacher, x0, labels, noise=noise, tau=tau, tau_teacher=tau_teacher, **kwargs
    )
    want_loss, want_flow, want_rep = ref_self_flow_loss(
        numpy_state(student),
        numpy_state(teacher),
        cfg,
        x0.numpy(),
        noise.numpy(),
        labels.tolist(),
        tau.numpy(),
        tau_teacher.numpy(),
        **kwargs,
    )
    assert parts["flow"].item() == pytest.approx(want_flow, rel=1e-9)
    assert parts["rep"].item() == pytest.approx(want_rep, rel=1e-9)
    assert loss.item() == pytest.approx(want_loss, rel=1e-9)
    assert want_rep > 1e-3, "features of different networks should not already agree"


# ----------------------------------------------------------------------------------------------
# The loss


def test_loss_matches_float64_reference_with_the_papers_layers():
    """Depth 28 at toy width: the default layers 8 and 20 are blocks[7] and blocks[19]."""
    cfg = ModelConfig(input_size=8, hidden_size=32, depth=28, num_heads=2, projector_dim=48)
    check_against_reference(cfg, size=2, student_layer=8, teacher_layer=20)


def test_loss_matches_float64_reference_on_tiny_model(tiny_config):
    check_against_reference(tiny_config, size=3, student_layer=1, teacher_layer=2)


@pytest.mark.slow
def test_loss_matches_float64_reference_at_xl2_width():
    """XL/2's tensors (1152 wide, 16 heads, 256 tokens of 2 × 2 × 4, 1001 labels, projector 2304)
    at depth 4 rather than 28, so that two float64 passes fit a CPU test."""
    cfg = ModelConfig(depth=4)
    assert (cfg.num_tokens, cfg.hidden_size, cfg.num_heads) == (256, 1152, 16)
    check_against_reference(cfg, size=1, student_layer=2, teacher_layer=3)


def test_default_layers_are_the_papers():
    """Called without layers, the loss asks the networks for blocks 8 and 20."""
    calls = {}

    class Recorder(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x, tau, y, **kwargs):
            calls[self.name] = kwargs
            b, t = x.shape[0], 16
            if "hidden_layer" in kwargs:
                return torch.ones(b, t, 8)
            return torch.zeros_like(x, requires_grad=True), torch.ones(b, t, 8)

    x0 = torch.randn(2, 4, 8, 8)
    tau, tau_teacher = dual_timesteps(2, 16)
    self_flow_loss(
        Recorder("student"),
        Recorder("teacher"),
        x0,
        torch.tensor([1, 2]),
        noise=torch.randn_like(x0),
        tau=tau,
        tau_teacher=tau_teacher,
    )
    assert calls == {"student": {"project_layer": 8}, "teacher": {"hidden_layer": 20}}


def test_teacher_gets_no_gradient_and_student_gradients_reach_projector_and_blocks(tiny_model):
    student = tiny_model
    teacher = randomize_(SelfFlowDiT(tiny_model.config), seed=3)
    x0, noise, labels, tau, tau_teacher = batch(tiny_model.config, 2, seed=1, dtype=torch.float32)
    loss, parts = self_flow_loss(
        student,
        teacher,
        x0,
        labels,
        noise=noise,
        tau=tau,
        tau_teacher=tau_teacher,
        student_layer=1,
        teacher_layer=2,
    )
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    for name, param in student.named_parameters():
        if name.startswith(("projector.", "blocks.0.", "blocks.1.", "final_layer.")):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert not parts["flow"].requires_grad and not parts["rep"].requires_grad


def test_rep_weight_zero_never_calls_the_teacher_nor_the_projector(tiny_model):
    class Forbidden(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("the teacher must not run when rep_weight is 0")

    x0, noise, labels, tau, tau_teacher = batch(tiny_model.config, 2, seed=2, dtype=torch.float32)
    loss, parts = self_flow_loss(
        tiny_model,
        Forbidden(),
        x0,
        labels,
        noise=noise,
        tau=tau,
        tau_teacher=tau_teacher,
        rep_weight=0,
    )
    loss.backward()
    assert parts["rep"].item() == 0.0
    assert loss.item() == parts["flow"].item()
    assert all(p.grad is None for p in tiny_model.projector.parameters())


def test_mask_ratio_zero_and_rep_weight_zero_is_plain_flow_matching(tiny_model):
    """SiT's objective: one t per sample, x_t = (1 − t)·x0 + t·ε, MSE against ε − x0."""
    model = tiny_model.double()
    cfg = model.config
    gen = torch.Generator().manual_seed(9)
    x0 = torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64)
    labels = torch.tensor([3, 7, 900, NULL_CLASS])
    tau, tau_teacher = dual_timesteps(4, cfg.num_tokens, mask_ratio=0.0, generator=gen)
    tau = tau.double()
    assert (tau == tau[:, :1]).all()
    loss, parts = self_flow_loss(
        model, None, x0, labels, noise=noise, tau=tau, tau_teacher=tau_teacher, rep_weight=0.0
    )
    t = tau[:, 0].reshape(4, 1, 1, 1)
    with torch.no_grad():
        direct = model((1 - t) * x0 + t * noise, tau[:, 0], labels)
    want = ((direct - (noise - x0)) ** 2).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)


def test_noised_input_spreads_each_token_time_over_its_patch():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 6, 4, generator=gen, dtype=torch.float64)  # 3 × 2 grid of 2 × 2
    noise = torch.randn(2, 3, 6, 4, generator=gen, dtype=torch.float64)
    tau = torch.rand(2, 6, generator=gen, dtype=torch.float64)
    got = noised_input(x0, noise, tau, 2).numpy()
    for b in range(2):
        want = ref_noised(x0[b].numpy(), noise[b].numpy(), tau[b].numpy(), 2)
        np.testing.assert_allclose(got[b], want, rtol=0, atol=1e-15)
    per_sample = noised_input(x0, noise, tau[:, 0], 2)
    expanded = noised_input(x0, noise, tau[:, :1].expand(2, 6), 2)
    torch.testing.assert_close(per_sample, expanded, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rep_weight=-1.0), "rep_weight"),
        (dict(rep_weight=float("nan")), "rep_weight"),
        (dict(rep_weight=True), "rep_weight"),
        (dict(tau=torch.rand(2, 15)), "does not tile"),
        (dict(tau_teacher=torch.rand(2, 16)), "tau_teacher"),
        (dict(noise=torch.randn(2, 4, 8, 6)), "one shape"),
    ],
)
def test_bad_arguments_are_refused(tiny_model, kwargs, match):
    x0 = torch.randn(2, 4, 8, 8)
    args = dict(noise=torch.randn(2, 4, 8, 8), tau=torch.rand(2, 16), tau_teacher=torch.rand(2))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        self_flow_loss(
            tiny_model,
            tiny_model,
            x0,
            torch.tensor([1, 2]),
            student_layer=1,
            teacher_layer=2,
            **args,
        )


# ----------------------------------------------------------------------------------------------
# Dual-timestep scheduling

DRAWS, TOKENS = 4000, 64


def redraw(seed: int, size: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t, s, u in the documented order from a fresh generator with the same seed."""
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.rand(size, generator=gen),
        torch.rand(size, generator=gen),
        torch.rand(size, tokens, generator=gen),
    )


def max_ks_statistic(tau: torch.Tensor) -> float:
    """Largest Kolmogorov–Smirnov distance to U(0, 1) over the token positions (columns)."""
    return max(stats.kstest(tau[:, k].numpy(), "uniform").statistic for k in range(tau.shape[1]))


def ks_threshold(n: int, tests: int, alpha: float = 1e-3) -> float:
    """The KS critical distance at level alpha / tests (Bonferroni over the token positions)."""
    return stats.kstwo.ppf(1 - alpha / tests, n)


def test_dual_timesteps_follow_the_documented_draws():
    gen = torch.Generator().manual_seed(21)
    tau, tau_teacher = dual_timesteps(DRAWS, TOKENS, mask_ratio=0.25, generator=gen)
    t, s, u = redraw(21, DRAWS, TOKENS)
    masked = u < 0.25
    torch.testing.assert_close(tau, torch.where(masked, s[:, None], t[:, None]), rtol=0, atol=0)
    torch.testing.assert_close(tau_teacher, torch.minimum(t, s), rtol=0, atol=0)
    assert (t > s).float().mean().item() == pytest.approx(0.5, abs=0.05)  # not sorted
    # masked share ≈ 0.25: five binomial standard deviations over all tokens
    n = DRAWS * TOKENS
    share = (tau == s[:, None]).float().mean().item()
    assert abs(share - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)
    # a Bernoulli mask: the number of masked tokens varies from sample to sample
    counts = masked.sum(1).float()
    assert counts.var().item() == pytest.approx(TOKENS * 0.25 * 0.75, rel=0.15)


def test_every_tokens_marginal_time_is_uniform_and_sorted_times_would_fail():
    gen = torch.Generator().manual_seed(22)
    tau, _ = dual_timesteps(DRAWS, TOKENS, mask_ratio=0.25, generator=gen)
    threshold = ks_threshold(DRAWS, TOKENS)
    assert max_ks_statistic(tau) < threshold
    # The same draws with (t, s) sorted (masked tokens always at the noisier time) are not
    # uniform per token: the test can tell.
    t, s, u = redraw(22, DRAWS, TOKENS)
    low, high = torch.minimum(t, s), torch.maximum(t, s)
    sorted_tau = torch.where(u < 0.25, high[:, None], low[:, None])
    assert max_ks_statistic(sorted_tau) > 2 * threshold


def test_mask_ratio_extremes_and_devices():
    gen = torch.Generator().manual_seed(3)
    tau, tau_teacher = dual_timesteps(50, 16, mask_ratio=0.0, generator=gen)
    t, s, _ = redraw(3, 50, 16)
    torch.testing.assert_close(tau, t[:, None].expand(50, 16), rtol=0, atol=0)
    torch.testing.assert_close(tau_teacher, torch.minimum(t, s), rtol=0, atol=0)
    tau, _ = dual_timesteps(50, 16, mask_ratio=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(tau, s[:, None].expand(50, 16), rtol=0, atol=0)
    tau, tau_teacher = dual_timesteps(2, 4, device="meta")
    assert tau.device.type == "meta" and tau_teacher.shape == (2,)
    for bad in (dict(mask_ratio=1.5), dict(mask_ratio=-0.1)):
        with pytest.raises(ValueError, match="mask_ratio"):
            dual_timesteps(2, 4, **bad)
    with pytest.raises(ValueError, match="batch_size"):
        dual_timesteps(0, 4)


# ----------------------------------------------------------------------------------------------
# The model's training outputs


def capture_blocks(model: SelfFlowDiT) -> tuple[list[torch.Tensor], list]:
    outputs, handles = [], []
    for block in model.blocks:
        handles.append(block.register_forward_hook(lambda m, i, o: outputs.append(o)))
    return outputs, handles


def test_hidden_layer_is_the_full_forwards_block_output_and_stops_there():
    cfg = ModelConfig(input_size=8, hidden_size=32, depth=5, num_heads=2, projector_dim=48)
    model = randomize_(SelfFlowDiT(cfg), seed=4)
    x, tau, y = torch.randn(2, 4, 8, 8), torch.rand(2, 16), torch.tensor([4, NULL_CLASS])
    outputs, handles = capture_blocks(model)
    with torch.no_grad():
        model(x, tau, y)
    for h in handles:
        h.remove()
    assert len(outputs) == 5
    ran = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
    model.final_layer.register_forward_pre_hook(lambda m, a: ran.append("final"))
    for layer in (1, 3, 5):
        ran.clear()
        with torch.no_grad():
            hidden = model(x, tau, y, hidden_layer=layer)
        torch.testing.assert_close(hidden, outputs[layer - 1], rtol=0, atol=0)
        assert ran == list(range(layer)), "blocks after the hidden layer must not run"
    with torch.no_grad():  # per-sample times too (the teacher's call)
        per_sample = model(x, tau[:, 0], y, hidden_layer=2)
        per_token = model(x, tau[:, :1].expand(2, 16), y, hidden_layer=2)
    torch.testing.assert_close(per_sample, per_token, rtol=1e-5, atol=1e-5)


def test_project_layer_returns_the_velocity_and_projected_block_output():
    cfg = ModelConfig(input_size=8, hidden_size=32, depth=3, num_heads=2, projector_dim=48)
    model = randomize_(SelfFlowDiT(cfg), seed=6)
    x, tau, y = torch.randn(2, 4, 8, 8), torch.rand(2, 16), torch.tensor([0, 9])
    outputs, _ = capture_blocks(model)
    with torch.no_grad():
        velocity, features = model(x, tau, y, project_layer=2)
        plain = model(x, tau, y)
    torch.testing.assert_close(velocity, plain, rtol=0, atol=0)
    torch.testing.assert_close(features, model.projector(outputs[1]), rtol=0, atol=0)
    assert features.shape == (2, 16, 32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(project_layer=1, hidden_layer=1), "not both"),
        (dict(hidden_layer=0), r"1\.\.2"),
        (dict(hidden_layer=3), r"1\.\.2"),
        (dict(project_layer=3), r"project_layer must be a block number in 1\.\.2"),
        (dict(project_layer=True), "block number"),
        (dict(hidden_layer=1.0), "block number"),
    ],
)
def test_bad_layers_are_refused(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.tensor([1]), **kwargs)


def test_null_class_is_the_last_label_row_and_guidance_uses_it():
    assert ModelConfig.xl_2().null_class == NULL_CLASS == 1000
    cfg = ModelConfig(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    model = randomize_(SelfFlowDiT(cfg), seed=0)
    assert cfg.null_class == 10 == model.y_embedder.embedding_table.num_embeddings - 1
    seen = []

    def network(x, tau, y):
        seen.append(y.clone())
        return model(x, tau, y)

    pipe = SelfFlowPipeline(model, model_fn=network)
    velocity = pipe.velocity_fn(torch.tensor([3]), SamplerSettings(cfg_scale=2.0))
    velocity(torch.randn(1, 4, 8, 8), torch.tensor([0.5]))
    assert sorted(torch.cat(seen).tolist()) == [3, 10]
