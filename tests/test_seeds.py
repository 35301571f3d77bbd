"""Keyed streams use every bit of their key (issue 23, item 7).

torch's CPU generator (mt19937) keeps only the low 32 bits of a seed. The streams used to be
torch generators seeded with 63 bits of ``sha256("selfflow/PURPOSE/SEED/INDEX")``, so two
indices whose hashes agree in those 32 bits drew identical numbers; among ~10⁵ keys such a pair
already exists. These tests find such pairs by a birthday search and check that the streams
of the two keys now differ, after showing that torch itself would have drawn the same numbers.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import pytest
import torch

from selfflow.base import seeds
from selfflow.train.streams import DataOrder, StreamSpec, draw_step

SEED = 0
SHAPE = (4, 8, 8)


def old_seed(seed: int, index: int, purpose: str) -> int:
    """The 63-bit seed the streams were keyed by before (written here from the old rule)."""
    digest = hashlib.sha256(f"selfflow/{purpose}/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@functools.cache
def colliding(purpose: str) -> tuple[int, int]:
    """Two indices whose old seeds for ``purpose`` differ but agree in their low 32 bits."""
    seen: dict[int, int] = {}
    for index in range(1_000_000):
        low = old_seed(SEED, index, purpose) & 0xFFFFFFFF
        if low in seen:
            return seen[low], index
        seen[low] = index
    raise AssertionError("no collision in 10⁶ keys")  # expected after ~8·10⁴


@pytest.mark.parametrize(
    "purpose", ["label", "noise", "brownian", "posterior", "times", "label-drop"]
)
def test_the_premise_torch_draws_the_same_numbers_for_the_colliding_seeds(purpose):
    a, b = colliding(purpose)
    seed_a, seed_b = old_seed(SEED, a, purpose), old_seed(SEED, b, purpose)
    assert seed_a != seed_b
    draw_a = torch.randn(1000, generator=torch.Generator().manual_seed(seed_a))
    draw_b = torch.randn(1000, generator=torch.Generator().manual_seed(seed_b))
    assert torch.equal(draw_a, draw_b)


def test_sampling_streams_of_colliding_indices_differ():
    a, b = colliding("noise")
    noise = seeds.start_noise(SEED, [a, b], SHAPE)
    assert not torch.equal(noise[0], noise[1])
    a, b = colliding("brownian")
    increments = seeds.BrownianIncrements(SEED, [a, b], SHAPE)(0)
    assert not torch.equal(increments[0], increments[1])
    a, b = colliding("label")  # a label is one draw of 1000; compare the streams behind it
    first = seeds.keyed_rng(SEED, a, "label").random(64)
    second = seeds.keyed_rng(SEED, b, "label").random(64)
    assert not np.array_equal(first, second)


def training_spec(seed: int = SEED) -> StreamSpec:
    # 64 rows with dropout 0.5: two steps' drops agree by chance with probability 2⁻⁶⁴
    return StreamSpec(seed, 64, (4, 4, 4), 4, 0.25, 0.5, True)


@pytest.mark.parametrize(
    "purpose, field",
    [("posterior", "posterior"), ("times", "tau"), ("noise", "noise"), ("label-drop", "drop")],
)
def test_training_streams_of_colliding_steps_differ(purpose, field):
    a, b = colliding(purpose)
    order = DataOrder(SEED, 1000)
    draws_a = draw_step(training_spec(), order, a)
    draws_b = draw_step(training_spec(), order, b)
    assert not torch.equal(getattr(draws_a, field), getattr(draws_b, field))


def test_a_stream_is_a_function_of_its_key_and_every_key_bit_counts():
    again = seeds.keyed_rng(7, 3, "noise").standard_normal(16, dtype=np.float32)
    assert np.array_equal(seeds.keyed_rng(7, 3, "noise").standard_normal(16, np.float32), again)
    key = seeds.stream_key(7, 3, "noise")
    assert 0 <= key < 2**128
    for bit in (0, 31, 32, 63, 64, 127):
        flipped = np.random.Generator(np.random.Philox(key=key ^ (1 << bit)))
        assert not np.array_equal(flipped.standard_normal(16, np.float32), again), bit
    assert np.array_equal(
        seeds.normals(seeds.keyed_rng(7, 3, "noise"), (4, 4)).numpy().ravel(), again
    )


def test_training_draws_are_a_function_of_seed_and_step_with_the_documented_types():
    order = DataOrder(SEED, 1000)
    first = draw_step(training_spec(), order, 12)
    second = draw_step(training_spec(), DataOrder(SEED, 1000), 12)
    for name in ("posterior", "noise", "tau", "tau_teacher", "drop"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert first.noise.dtype == first.posterior.dtype == first.tau.dtype == torch.float32
    assert first.noise.shape == (64, 4, 4, 4) and first.tau.shape == (64, 4)
    assert first.drop.dtype == torch.bool and first.tau_teacher.shape == (64,)
    other_seed = draw_step(training_spec(seed=SEED + 1), order, 12)
    assert not torch.equal(other_seed.noise, first.noise)
