"""Execute GraphDef nodes in PyTorch with TensorFlow's semantics.

Tensors keep TensorFlow's NHWC layout at the graph level. Convolutions and pools look at an
NHWC tensor through a ``permute`` view, which is exactly PyTorch's channels-last memory format,
so no copies are made and cuDNN/oneDNN run their NHWC kernels.

Each supported op type has a *builder*: it reads the node's attributes and constant inputs once
(filters are transposed to PyTorch's layout ahead of time) and returns a small function of the
runtime inputs. An op type without a builder stops graph construction with its node's name.
"""

from selfflow.eval.tf_ops.base import OpContext, register, same_padding, supported_ops
from selfflow.eval.tf_ops.executor import GraphExecutor
from selfflow.eval.tf_ops.spatial import resize_weights

__all__ = [
    "GraphExecutor",
    "OpContext",
    "register",
    "resize_weights",
    "same_padding",
    "supported_ops",
]
