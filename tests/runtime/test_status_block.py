from __future__ import annotations

import os
import random
import secrets
import stat

import pytest

from minisrv.runtime.status_block import ModelFacts, SchedulerStats, StatusBlock


@pytest.fixture
def block():
    created = StatusBlock.create(f"/minisrv-test-{os.getpid()}-{secrets.token_hex(4)}-status", num_workers=3)
    yield created
    created.unlink()
    created.close()


def shm_path(block: StatusBlock) -> str:
    return "/dev/shm" + block.spec.name


def test_segment_is_private_to_the_user(block: StatusBlock) -> None:
    assert stat.S_IMODE(os.stat(shm_path(block)).st_mode) == 0o600


def test_last_worker_to_attach_unlinks_the_name(block: StatusBlock) -> None:
    workers = [StatusBlock(block.spec) for _ in range(3)]
    for slot, worker in enumerate(workers):
        assert os.path.exists(shm_path(block))
        worker.attach_worker(slot, 1000 + slot)
    assert not os.path.exists(shm_path(block))
    workers[0].mark_ready(0, 1000)   # mappings outlive the name
    assert block.ready_slots() == [True, False, False]
    for worker in workers:
        worker.close()


def test_readiness_per_slot(block: StatusBlock) -> None:
    worker = StatusBlock(block.spec)
    assert block.ready_slots() == [False, False, False]
    for slot in (2, 0, 1):
        worker.mark_ready(slot, 4242)
    assert block.ready_slots() == [True, True, True]
    worker.close()


def test_heartbeats_age_until_the_next_beat(block: StatusBlock) -> None:
    import time

    worker = StatusBlock(block.spec)
    assert block.heartbeat_ages() == [None, None, None]   # nothing ready: nothing to be late
    worker.mark_ready(1, 4242)                             # ready counts as a beat
    time.sleep(0.05)
    [none, age, none2] = block.heartbeat_ages()
    assert none is None and none2 is None and 0.04 < age < 1.0
    worker.beat(1)
    assert block.heartbeat_ages()[1] < 0.04
    worker.close()


def test_model_facts_and_stats_round_trip(block: StatusBlock) -> None:
    scheduler = StatusBlock(block.spec)
    facts = ModelFacts("SmolLM2-135M-Instruct 模型", max_model_len=8192, vocab_size=49152)
    scheduler.publish_model(facts)
    assert block.model() == facts
    rng = random.Random(11)
    for _ in range(50):
        stats = SchedulerStats(rng.randrange(300), rng.randrange(300), rng.random(), rng.randrange(1 << 40),
                               rng.randrange(1 << 40))
        scheduler.publish_stats(stats)
        assert block.stats() == stats
    scheduler.close()


def test_a_block_of_another_shape_is_refused(block: StatusBlock) -> None:
    with pytest.raises(ValueError, match="does not match"):
        StatusBlock(type(block.spec)(block.spec.name, num_workers=5))


def test_each_replica_publishes_its_own_stats_and_the_total_adds_them() -> None:
    block = StatusBlock.create(f"/minisrv-test-{os.getpid()}-{secrets.token_hex(4)}-status", num_workers=5,
                               num_replicas=2)
    try:
        block.publish_stats(SchedulerStats(num_running=3, kv_cache_usage=0.5, num_preemptions=1), replica=0)
        block.publish_stats(SchedulerStats(num_running=4, num_waiting=2, kv_cache_usage=0.25), replica=1)
        assert block.stats(1) == SchedulerStats(num_running=4, num_waiting=2, kv_cache_usage=0.25)
        assert block.total_stats() == SchedulerStats(num_running=7, num_waiting=2, kv_cache_usage=0.375,
                                                     num_preemptions=1)
        block.beat(4)   # the last worker's slot is not overwritten by the replicas' lines
        assert block.stats(0).num_running == 3
    finally:
        block.unlink()
        block.close()


def test_histograms_round_trip_and_add_up_over_replicas() -> None:
    from minisrv.scheduler.metrics import RequestMetrics
    from minisrv.wire.terms import REQUEST_HISTOGRAMS

    block = StatusBlock.create(f"/minisrv-test-{os.getpid()}-{secrets.token_hex(4)}-status", num_workers=2,
                               num_replicas=2)
    try:
        rng, each = random.Random(3), []
        for replica in range(2):
            metrics = RequestMetrics()
            for _ in range(200):
                metrics.observe(rng.randrange(len(REQUEST_HISTOGRAMS)), rng.random() * 100)
            block.publish_stats(SchedulerStats(num_running=replica + 1), metrics, replica)
            each.append(metrics)
            assert block.histograms(replica).counts == metrics.counts.tolist()
            assert block.histograms(replica).sums == metrics.sums.tolist()
        total = block.total_histograms()
        assert total.counts == [a + b for a, b in zip(each[0].counts, each[1].counts)]
        assert total.sums == pytest.approx([a + b for a, b in zip(each[0].sums, each[1].sums)])
        assert block.stats(1) == SchedulerStats(num_running=2)   # the histograms overwrite no stats
    finally:
        block.unlink()
        block.close()
