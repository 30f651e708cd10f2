from __future__ import annotations

import numpy as np
import pytest

from minisrv.engine.philox import philox4x32_10, uniform_draws

# Random123's tests/kat_vectors, the three "philox4x32 10" lines: counter[4], key[2] -> output[4].
KNOWN_ANSWERS = [
    ([0x00000000] * 4, [0x00000000] * 2, [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]


def test_philox_matches_random123_known_answers() -> None:
    counters = np.array([c for c, _, _ in KNOWN_ANSWERS])
    keys = np.array([k for _, k, _ in KNOWN_ANSWERS])
    expected = np.array([out for _, _, out in KNOWN_ANSWERS], dtype=np.uint32)
    np.testing.assert_array_equal(philox4x32_10(counters, keys), expected)


def test_uniform_draw_uses_curand_layout() -> None:
    # curand_init(seed, subsequence, 0): key = seed's two halves, counter = (0, 0, subsequence's halves).
    rng = np.random.default_rng(7)
    seeds = rng.integers(0, 2**63, size=5, dtype=np.uint64)
    positions = rng.integers(0, 2**40, size=5, dtype=np.uint64)
    low32 = np.uint64(0xFFFFFFFF)
    counters = np.stack([np.zeros(5, np.uint64), np.zeros(5, np.uint64), positions & low32, positions >> np.uint64(32)], 1)
    keys = np.stack([seeds & low32, seeds >> np.uint64(32)], 1)
    words = philox4x32_10(counters, keys)[:, 0].astype(np.float64)
    expected = (words * 2.0**-32 + 2.0**-33).astype(np.float32)   # float64 here: differs by < 1 float32 ulp
    draws = uniform_draws(seeds.tolist(), positions.tolist())
    assert draws.dtype == np.float32
    np.testing.assert_allclose(draws, expected, rtol=1.2e-7, atol=0)


def test_draws_depend_only_on_seed_and_position() -> None:
    rng = np.random.default_rng(11)
    seeds = rng.integers(0, 2**63, size=64).tolist()
    positions = rng.integers(0, 10_000, size=64).tolist()
    together = uniform_draws(seeds, positions)
    order = rng.permutation(64)
    shuffled = uniform_draws([seeds[i] for i in order], [positions[i] for i in order])
    np.testing.assert_array_equal(shuffled, together[order])
    one_by_one = np.concatenate([uniform_draws([s], [p]) for s, p in zip(seeds[:8], positions[:8])])
    np.testing.assert_array_equal(one_by_one, together[:8])


def test_draws_are_uniform_and_in_range() -> None:
    # One seed over consecutive positions (how a request uses it), and many seeds at one position.
    for draws in (uniform_draws([12345] * 20_000, list(range(20_000))),
                  uniform_draws(list(range(20_000)), [3] * 20_000)):
        assert draws.min() > 0.0 and draws.max() <= 1.0
        assert len(np.unique(draws)) > 19_900
        # Kolmogorov-Smirnov distance to U(0, 1); 1.63 / sqrt(n) is the 1% critical value.
        ordered = np.sort(draws.astype(np.float64))
        grid = np.arange(1, len(ordered) + 1) / len(ordered)
        assert np.abs(ordered - grid).max() < 1.63 / np.sqrt(len(ordered))


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="seeds and positions"):
        uniform_draws([1, 2], [3])
    with pytest.raises(ValueError, match="counter must be"):
        philox4x32_10(np.zeros((2, 3)), np.zeros((2, 2)))
