from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minisrv.scheduler.kv_pages import PagePool, pages_for_tokens
from minisrv.scheduler.prefix_cache import PrefixCache

PAGE = 4


def new_cache(num_pages: int = 32) -> PrefixCache:
    return PrefixCache(PagePool(num_pages=num_pages, page_size=PAGE))


def compute(cache: PrefixCache, tokens: list[int]) -> list[int]:
    """What a request does: take cached pages, allocate the rest, cache its full pages; returns its page table."""
    pages, cursor = cache.match(tokens)
    pages += cache.pool.allocate(pages_for_tokens(len(tokens), PAGE) - len(pages))
    cache.insert(cursor, tokens, pages, len(tokens) // PAGE)
    return pages


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000) for _ in range(n)]


def test_match_finds_only_whole_cached_pages_after_the_same_prefix():
    rng = random.Random(2)
    cache = new_cache()
    tokens = random_tokens(rng, 3 * PAGE + 2)
    table = compute(cache, tokens)
    assert cache.num_cached_pages == 3

    pages, cursor = cache.match(tokens + random_tokens(rng, 5))
    assert pages == table[:3] and cursor.depth == 3
    assert all(cache.pool.ref_count(p) == 2 for p in pages)
    cache.pool.release(pages)

    pages, cursor = cache.match(tokens[:2 * PAGE + 3])          # a partial third page does not match
    assert pages == table[:2] and cursor.depth == 2
    cache.pool.release(pages)

    # The second page's tokens after a different first page: its K/V would differ, so no hit.
    other = random_tokens(rng, PAGE) + tokens[PAGE:3 * PAGE]
    pages, cursor = cache.match(other)
    assert pages == [] and cursor is cache.root


def test_a_later_duplicate_switches_to_the_cached_page_and_frees_its_own():
    rng = random.Random(3)
    cache = new_cache()
    tokens = random_tokens(rng, 2 * PAGE + 1)
    first = cache.pool.allocate(3)
    second = cache.pool.allocate(3)                               # computed concurrently, no hit
    cache.insert(cache.root, tokens, first, 2)
    free_before = cache.pool.num_free
    own = list(second)
    cursor = cache.insert(cache.root, tokens, second, 2)
    assert second[:2] == first[:2] and second[2] == own[2] and cursor.depth == 2
    assert cache.pool.num_free == free_before + 2 and set(own[:2]) <= set(cache.pool.free_pages())
    assert [cache.pool.ref_count(p) for p in first] == [2, 2, 1]


def test_insert_continues_from_the_cursor_as_a_sequence_grows():
    rng = random.Random(4)
    cache = new_cache()
    tokens = random_tokens(rng, PAGE + 1)
    pages = cache.pool.allocate(2)
    cursor = cache.insert(cache.root, tokens, pages, 1)
    tokens += random_tokens(rng, PAGE)                            # decoded output fills the second page
    cursor = cache.insert(cursor, tokens, pages, 2)
    assert cursor.depth == 2 and cursor.parent.page == pages[0] and cursor.page == pages[1]
    assert cache.match(tokens)[0] == pages


def test_eviction_is_least_recently_used_and_leaves_first():
    rng = random.Random(5)
    cache = new_cache(num_pages=16)
    shared = random_tokens(rng, PAGE)
    chains = [shared + random_tokens(rng, 2 * PAGE) for _ in range(3)]
    tables = [compute(cache, tokens) for tokens in chains]
    for i in (1, 0, 2):                                           # requests finish in this order
        cache.pool.release(tables[i])
    assert cache.pool.num_idle == 7 and cache.pool.num_in_use == 0

    # Chain 1's leaf, then its middle page, go first; the shared page outlives all its successors.
    assert cache.evict(2) == 2
    assert cache.match(chains[1])[0] == tables[1][:1]
    cache.pool.release(tables[1][:1])                             # that touch makes the shared page recent
    assert cache.evict(2) == 2                                    # chain 0 goes next
    pages, _ = cache.match(chains[0])
    assert pages == tables[0][:1]
    cache.pool.release(pages)
    pages, _ = cache.match(chains[2])                             # chain 2 is untouched
    assert pages == tables[2]

    # Pages in use are never evicted, however old.
    assert cache.evict(10) == 0 and cache.num_cached_pages == 3
    cache.pool.release(pages)
    assert cache.evict(10) == 3 and cache.num_cached_pages == 0 and cache.pool.num_free == 16
    assert cache.root.children == {}


def test_out_of_order_release_is_detected():
    rng = random.Random(6)
    cache = new_cache()
    table = compute(cache, random_tokens(rng, 2 * PAGE))
    for page in table:                                            # first page first: the parent goes idle first
        cache.pool.release([page])
    with pytest.raises(RuntimeError, match="out of order"):
        cache.evict(1)


@settings(max_examples=80, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.sampled_from(["compute", "finish", "evict"]), st.integers(0, 2**32)),
                    max_size=40))
def test_random_use_keeps_tree_and_pool_consistent(ops):
    cache = new_cache(num_pages=24)
    pool = cache.pool
    stems = [random_tokens(random.Random(s), 3 * PAGE) for s in range(3)]
    live: list[tuple[list[int], list[int]]] = []                  # (tokens, page table) per holder
    for op, seed in ops:
        rng = random.Random(seed)
        if op == "compute":
            tokens = rng.choice(stems)[:rng.randrange(3 * PAGE + 1)] + random_tokens(rng, rng.randrange(1, 6))
            need = pages_for_tokens(len(tokens), PAGE)
            if need > pool.num_free + pool.num_idle:
                continue
            pages, cursor = cache.match(tokens)
            if need - len(pages) > pool.num_free:
                cache.evict(need - len(pages) - pool.num_free)
            pages += pool.allocate(need - len(pages))
            cache.insert(cursor, tokens, pages, len(tokens) // PAGE)
            live.append((tokens, pages))
        elif op == "finish" and live:
            pool.release(live.pop(rng.randrange(len(live)))[1])
        elif op == "evict":
            idle, wanted = pool.num_idle, rng.randrange(1, 5)
            assert cache.evict(wanted) == min(idle, wanted)
        # Every holder's full pages form its token path in the tree, which shares equal prefixes.
        for tokens, pages in live:
            node = cache.root
            for i in range(len(tokens) // PAGE):
                node = node.children[tuple(tokens[i * PAGE:(i + 1) * PAGE])]
                assert node.page == pages[i]
        holders = [0] * pool.num_pages
        for _, pages in live:
            for page in pages:
                holders[page] += 1
        assert all(pool.ref_count(p) == holders[p] for p in range(pool.num_pages))
        assert pool.num_free + pool.num_idle + pool.num_in_use == pool.num_pages
        assert cache.num_cached_pages == sum(pool.is_cached(p) for p in range(pool.num_pages))
    for _, pages in live:
        pool.release(pages)
    assert pool.num_in_use == 0
    cached = cache.num_cached_pages
    assert pool.num_idle == cached and cache.evict(pool.num_pages) == cached
    assert cache.num_cached_pages == 0 and pool.num_free == pool.num_pages
