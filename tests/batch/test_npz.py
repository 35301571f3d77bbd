"""The streamed .npz against numpy's own writer and reader."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from selfflow.batch.npz import (
    NpzStreamWriter,
    iter_npz_rows,
    npy_header,
    npz_array_info,
    read_npy_header,
)


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((50000, 256, 256, 3), np.uint8), ((7,), np.int64), ((0, 3), np.float32), ((2, 3, 4), "<f8")],
)
def test_header_is_byte_identical_to_numpys(shape, dtype):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    )
    assert npy_header(shape, dtype) == buffer.getvalue()
    assert len(npy_header(shape, dtype)) % 64 == 0


def test_header_parser_reads_what_numpy_writes():
    array = np.zeros((3, 5, 2), dtype=np.int16)
    buffer = io.BytesIO()
    np.save(buffer, array)
    buffer.seek(0)
    info = read_npy_header(buffer)
    assert info.shape == (3, 5, 2) and info.dtype == np.int16 and not info.fortran_order
    assert info.row_bytes == 5 * 2 * 2


def test_streamed_npz_reads_back_with_np_load(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(37, 5, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, size=37)
    path = tmp_path / "out.npz"
    with NpzStreamWriter(path) as npz:
        with npz.array("arr_0", images.shape, np.uint8) as out:
            for start in range(0, 37, 10):  # uneven blocks
                out.write(images[start : start + 10])
        with npz.array("arr_1", labels.shape, np.int64) as out:
            out.write(labels)
    with np.load(path, allow_pickle=False) as loaded:
        assert loaded.files == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(loaded["arr_0"], images)
        np.testing.assert_array_equal(loaded["arr_1"], labels)
    assert npz_array_info(path).shape == (37, 5, 6, 3)
    with zipfile.ZipFile(path) as archive:  # stored, like np.savez, so it can be streamed
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}


def test_streaming_reader_matches_np_savez(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(23, 4, 4, 3), dtype=np.uint8)
    path = tmp_path / "ref.npz"
    np.savez(path, images, np.arange(23))  # numpy's writer, independent of ours
    blocks = list(iter_npz_rows(path, "arr_0", rows_per_block=5))
    assert [len(b) for b in blocks] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate(blocks), images)


def test_writer_refuses_a_short_entry(tmp_path):
    npz = NpzStreamWriter(tmp_path / "x.npz")
    with (
        pytest.raises(ValueError, match="2 rows written, 3 declared"),
        npz.array("arr_0", (3, 2), np.uint8) as out,
    ):
        out.write(np.zeros((2, 2), np.uint8))
    npz.close()


def test_writer_refuses_rows_of_another_shape_or_too_many(tmp_path):
    with NpzStreamWriter(tmp_path / "x.npz") as npz, npz.array("arr_0", (2, 2), np.uint8) as out:
        with pytest.raises(ValueError, match="expected rows"):
            out.write(np.zeros((1, 3), np.uint8))
        with pytest.raises(ValueError, match="too many rows"):
            out.write(np.zeros((3, 2), np.uint8))
        out.write(np.zeros((2, 2), np.uint8))


def test_streaming_reader_catches_a_flipped_byte(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8)
    path = tmp_path / "x.npz"
    np.savez(path, images)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside arr_0's data
    path.write_bytes(bytes(raw))
    with pytest.raises(zipfile.BadZipFile):
        list(iter_npz_rows(path, "arr_0", rows_per_block=3))


def test_streaming_reader_names_a_missing_key(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, images=np.zeros((1, 1), np.uint8))
    with pytest.raises(Exception, match="no array 'arr_0'.*images"):
        list(iter_npz_rows(path))
