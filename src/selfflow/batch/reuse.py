"""Growing (or shrinking) a finished run: reuse the samples of ``samples_{N0}.npz`` for a new N.

Sample ``i`` is a function of ``(seed, i)`` alone (its label, start noise and every Brownian
increment), so the first ``min(N0, N)`` images of a run of ``N`` samples are exactly those of a
finished run of ``N0`` with the same settings. A folder that holds a finished ``N0`` therefore
need not be refused when ``--num-fid-samples`` changes: the new run is planned as a fresh run of
``N`` would be, every new shard that lies wholly inside ``0 … N0−1`` is cut from the finished
npz (whose sha256 is checked first when the manifest records it), and only the rest is sampled.
At most one shard straddles ``N0``; it is sampled again, whole.

Not possible, and refused with the reason:

* ``--class-balanced``: the seeded shuffle of ``N/1000`` labels per class depends on ``N``, so
  sample ``i`` has another label in a run of another size;
* a folder whose run of ``N0`` never finished: its shards are cut for ``N0``'s plan.

numpy only, like the rest of the batch store.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from selfflow.base.errors import ConfigurationError
from selfflow.base.files import file_sha256
from selfflow.base.npz import iter_npz_rows
from selfflow.batch import store
from selfflow.batch.assemble import npz_name

COUNT_SETTING = "num_samples"


def only_the_count_differs(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    """True when the two settings differ in ``num_samples`` and nothing else."""
    names = (set(stored) | set(current)) - {COUNT_SETTING}
    return stored.get(COUNT_SETTING) != current.get(COUNT_SETTING) and all(
        stored.get(name) == current.get(name) for name in names
    )


def finished_npz(
    output_dir: Path, settings: dict[str, Any], complete: dict[str, Any] | None
) -> tuple[Path, int]:
    """The finished npz of the folder's run and its sample count, checked; raises if unusable.

    ``settings`` and ``complete`` are the stored manifest's. The npz's sha256 is compared with
    the one recorded when it was written (manifests of older versions record only its size).
    """
    count = int(settings[COUNT_SETTING])
    if settings.get("class_balanced"):
        raise ConfigurationError(
            f"{output_dir} holds a --class-balanced run of {count}; its labels depend on the "
            f"number of samples (N/1000 per class, shuffled), so it cannot be reused for another "
            f"--num-fid-samples: use --num-fid-samples {count}, --overwrite, or another --output-dir"
        )
    if not complete:
        raise ConfigurationError(
            f"{output_dir} holds an unfinished run of {count} samples; finish it first (the same "
            f"command with --num-fid-samples {count}), then change --num-fid-samples to reuse it, "
            f"or use --overwrite / another --output-dir"
        )
    path = output_dir / npz_name(count)
    problem = None
    if not path.is_file():
        problem = "it is missing"
    elif path.stat().st_size != complete.get("bytes"):
        problem = f"it has {path.stat().st_size} bytes, {complete.get('bytes')} were written"
    elif complete.get("sha256") and file_sha256(path) != complete["sha256"]:
        problem = "its sha256 differs from the one recorded when it was written"
    if problem:
        raise ConfigurationError(
            f"cannot reuse {path} for another --num-fid-samples: {problem}; run the same command "
            f"with --num-fid-samples {count} to rebuild it first, or use --overwrite"
        )
    return path, count


def shards_from_npz(output_dir: Path, plan: store.ShardPlan, source: Path, count: int) -> int:
    """Write every shard of ``plan`` that lies wholly in ``0 … count−1`` from ``source``.

    Shards of the previous run (another plan, or --keep-shards) are removed first: the finished
    npz holds all of their images. Returns the number of samples reused. The images are streamed
    one shard at a time; the labels (``arr_1``, N integers) are read whole.
    """
    shutil.rmtree(output_dir / store.SHARD_DIR, ignore_errors=True)
    covered = [shard for shard in plan.shards if shard.stop <= count]
    if not covered:
        return 0
    with np.load(source, allow_pickle=False) as npz:
        labels = np.asarray(npz["arr_1"], dtype=np.int64)
    blocks = iter_npz_rows(source, "arr_0", rows_per_block=plan.shard_size)
    for shard, images in zip(covered, blocks, strict=False):
        store.write_shard(output_dir, shard, images, labels[shard.start : shard.stop])
    blocks.close()
    return covered[-1].stop
