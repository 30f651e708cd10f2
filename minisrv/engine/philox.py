"""Counter-based uniform draws keyed by (seed, output position): Philox4x32-10 in cuRAND's layout.

Sampling needs one uniform number per request per output position that is a pure function of
(seed, position), so a seeded request samples the same tokens whatever else shares its batch.
A counter-based generator gives that without any generator state to carry between steps, and it is
what CUDA kernels use: the draw here equals, bit for bit,

    curandStatePhilox4_32_10_t s;
    curand_init(seed, /*subsequence=*/position, /*offset=*/0, &s);
    float u = curand_uniform(&s);

so a fused sampling kernel can reproduce it from seed/position device tensors inside a CUDA graph.
Philox is Random123's (Salmon et al., SC'11); cuRAND ships the same function, numpy only the 4x64 one.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PHILOX_ROUNDS = 10
# Random123's multipliers and Weyl key increments for Philox4x32.
_MULTIPLIER_0 = np.uint64(0xD2511F53)
_MULTIPLIER_1 = np.uint64(0xCD9E8D57)
_KEY_BUMP_0 = np.uint64(0x9E3779B9)
_KEY_BUMP_1 = np.uint64(0xBB67AE85)
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def philox4x32_10(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32-10 of many blocks at once: counter [n, 4] and key [n, 2] 32-bit words -> [n, 4] uint32.

    Words are held in uint64 so the 32x32-bit products are exact; numpy has no mulhi.
    """
    counter = np.asarray(counter, dtype=np.uint64)
    key = np.asarray(key, dtype=np.uint64)
    if counter.ndim != 2 or counter.shape[1] != 4 or key.shape != (counter.shape[0], 2):
        raise ValueError(f"counter must be [n, 4] and key [n, 2], got {counter.shape} and {key.shape}")
    c0, c1, c2, c3 = (counter[:, i] for i in range(4))
    k0, k1 = key[:, 0], key[:, 1]
    for _ in range(PHILOX_ROUNDS):
        product_0 = c0 * _MULTIPLIER_0
        product_1 = c2 * _MULTIPLIER_1
        c0, c1, c2, c3 = (
            (product_1 >> _SHIFT32) ^ c1 ^ k0,
            product_1 & _LOW32,
            (product_0 >> _SHIFT32) ^ c3 ^ k1,
            product_0 & _LOW32,
        )
        k0 = (k0 + _KEY_BUMP_0) & _LOW32
        k1 = (k1 + _KEY_BUMP_1) & _LOW32
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def uniform_draws(seeds: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """float32 uniforms in (0, 1], one per (seed, position) pair: curand_uniform after curand_init(seed, position, 0)."""
    seeds_u64 = np.asarray(seeds, dtype=np.uint64)
    positions_u64 = np.asarray(positions, dtype=np.uint64)
    if seeds_u64.shape != positions_u64.shape or seeds_u64.ndim != 1:
        raise ValueError(f"seeds and positions must be 1-D of one length, got {seeds_u64.shape}, {positions_u64.shape}")
    zeros = np.zeros_like(seeds_u64)
    # curand_init puts the subsequence in counter words z, w and the seed in the key; offset 0 leaves x, y.
    counter = np.stack([zeros, zeros, positions_u64 & _LOW32, positions_u64 >> _SHIFT32], axis=1)
    key = np.stack([seeds_u64 & _LOW32, seeds_u64 >> _SHIFT32], axis=1)
    first_word = philox4x32_10(counter, key)[:, 0]
    # cuRAND's _curand_uniform: x * 2^-32 + 2^-33 in float32. The uint32 -> float32 cast rounds to nearest
    # (exact through float64) as CUDA's does; the product is exact, so only the sum rounds, FMA or not.
    as_float = first_word.astype(np.float64).astype(np.float32)
    return as_float * np.float32(2.0**-32) + np.float32(2.0**-33)
