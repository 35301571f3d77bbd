"""The streamed .npz (selfflow.base.npz) against numpy's own writer and reader."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from selfflow.base.errors import ConfigurationError
from selfflow.base.npz import (
    NpzArray,
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
    assert buffer.read() == array.tobytes()  # left at the start of the data


def test_header_parser_reads_numpys_format_2_and_fortran_order():
    buffer = io.BytesIO()
    header = {"descr": ">f4", "fortran_order": True, "shape": (4, 7)}
    np.lib.format.write_array_header_2_0(buffer, header)
    buffer.seek(0)
    info = read_npy_header(buffer)
    assert info.shape == (4, 7) and info.dtype == np.dtype(">f4") and info.fortran_order


def _header_with(text: str) -> io.BytesIO:
    body = text.encode("latin1") + b"\n"
    return io.BytesIO(b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (io.BytesIO(b"PK\x03\x04 a zip, not an array"), "magic string"),
        (io.BytesIO(b"\x93NUMPY\x04\x00\x10\x00"), "unknown .npy format version 4.0"),
        (io.BytesIO(b"\x93NUMPY\x01\x00\x50\x00{'descr'"), "truncated"),
        (io.BytesIO(b"\x93NUMPY\x02\x00\xff\xff\xff\x00"), "at most 10000"),
        (_header_with("{'descr': '<u1', 'shape': (2,)}"), "must hold descr, fortran_order"),
        (_header_with("{'descr': 'xyz', 'fortran_order': False, 'shape': (2,)}"), "bad descr"),
        (_header_with("{'descr': '<u1', 'fortran_order': False, 'shape': (2, -1)}"), "bad shape"),
        (_header_with("{'descr': '<u1', 'fortran_order': 0, 'shape': (2,)}"), "fortran_order"),
        (_header_with("__import__('os')"), "unreadable .npy header"),
    ],
)
def test_header_parser_refuses_bad_headers(raw, message):
    with pytest.raises(ValueError, match=message):
        read_npy_header(raw)


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
    assert all(b.flags.writeable for b in blocks)  # torch.from_numpy takes them without a copy


@pytest.mark.parametrize("compressed", [False, True])
def test_streaming_reader_matches_np_load_for_other_dtypes(tmp_path, compressed):
    rng = np.random.default_rng(3)
    arrays = {
        "floats": rng.standard_normal((9, 2, 5)).astype(">f4"),
        "labels": rng.integers(-5, 1000, size=11),
        "empty": np.zeros((0, 3), np.float64),
    }
    path = tmp_path / "x.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    for key, expected in arrays.items():
        array = NpzArray(path, key)
        assert array.shape == expected.shape and array.dtype == expected.dtype
        blocks = list(array.rows(4))
        assert [len(b) for b in blocks] == [
            min(4, len(expected) - s) for s in range(0, len(expected), 4)
        ]
        got = np.concatenate(blocks) if blocks else np.zeros((0, 3))
        np.testing.assert_array_equal(got, expected)


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
    with pytest.raises(ConfigurationError, match=r"x.npz \[arr_0\] is damaged.*CRC"):
        list(iter_npz_rows(path, "arr_0", rows_per_block=3))


def _npz_with_member(path, header: dict, data: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive, archive.open("arr_0.npy", "w") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(data)


def test_streaming_reader_reports_missing_and_extra_data(tmp_path):
    images = np.arange(10 * 6, dtype=np.uint8).reshape(10, 2, 3)
    header = np.lib.format.header_data_from_array_1_0(images)
    path = tmp_path / "x.npz"
    _npz_with_member(path, {**header, "shape": (12, 2, 3)}, images.tobytes())
    array = NpzArray(path)  # the header alone is fine
    with pytest.raises(ConfigurationError, match="promises 12 rows, the data holds 10"):
        list(array.rows(4))
    _npz_with_member(path, {**header, "shape": (9, 2, 3)}, images.tobytes())
    with pytest.raises(ConfigurationError, match=r"more data than its header's shape \(9, 2, 3\)"):
        list(iter_npz_rows(path, rows_per_block=4))


def test_streaming_reader_refuses_fortran_order_scalars_and_bad_headers(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, arr_0=np.asfortranarray(np.zeros((3, 4))), one=np.float32(1))
    assert NpzArray(path).info.fortran_order
    with pytest.raises(ConfigurationError, match="Fortran order"):
        list(iter_npz_rows(path))
    with pytest.raises(ConfigurationError, match="scalar"):
        list(iter_npz_rows(path, "one"))
    with zipfile.ZipFile(path, "w") as archive:
        bad = _header_with("{'descr': '?zz', 'fortran_order': False, 'shape': (2,)}")
        archive.writestr("arr_0.npy", bad.getvalue() + b"ab")
    with pytest.raises(ConfigurationError, match=r"x.npz \[arr_0\] is not a valid .npy array"):
        npz_array_info(path)


def test_streaming_reader_names_a_missing_key(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, images=np.zeros((1, 1), np.uint8))
    with pytest.raises(ConfigurationError, match="no array 'arr_0'.*images"):
        list(iter_npz_rows(path))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip" * 50)
    with pytest.raises(ConfigurationError, match="not a readable .npz"):
        npz_array_info(garbage)
