"""selfflow: the Self-Flow ImageNet 256 model, its samplers, and ADM's evaluation in PyTorch.

Importing the package is cheap and needs no GPU; heavy pieces (diffusers, the evaluator)
are imported only when used.
"""

from __future__ import annotations

from selfflow.base.errors import CheckpointError, ConfigurationError, DownloadError, SelfFlowError
from selfflow.base.version import __version__

__all__ = [
    "CheckpointError",
    "ConfigurationError",
    "DownloadError",
    "ModelConfig",
    "SelfFlowDiT",
    "SelfFlowError",
    "SelfFlowPipeline",
    "__version__",
    "load_model",
    "save_model",
]


def __getattr__(name: str):
    # Lazy attributes keep `import selfflow` fast (no torch import for `selfflow --help`).
    if name in ("ModelConfig", "SelfFlowDiT"):
        from selfflow.model import network as model

        return getattr(model, name)
    if name in ("load_model", "save_model"):
        from selfflow.model import checkpoint

        return getattr(checkpoint, name)
    if name == "SelfFlowPipeline":
        from selfflow.sampling.pipeline import SelfFlowPipeline

        return SelfFlowPipeline
    raise AttributeError(f"module 'selfflow' has no attribute {name!r}")
