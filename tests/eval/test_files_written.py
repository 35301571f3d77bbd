"""What `evaluate` writes: metrics.json and the feature cache honour the umask (as the sample
npz does), and metrics.json says what is known of each input's integrity."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import numpy as np
import pytest

from selfflow.eval.evaluator import evaluate


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_metrics_and_cache_files_honour_the_umask(tmp_path, inception_small, umask):
    images = np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    np.savez(tmp_path / "sample.npz", arr_0=images[::-1])
    previous = os.umask(umask)
    try:
        metrics = evaluate(
            tmp_path / "ref.npz", tmp_path / "sample.npz", tmp_path / "out",
            inception=inception_small, device="cpu", progress=False,
        )  # fmt: skip
        plain = tmp_path / "plain-open"
        plain.write_bytes(b"")  # what open() gives under this umask: the expected mode
    finally:
        os.umask(previous)
    expected = stat.S_IMODE(plain.stat().st_mode)
    assert expected == 0o666 & ~umask
    cached = list((tmp_path / "cache" / "reference-features").glob("*.npz"))
    assert len(cached) == 1
    for path in (tmp_path / "out" / "metrics.json", cached[0]):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path

    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    ref_sha = hashlib.sha256((tmp_path / "ref.npz").read_bytes()).hexdigest()
    graph_sha = hashlib.sha256(inception_small.read_bytes()).hexdigest()
    assert written["reference"]["integrity"] == {
        "sha256": ref_sha, "verified": False, "how": "no published sha256 is known",
    }  # fmt: skip
    assert written["inception"]["integrity"]["sha256"] == graph_sha
    assert written["inception"]["integrity"]["verified"] is False
