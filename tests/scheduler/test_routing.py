"""Data-parallel routing: the least loaded replica, unless another likely holds the prompt's start in its cache."""
from __future__ import annotations

from minisrv.scheduler.routing import ReplicaRouter, RoutingPolicy, page_prefix_hashes
from minisrv.wire.terms import SchedulerStats

POLICY = RoutingPolicy(page_size=4, min_cached_share=0.5, max_imbalance=3)


def test_prefix_hashes_are_per_whole_page_and_chained() -> None:
    a = page_prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = page_prefix_hashes([1, 2, 3, 4, 5, 6, 7, 0], 4)
    assert len(a) == 2 and len(b) == 2
    assert a[0] == b[0] and a[1] != b[1]
    assert page_prefix_hashes([9, 9, 9, 9, 5, 6, 7, 8], 4)[1] != a[1]   # the same second page after another first


def test_a_burst_between_publications_spreads_over_the_replicas() -> None:
    router = ReplicaRouter(3, POLICY)
    chosen = [router.route([i, i + 1, i + 2]) for i in range(6)]
    assert sorted(chosen) == [0, 0, 1, 1, 2, 2]


def test_published_load_steers_new_requests_to_the_idle_replica() -> None:
    router = ReplicaRouter(2, POLICY)
    router.observe(0, SchedulerStats(num_running=10, num_waiting=2))
    router.observe(1, SchedulerStats(num_running=1))
    assert [router.route([i] * 3) for i in range(5)] == [1] * 5
    # The five sent since count until replica 1 publishes again: 1 + 5 = 6 < 12.
    assert router.load(1) == 6
    router.observe(1, SchedulerStats(num_running=6))
    assert router.load(1) == 6


def test_a_shared_prefix_goes_where_it_was_sent_while_the_load_allows() -> None:
    router = ReplicaRouter(2, POLICY)
    system = list(range(100, 116))   # four pages
    first = router.route(system + [1, 2])
    assert router.route(system + [3, 4]) == first   # 16 of 18 tokens cached there
    assert router.route([7, 7, 7, 7, 7]) != first   # nothing cached: the less loaded one
    for _ in range(3):
        router.route(system + [5])   # the cached replica gets busier...
    assert router.load(first) - router.load(1 - first) > POLICY.max_imbalance
    assert router.route(system + [6]) == 1 - first   # ...until balance wins


def test_after_a_flush_no_replica_is_preferred_for_a_prefix() -> None:
    router = ReplicaRouter(2, POLICY)
    system = list(range(100, 116))
    first = router.route(system + [1, 2])
    router.forget_prefixes()
    assert router.route(system + [3, 4]) != first   # balance alone: the other, idle replica


def test_choices_count_as_load() -> None:
    router = ReplicaRouter(2, POLICY)
    router.route([1, 2, 3], choices=8)
    assert [router.load(0), router.load(1)] == [8, 0]
