"""Where selfflow keeps what it downloads and computes once: ``$SELFFLOW_CACHE``.

A module of its own, free of heavy imports, so that the checkpoint loader, the evaluator and
the downloader all find the same folder without importing one another.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where downloads and cached reference features live (``~/.cache/selfflow`` by default)."""
    override = os.environ.get("SELFFLOW_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "selfflow"
