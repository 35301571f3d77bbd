"""Does writing the batch stall the sampler? End-to-end rate against the pure sampler rate.

    python -m selfflow.batch.bench --device cuda --batch-size 64 --num-steps 250 --batches 4
    python -m selfflow.batch.bench --tiny --device cpu          # seconds, for CI and smoke tests

In one process: (1) the pure sampler rate — ``sample_latents`` alone, batch after batch, after
a warm-up batch (which also pays for ``torch.compile``); (2) the end-to-end rate of
:func:`generate_fid_batch` on the same network object (already compiled) — sampling, decoding,
the non-finite checks, shard files and, with ``--save-images``, PNGs. The target is an
end-to-end rate within 5 % of the pure sampler rate on a GPU. On a CPU the decoder competes with
the sampler for the same cores, so the ratio there says little.

Weights are random with the released shapes (XL/2 and the SD-VAE architecture), unless
``--ckpt``/``--vae`` name real files: speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def random_model(tiny: bool, device=None):
    """Self-Flow with seeded random weights, non-zero everywhere (adaLN-Zero starts at zero)."""
    import torch

    from selfflow.model.network import ModelConfig, SelfFlowDiT

    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        model = SelfFlowDiT(ModelConfig.tiny() if tiny else ModelConfig.xl_2())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "pos_embed" and param.dim() > 1:
                param.normal_(0.0, 0.02)
    return model


def random_checkpoint(folder: Path, tiny: bool) -> Path:
    """A checkpoint of :func:`random_model` saved as ``folder/random.pt`` (for benchmarks)."""
    from selfflow.model.checkpoint import save_model

    return save_model(random_model(tiny), folder / "random.pt")


def random_vae(folder: Path, tiny: bool) -> Path:
    """An SD-VAE-shaped AutoencoderKL with seeded random weights in ``folder/vae``."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    blocks = (8, 16) if tiny else (128, 256, 512, 512)  # SD-VAE: 4 levels, 8x upsampling
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks,
        layers_per_block=1 if tiny else 2,
        latent_channels=4,
        norm_num_groups=4 if tiny else 32,
        sample_size=16 if tiny else 256,
    )
    vae.save_pretrained(folder / "vae")
    return folder / "vae"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m selfflow.batch.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model and VAE (CPU smoke test)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-steps", type=int, default=250)
    parser.add_argument("--batches", type=int, default=4, help="timed batches per measurement")
    parser.add_argument("--save-images", action="store_true")
    parser.add_argument("--ckpt", default=None, help="a real checkpoint instead of random weights")
    parser.add_argument("--vae", default=None, help="a real VAE folder instead of random weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Measure both rates and print them as a Markdown table."""
    parser = _parser()
    args = parser.parse_args(argv)

    import torch

    from selfflow.base import distributed, seeds
    from selfflow.base.errors import SelfFlowError

    try:  # before any weights are made: no CUDA is one line, not a traceback
        distributed.resolve_device(args.device, 0)
    except SelfFlowError as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    from selfflow.base.distributed import resolve_dtype
    from selfflow.batch import BatchConfig, generate_fid_batch
    from selfflow.sampling.pipeline import SamplerSettings, SelfFlowPipeline

    with tempfile.TemporaryDirectory(prefix="selfflow-bench-") as tmp:
        folder = Path(tmp)
        checkpoint = args.ckpt or str(random_checkpoint(folder, args.tiny))
        vae = args.vae or str(random_vae(folder, args.tiny))
        config = BatchConfig(
            checkpoint=checkpoint,
            vae=vae,
            output_dir=folder / "samples",
            num_samples=args.batch_size * args.batches,
            batch_size=args.batch_size,
            num_steps=args.num_steps,
            device=args.device,
            dtype=args.dtype,
            save_images=args.save_images,
            shard_size=args.batch_size,
        )
        context = distributed.setup(args.device)
        dtype = resolve_dtype(args.dtype, context.device)
        pipe = SelfFlowPipeline.from_pretrained(checkpoint, vae, device=context.device, dtype=dtype)
        network = f"{type(pipe.model_fn).__name__}/{str(dtype).removeprefix('torch.')}"
        settings = SamplerSettings(num_steps=args.num_steps)  # the paper's: SDE, no guidance

        def one_batch(start: int) -> None:
            indices = list(range(start, start + args.batch_size))
            pipe.sample_latents(seeds.uniform_labels(0, indices), indices, 0, settings)
            if context.device.type == "cuda":
                torch.cuda.synchronize(context.device)

        began = time.perf_counter()
        one_batch(10**6)  # warm-up (and torch.compile on CUDA)
        warmup = time.perf_counter() - began
        began = time.perf_counter()
        for k in range(args.batches):
            one_batch(k * args.batch_size)
        pure = args.batch_size * args.batches / (time.perf_counter() - began)

        model_fn = pipe.model_fn

        def reuse_network(new_pipe) -> None:
            new_pipe.model_fn = model_fn  # the warmed-up (compiled) network

        result = generate_fid_batch(
            config,
            context=context,
            prepare_pipeline=reuse_network,
            progress=False,
            log=lambda m: None,
        )
        distributed.teardown(context, finished=True)
    end_to_end = result.images_per_second
    print(
        f"device {context.device}, network {network}, batch {args.batch_size}, "
        f"{args.num_steps} steps, {args.batches} batches, warm-up {warmup:.1f} s"
    )
    print("| measurement | images/s |")
    print("|---|---|")
    print(f"| sampler alone (sample_latents) | {pure:.3f} |")
    print(
        f"| selfflow sample end to end{' + PNGs' if args.save_images else ''} | {end_to_end:.3f} |"
    )
    print(f"end-to-end / sampler = {end_to_end / pure:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
