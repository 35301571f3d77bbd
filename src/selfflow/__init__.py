"""selfflow: the Self-Flow ImageNet 256 model, its samplers, and ADM's evaluation in PyTorch.

Importing the package is cheap and needs no GPU; heavy pieces (diffusers, the evaluator)
are imported only when used.
"""

from __future__ import annotations

from selfflow.base.errors import CheckpointError, ConfigurationError, DownloadError, SelfFlowError
from selfflow.base.lazy import lazy_names
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

# Lazy names keep `import selfflow` fast (no torch import for `selfflow --help`).
_HOMES = {
    "ModelConfig": "selfflow.model.network",
    "SelfFlowDiT": "selfflow.model.network",
    "load_model": "selfflow.model.checkpoint",
    "save_model": "selfflow.model.checkpoint",
    "SelfFlowPipeline": "selfflow.sampling.pipeline",
}
__getattr__ = lazy_names(__name__, _HOMES)
