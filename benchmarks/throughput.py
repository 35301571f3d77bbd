"""Sampling throughput: the official-equivalent network call against the fast path.

One process, one run, random weights with the released shapes (no checkpoint needed):

* times one network evaluation (warm-up, device sync, median of ``--repeats``) for each path
  and batch size, and converts it to images/s for a ``--steps``-step SDE (one evaluation per
  step; the sampler's own element-wise updates are left out, and ``--sample-batches`` times
  a real run to show how little they cost);
* measures the machine's matmul peak in the fast path's dtype (large square products) and
  prints the model FLOP utilisation (MFU) of the *useful* work: 237 GFLOP per image per
  evaluation for XL/2 (``selfflow.model.inference.forward_flops``; per-sample adaLN, so the official
  path's per-token modulation counts as waste, not work);
* prints the relative L2 error of every path against the float32 per-sample network, for one
  forward pass and after ``--error-steps`` SDE steps driven by the same start noise and the same
  Brownian increments.

Paths: ``official`` (fp32 weights, bf16 autocast, per-token adaLN, eager: what the release
runs) and ``fast`` (:class:`selfflow.model.inference.FastSelfFlow`) with options joined by ``+``:
``fast+compile``, ``fast+cudnn+gelu``, ... (see ``--paths``).

    python benchmarks/throughput.py                      # XL/2 on the GPU, batches 64 and 256
    python benchmarks/throughput.py --tiny --device cpu  # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    import selfflow  # noqa: F401
except (
    ImportError
):  # run from a checkout that is not installed (e.g. a fresh clone on a GPU machine)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from selfflow.model.inference import FastSelfFlow, forward_flops, official_equivalent
from selfflow.model.network import ModelConfig, SelfFlowDiT
from selfflow.sampling.transport import sample_sde

ALIASES = {"fast-eager": "fast", "fast-compiled": "fast+compile"}
MODIFIERS = ("compile", "autotune", "cudnn", "gelu")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

NetworkFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def log(message: str) -> None:
    print(f"[throughput] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--tiny", action="store_true", help="tiny model (CI) instead of SiT-XL/2")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda, cuda:N or cpu (default: %(default)s)",
    )
    p.add_argument(
        "--batches", type=int, nargs="+", default=[64, 256], help="batch sizes (default: 64 256)"
    )
    p.add_argument(
        "--paths",
        nargs="+",
        default=None,
        help="paths to time: 'official', or 'fast' with modifiers joined by '+': compile "
        "(torch.compile), autotune (compile with max-autotune-no-cudagraphs), cudnn (cuDNN "
        "attention first), gelu (cuBLASLt bias+GELU epilogue, CUDA only); 'fast-eager' and "
        "'fast-compiled' are aliases of 'fast' and 'fast+compile' "
        "(default: official fast fast+compile+gelu on CUDA, the fast path's default there; "
        "official fast on the CPU)",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bf16",
        help="fast-path dtype (default: %(default)s)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=250,
        help="SDE steps per image for images/s (default: %(default)s)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed evaluations before timing (default: %(default)s)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=10,
        help="timed evaluations, median taken (default: %(default)s)",
    )
    p.add_argument(
        "--error-steps",
        type=int,
        default=20,
        help="SDE steps of the shared-noise error check (0: forward error only, <0: no errors; "
        "default: %(default)s)",
    )
    p.add_argument(
        "--error-batch",
        type=int,
        default=None,
        help="batch of the error checks (default: the first of --batches, no extra compile)",
    )
    p.add_argument(
        "--sample-batches",
        type=int,
        nargs="*",
        default=[],
        help="also time a real --steps-step SDE run of the last path at these batches "
        "(must be in --batches)",
    )
    p.add_argument(
        "--peak-size",
        type=int,
        default=None,
        help="square matmul size for the peak (default: 8192 on CUDA, 1024 on the CPU)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: 1 for --tiny on the CPU, whose ops are too small to split "
        "and stall on a busy machine; else PyTorch's default)",
    )
    p.add_argument("--seed", type=int, default=0, help="weights and inputs (default: 0)")
    p.add_argument("--json", type=Path, default=None, help="write all figures to this JSON file")
    args = p.parse_args(argv)
    if args.paths is None:
        cuda = args.device.startswith("cuda")
        # on CUDA, "fast+compile+gelu" is what FastSelfFlow does by default there
        args.paths = ["official", "fast", "fast+compile+gelu"] if cuda else ["official", "fast"]
    try:
        specs = {path_name(p): fast_options(p) for p in args.paths}
    except ValueError as error:
        p.error(str(error))
    # official first: the baseline of the speed-up column
    args.paths = sorted(specs, key=lambda name: name != "official")
    if args.error_batch is None:
        args.error_batch = args.batches[0]
    if min(args.batches + [args.error_batch, args.steps, args.repeats]) < 1 or args.warmup < 0:
        p.error("batch sizes, --steps and --repeats must be >= 1, --warmup >= 0")
    if args.error_steps == 1:
        p.error("--error-steps must be 0 (forward only), >= 2, or negative (skip)")
    if set(args.sample_batches) - set(args.batches):
        p.error("--sample-batches must be a subset of --batches")
    return args


def path_name(spec: str) -> str:
    """Canonical name of a path: aliases resolved, modifiers in a fixed order."""
    spec = ALIASES.get(spec, spec)
    if spec == "official":
        return spec
    head, *mods = spec.split("+")
    if head != "fast" or set(mods) - set(MODIFIERS) or len(set(mods)) != len(mods):
        raise ValueError(
            f"unknown path {spec!r}: expected 'official' or 'fast' with modifiers from "
            f"{'+'.join(MODIFIERS)} joined by '+'"
        )
    return "+".join(["fast", *(m for m in MODIFIERS if m in mods)])


def fast_options(spec: str) -> dict | None:
    """FastSelfFlow keyword arguments of a path (None for the official path)."""
    name = path_name(spec)
    if name == "official":
        return None
    mods = set(name.split("+")[1:])
    return {
        "compile": bool(mods & {"compile", "autotune"}),
        "compile_mode": "max-autotune-no-cudagraphs" if "autotune" in mods else None,
        "attention_backends": ["cudnn", "flash", "efficient", "math"] if "cudnn" in mods else None,
        "gelu_epilogue": "gelu" in mods,
    }


# ----------------------------------------------------------------------------------------------
# Set-up


def realistic_random_(model: SelfFlowDiT, seed: int) -> SelfFlowDiT:
    """Random weights that make every layer count, unlike adaLN-Zero's zeroed blocks.

    Linear weights ``N(0, 1/fan_in)`` (unit gain, so activations stay O(1) through the depth),
    biases ``N(0, 0.02²)``, label table ``N(0, 0.5²)`` (comparable to the time embedding):
    adaLN shift/scale/gate come out of order 0.4, as in trained DiTs, so the error figures
    exercise the modulation, the gates and the residual stream.
    """
    device = model.pos_embed.device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("embedding_table.weight"):
                std = 0.5
            elif param.dim() == 2:
                std = param.shape[1] ** -0.5
            else:
                std = 0.02
            param.normal_(0.0, std, generator=generator)
    return model


def build_model(config: ModelConfig, device: torch.device, seed: int) -> SelfFlowDiT:
    with torch.device(device):
        model = SelfFlowDiT(config)
    return realistic_random_(model, seed).eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    plural = "s" if threads > 1 else ""
    return f"CPU {platform.processor() or platform.machine()} ({threads} thread{plural})"


def inputs(config: ModelConfig, batch: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g)
    tau = torch.rand(batch, generator=g)
    y = torch.randint(0, config.num_classes + 1, (batch,), generator=g)
    return x.to(device), tau.to(device), y.to(device)


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Best-case matmul rate in FLOP/s: median over large square products of random data."""
    g = torch.Generator().manual_seed(123)
    a = torch.randn(size, size, generator=g).to(device, dtype)
    b = torch.randn(size, size, generator=g).to(device, dtype)
    repeats = 10 if device.type == "cuda" else 3
    seconds, _ = median_seconds(lambda: a @ b, device, warmup=3, repeats=repeats)
    return 2.0 * size**3 / seconds


