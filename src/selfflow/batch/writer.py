"""Decode and write in a background thread, so that the sampler never waits for files.

The main thread samples batch after batch and hands each batch of latents to a
:class:`ShardWriter` through a bounded queue. The writer thread decodes them (on a CUDA side
stream when the latents live on a GPU, so the decode overlaps the next batch's sampling
instead of queueing behind it; the decoder refuses NaN/inf), fills the current shard and,
when it is full, writes its PNGs (with ``--save-images``) and then the shard file. The queue
holds at most ``queue_size`` batches of latents, and the writer at most one shard of images,
so memory stays bounded however fast the sampler runs.

A batch with a non-finite sample stops the run with the samples' indices; the shard it belongs
to is never written, so nothing bad reaches the disk.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from selfflow.base.finite import NonFiniteSamplesError
from selfflow.batch.store import Shard, png_path, write_shard

_STOP = object()
NOTHING_WRITTEN = (
    "; the run stopped and nothing was written for them (check the checkpoint, or use "
    "--dtype float32)"
)


class ShardWriter:
    """Background decoder and shard writer for one process's list of shards.

    ``submit(indices, labels, latents)`` must be called with the samples of ``shards`` in
    order (batches may cross shard boundaries). ``on_images(n)`` is called from the writer
    thread after each decoded batch; ``on_shard(shard)`` after each written shard.
    """

    def __init__(
        self,
        decode: Callable[[torch.Tensor], np.ndarray],
        output_dir: Path,
        shards: Sequence[Shard],
        image_shape: tuple[int, int, int],
        num_samples: int,
        *,
        save_images: bool = False,
        queue_size: int = 2,
        on_images: Callable[[int], None] | None = None,
        on_shard: Callable[[Shard], None] | None = None,
    ) -> None:
        self.decode = decode
        self.output_dir = Path(output_dir)
        self.shards = list(shards)
        self.image_shape = tuple(image_shape)
        self.num_samples = num_samples
        self.save_images = save_images
        self.on_images = on_images
        self.on_shard = on_shard
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="selfflow-writer", daemon=True)
        self._stream = None
        # the shard being filled
        self._position = 0
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._filled = 0

    # -- the main thread's side ---------------------------------------------------------------

    def start(self) -> ShardWriter:
        self._thread.start()
        return self

    def submit(self, indices: np.ndarray, labels: np.ndarray, latents: torch.Tensor) -> None:
        """Queue a sampled batch; blocks while the queue is full; raises the writer's error."""
        ready = None
        if latents.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(latents.device))
        item = (np.asarray(indices, np.int64), np.asarray(labels, np.int64), latents, ready)
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Wait until every queued batch is written; raises the writer's error if any."""
        while self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=0.2)
                break
            except queue.Full:
                self._raise_if_failed()
        self._thread.join()
        self._raise_if_failed()
        if self._position != len(self.shards):
            raise RuntimeError(
                f"the writer finished {self._position} of {len(self.shards)} shards: "
                f"fewer samples were submitted than planned"
            )

    def abort(self) -> None:
        """Stop without writing anything more (after an error in the main thread)."""
        self._abort.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_STOP)
            self._thread.join(timeout=60)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the writer thread --------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._abort.is_set():
                item = self._queue.get()
                if item is _STOP or self._abort.is_set():
                    return
                self._handle(*item)
        except BaseException as error:  # handed to the main thread
            self._error = error

    def _on_stream(self, latents: torch.Tensor, ready):
        """Run the writer's GPU work on a side stream, after the batch's sampling has finished."""
        if ready is None:
            return contextlib.nullcontext()
        if self._stream is None:
            torch.cuda.set_device(latents.device)
            self._stream = torch.cuda.Stream(device=latents.device)
        self._stream.wait_event(ready)
        latents.record_stream(self._stream)  # the main thread's allocator must not reuse it early
        return torch.cuda.stream(self._stream)

    def _handle(
        self, indices: np.ndarray, labels: np.ndarray, latents: torch.Tensor, ready
    ) -> None:
        with torch.no_grad(), self._on_stream(latents, ready):
            try:  # the sampler has checked the latents; the decoder checks its images
                images = self.decode(latents)
            except NonFiniteSamplesError as error:
                raise error.renamed(indices, detail=NOTHING_WRITTEN) from None
        del latents
        if images.shape != (len(indices), *self.image_shape) or images.dtype != np.uint8:
            raise RuntimeError(
                f"the decoder returned {images.dtype} {images.shape}; expected uint8 "
                f"{(len(indices), *self.image_shape)}"
            )
        if self.on_images is not None:
            self.on_images(len(indices))
        self._store(indices, labels, images)

    def _store(self, indices: np.ndarray, labels: np.ndarray, images: np.ndarray) -> None:
        done = 0
        while done < len(indices):
            if self._abort.is_set():
                return
            if self._position >= len(self.shards):
                raise RuntimeError(f"sample {indices[done]} is beyond this process's shards")
            shard = self.shards[self._position]
            if self._images is None:
                self._images = np.empty((shard.size, *self.image_shape), np.uint8)
                self._labels = np.empty(shard.size, np.int64)
                self._filled = 0
            take = min(shard.size - self._filled, len(indices) - done)
            expected = np.arange(shard.start + self._filled, shard.start + self._filled + take)
            if not np.array_equal(indices[done : done + take], expected):
                raise RuntimeError(
                    f"samples arrived out of order: expected {expected[0]}…{expected[-1]}, "
                    f"got {indices[done]}…{indices[done + take - 1]}"
                )
            self._images[self._filled : self._filled + take] = images[done : done + take]
            self._labels[self._filled : self._filled + take] = labels[done : done + take]
            self._filled += take
            done += take
            if self._filled == shard.size:
                self._write(shard)

    def _write(self, shard: Shard) -> None:
        assert self._images is not None and self._labels is not None
        if self.save_images:
            write_pngs(self.output_dir, self._images, shard.indices, self.num_samples)
        write_shard(self.output_dir, shard, self._images, self._labels)
        self._images = self._labels = None
        self._position += 1
        if self.on_shard is not None:
            self.on_shard(shard)


def write_pngs(
    output_dir: Path,
    images: np.ndarray,
    indices: Sequence[int],
    num_samples: int,
    only_missing: bool = False,
) -> int:
    """Write ``images/{index:06d}.png`` for each image (atomically); returns how many."""
    from selfflow.base.images import save_png

    written = 0
    for image, index in zip(images, indices, strict=True):
        path = png_path(output_dir, int(index), num_samples)
        if only_missing and path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(image, path)
        written += 1
    return written
