"""Damaged sample files and unwritable caches: one clear line or a harmless accept, early.

Random corruptions (seeded) of a sample npz must end in a :class:`SelfFlowError` naming the
file, or be accepted with the very images that were written; never another exception type.
The evaluator reads the sample file end to end before it computes any reference feature.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from selfflow.base.errors import SelfFlowError
from selfflow.eval import evaluator
from selfflow.eval.evaluator import evaluate
from selfflow.eval.npz import NpzImages, read_small_arrays, verify_batch

IMAGES = np.random.default_rng(5).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
LABELS = np.arange(12, dtype=np.int64)


def sample_bytes(tmp_path: Path, compressed: bool = False) -> bytes:
    path = tmp_path / "pristine.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=IMAGES, arr_1=LABELS)
    return path.read_bytes()


def read_as_the_evaluator_does(path: Path) -> np.ndarray:
    """The evaluator's reading of a sample file: open, check end to end, stream, statistics."""
    images = NpzImages(path, role="sample batch")
    verify_batch(path, "sample batch", progress=False)
    read_small_arrays(path, ["mu", "sigma", "mu_s", "sigma_s"], "sample batch")
    return np.concatenate(list(images.batches(5)))


def corruptions(data: bytes, rng: np.random.Generator, count: int):
    """(description, corrupted bytes): flipped bytes anywhere, cuts, inserted and zeroed runs,
    and garbled end-of-central-directory fields."""
    end = data.rfind(b"PK\x05\x06")
    for n in range(count):
        raw = bytearray(data)
        kind = n % 6
        if kind == 0:
            at = int(rng.integers(len(raw)))
            raw[at] ^= int(rng.integers(1, 256))
            yield f"byte {at} flipped", bytes(raw)
        elif kind == 1:
            at = int(rng.integers(1, len(raw)))
            yield f"cut at {at}", bytes(raw[:at])
        elif kind == 2:
            at = int(rng.integers(len(raw)))
            yield f"4 bytes inserted at {at}", bytes(raw[:at] + rng.bytes(4) + raw[at:])
        elif kind == 3:
            at = int(rng.integers(len(raw) - 64))
            raw[at : at + 64] = bytes(64)
            yield f"64 bytes zeroed at {at}", bytes(raw)
        elif kind == 4:  # the directory's offset or size: past the end, or anywhere
            field = end + int(rng.choice([12, 16]))
            value = int(rng.choice([len(raw) + 1000, 2**32 - 1, int(rng.integers(len(raw)))]))
            struct.pack_into("<I", raw, field, value)
            yield f"directory field {field - end} set to {value}", bytes(raw)
        else:
            at = int(rng.integers(len(raw)))
            for k in range(at, min(at + 3, len(raw))):
                raw[k] = int(rng.integers(256))
            yield f"3 random bytes at {at}", bytes(raw)


@pytest.mark.parametrize("compressed", [False, True])
def test_random_corruptions_give_one_clear_line_or_the_written_images(tmp_path, compressed):
    data = sample_bytes(tmp_path, compressed)
    rng = np.random.default_rng(2026 + compressed)
    path = tmp_path / "samples.npz"
    outcomes = {"refused": 0, "accepted": 0}
    for description, damaged in corruptions(data, rng, 240):
        path.write_bytes(damaged)
        try:
            images = read_as_the_evaluator_does(path)
        except SelfFlowError as error:
            message = str(error)
            assert str(path) in message and "\n" not in message, (description, message)
            outcomes["refused"] += 1
            continue
        except Exception as error:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{description}: {type(error).__name__}: {error}")
        # accepted: then it must be harmless, the images exactly as written
        np.testing.assert_array_equal(images, IMAGES, err_msg=description)
        outcomes["accepted"] += 1
    assert outcomes["refused"] > 150, outcomes  # most corruptions must be noticed


def test_a_directory_that_points_past_the_end_is_reported_as_damage(tmp_path):
    raw = bytearray(sample_bytes(tmp_path))
    end = raw.rfind(b"PK\x05\x06")
    struct.pack_into("<I", raw, end + 16, len(raw) + 1000)  # start of the central directory
    path = tmp_path / "samples.npz"
    path.write_bytes(bytes(raw))
    with pytest.raises(SelfFlowError, match="damaged|not a readable") as caught:
        read_as_the_evaluator_does(path)
    assert str(path) in str(caught.value)


@pytest.fixture
def two_batches(tmp_path):
    from tests.eval.test_evaluator import make_images

    ref, sample = tmp_path / "ref.npz", tmp_path / "sample.npz"
    np.savez(ref, arr_0=make_images(40, 16, 1))
    np.savez(sample, arr_0=make_images(30, 16, 2))
    return ref, sample


def test_a_sample_damaged_in_the_middle_is_reported_before_any_reference_feature(
    two_batches, inception_small, monkeypatch
):
    ref, sample = two_batches
    raw = bytearray(sample.read_bytes())
    raw[len(raw) // 2] ^= 0x40  # inside the image data: only the CRC-32 at its end tells
    sample.write_bytes(bytes(raw))
    passes = []
    inner = evaluator.compute_activations
    monkeypatch.setattr(
        evaluator,
        "compute_activations",
        lambda model, images, *a, **k: passes.append(images.path) or inner(model, images, *a, **k),
    )
    with pytest.raises(SelfFlowError, match="damaged.*CRC"):
        evaluate(ref, sample, inception=inception_small, device="cpu", progress=False)
    assert passes == []  # not one reference feature was computed


def test_an_unwritable_feature_cache_is_skipped_with_a_note(
    two_batches, inception_small, monkeypatch, capsys
):
    ref, sample = two_batches
    if not Path("/sys").is_dir() or (Path("/sys") / "reference-features").exists():
        pytest.skip("needs Linux's /sys, which no user can write into")
    monkeypatch.setenv("SELFFLOW_CACHE", "/sys")  # as a read-only, admin-filled cache
    result = evaluate(ref, sample, inception=inception_small, device="cpu", progress=False)
    notes = [n for n in result["notes"] if "reference features not cached" in n]
    assert len(notes) == 1 and "/sys" in notes[0]
    assert result["reference"]["features_cached"] is False and np.isfinite(result["fid"])
    assert "note: reference features not cached" in capsys.readouterr().err


def test_a_missing_reference_creates_no_folder(tmp_path, two_batches, inception_small):
    _, sample = two_batches
    cache, out = tmp_path / "cache", tmp_path / "out"  # SELFFLOW_CACHE is tmp_path / "cache"
    with pytest.raises(SelfFlowError, match="does not exist"):
        evaluate(tmp_path / "missing.npz", sample, out, inception=inception_small, device="cpu")
    assert not cache.exists() and not out.exists()


def test_a_stored_zip_member_with_a_wrong_length_is_damage(tmp_path):
    """A header that promises more images than the member holds is refused by the check."""
    header = np.lib.format.header_data_from_array_1_0(IMAGES)
    header["shape"] = (13, 8, 8, 3)
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w") as archive, archive.open("arr_0.npy", "w") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(IMAGES.tobytes())
    with pytest.raises(SelfFlowError, match="needs 2496"):
        verify_batch(path, "sample batch", progress=False)
