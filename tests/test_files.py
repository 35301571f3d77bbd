"""File helpers: the one sha256 used for checkpoints, downloads and evaluator inputs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from selfflow.files import file_sha256


def test_file_sha256_matches_hashlib_on_multiple_chunks(tmp_path):
    data = os.urandom(10_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert file_sha256(path, chunk_size=777) == hashlib.sha256(data).hexdigest()
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()  # one chunk


def test_file_sha256_of_an_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert file_sha256(path) == hashlib.sha256(b"").hexdigest()


def test_every_module_hashes_with_the_same_function():
    import selfflow.checkpoint
    import selfflow.download
    import selfflow.eval.evaluator

    assert selfflow.checkpoint.file_sha256 is file_sha256
    assert selfflow.download.file_sha256 is file_sha256
    assert selfflow.eval.evaluator.file_sha256 is file_sha256


def test_files_and_download_stay_light():
    code = (
        "import sys, selfflow.files, selfflow.download; "
        "print('torch' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