# ----------------------------------------------------------------------------------------------
# Error checks


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def sde_rollout(fn: NetworkFn, x0, y, xis, steps: int) -> torch.Tensor:
    """``steps`` SDE steps (the official sampler) with the given start noise and increments."""
    velocity = lambda x, tau: fn(x, tau, y)  # noqa: E731
    return sample_sde(velocity, x0.clone(), num_steps=steps, brownian=xis.__getitem__)


def error_checks(nets: dict[str, NetworkFn], model: SelfFlowDiT, config, args, device, failures):
    """Relative L2 error of each path against the float32 per-sample network.

    ``forward``: one evaluation at random (x, tau, y). ``sde``: the end of an ``--error-steps``
    SDE run from the same start noise with the same Brownian increments. ``fp32``: the fast path
    with the same options but float32 weights (eager), which must match to float32 rounding:
    it shows that the fast path computes the same function, not only a close one.
    A path that fails is recorded in ``failures`` and the others go on.
    """
    x, tau, y = inputs(config, args.error_batch, device, args.seed + 1)
    ref_out = model(x, tau, y)
    g = torch.Generator().manual_seed(args.seed + 2)
    x0 = torch.randn(x.shape, generator=g).to(device)
    xis = [torch.randn(x.shape, generator=g).to(device) for _ in range(args.error_steps - 1)]
    ref_end = sde_rollout(model, x0, y, xis, args.error_steps) if args.error_steps >= 2 else None
    results: dict[str, dict[str, float]] = {}
    for name, fn in nets.items():
        try:
            result = {"forward": rel_l2(fn(x, tau, y), ref_out)}
            options = fast_options(name)
            if options is not None:
                eager = {**options, "compile": False, "compile_mode": None}
                exact = FastSelfFlow.from_model(model, dtype=torch.float32, **eager)
                result["fp32"] = rel_l2(exact(x, tau, y), ref_out)
                del exact
            if ref_end is not None:
                end = sde_rollout(fn, x0, y, xis, args.error_steps)
                result["sde"] = rel_l2(end, ref_end)
            results[name] = result
        except Exception as error:
            failures[f"{name} (errors)"] = f"{type(error).__name__}: {error}"
            log(f"{name} error check: {failures[f'{name} (errors)']}")
    return results


