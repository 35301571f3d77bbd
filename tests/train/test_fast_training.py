"""The fast training forward pass against the float32 plain model, its reference twin.

The plain :class:`SelfFlowDiT` (per-token modulation for every token, float32, eager) is itself
held to an independent float64 re-computation in ``tests/test_model.py`` and
``tests/train/test_objective.py``; here the fast module is held to it on the same weights,
through the whole Self-Flow loss and its gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from selfflow.base.errors import ConfigurationError
from selfflow.model.network import NULL_CLASS, ModelConfig, SelfFlowDiT
from selfflow.train import (
    FastTrainingDiT,
    dual_timesteps,
    self_flow_loss,
    split_times,
    straightforward_loss,
    train_step_flops,
    training_optimizer,
)
from tests.conftest import randomize_

CONFIG = ModelConfig(input_size=8, hidden_size=64, depth=4, num_heads=4, projector_dim=96)
LAYERS = dict(student_layer=2, teacher_layer=3)


def pair(seed: int = 1) -> tuple[SelfFlowDiT, SelfFlowDiT]:
    """Plain student and a different plain teacher (every layer live)."""
    student = randomize_(SelfFlowDiT(CONFIG), seed=seed)
    teacher = randomize_(SelfFlowDiT(CONFIG), seed=seed + 100).requires_grad_(False)
    return student, teacher


def data(size: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(size, 4, 8, 8, generator=gen)
    noise = torch.randn(size, 4, 8, 8, generator=gen)
    y = torch.randint(1000, (size,), generator=gen)
    y[0] = NULL_CLASS
    tau, tau_teacher = dual_timesteps(size, CONFIG.num_tokens, mask_ratio=0.25, generator=gen)
    return x0, y, dict(noise=noise, tau=tau, tau_teacher=tau_teacher)


def loss_and_grads(student, teacher, x0, y, kwargs, rep_weight=0.8):
    student.zero_grad(set_to_none=True)
    loss, parts = self_flow_loss(student, teacher, x0, y, rep_weight=rep_weight, **kwargs, **LAYERS)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return loss.detach(), parts, grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("rep_weight", [0.8, 0.0])
def test_float32_fast_loss_and_gradients_match_the_plain_model(rep_weight):
    student, teacher = pair()
    fast_student = FastTrainingDiT.from_model(student, dtype=torch.float32)
    fast_teacher = FastTrainingDiT.from_model(teacher, dtype=torch.float32)
    x0, y, kwargs = data()
    want, want_parts, want_grads = loss_and_grads(student, teacher, x0, y, kwargs, rep_weight)
    got, got_parts, got_grads = loss_and_grads(
        fast_student, fast_teacher, x0, y, kwargs, rep_weight
    )
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for key in ("flow", "rep"):
        assert got_parts[key].item() == pytest.approx(want_parts[key].item(), rel=1e-5, abs=1e-7)
    assert got_grads.keys() == want_grads.keys()
    assert ("projector.linear1.weight" in want_grads) == (rep_weight > 0)
    for name, grad in want_grads.items():
        assert rel(got_grads[name], grad) < 1e-5, name
    assert all(p.grad is None for p in fast_teacher.parameters())


def test_bf16_autocast_fast_step_is_within_bf16_rounding_of_float32():
    """bf16 matmuls and attention (8 significant bits): per-cent agreement, not more."""
    student, teacher = pair(seed=2)
    fast_student = FastTrainingDiT.from_model(student, dtype=torch.bfloat16)
    fast_teacher = FastTrainingDiT.from_model(teacher, dtype=torch.bfloat16)
    x0, y, kwargs = data(seed=3)
    want, want_parts, want_grads = loss_and_grads(student, teacher, x0, y, kwargs)
    got, got_parts, got_grads = loss_and_grads(fast_student, fast_teacher, x0, y, kwargs)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=2e-2)
    assert got_parts["rep"].item() == pytest.approx(want_parts["rep"].item(), rel=5e-2)
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])  # noqa: E731
    assert rel(flat(got_grads), flat(want_grads)) < 5e-2
    # ...and it does run in bf16: the same module in float32 is much closer
    exact = FastTrainingDiT.from_model(student, dtype=torch.float32)
    exact_teacher = FastTrainingDiT.from_model(teacher, dtype=torch.float32)
    exact_loss, _, _ = loss_and_grads(exact, exact_teacher, x0, y, kwargs)
    assert abs(exact_loss - want) < abs(got - want)


def test_follows_the_callers_autocast_by_default():
    student, teacher = pair(seed=3)
    fast = FastTrainingDiT.from_model(student)
    x0, y, kwargs = data(seed=4)
    with torch.no_grad():
        plain = student(x0, kwargs["tau"], y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fast(x0, kwargs["tau"], y)
        full = fast(x0, kwargs["tau"], y)
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert rel(full, plain) < 1e-5 < rel(low.float(), plain) < 5e-2


def test_outputs_match_for_every_call_form():
    student, _ = pair(seed=4)
    fast = FastTrainingDiT.from_model(student, dtype=torch.float32)
    x0, y, kwargs = data(seed=5)
    tau, tau_teacher = kwargs["tau"], kwargs["tau_teacher"]
    one_time = tau[:, :1].expand(-1, CONFIG.num_tokens).contiguous()  # no token masked
    with torch.no_grad():
        for args, options in [
            ((x0, tau, y), {}),
            ((x0, one_time, y), {}),
            ((x0, tau_teacher, y), {}),
            ((x0, tau, y), {"project_layer": 1}),
            ((x0, tau, y), {"hidden_layer": 4}),
            ((x0, tau_teacher, y), {"hidden_layer": 2}),
        ]:
            want, got = student(*args, **options), fast(*args, **options)
            for w, g in zip(
                want if isinstance(want, tuple) else (want,),
                got if isinstance(got, tuple) else (got,),
                strict=True,
            ):
                assert rel(g, w) < 1e-5, options
        for t in (1 - tau, 1 - tau_teacher):  # the inherited SiT-convention call, any times
            assert rel(fast.forward_sit(x0, t, y), student.forward_sit(x0, t, y)) < 1e-5


def test_every_block_is_called_and_the_teacher_stops_at_its_layer():
    """FSDP2 gathers a block's shards in the block's own hooks: the fast path must call them."""
    fast = FastTrainingDiT.from_model(pair()[0], dtype=torch.float32)
    ran = []
    for i, block in enumerate(fast.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
    x0, y, kwargs = data()
    with torch.no_grad():
        fast(x0, kwargs["tau"], y, project_layer=2)
        assert ran == [0, 1, 2, 3]
        ran.clear()
        fast(x0, kwargs["tau_teacher"], y, hidden_layer=3)
        assert ran == [0, 1, 2]


def test_same_parameters_and_state_dict_as_the_model():
    student, _ = pair()
    fast = FastTrainingDiT(CONFIG)
    assert list(fast.state_dict()) == list(student.state_dict())
    fast.load_state_dict(student.state_dict(), strict=True)
    plain = SelfFlowDiT(CONFIG)
    plain.load_state_dict(fast.state_dict(), strict=True)
    ema = copy.deepcopy(fast)  # the trainer's EMA is a deep copy
    assert isinstance(ema, FastTrainingDiT) and isinstance(ema, SelfFlowDiT)
    copied = FastTrainingDiT.from_model(student.requires_grad_(False).eval())
    assert not any(p.requires_grad for p in copied.parameters()) and not copied.training
    for a, b in zip(copied.parameters(), student.parameters(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_split_times_detects_the_two_times_and_refuses_a_third():
    tau = torch.tensor([[0.2, 0.7, 0.2, 0.7], [0.5, 0.5, 0.5, 0.5]])
    times, select = split_times(tau)
    torch.testing.assert_close(times, torch.tensor([[0.2, 0.7], [0.5, 0.5]]))
    rebuilt = torch.where(select[..., 0], times[:, 1:], times[:, :1])
    assert torch.equal(rebuilt, tau)
    times, select = split_times(torch.tensor([0.3, 0.9]))
    assert select is None and times.shape == (2, 1)
    with pytest.raises(ConfigurationError, match="at most two times"):
        split_times(torch.tensor([[0.1, 0.2, 0.3, 0.1]]))
    fast = FastTrainingDiT(CONFIG)
    with pytest.raises(ConfigurationError, match="SelfFlowDiT for arbitrary per-token times"):
        fast(torch.zeros(1, 4, 8, 8), torch.rand(1, 16), torch.tensor([1]))


def test_bad_layers_and_dtype_are_refused():
    fast = FastTrainingDiT(CONFIG)
    x, tau, y = torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.tensor([1])
    with pytest.raises(ValueError, match="not both"):
        fast(x, tau, y, project_layer=1, hidden_layer=1)
    with pytest.raises(ValueError, match=r"1\.\.4"):
        fast(x, tau, y, hidden_layer=5)
    with pytest.raises(ConfigurationError, match="dtype"):
        FastTrainingDiT(CONFIG, dtype=torch.int8)


def test_training_optimizer_uses_the_recipe_and_fuses_only_on_cuda():
    params = list(pair()[0].parameters())
    opt = training_optimizer(params)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        1e-4,
        (0.9, 0.999),
        1e-8,
        0.0,
    )
    assert not group["fused"]


def counted_step_flops(
    cfg: ModelConfig, fast: bool, student_layer: int = 8, teacher_layer: int = 20
) -> float:
    """FLOPs of one loss + backward per image, counted by PyTorch on weightless (meta) models:
    the fast modules through ``self_flow_loss``, or plain ones the straightforward way. (The
    B/2 figures of docs/performance.md are this at layers 4 and 8.)"""
    cls, loss_fn = (
        (FastTrainingDiT, self_flow_loss) if fast else (SelfFlowDiT, straightforward_loss)
    )
    with torch.device("meta"):
        student, teacher = cls(cfg), cls(cfg).requires_grad_(False)
        b, n, c = 2, cfg.input_size, cfg.in_channels
        x0, noise = torch.randn(b, c, n, n), torch.randn(b, c, n, n)
        with FlopCounterMode(display=False) as counter:
            loss, _ = loss_fn(
                student,
                teacher,
                x0,
                torch.zeros(b, dtype=torch.long),
                noise=noise,
                tau=torch.rand(b, cfg.num_tokens),
                tau_teacher=torch.rand(b),
                student_layer=student_layer,
                teacher_layer=teacher_layer,
            )
            loss.backward()
    return counter.get_total_flops() / b


def test_straightforward_loss_is_the_same_loss():
    """The benchmark's baseline computes the same numbers, so its speed-up compares like with like."""
    student, teacher = pair(seed=5)
    x0, y, kwargs = data(seed=6)
    want, want_parts, want_grads = loss_and_grads(student, teacher, x0, y, kwargs)
    student.zero_grad(set_to_none=True)
    got, parts = straightforward_loss(student, teacher, x0, y, **kwargs, **LAYERS)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert parts["rep"].item() == pytest.approx(want_parts["rep"].item(), rel=1e-6)
    for name, param in student.named_parameters():
        assert rel(param.grad, want_grads[name]) < 1e-6, name


