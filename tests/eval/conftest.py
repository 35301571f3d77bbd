"""Session-wide artefacts for the evaluator tests: synthetic Inception graphs written once."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfflow.eval.synthetic import inception_like_graph


@pytest.fixture(scope="session")
def inception_299(tmp_path_factory) -> Path:
    """2015 Inception structure at 1/8 width, resizing to 299 like ADM's graph."""
    path = tmp_path_factory.mktemp("graphs") / "inception_299.pb"
    path.write_bytes(inception_like_graph(width=0.125, seed=0))
    return path


@pytest.fixture(scope="session")
def inception_small(tmp_path_factory) -> Path:
    """Minimal width (66 pool features) resizing to 75: 3 x 3 mixed_6 map (63 spatial features), fast."""
    path = tmp_path_factory.mktemp("graphs") / "inception_75.pb"
    path.write_bytes(
        inception_like_graph(width=0.03, seed=1, classes=40, image_size=75, logit_scale=20.0)
    )
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets its own SELFFLOW_CACHE: no test reads or writes ~/.cache."""
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "cache"))
