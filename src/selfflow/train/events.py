"""TensorBoard event files, written without TensorFlow.

``torch.utils.tensorboard`` imports TensorFlow whenever it is installed (``tensorboard.compat``
resolves to the real TensorFlow when it can): every start of a run then spent seconds and
printed oneDNN notices for a writer that needs none of it. An event file is small to write by
hand: a TFRecord file whose records are serialised ``Event`` protos, the first one naming the
format (``file_version: "brain.Event:2"``). Each record is framed as

    uint64 length (little-endian) · uint32 masked CRC-32C of those 8 bytes ·
    the bytes · uint32 masked CRC-32C of the bytes

with CRC-32C the Castagnoli CRC (reflected polynomial 0x82F63B78) and the mask
``rotate_right(crc, 15) + 0xA282EAD8`` (mod 2³²). The protos are those TensorBoard ships
(``tensorboard.compat.proto``: plain protobuf, no TensorFlow). Scalars are written as
``simple_value`` and images as PNG, as ``SummaryWriter`` wrote them, so TensorBoard shows the
same tags and values.

The CRC runs in Python, about half a second per megabyte; the scalars are tens of bytes, and a
sample grid's PNG (1–2 MB for 16 images of 256 × 256) is written every ``--sample-every`` steps.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import time
from pathlib import Path

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2

from selfflow.base.files import writing

FILE_VERSION = "brain.Event:2"


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``; ``crc32c(b"123456789") == 0xE3069283``."""
    crc = 0xFFFFFFFF
    table = _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The CRC as TFRecord stores it (masked, so a CRC of CRCs does not look valid)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """One TFRecord: length, its CRC, the data, its CRC."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


class EventWriter:
    """Appends scalars and images to a new event file in ``folder``.

    ``purge_step`` (a run's first new step: a resume's, or 0 for a start over) tells
    TensorBoard to drop the events of that step and later ones from the files written before (a
    killed run may have logged steps past the checkpoint the resume starts from, or steps of an
    attempt killed before its first checkpoint): a ``SessionLog.START`` event at that step.
    """

    def __init__(self, folder: str | os.PathLike, purge_step: int | None = None) -> None:
        folder = Path(folder)
        # microseconds in the name: a resume in the same second still sorts after its run
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self.path = folder / name
        with writing(self.path):
            folder.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - open until close()
        self._write(event_pb2.Event(wall_time=time.time(), file_version=FILE_VERSION))
        if purge_step is not None:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._write(event_pb2.Event(wall_time=time.time(), step=purge_step, session_log=start))
        self.flush()

    def _write(self, event: event_pb2.Event) -> None:
        with writing(self.path):
            self._file.write(record(event.SerializeToString()))

    def _summary(self, step: int, value: summary_pb2.Summary.Value) -> None:
        summary = summary_pb2.Summary(value=[value])
        self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._summary(step, summary_pb2.Summary.Value(tag=tag, simple_value=float(value)))

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """``image``: uint8 ``(H, W, 3)``, stored as PNG."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
        height, width, channels = image.shape
        encoded = summary_pb2.Summary.Image(
            height=height,
            width=width,
            colorspace=channels,
            encoded_image_string=buffer.getvalue(),
        )
        self._summary(step, summary_pb2.Summary.Value(tag=tag, image=encoded))

    def flush(self) -> None:
        with writing(self.path):
            self._file.flush()

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self.flush()
        finally:
            with contextlib.suppress(OSError):  # a failed flush was reported above
                self._file.close()
