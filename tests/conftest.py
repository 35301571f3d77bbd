"""Shared test fixtures: tiny random models whose every layer does something."""

from __future__ import annotations

import pytest
import torch

from selfflow.model import ModelConfig, SelfFlowDiT


def randomize_(model: torch.nn.Module, seed: int = 0, gain: float = 1.0) -> torch.nn.Module:
    """Fill every parameter with fan-in-scaled noise.

    DiT's adaLN-Zero initialisation zeroes every block and the output layer, so a freshly built
    model is the zero function; tests need one where every weight matters.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            fan_in = param.shape[-1] if param.dim() > 1 else 16
            if "embedding_table" in name:
                fan_in = 1
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.copy_(noise * gain / fan_in**0.5)
    return model


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig.tiny()


@pytest.fixture
def tiny_model(tiny_config: ModelConfig) -> SelfFlowDiT:
    return randomize_(SelfFlowDiT(tiny_config), seed=1).eval()
