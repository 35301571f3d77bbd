"""Full float32 where numbers must match across machines: TF32 off for matmuls and convolutions.

Ampere and later GPUs may run float32 matmuls and convolutions in TF32 (10-bit mantissa) when
torch allows it, so the same inputs give different digits on an A100 and on a V100 or a CPU.
Work whose numbers are compared across machines (the evaluator's Inception features, the VAE
encoder of ``selfflow prepare``) runs inside :func:`full_fp32`. It lives in the base because
evaluation and data preparation both need it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _tf32_switches(backends: Any) -> list[tuple[object, str, object]]:
    """(owner, attribute, full-precision value) for matmuls and cuDNN convolutions.

    torch >= 2.9 spells each switch ``fp32_precision`` ("ieee" = full float32); older releases
    ``allow_tf32`` (False = full float32).
    """
    matmul = backends.cuda.matmul
    conv = getattr(backends.cudnn, "conv", None)
    return [
        (matmul, "fp32_precision", "ieee")
        if hasattr(matmul, "fp32_precision")
        else (matmul, "allow_tf32", False),
        (conv, "fp32_precision", "ieee")
        if conv is not None and hasattr(conv, "fp32_precision")
        else (backends.cudnn, "allow_tf32", False),
    ]


@contextmanager
def full_fp32(backends: Any = None) -> Iterator[None]:
    """Turn TF32 off for matmuls and convolutions, so numbers match across GPU generations;
    the caller's settings come back afterwards. ``backends`` defaults to ``torch.backends``."""
    switches = _tf32_switches(torch.backends if backends is None else backends)
    saved = [getattr(owner, name) for owner, name, _ in switches]
    for owner, name, full in switches:
        setattr(owner, name, full)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(switches, saved, strict=True):
            setattr(owner, name, value)