# ----------------------------------------------------------------------------------------------
# Main


def time_path(name: str, fn: NetworkFn, batch: int, args, config, device) -> dict:
    x, tau, y = inputs(config, batch, device, args.seed)
    start = time.perf_counter()
    fn(x, tau, y)  # first call: compilation, kernel selection, allocations
    sync(device)
    first = time.perf_counter() - start
    seconds, times = median_seconds(lambda: fn(x, tau, y), device, args.warmup, args.repeats)
    row = {
        "path": name,
        "batch": batch,
        "ms_per_eval": seconds * 1e3,
        "ms_min": min(times) * 1e3,
        "ms_max": max(times) * 1e3,
        "first_call_s": first,
    }
    if batch in args.sample_batches and name == args.paths[-1]:
        row["sampled_s"] = timed_sampling(fn, x, y, args.steps, device)
    return row


def timed_sampling(fn: NetworkFn, x, y, steps: int, device: torch.device) -> float:
    """Seconds for one real ``steps``-step SDE run (the network plus the sampler's updates)."""
    sync(device)
    start = time.perf_counter()
    sample_sde(lambda z, tau: fn(z, tau, y), x, num_steps=steps)
    sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; use --device cpu")
    threads = args.threads or (1 if args.tiny and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    torch.set_float32_matmul_precision("highest")  # the float32 reference must be float32
    torch.set_grad_enabled(False)
    wall = time.perf_counter()
    config = ModelConfig.tiny() if args.tiny else ModelConfig.xl_2()
    dtype = DTYPES[args.dtype]
    flops = forward_flops(config)

    log(f"device {device_name(device)}, torch {torch.__version__}")
    peak_size = args.peak_size or (8192 if device.type == "cuda" else 1024)
    peak = matmul_peak(device, dtype, peak_size)
    log(f"{args.dtype} matmul peak {peak / 1e12:.3f} TFLOP/s ({peak_size}³)")

    t0 = time.perf_counter()
    model = build_model(config, device, args.seed)
    log(
        f"{'tiny' if args.tiny else 'XL/2'} model, random weights, {time.perf_counter() - t0:.1f} s"
    )

    nets: dict[str, NetworkFn] = {}
    failures: dict[str, str] = {}
    for name in args.paths:
        options = fast_options(name)
        try:
            if options is None:
                nets[name] = official_equivalent(model)
            else:
                nets[name] = FastSelfFlow.from_model(model, dtype=dtype, **options)
        except Exception as error:  # one broken variant must not lose the others' figures
            failures[name] = f"{type(error).__name__}: {error}"
            log(f"{name}: {failures[name]}")

    report = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "model": "tiny" if args.tiny else "XL/2",
        "config": config.to_dict(),
        "fast_dtype": args.dtype,
        "paths": {name: fast_options(name) for name in args.paths},
        "peak_flops": peak,
        "peak_size": peak_size,
        "useful_flops_per_image": flops,
        "per_token_adaln_flops_per_image": forward_flops(config, per_token_adaln=True),
        "steps": args.steps,
        "error_batch": args.error_batch,
        "error_steps": args.error_steps,
        "rows": [],
        "errors": {},
        "failures": failures,
        "wall_s": 0.0,
    }

    def save() -> None:
        """Written after every figure, so a run stopped by a time limit keeps what it measured."""
        report["wall_s"] = time.perf_counter() - wall
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))

    def check_errors() -> None:
        if args.error_steps >= 0 and not report["errors"]:
            log(f"error checks at batch {args.error_batch} ({args.error_steps} SDE steps)")
            report["errors"] = error_checks(nets, model, config, args, device, failures)
            save()

    for batch in args.batches:
        if batch != args.batches[0] and args.error_batch == args.batches[0]:
            check_errors()  # before the next batch's compilation, while the graph is warm
        base = None
        for name, fn in list(nets.items()):
            try:
                row = time_path(name, fn, batch, args, config, device)
            except Exception as error:
                failures[name] = f"{type(error).__name__}: {error}"
                log(f"{name} batch {batch}: {failures[name]}")
                del nets[name]
                save()
                continue
            seconds = row["ms_per_eval"] / 1e3
            base = seconds if name == "official" else base
            row["images_per_s"] = batch / (args.steps * seconds)
            row["mfu"] = flops * batch / seconds / peak
            row["speedup"] = base / seconds if base else None
            if "sampled_s" in row:
                row["sampled_images_per_s"] = batch / row["sampled_s"]
            report["rows"].append(row)
            save()
            log(
                f"{name:>24} batch {batch:4d}: {row['ms_per_eval']:9.2f} ms/eval "
                f"(first call {row['first_call_s']:.1f} s), MFU {row['mfu']:.3f}"
            )

    check_errors()
    save()
    print(format_report(report))
    if args.json is not None:
        log(f"wrote {args.json}")
    return 1 if failures else 0


