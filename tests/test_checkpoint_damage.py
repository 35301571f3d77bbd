"""A seeded sweep of random damage to a checkpoint file: every damaged copy is either refused
with a CheckpointError or loads exactly the original tensors. Never a silent change, never
another exception type (a traceback instead of a one-line message)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from selfflow.base.errors import CheckpointError
from selfflow.model.checkpoint import load_model, save_model


def _damage(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random corruption of the kinds disks, copies and downloads produce."""
    kind = rng.choice(["bit flip", "random byte", "zeroed run", "truncation", "inserted byte"])
    at = rng.randrange(len(data))
    out = bytearray(data)
    if kind == "bit flip":
        out[at] ^= 1 << rng.randrange(8)
    elif kind == "random byte":
        out[at] = (out[at] + rng.randrange(1, 256)) % 256
    elif kind == "zeroed run":
        end = min(len(out), at + rng.randrange(1, 64))
        out[at:end] = bytes(end - at)
    elif kind == "truncation":
        out = out[:at]
    else:
        out[at:at] = bytes([rng.randrange(256)])
    return f"{kind} at byte {at} of {len(data)}", bytes(out)


@pytest.mark.parametrize("seed", range(4))
def test_random_damage_is_refused_or_harmless(tmp_path, tiny_model, seed):
    path = save_model(tiny_model, tmp_path / "tiny.pt")
    original = path.read_bytes()
    expected = {k: v.clone() for k, v in load_model(path).state_dict().items()}
    rng = random.Random(1000 + seed)
    refused = harmless = 0
    for trial in range(60):
        what, damaged = _damage(original, rng)
        if damaged == original:
            continue
        copy = tmp_path / f"damaged_{trial}.pt"
        copy.write_bytes(damaged)
        try:
            state = load_model(copy).state_dict()
        except CheckpointError:
            refused += 1
            continue
        # loaded: it must be exactly the original weights
        assert state.keys() == expected.keys(), what
        for key, value in expected.items():
            assert torch.equal(state[key], value), f"{what}: {key} changed silently"
        harmless += 1
    assert refused > 0  # the sweep did reach the data


def test_a_flipped_flag_bit_in_the_zip_directory_is_damage_not_a_traceback(tmp_path, tiny_model):
    """Found by the sweep: zipfile raises NotImplementedError ("compressed patched data") when
    bit 5 of an entry's flags flips in the central directory."""
    path = save_model(tiny_model, tmp_path / "tiny.pt")
    data = bytearray(path.read_bytes())
    directory = data.rindex(b"PK\x01\x02")  # the last entry's central directory header
    data[directory + 8] |= 0x20  # general purpose flags, bit 5
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        load_model(damaged)


def test_a_zip_whose_directory_is_cut_off_is_damage(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "tiny.pt")
    data = path.read_bytes()
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(data[: data.rindex(b"PK\x01\x02")])
    with pytest.raises(CheckpointError, match="zip directory"):
        load_model(damaged)


def test_every_reader_of_pt_files_goes_through_the_verified_loader():
    """torch.load appears only inside the checkpoint module (behind the CRC pass): a new reader
    elsewhere (a training resume, a script) must call torch_load_verified instead."""
    root = Path(__file__).resolve().parents[1]
    callers = [
        str(path.relative_to(root))
        for folder in ("src", "benchmarks")
        for path in (root / folder).rglob("*.py")
        if "torch.load(" in path.read_text()
    ] + [
        name for name in ("sample.py", "evaluator.py") if "torch.load(" in (root / name).read_text()
    ]
    assert sorted(callers) == ["benchmarks/crc_cost.py", "src/selfflow/model/checkpoint.py"]
