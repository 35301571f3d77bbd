"""File helpers: the one sha256, the one atomic write and the clean-up of its temporaries."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from selfflow.base.files import file_sha256


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
    import selfflow.base.download
    import selfflow.eval.evaluator
    import selfflow.model.checkpoint

    assert selfflow.model.checkpoint.file_sha256 is file_sha256
    assert selfflow.base.download.file_sha256 is file_sha256
    assert selfflow.eval.evaluator.file_sha256 is file_sha256


def test_files_and_download_stay_light():
    code = (
        "import sys, selfflow.base.files, selfflow.base.download; "
        "print('torch' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_replaced_atomically_keeps_the_old_file_when_the_writer_fails(tmp_path):
    import pytest

    from selfflow.base.files import replaced_atomically

    path = tmp_path / "data.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), replaced_atomically(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["data.json"]  # no temporary left behind
    with replaced_atomically(path, fsync=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".")
        tmp.write_text("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["data.json"]


def test_atomic_write_writes_bytes_and_makes_missing_folders(tmp_path):
    from selfflow.base.files import atomic_write

    path = tmp_path / "a" / "b.bin"
    atomic_write(path, lambda handle: handle.write(b"\x00\x01"))
    assert path.read_bytes() == b"\x00\x01"


def test_the_clean_up_removes_exactly_the_temporaries_of_killed_writers(tmp_path):
    from selfflow.base.files import remove_temporaries, temporary_name

    keep = ["shard_00000.npz", "manifest.json", ".hidden", "notes.tmp"]
    for name in keep:
        (tmp_path / name).write_text("x")
    temporaries = [temporary_name(tmp_path / "manifest.json"), tmp_path / ".x.npz.tmp-99999"]
    for path in temporaries:
        path.write_text("half")
    (tmp_path / ".dir.tmp-1").mkdir()  # a folder is never a writer's temporary
    assert remove_temporaries([tmp_path, tmp_path / "missing"]) == 2
    assert sorted(os.listdir(tmp_path)) == sorted([*keep, ".dir.tmp-1"])


def test_every_atomic_rename_goes_through_the_one_helper():
    """temp + os.replace is written once; a copy elsewhere would name its temporaries its own way."""
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "selfflow"
    callers = sorted(
        str(path.relative_to(src))
        for path in src.rglob("*.py")
        if "os.replace(" in path.read_text(encoding="utf-8")
    )
    # download.py renames its resumable ``.part`` file, kept on purpose across runs
    assert callers == ["base/download.py", "base/files.py"]


def test_folder_sha256_is_the_hash_of_names_and_contents_in_order(tmp_path):
    from selfflow.base.files import folder_sha256

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"bee")
    (tmp_path / "a.json").write_bytes(b"{}")
    expected = hashlib.sha256(b"a.json\0{}" + b"sub/b.bin\0bee").hexdigest()
    assert folder_sha256(tmp_path) == expected
    (tmp_path / "a.json").write_bytes(b"{ }")
    assert folder_sha256(tmp_path) != expected
