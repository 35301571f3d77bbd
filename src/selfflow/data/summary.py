"""What ``selfflow prepare`` reports when it ends: the dataset, what this run encoded and how
fast, and the files it left out (kept apart from :mod:`selfflow.data.prepare`, which runs it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfflow.data.images import listing


@dataclass
class PrepareResult:
    out_dir: Path
    num_images: int
    new_images: int  # encoded by this run (skipped files not counted)
    skipped: list[str]  # every file the dataset leaves out, earlier runs' included
    upscaled: int
    seconds: float  # encoding: from the first batch decoded to the last shard written
    world_size: int
    identity: str
    startup_seconds: float = 0.0  # before it: VAE, file list, re-hashing finished shards
    held_out: PrepareResult | None = None  # --val-per-class: the dataset in OUT_DIR-val

    def summary(self) -> str:
        def count(n: int, noun: str) -> str:
            return f"{n} {noun}{'' if n == 1 else 's'}"

        encoded = f"{count(self.new_images, 'image')} encoded now"
        if self.new_images:
            encoded += (
                f" in {self.seconds:.1f} s ({self.new_images / max(self.seconds, 1e-9):.1f} "
                f"images/s; start-up {self.startup_seconds:.1f} s)"
            )
        lines = [
            f"{count(self.num_images, 'image')} in {self.out_dir} (identity {self.identity}); "
            f"{encoded} on {self.world_size} process{'es' if self.world_size > 1 else ''}"
        ]
        if self.skipped:
            lines.append(
                f"skipped {count(len(self.skipped), 'bad file')}: {listing(self.skipped)} "
                f"(listed under 'skipped' in manifest.json)"
            )
        if self.upscaled:
            was = "was" if self.upscaled == 1 else "were"
            lines.append(
                f"{count(self.upscaled, 'image')} {was} smaller than the crop and {was} upscaled"
            )
        if self.held_out is not None:
            lines.append(f"held out, never trained on: {self.held_out.summary()}")
        return "\n".join(lines)
