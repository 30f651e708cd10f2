"""Request ids across the pipeline: each of a request's n choices is its own engine request.

The API server numbers requests (the base id); the tokenizer worker turns a request with n choices
into n GENERATE records whose ids carry the choice index in their low bits, so the scheduler sees
independent requests (sharing prompt pages through the prefix cache) and every TEXT row tells the
API server which request and which choice it belongs to without a lookup table.
"""
from __future__ import annotations

CHOICE_BITS = 4
MAX_CHOICES = 1 << CHOICE_BITS   # n is in [1, MAX_CHOICES]
MAX_BASE_ID = (1 << (64 - CHOICE_BITS)) - 1


def choice_rid(base: int, index: int) -> int:
    """The engine request id of choice `index` of request `base`."""
    return base << CHOICE_BITS | index


def split_rid(rid: int) -> tuple[int, int]:
    """(base id, choice index) of an engine request id."""
    return rid >> CHOICE_BITS, rid & (MAX_CHOICES - 1)


_GOLDEN = 0x9E3779B97F4A7C15   # 2**64 / golden ratio: spreads consecutive indices over all bits


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a seeded request: a seed fixes all n choices, yet they are different
    samples (as in vLLM). Choice 0 keeps the request's seed, so n does not change the first choice."""
    if seed is None or index == 0:
        return seed
    return (seed ^ (index * _GOLDEN)) & ((1 << 63) - 1)