def format_report(report: dict) -> str:
    peak = report["peak_flops"]
    flops = report["useful_flops_per_image"]
    steps = report["steps"]
    lines = [
        f"## Throughput: {report['model']} on {report['device']} (torch {report['torch']})",
        "",
        f"{report['fast_dtype']} matmul peak {peak / 1e12:.3g} TFLOP/s; useful work "
        f"{flops / 1e9:.4g} GFLOP per image per evaluation (per-token adaLN: "
        f"{report['per_token_adaln_flops_per_image'] / 1e9:.4g}); at peak "
        f"{peak / (flops * steps):.3g} images/s at {steps} steps.",
        "",
        f"| path | batch | ms / eval | images/s at {steps} steps | MFU | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        speedup = f"{r['speedup']:.2f}×" if r["speedup"] else "–"
        sampled = (
            f" (real run: {r['sampled_images_per_s']:.3g})" if "sampled_images_per_s" in r else ""
        )
        lines.append(
            f"| {r['path']} | {r['batch']} | {r['ms_per_eval']:.2f} | "
            f"{r['images_per_s']:.3g}{sampled} | {r['mfu']:.3f} | {speedup} |"
        )
    if report["errors"]:
        es = report["error_steps"]
        lines += [
            "",
            f"Relative L2 error against the float32 per-sample network (batch {report['error_batch']}):",
            "",
            "| path | one forward | "
            + (f"after {es} SDE steps" if es >= 2 else "SDE (not run)")
            + " | same path in float32 (maths check) |",
            "|---|---:|---:|---:|",
        ]
        for name, e in report["errors"].items():
            sde = f"{e['sde']:.2e}" if "sde" in e else "–"
            fp32 = f"{e['fp32']:.2e}" if "fp32" in e else "–"
            lines.append(f"| {name} | {e['forward']:.2e} | {sde} | {fp32} |")
    for name, message in report["failures"].items():
        lines.append(f"\nFAILED {name}: {message}")
    lines.append(f"\n({report['wall_s']:.0f} s in all)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
