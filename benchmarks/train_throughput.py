"""Training throughput: a straightforward Self-Flow step against the fast one.

One process, random weights with the released shapes (no data or checkpoint needed). Paths:

* ``straightforward``: written the way the released model and SiT/REPA-style loops are:
  float32 weights under bf16 autocast, the plain :class:`~selfflow.model.network.SelfFlowDiT` with the
  adaLN modulation computed for every token, the EMA teacher run through all its blocks (and its
  final layer) with a hook catching its block, eager, PyTorch's default (unfused) AdamW, EMA
  updated parameter by parameter (:func:`selfflow.train.network.straightforward_loss`);
* ``fast``: ``selfflow train``'s own step, :class:`selfflow.train.step.TrainStep` (what the
  trainer runs every step) on :class:`selfflow.train.network.FastTrainingDiT` (modulation for each
  sample's two times, teacher stopped at its block, the block function compiled on CUDA): bf16
  autocast over float32 weights, fused AdamW on CUDA, one multi-tensor EMA update, no host
  synchronisation;
* ``fast-eager``: the same without ``torch.compile`` (what compiling buys);
* ``fast-float32``: the fast step in float32 (compiled on CUDA): its losses must follow the
  float32 reference to float32 rounding, which checks the compiled maths on the device.

Each step is the whole optimiser step: loss, backward, gradient clipping at norm 1, AdamW, EMA.
For every path and ``--batches`` size it reports the median step time over ``--repeats`` steps
after ``--warmup``, images/s, peak memory, and the model FLOP utilisation: the useful work of
a step (``selfflow.train.train_step_flops``, ≈ 889 GFLOP per image for XL/2) over a matmul peak
measured in the same run. Then, from the same weights and the same ``--compare-steps`` batches,
it trains a float32 reference (the plain model, no autocast, TF32 off) and each path, and
reports their losses and gradient norms step by step: the bf16 paths should stay within bf16
rounding of the reference. On CUDA it also counts the synchronising calls of one warm step
(PyTorch's sync debug mode): the fast step should make none.

    python benchmarks/train_throughput.py                      # XL/2 on the GPU: 32 64 128
    python benchmarks/train_throughput.py --tiny --device cpu  # seconds, for CI
    python benchmarks/train_throughput.py --model B/2 --device cpu --batches 8  # minutes
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sampling benchmark's helpers
try:
    import selfflow  # noqa: F401
except ImportError:  # run from a checkout that is not installed (e.g. a fresh GPU machine)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from throughput import device_name, matmul_peak, realistic_random_, sync  # noqa: E402

from selfflow.model.network import ModelConfig, SelfFlowDiT  # noqa: E402
from selfflow.train import (  # noqa: E402
    FastTrainingDiT,
    dual_timesteps,
    self_flow_loss,
    straightforward_loss,
    train_step_flops,
    training_optimizer,
)
from selfflow.train.config import (  # noqa: E402
    MODEL_SIZES,
    TrainConfig,
    choose_layers,
    model_config,
)
from selfflow.train.ema import make_ema  # noqa: E402
from selfflow.train.step import SUMMARY_FIELDS, StepRecipe, TrainStep  # noqa: E402
from selfflow.train.streams import MicroBatch  # noqa: E402

PATHS = ("straightforward", "fast", "fast-eager", "fast-float32")
#: The paper's run: 4 M steps at global batch 256, in images (what a GPU-hour figure is of).
PAPER_RUN_IMAGES = 4_000_000 * 256
LR, EMA_DECAY, GRAD_CLIP, REP_WEIGHT = 1e-4, 0.9999, 1.0, 0.8

Step = Callable[[dict], tuple[torch.Tensor, torch.Tensor]]


def log(message: str) -> None:
    print(f"[train_throughput] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model (CI): --model tiny")
    p.add_argument(
        "--model",
        choices=list(MODEL_SIZES),
        default=None,
        help="SiT size, as selfflow train --model builds it on ImageNet 256 latents (default: "
        "XL/2). A smaller one shows the arithmetic saving on a CPU, where the tiny model "
        "is all per-op overhead",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda, cuda:N or cpu (default: %(default)s)",
    )
    p.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="per-GPU batch sizes (default: 32 64 128; 4 8 with --tiny)",
    )
    p.add_argument(
        "--paths",
        nargs="+",
        choices=PATHS,
        default=None,
        help="steps to time (default: straightforward fast; fast is eager off CUDA anyway)",
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (default: %(default)s)")
    p.add_argument(
        "--repeats", type=int, default=10, help="timed steps, median taken (default: %(default)s)"
    )
    p.add_argument(
        "--compare-steps",
        type=int,
        default=20,
        help="steps of the loss comparison against float32 (0: skip; default: %(default)s)",
    )
    p.add_argument(
        "--compare-batch",
        type=int,
        default=None,
        help="batch of the loss comparison (default: the first of --batches)",
    )
    p.add_argument(
        "--peak-size",
        type=int,
        default=None,
        help="square bf16 matmul size for the peak (default: 8192 on CUDA, 1024 on the CPU)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: 1 for --tiny on the CPU, whose ops are too small to split "
        "and stall on a busy machine; else PyTorch's default)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=256,
        help="pixels per side of the images the latents stand for (SD-VAE's factor 8: 512 is "
        "64 x 64 latents, 1024 tokens for a /2 model; default: %(default)s)",
    )
    p.add_argument(
        "--latent-channels",
        type=int,
        default=4,
        help="latent channels of the VAE (4: SD-VAE; 16: SD3/FLUX-style; default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="weights and data (default: 0)")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="after the figures, profile one warm step of each path at the first of --batches "
        "and write the operators that take the time (device time on CUDA) to this file",
    )
    p.add_argument("--out", "--json", type=Path, default=None, help="write all figures as JSON")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.tiny and args.model not in (None, "tiny"):
        p.error(f"--tiny is --model tiny; it cannot go with --model {args.model}")
    args.model = "tiny" if args.tiny else args.model or "XL/2"
    args.tiny = args.model == "tiny"
    if args.batches is None:
        args.batches = [4, 8] if args.tiny else [32, 64, 128]
    if args.paths is None:
        args.paths = ["straightforward", "fast"]
    args.paths = sorted(set(args.paths), key=PATHS.index)  # the baseline first
    if args.compare_batch is None:
        args.compare_batch = args.batches[0]
    if min(args.batches + [args.repeats, args.compare_batch]) < 1 or args.warmup < 0:
        p.error("batch sizes and --repeats must be >= 1, --warmup >= 0")
    if args.compare_steps < 0:
        p.error("--compare-steps must be >= 0")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu")
    return args


# ----------------------------------------------------------------------------------------------
# Data and steps


def benchmark_model(name: str, image_size: int = 256, channels: int = 4) -> ModelConfig:
    """``tiny`` is the tests' ``ModelConfig.tiny()``; a SiT size is what ``selfflow train
    --model NAME`` builds for ImageNet latents of ``image_size`` pixels (factor 8: 4 × 32 × 32
    at 256, 4 × 64 × 64 at 512; 1000 classes)."""
    if name == "tiny":
        return ModelConfig.tiny()
    config = TrainConfig(data="-", output_dir="-", steps=1, model=name)
    return model_config(config, (channels, image_size // 8, image_size // 8), 1000)


def make_batches(config: ModelConfig, batch: int, count: int, seed: int, device) -> list[dict]:
    """``count`` training batches drawn on the CPU from one seeded generator, moved to device."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, config.in_channels, config.input_size, config.input_size)
    out = []
    for _ in range(count):
        x0 = torch.randn(shape, generator=gen)
        noise = torch.randn(shape, generator=gen)
        y = torch.randint(config.num_classes + 1, (batch,), generator=gen)
        tau, tau_teacher = dual_timesteps(batch, config.num_tokens, generator=gen)
        values = dict(x0=x0, y=y, noise=noise, tau=tau, tau_teacher=tau_teacher)
        out.append({k: v.to(device, non_blocking=True) for k, v in values.items()})
    return out


