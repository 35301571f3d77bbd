"""ADM's Inception-v3 features, computed by executing the GraphDef's own nodes in PyTorch.

ADM feeds float32 NHWC images in [0, 255] at ``ExpandDims:0`` (the graph resizes to 299 and
normalises them itself) and reads:

- ``pool_3:0`` (N, 1, 1, 2048) -> 2048 pool features (FID, precision/recall, IS logits);
- ``mixed_6/conv:0`` (N, 17, 17, 192) -> first 7 channels, flattened in (h, w, c) order -> 2023
  "spatial" features (sFID);
- input 1 of ``softmax/logits/MatMul`` -> the 2048 x 1008 weight W; the IS softmax is
  ``softmax(pool @ W)`` with no bias.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from selfflow.base.errors import ConfigurationError
from selfflow.eval.graphdef import TFGraph
from selfflow.eval.tf_ops import GraphExecutor

INPUT_TENSOR = "ExpandDims:0"
POOL_TENSOR = "pool_3:0"
SPATIAL_TENSOR = "mixed_6/conv:0"
SOFTMAX_MATMUL = "softmax/logits/MatMul"
SPATIAL_CHANNELS = 7


class InceptionV3:
    """The 2015 Inception graph as a PyTorch feature extractor.

    ``graph`` is a path to the GraphDef or an already parsed :class:`TFGraph`.
    """

    def __init__(self, graph: str | os.PathLike | TFGraph, device: str | torch.device = "cpu"):
        self.graph = graph if isinstance(graph, TFGraph) else TFGraph.load(Path(graph))
        self.device = torch.device(device)
        needed = [
            INPUT_TENSOR.split(":")[0],
            POOL_TENSOR.split(":")[0],
            SPATIAL_TENSOR.split(":")[0],
            SOFTMAX_MATMUL,
        ]
        missing = [name for name in needed if name not in self.graph.nodes]
        if missing:
            raise ConfigurationError(
                f"{self.graph.source} is not ADM's Inception graph: it has no node "
                f"{', '.join(repr(m) for m in missing)} (expected classify_image_graph_def.pb)"
            )
        self.executor = GraphExecutor(
            self.graph,
            feeds=[INPUT_TENSOR],
            fetches=[POOL_TENSOR, SPATIAL_TENSOR],
            device=self.device,
        )
        matmul = self.graph.node(SOFTMAX_MATMUL)
        inputs = [i for i in matmul.input if not i.startswith("^")]
        weight = self.graph.constant(inputs[1]) if len(inputs) == 2 else None
        if weight is None or weight.ndim != 2:
            raise ConfigurationError(
                f"{self.graph.source}: input 1 of {SOFTMAX_MATMUL!r} is not a constant 2-D weight"
            )
        self.softmax_weight = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)).to(
            self.device
        )

    @property
    def sha256(self) -> str | None:
        return self.graph.sha256

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool, spatial) features of a batch of NHWC images with values in [0, 255]."""
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ConfigurationError(
                f"expected images of shape (N, H, W, 3), got {list(images.shape)}"
            )
        x = images.to(self.device, non_blocking=True).to(torch.float32)
        pool, spatial = self.executor({INPUT_TENSOR: x})
        n = x.shape[0]
        if spatial.dim() != 4 or spatial.shape[-1] < SPATIAL_CHANNELS:
            raise ConfigurationError(
                f"{SPATIAL_TENSOR} has shape {list(spatial.shape)}; expected (N, h, w, >= 7)"
            )
        return pool.reshape(n, -1), spatial[..., :SPATIAL_CHANNELS].reshape(n, -1)

    @torch.inference_mode()
    def softmax(self, pool: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``softmax(pool @ W)`` as ADM computes them for the IS."""
        pool = pool.to(self.device, torch.float32)
        if pool.shape[-1] != self.softmax_weight.shape[0]:
            raise ConfigurationError(
                f"pool features have {pool.shape[-1]} values; the softmax weight expects "
                f"{self.softmax_weight.shape[0]}"
            )
        return torch.softmax(pool @ self.softmax_weight, dim=-1)
