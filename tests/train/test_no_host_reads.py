"""The training step reads no value back to the host: checked on the CPU, operation by operation.

On a GPU, every read of a device value on the host (``.item()``, ``bool(t)``, ``float(t)``,
boolean-mask indexing, ``nonzero``, ...) makes the host wait for the queue to drain, and the
GPU then idles while Python prepares the next kernels. PyTorch's CUDA sync debug mode counts
them on a GPU (``benchmarks/train_throughput.py``); here a dispatch mode sees every aten
operation of :class:`~selfflow.train.step.TrainStep` (forward, backward, clipping, fused AdamW
as on CUDA, EMA) and fails on those that read values, wherever they are called from, Python or
C++. It also watches ``.tolist()``, ``.numpy()`` and ``.cpu()``, which need no aten operation on
the CPU. The one exception is the CPU's own refusal of a third time in ``split_times``: on
CUDA the same check is ``torch._assert_async``, which does not wait.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from selfflow.model.network import ModelConfig, SelfFlowDiT
from selfflow.train import FastTrainingDiT, training_optimizer
from selfflow.train.ema import make_ema
from selfflow.train.step import StepRecipe, TrainStep
from selfflow.train.streams import MicroBatch

# aten operations whose result depends on values the host must first read back
HOST_READS = {
    "aten._local_scalar_dense",  # .item(), bool(), float(), int() of a tensor
    "aten.is_nonzero",
    "aten.nonzero",
    "aten.nonzero_static",
    "aten.masked_select",
    "aten.equal",
    "aten.allclose",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.repeat_interleave",
    "aten.bincount",
}


# indexing with a boolean mask: the result's size (or the positions written) depend on values
BOOLEAN_INDEXING = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}
# conversions that leave torch for Python or numpy: seen at the Python level, since on the CPU
# they need no aten operation at all (on CUDA they copy to the host and wait)
TO_PYTHON = ("tolist", "numpy", "cpu", "__array__")


class HostReads(TorchDispatchMode):
    """Records every operation that reads a value on the host, with where it was called.

    Device moves with ``.to(...)`` cannot be told apart on the CPU (the step's own device is
    the CPU here); the batches' move is non-blocking by construction (``MicroBatch.to``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []
        self.seen: set[str] = set()
        self._saved: dict[str, object] = {}

    def _record(self, name: str) -> None:
        self.found.append((name, "".join(traceback.format_stack(limit=12))))

    def __enter__(self):
        for name in TO_PYTHON:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def recording(tensor, *args, _name=name, _original=original, **kwargs):
                self._record(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, recording)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.seen.add(name)
        boolean_index = name in BOOLEAN_INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        if name in HOST_READS or boolean_index:
            self._record(str(func))
        return func(*args, **(kwargs or {}))


def step_and_batches(micro_batches: int, rep_weight: float = 0.8):
    torch.manual_seed(0)
    cfg = ModelConfig.tiny()
    model = SelfFlowDiT(cfg).float().train()
    ema = make_ema(model)
    model, ema = FastTrainingDiT.from_model(model), FastTrainingDiT.from_model(ema)
    step = TrainStep(
        student=model,
        teacher=ema,
        model=model,
        ema=ema,
        optimizer=training_optimizer(model.parameters(), fused=True),  # CUDA's optimiser
        recipe=StepRecipe(rep_weight, 1, 2, 1.0, 0.999),
        autocast=torch.bfloat16,
    )
    b, side = 4, cfg.input_size
    tokens = (side // cfg.patch_size) ** 2
    batches = []
    for _ in range(micro_batches):
        t, s, u = torch.rand(b), torch.rand(b), torch.rand(b, tokens)
        batches.append(
            MicroBatch(
                torch.randn(b, cfg.in_channels, side, side),
                torch.randint(0, cfg.num_classes + 1, (b,)),
                torch.randn(b, cfg.in_channels, side, side),
                torch.where(u < 0.25, s[:, None], t[:, None]),
                torch.minimum(t, s),
            )
        )
    return step, batches


@pytest.mark.parametrize("micro_batches, rep_weight", [(1, 0.8), (2, 0.8), (1, 0.0)])
def test_the_step_reads_nothing_back_but_the_cpu_only_refusal(micro_batches, rep_weight):
    step, batches = step_and_batches(micro_batches, rep_weight)
    step(batches)  # the first step creates the optimiser's state
    with HostReads() as reads:
        summary = step(batches)
    # the mode saw the whole step: attention backward, the fused AdamW, the EMA's lerp
    backward = {"aten._scaled_dot_product_flash_attention_for_cpu_backward"}
    assert backward | {"aten._fused_adamw_", "aten._foreach_lerp_"} <= reads.seen
    assert summary.shape == (5,) and torch.isfinite(summary[:4]).all()
    elsewhere = [(op, where) for op, where in reads.found if "split_times" not in where]
    assert not elsewhere, elsewhere[0][1] + elsewhere[0][0]
    # one refusal check per student call (the teacher's tau is per sample: nothing to check)
    assert len(reads.found) == micro_batches


def finite_check(kind: str):
    """A step's loss with one of the usual host reads added after it."""
    from selfflow.train import step as step_module

    original = step_module.self_flow_loss

    def checked(*args, **kwargs):
        loss, parts = original(*args, **kwargs)
        if kind == "bool":
            assert bool(torch.isfinite(loss))
        elif kind == "tolist":
            assert loss.detach().reshape(1).tolist()
        elif kind == "cpu":
            assert loss.detach().cpu() is not None
        elif kind == "mask":
            parts["flow"][parts["flow"] > 1e9] = 0.0  # a boolean-mask write (index_put_)
        return loss, parts

    return checked


@pytest.mark.parametrize("kind", ["bool", "tolist", "cpu", "mask"])
def test_the_probe_catches_a_host_read_in_the_step(monkeypatch, kind):
    from selfflow.train import step as step_module

    monkeypatch.setattr(step_module, "self_flow_loss", finite_check(kind))
    step, batches = step_and_batches(1)
    with HostReads() as reads:
        step(batches)
    assert any("checked" in where for _, where in reads.found), kind
    assert torch.Tensor.tolist is not None and "recording" not in repr(torch.Tensor.tolist)