def layers(config: ModelConfig) -> dict:
    """The trainer's blocks: 0.3 and 0.7 of the depth (8 and 20 for XL/2), the teacher moved
    one block deeper where the two coincide (depth 2: 1 and 2), as ``selfflow train`` does."""
    student, teacher, _ = choose_layers(config.depth, None, None, True)
    return dict(student_layer=student, teacher_layer=teacher)


def trainer_step(
    model: FastTrainingDiT, recipe: StepRecipe, *, lr: float, autocast: torch.dtype | None
) -> TrainStep:
    """``selfflow train``'s step in one process, built as the trainer builds it: ``model``
    trains, its exact float32 copy is the EMA teacher, AdamW as ``training_optimizer`` makes it
    (fused on CUDA). ``benchmarks/train_loop.py`` uses it too."""
    ema = make_ema(model)
    return TrainStep(
        student=model,
        teacher=ema,
        model=model,
        ema=ema,
        optimizer=training_optimizer(model.parameters(), lr=lr),
        recipe=recipe,
        autocast=autocast,
    )


def build_step(path: str, initial: SelfFlowDiT, device: torch.device) -> Step:
    """One optimiser step of ``path`` on copies of ``initial``: returns (loss, grad norm).

    The fast paths are ``selfflow train``'s own step (:class:`selfflow.train.step.TrainStep`,
    built as the trainer builds it: float32 weights, bf16 autocast, fused AdamW on CUDA).
    """
    kw = layers(initial.config)
    if path.startswith("fast"):
        compile = False if path == "fast-eager" else None  # None: on CUDA only
        train_step = trainer_step(
            FastTrainingDiT.from_model(initial, compile=compile).train().requires_grad_(),
            StepRecipe(REP_WEIGHT, grad_clip=GRAD_CLIP, ema_decay=EMA_DECAY, **kw),
            lr=LR,
            autocast=None if path == "fast-float32" else torch.bfloat16,
        )
        loss_at, norm_at = SUMMARY_FIELDS.index("loss"), SUMMARY_FIELDS.index("grad_norm")

        def fast_step(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
            summary = train_step([MicroBatch(**batch)])
            return summary[loss_at], summary[norm_at]

        return fast_step
    if path == "reference":  # float32 throughout, the plain model
        student, loss_fn, autocast = copy.deepcopy(initial), self_flow_loss, None
    else:  # straightforward
        student, loss_fn, autocast = copy.deepcopy(initial), straightforward_loss, torch.bfloat16
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    student.train().requires_grad_(True)
    teacher = copy.deepcopy(student).requires_grad_(False)
    params, ema = list(student.parameters()), list(teacher.parameters())

    def step(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss, _ = loss_fn(student, teacher, batch["x0"], batch["y"], **_rest(batch), **kw)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # parameter by parameter, as such loops write it
            for averaged, current in zip(ema, params, strict=True):
                averaged.mul_(EMA_DECAY).add_(current, alpha=1.0 - EMA_DECAY)
        return loss.detach(), norm.detach()

    return step


def _rest(batch: dict) -> dict:
    return {k: batch[k] for k in ("noise", "tau", "tau_teacher")}


# ----------------------------------------------------------------------------------------------
# Measurements


def time_step(step: Step, batches: list[dict], args, device: torch.device) -> dict:
    """Median seconds per step after warm-up (the first call, compilation included, apart)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step(batches[0])
    sync(device)
    first = time.perf_counter() - start
    for i in range(1, args.warmup):
        step(batches[i % len(batches)])
    sync(device)
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        step(batches[i % len(batches)])
        sync(device)
        times.append(time.perf_counter() - start)
    row = {"first_step_s": first, "step_s": statistics.median(times), "times_s": times}
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["host_syncs"] = count_host_syncs(step, batches[0])
    return row


def count_host_syncs(step: Step, batch: dict) -> int:
    """Synchronising CUDA calls in one (warm) step, as PyTorch's sync debug mode reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def compare_losses(initial: SelfFlowDiT, paths: list[str], args, device) -> dict:
    """Each path trained ``--compare-steps`` steps from the same weights on the same batches,
    against the float32 reference: losses and gradient norms per step."""
    config = initial.config
    batches = make_batches(config, args.compare_batch, args.compare_steps, args.seed + 1, device)
    out = {}
    for path in ["reference", *paths]:
        matmul = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference must be float32
        try:
            step = build_step(path, initial, device)
            losses, norms = [], []
            for batch in batches:
                loss, norm = step(batch)
                losses.append(float(loss))
                norms.append(float(norm))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul
        del step
        out[path] = {"loss": losses, "grad_norm": norms}
        log(f"compare {path}: loss {losses[-1]:.5f}, grad norm {norms[-1]:.5f} after {len(losses)}")
    ref = out["reference"]
    for path in paths:
        row = out[path]
        row["loss_rel_diff"] = [
            abs(a - b) / abs(b) for a, b in zip(row["loss"], ref["loss"], strict=True)
        ]
        row["grad_norm_rel_diff"] = [
            abs(a - b) / abs(b) for a, b in zip(row["grad_norm"], ref["grad_norm"], strict=True)
        ]
    return out


def time_batch(batch: int, initial: SelfFlowDiT, report: dict, args, device, save) -> None:
    """Time every path at ``batch``; a failing path is recorded and not tried again."""
    config, flops, peak = initial.config, report["useful_flops_per_image"], report["peak_flops"]
    data = make_batches(config, batch, min(args.repeats, 4), args.seed, device)
    base = None
    for path in args.paths:
        if path in report["failures"]:
            continue
        try:
            row = time_step(build_step(path, initial, device), data, args, device)
        except Exception as error:  # one broken path must not lose the others' figures
            report["failures"][path] = f"{type(error).__name__}: {error}"
            log(f"{path} batch {batch}: {report['failures'][path]}")
            save()
            continue
        base = row["step_s"] if path == "straightforward" else base
        row.update(path=path, batch=batch, images_per_s=batch / row["step_s"])
        row["mfu"] = flops * batch / row["step_s"] / peak
        row["speedup"] = base / row["step_s"] if base else None
        report["rows"].append(row)
        save()
        log(
            f"{path:>16} batch {batch:4d}: {row['step_s'] * 1e3:9.2f} ms/step, "
            f"{row['images_per_s']:.1f} images/s, MFU {row['mfu']:.3f} "
            f"(first step {row['first_step_s']:.1f} s)"
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()


def compare(initial: SelfFlowDiT, report: dict, args, device, save) -> None:
    """The loss comparison, once; a failure is recorded without losing the timings."""
    if not args.compare_steps or report["compare"] or "compare" in report["failures"]:
        return
    log(f"loss comparison: {args.compare_steps} steps at batch {args.compare_batch}")
    paths = [p for p in args.paths if p not in report["failures"]]
    try:
        report["compare"] = compare_losses(initial, paths, args, device)
    except Exception as error:
        report["failures"]["compare"] = f"{type(error).__name__}: {error}"
        log(f"compare: {report['failures']['compare']}")
    save()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def profile_paths(initial: SelfFlowDiT, report: dict, args, device: torch.device) -> None:
    """One warm step of each timed path under ``torch.profiler``, the top operators by self time
    written to ``--profile``: where the time goes when a figure misses its target. Runs last, at
    the first batch size, whose graphs are already compiled."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    batch = args.batches[0]
    data = make_batches(initial.config, batch, 2, args.seed, device)
    parts = []
    for path in args.paths:
        if path in report["failures"]:
            continue
        try:
            step = build_step(path, initial, device)
            step(data[0])  # warm: its first call builds state (and finds the compiled graphs)
            sync(device)
            with profile(activities=activities) as prof:
                step(data[1])
                sync(device)
            table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
            parts.append(f"## {path}, batch {batch}: one step, sorted by {sort}\n\n{table}")
            del step
        except Exception as error:  # a diagnosis: recorded, but neither a figure nor a failure
            message = f"{type(error).__name__}: {error}"
            report.setdefault("profile_errors", {})[path] = message
            log(f"profile {path}: {message}")
        if cuda:
            torch.cuda.empty_cache()
    args.profile.parent.mkdir(parents=True, exist_ok=True)
    args.profile.write_text("\n\n".join(parts) + "\n")
    log(f"wrote the profile of {len(parts)} path(s) to {args.profile}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = args.threads or (1 if args.tiny and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    wall = time.perf_counter()
    config = benchmark_model(args.model, args.image_size, args.latent_channels)
    flops = train_step_flops(config, teacher_layer=layers(config)["teacher_layer"])
    log(f"device {device_name(device)}, torch {torch.__version__}")
    peak_size = args.peak_size or (8192 if device.type == "cuda" else 1024)
    peak = matmul_peak(device, torch.bfloat16, peak_size)
    log(f"bf16 matmul peak {peak / 1e12:.3f} TFLOP/s ({peak_size}³)")
    with torch.device(device):
        initial = realistic_random_(SelfFlowDiT(config), args.seed)
    report = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "model": args.model,
        "image_size": args.image_size,
        "config": config.to_dict(),
        "layers": layers(config),
        "peak_flops": peak,
        "peak_size": peak_size,
        "useful_flops_per_image": flops,
        "rows": [],
        "compare": {},
        "failures": {},
        "wall_s": 0.0,
    }

    def save() -> None:
        """Written after every figure, so a run stopped by a time limit keeps what it measured."""
        report["wall_s"] = time.perf_counter() - wall
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))

    for batch in args.batches:
        time_batch(batch, initial, report, args, device, save)
        if batch == args.compare_batch:  # while its graphs are compiled, before the next size
            compare(initial, report, args, device, save)
    compare(initial, report, args, device, save)  # a --compare-batch outside --batches
    save()
    print(format_report(report), flush=True)  # before the profile: a time limit there loses none
    if args.out is not None:
        log(f"wrote {args.out}")
    if args.profile is not None:
        profile_paths(initial, report, args, device)
        save()
    return 1 if report["failures"] else 0


def format_report(report: dict) -> str:
    peak, flops = report["peak_flops"], report["useful_flops_per_image"]
    lines = [
        f"## Training throughput: {report['model']} on {report['device']} (torch {report['torch']})",
        "",
        f"bf16 matmul peak {peak / 1e12:.3g} TFLOP/s; useful work {flops / 1e9:.4g} GFLOP per "
        f"image per step (student forward + backward with projector, teacher to block "
        f"{report['layers']['teacher_layer']}); at peak {peak / flops:.4g} images/s. GPU-hours: "
        f"the paper's 4 M steps at global batch 256 ({PAPER_RUN_IMAGES:.4g} images) at the row's "
        f"images/s per GPU.",
        "",
        "| path | batch | ms / step | images/s | MFU | peak memory (GiB) | host syncs | speed-up "
        "| 4 M-step run (GPU-hours) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        speedup = f"{r['speedup']:.2f}×" if r["speedup"] else "–"
        memory = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "–"
        syncs = r.get("host_syncs", "–")
        lines.append(
            f"| {r['path']} | {r['batch']} | {r['step_s'] * 1e3:.1f} | {r['images_per_s']:.4g} | "
            f"{r['mfu']:.3f} | {memory} | {syncs} | {speedup} | "
            f"{PAPER_RUN_IMAGES / 3600 / r['images_per_s']:,.0f} |"
        )
    compare = report["compare"]
    if compare:
        ref = compare["reference"]
        n = len(ref["loss"])
        lines += [
            "",
            f"After {n} steps from the same weights and batches (float32 reference: loss "
            f"{ref['loss'][-1]:.5f}, gradient norm {ref['grad_norm'][-1]:.5f}):",
            "",
            "| path | loss | rel. diff | max rel. diff (all steps) | grad norm | rel. diff |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for path, c in compare.items():
            if path == "reference":
                continue
            lines.append(
                f"| {path} | {c['loss'][-1]:.5f} | {c['loss_rel_diff'][-1]:.2e} | "
                f"{max(c['loss_rel_diff']):.2e} | {c['grad_norm'][-1]:.5f} | "
                f"{c['grad_norm_rel_diff'][-1]:.2e} |"
            )
    for name, message in report["failures"].items():
        lines.append(f"\nFAILED {name}: {message}")
    lines.append(f"\n({report['wall_s']:.0f} s in all)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
