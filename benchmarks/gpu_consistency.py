"""How far do images move with the batch size, the precision and the device? Measured, not assumed.

Three questions a user sampling on a GPU asks, answered in one process with random weights of
the released shapes (XL/2 and the SD-VAE architecture):

1. **GPU count at one batch size.** With more processes, an image sits in another batch among
   other images, at another row, but the batch shape is the same: sampling indices ``0..B-1``
   and ``B/2..3B/2-1`` must give bit-identical latents for the shared half (and a repeat of the
   first batch must give the same latents again: the kernels are deterministic).
2. **Batch size.** ``selfflow sample`` draws every image's noise from ``(seed,
   index)``, so only rounding can differ between runs with different batch sizes or process
   counts. On a GPU the bf16 matmul kernels, chosen per shape, round differently: this runs the
   same ``--num-samples`` with two batch sizes and counts the bytes of ``arr_0`` that differ.
3. **Precision.** The same images from the float32 reference network (``--dtype float32``): how
   many bytes the bf16 fast path changes.
4. **Evaluator device.** Inception features of the same images on the GPU and on the CPU (a
   synthetic graph with the real structure): the CPU executor is the one the tests prove
   against TensorFlow.
5. **VAE decode shape.** The bf16 SD-VAE decoded one latent at a time against the same
   latents together (the plain decoder: how many bytes the shape changes), ``selfflow.model.vae.decode``
   (fixed chunks of ``DECODE_BATCH``) alone against together (must be bit-identical), and what
   the fixed chunks cost against one call for a whole batch.

    python benchmarks/gpu_consistency.py                    # on a GPU, about 3 minutes
    python benchmarks/gpu_consistency.py --tiny --device cpu --num-steps 4   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    import selfflow  # noqa: F401
except (
    ImportError
):  # run from a checkout that is not installed (e.g. a fresh clone on a GPU machine)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from selfflow.base import distributed
from selfflow.base.distributed import resolve_dtype
from selfflow.base.precision import full_fp32
from selfflow.batch import BatchConfig, generate_fid_batch
from selfflow.batch.bench import random_checkpoint, random_model, random_vae
from selfflow.eval.graphdef import TFGraph
from selfflow.eval.inception import InceptionV3
from selfflow.eval.synthetic import inception_like_graph


def log(message: str) -> None:
    print(f"[consistency] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tiny", action="store_true", help="tiny model, VAE and graph (smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--batch-sizes", type=int, nargs=2, default=[32, 16])
    p.add_argument("--num-steps", type=int, default=250)
    p.add_argument(
        "--composition-only", action="store_true", help="only question 1 (no checkpoint files)"
    )
    p.add_argument("--skip-fp32", action="store_true", help="skip the float32 reference run")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args(argv)


def byte_differences(a: np.ndarray, b: np.ndarray) -> dict:
    """Share of bytes that differ, the largest difference, and the share of images touched."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    per_image = diff.reshape(len(diff), -1).max(axis=1)
    return {
        "bytes_differing": float((diff > 0).mean()),
        "bytes_differing_by_more_than_1": float((diff > 1).mean()),
        "max_abs": int(diff.max()),
        "mean_abs": float(diff.mean()),
        "images_touched": float((per_image > 0).mean()),
    }


def sample(folder: Path, name: str, args, **overrides) -> tuple[np.ndarray, float]:
    config = BatchConfig(
        checkpoint=str(folder / "random.pt"),
        vae=str(folder / "vae"),
        output_dir=folder / name,
        num_samples=args.num_samples,
        num_steps=args.num_steps,
        device=args.device,
        **overrides,
    )
    context = distributed.setup(args.device)
    try:
        start = time.perf_counter()
        result = generate_fid_batch(config, context=context, progress=False, log=lambda m: None)
        seconds = time.perf_counter() - start
    finally:
        distributed.teardown(context)
    with np.load(result.npz_path) as data:
        images = data["arr_0"]
    log(f"{name}: {images.shape} in {seconds:.1f} s (loading and compiling included)")
    return images, seconds


def batch_composition(args) -> dict:
    """Question 1: the same images in batches of the same shape but other neighbours."""
    from selfflow.base import seeds
    from selfflow.sampling.pipeline import SamplerSettings, SelfFlowPipeline, network_for

    device = torch.device(args.device)
    model = random_model(args.tiny, device)
    dtype = resolve_dtype(None, device)
    pipe = SelfFlowPipeline(model, None, model_fn=network_for(model, dtype), device=device)
    settings = SamplerSettings(num_steps=args.num_steps)  # the paper's: SDE, no guidance
    batch = args.batch_sizes[0]
    half = batch // 2

    def latents(start: int) -> torch.Tensor:
        indices = list(range(start, start + batch))
        out = pipe.sample_latents(seeds.uniform_labels(0, indices), indices, 0, settings)
        return out.cpu()

    first, shifted, repeat = latents(0), latents(half), latents(0)
    shared_first, shared_shifted = first[half:], shifted[: batch - half]
    return {
        "network": f"{type(pipe.model_fn).__name__}/{str(dtype).removeprefix('torch.')}",
        "batch": batch,
        "repeat_bit_identical": bool(torch.equal(first, repeat)),
        "shared_half_bit_identical": bool(torch.equal(shared_first, shared_shifted)),
        "shared_half_max_abs": float((shared_first - shared_shifted).abs().max()),
    }


