from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from minisrv.scheduler.kv_pages import PagePool, pages_for_tokens


def test_pages_for_tokens_rounds_up():
    rng = random.Random(1)
    for _ in range(200):
        page_size, tokens = rng.randint(1, 64), rng.randint(0, 5000)
        pages = pages_for_tokens(tokens, page_size)
        assert pages * page_size >= tokens > (pages - 1) * page_size or (tokens == 0 and pages == 0)


def test_allocate_and_release_return_pages_to_the_free_list():
    pool = PagePool(num_pages=7, page_size=3)
    a = pool.allocate(3)
    b = pool.allocate(4)
    assert sorted(a + b) == list(range(7)) and pool.num_free == 0 and pool.num_in_use == 7
    assert all(pool.ref_count(p) == 1 for p in a + b)
    pool.release(a)
    assert pool.num_free == 3 and sorted(pool.free_pages()) == sorted(a)
    with pytest.raises(RuntimeError, match="only 3 are free"):
        pool.allocate(4)
    assert sorted(pool.allocate(3)) == sorted(a)


def test_misuse_raises():
    pool = PagePool(num_pages=4, page_size=2)
    (page,) = pool.allocate(1)
    pool.release([page])
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([page])
    with pytest.raises(RuntimeError, match="is free"):
        pool.retain([page])
    with pytest.raises(RuntimeError, match="must be in use"):
        pool.mark_cached(page)
    with pytest.raises(RuntimeError, match="not idle"):
        pool.uncache(page)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_pages"):
            PagePool(num_pages=bad, page_size=2)
        with pytest.raises(ValueError, match="page_size"):
            PagePool(num_pages=2, page_size=bad)


def test_cached_pages_go_idle_in_release_order_and_evict_to_free():
    pool = PagePool(num_pages=6, page_size=2)
    table = pool.allocate(4)
    for page in table[:3]:
        pool.mark_cached(page)
    pool.retain(table[:2])                  # a second request shares the first two pages
    pool.release(table)                     # first request done: only its unshared cached page goes idle
    assert pool.idle_pages() == [table[2]] and table[3] in pool.free_pages()
    pool.release(table[:2])                 # second request done: last page first
    assert pool.idle_pages() == [table[2], table[1], table[0]]
    assert pool.num_in_use == 0 and pool.num_free == 3
    pool.retain([table[1]])                 # reuse moves a page out of idle; release puts it last
    pool.release([table[1]])
    assert pool.idle_pages() == [table[2], table[0], table[1]]
    assert pool.oldest_idle() == table[2]
    pool.uncache(table[2])
    assert not pool.is_cached(table[2]) and table[2] in pool.free_pages() and pool.num_idle == 2


class PoolMachine(RuleBasedStateMachine):
    """Random allocate/retain/release/cache/evict sequences against a plain model of holders."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = PagePool(num_pages=9, page_size=4)
        self.tables: list[list[int]] = []       # each a holder's pages
        self.cached: set[int] = set()

    @rule(num=st.integers(0, 4))
    def allocate(self, num):
        if num <= self.pool.num_free:
            self.tables.append(self.pool.allocate(num))

    @precondition(lambda self: self.tables)
    @rule(which=st.randoms(use_true_random=False))
    def share_cached_prefix(self, which):
        # A new holder takes the cached pages of some table, as a prefix-cache hit does.
        table = which.choice(self.tables)
        shared = [p for p in table if p in self.cached]
        self.pool.retain(shared)
        self.tables.append(shared)

    @precondition(lambda self: self.tables)
    @rule(which=st.randoms(use_true_random=False))
    def cache_one(self, which):
        table = which.choice(self.tables)
        fresh = [p for p in table if p not in self.cached]
        if fresh:
            self.pool.mark_cached(fresh[0])
            self.cached.add(fresh[0])

    @precondition(lambda self: self.tables)
    @rule(which=st.randoms(use_true_random=False))
    def release(self, which):
        table = self.tables.pop(which.randrange(len(self.tables)))
        self.pool.release(table)

    @rule(num=st.integers(1, 3))
    def evict(self, num):
        for _ in range(num):
            page = self.pool.oldest_idle()
            if page is None:
                break
            self.pool.uncache(page)
            self.cached.discard(page)

    @invariant()
    def states_partition_the_pool(self):
        holders = [0] * self.pool.num_pages
        for table in self.tables:
            for page in table:
                holders[page] += 1
        free, idle = set(self.pool.free_pages()), set(self.pool.idle_pages())
        assert len(free) == self.pool.num_free
        for page in range(self.pool.num_pages):
            assert self.pool.ref_count(page) == holders[page]
            assert self.pool.is_cached(page) == (page in self.cached)
            assert (page in free) == (holders[page] == 0 and page not in self.cached)
            assert (page in idle) == (holders[page] == 0 and page in self.cached)
        assert self.pool.num_free + self.pool.num_idle + self.pool.num_in_use == self.pool.num_pages


PoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, derandomize=True,
                                         database=None, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestPoolMachine = PoolMachine.TestCase