def test_train_step_flops_agree_with_pytorchs_count_and_the_saving_is_real():
    xl = ModelConfig.xl_2()
    counted = counted_step_flops(xl, fast=True)
    assert counted == pytest.approx(train_step_flops(xl, teacher_layer=20), rel=5e-3)
    assert 870e9 < counted < 900e9
    # per-token adaLN in the student and a full per-token teacher: ≈ 1.6 × the useful work
    straightforward = counted_step_flops(xl, fast=False)
    assert 1.5 < straightforward / counted < 1.7
    assert train_step_flops(xl, rep_weight=0) == pytest.approx(counted * 0.79, rel=0.02)


def test_ddp_wrapped_fast_student_gives_the_same_loss_and_gradients(tmp_path):
    """The objective calls a DDP-wrapped student with the model's keywords; every parameter the
    step uses gets its gradient (DDP would stop at the next step otherwise)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        student, teacher = pair(seed=7)
        fast_teacher = FastTrainingDiT.from_model(teacher, dtype=torch.float32)
        plain = FastTrainingDiT.from_model(student, dtype=torch.float32)
        wrapped = DistributedDataParallel(FastTrainingDiT.from_model(student, dtype=torch.float32))
        for seed in (8, 9):  # two steps: DDP checks the previous step's reduction on the next
            x0, y, kwargs = data(seed=seed)
            want, _, want_grads = loss_and_grads(plain, fast_teacher, x0, y, kwargs)
            wrapped.zero_grad(set_to_none=True)
            got, _ = self_flow_loss(wrapped, fast_teacher, x0, y, **kwargs, **LAYERS)
            got.backward()
            assert got.item() == pytest.approx(want.item(), rel=1e-6)
            for name, param in wrapped.module.named_parameters():
                assert rel(param.grad, want_grads[name]) < 1e-6, name
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module:UserWarning")
def test_fsdp2_sharded_fast_student_gives_the_same_loss_and_gradients(tmp_path):
    """``fully_shard`` per block and at the root, as the trainer's ``--fsdp`` does: each block's
    hooks gather its weights only if the fast forward calls the block module itself."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        student, teacher = pair(seed=7)
        fast_teacher = FastTrainingDiT.from_model(teacher, dtype=torch.float32)
        plain = FastTrainingDiT.from_model(student, dtype=torch.float32)
        sharded = FastTrainingDiT.from_model(student, dtype=torch.float32)
        for block in sharded.blocks:
            fully_shard(block)
        fully_shard(sharded)
        for seed in (8, 9):
            x0, y, kwargs = data(seed=seed)
            want, _, want_grads = loss_and_grads(plain, fast_teacher, x0, y, kwargs)
            sharded.zero_grad(set_to_none=True)
            got, _ = self_flow_loss(sharded, fast_teacher, x0, y, **kwargs, **LAYERS)
            got.backward()
            assert got.item() == pytest.approx(want.item(), rel=1e-6)
            for name, param in sharded.named_parameters():
                assert rel(param.grad.full_tensor(), want_grads[name]) < 1e-6, name
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_fast_path_matches_the_plain_model():
    """torch.compile of the block function (the CUDA default), here on the CPU in float32:
    one graph for every block, with gradients, and the teacher's no-grad per-sample variant."""
    from torch._dynamo.utils import counters

    student, teacher = pair(seed=8)
    fast_student = FastTrainingDiT.from_model(student, dtype=torch.float32, compile=True)
    fast_teacher = FastTrainingDiT.from_model(teacher, dtype=torch.float32, compile=True)
    x0, y, kwargs = data(seed=10)
    want, _, want_grads = loss_and_grads(student, teacher, x0, y, kwargs)
    torch._dynamo.reset()  # nothing compiled by earlier tests counts
    counters.clear()
    got, _, got_grads = loss_and_grads(fast_student, fast_teacher, x0, y, kwargs)
    # the student's 4 blocks and the teacher's 3 run two graphs: the block function's weights
    # are its arguments (a graph per block would also hit dynamo's recompile limit of 8)
    assert counters["stats"]["unique_graphs"] == 2
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for name, grad in want_grads.items():
        assert rel(got_grads[name], grad) < 1e-5, name


def test_fast_forward_matches_the_plain_model_at_xl2_width():
    """XL/2's block (1152 wide, 16 heads of 72, 256 tokens, projector 2304), one deep, float32."""
    cfg = ModelConfig(depth=1)
    plain = randomize_(SelfFlowDiT(cfg), seed=12)
    fast = FastTrainingDiT.from_model(plain, dtype=torch.float32)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 4, 32, 32, generator=gen)
    tau, tau_teacher = dual_timesteps(2, cfg.num_tokens, generator=gen)
    y = torch.tensor([207, NULL_CLASS])
    with torch.no_grad():
        want_v, want_f = plain(x, tau, y, project_layer=1)
        got_v, got_f = fast(x, tau, y, project_layer=1)
        want_h = plain(x, tau_teacher, y, hidden_layer=1)
        got_h = fast(x, tau_teacher, y, hidden_layer=1)
    assert rel(got_v, want_v) < 1e-5 and rel(got_f, want_f) < 1e-5 and rel(got_h, want_h) < 1e-5