def decode_shapes(vae_folder: Path, device: str, batch: int) -> dict:
    """Question 5: bytes of the plain decoder by shape; selfflow's fixed chunks; their cost."""
    from selfflow.model import vae

    model = vae.load_vae(vae_folder, device=device, dtype=torch.bfloat16)
    size = model.config.sample_size // 2 ** (len(model.config.block_out_channels) - 1)
    generator = torch.Generator().manual_seed(0)
    z = (torch.randn(batch, 4, size, size, generator=generator) * 0.18215 * 4).to(device)

    def plain(latents: torch.Tensor) -> np.ndarray:
        return vae.decode(model, latents, batch=None)

    def timed(fn) -> tuple[np.ndarray, float]:
        fn(z)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(z)
        return out, (time.perf_counter() - start) / batch * 1e3

    together, one_call_ms = timed(plain)
    chunked, chunked_ms = timed(lambda latents: vae.decode(model, latents))
    plain_alone = np.concatenate([plain(z[i : i + 1]) for i in range(batch)])
    fixed_alone = np.concatenate([vae.decode(model, z[i : i + 1]) for i in range(batch)])
    return {
        "latents": batch,
        "decode_batch": vae.DECODE_BATCH,
        "plain alone vs together": byte_differences(plain_alone, together),
        "fixed chunks: alone bit-identical to together": bool(np.array_equal(fixed_alone, chunked)),
        "ms per image, one call": one_call_ms,
        "ms per image, fixed chunks": chunked_ms,
    }


def evaluator_devices(images: np.ndarray, device: str, tiny: bool) -> dict:
    """Relative L2 and largest difference of pool and spatial features, GPU against CPU."""
    graph = TFGraph.from_bytes(inception_like_graph(width=0.125 if tiny else 1.0), source="synth")
    batch = torch.from_numpy(images)
    out = {}
    with full_fp32():
        cpu_pool, cpu_spatial = InceptionV3(graph, device="cpu").features(batch)
        dev_pool, dev_spatial = InceptionV3(graph, device=device).features(batch)
    for name, ref, got in (
        ("pool", cpu_pool, dev_pool),
        ("spatial", cpu_spatial, dev_spatial),
    ):
        ref, got = ref.double().cpu(), got.double().cpu()
        out[name] = {
            "rel_l2": float((got - ref).norm() / ref.norm()),
            "max_abs": float((got - ref).abs().max()),
            "max_ref": float(ref.abs().max()),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict = {"device": args.device, "steps": args.num_steps}
    if args.device.startswith("cuda"):
        report["device_name"] = torch.cuda.get_device_name(torch.device(args.device))
    report["same batch shape, other neighbours"] = batch_composition(args)
    log(f"batch composition: {report['same batch shape, other neighbours']}")
    if args.composition_only:
        return write(report, args.json)
    report["num_samples"] = args.num_samples
    with tempfile.TemporaryDirectory(prefix="selfflow-consistency-") as tmp:
        folder = Path(tmp)
        random_checkpoint(folder, args.tiny)
        random_vae(folder, args.tiny)
        big, small = args.batch_sizes
        report["VAE decode, alone vs in a batch"] = decode_shapes(folder / "vae", args.device, big)
        log(f"VAE decode: {report['VAE decode, alone vs in a batch']}")
        first, report["seconds_batch_a"] = sample(folder, f"batch{big}", args, batch_size=big)
        second, report["seconds_batch_b"] = sample(folder, f"batch{small}", args, batch_size=small)
        report[f"batch {big} vs batch {small}"] = byte_differences(first, second)
        if not args.skip_fp32:
            exact, report["seconds_fp32"] = sample(
                folder, "fp32", args, batch_size=big, dtype="float32"
            )
            default = str(resolve_dtype(None, torch.device(args.device))).removeprefix("torch.")
            report[f"default ({default}) vs float32 network"] = byte_differences(first, exact)
        if args.device != "cpu":
            report["evaluator features, device vs CPU"] = evaluator_devices(
                first, args.device, args.tiny
            )
    return write(report, args.json)


def write(report: dict, path: Path | None) -> int:
    text = json.dumps(report, indent=2)
    print(text)
    if path is not None:
        path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
