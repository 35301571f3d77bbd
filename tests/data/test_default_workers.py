"""`prepare --num-workers` defaults to 8 decoding processes, fewer where fewer CPUs are usable
(torch's DataLoader warns about more workers than CPUs, and they only contend)."""

from __future__ import annotations

import os

import pytest

from selfflow.data.cli import default_workers


@pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (2, 2), (8, 8), (64, 8)])
def test_workers_are_capped_by_the_usable_cpus(monkeypatch, cpus, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert default_workers() == expected
