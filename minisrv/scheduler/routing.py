"""Which data-parallel scheduler replica gets a request: the least loaded, or the one whose prefix cache likely
holds the request's prompt prefix when that saves more (SGLang's cache-aware routing, approximated here).

Each tokenizer worker routes its own requests with a `ReplicaRouter`. A replica's load is its running and
waiting requests as it last published them (the status block) plus what this router sent it since that
publication. What a replica's prefix cache holds is approximated by the page-aligned prompt prefixes this
router sent it, hashed and kept in least-recently-used order up to a bound; a prefix it lost to eviction only
costs a recomputation there.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from minisrv.wire.terms import SchedulerStats


@dataclass(frozen=True)
class RoutingPolicy:
    page_size: int = 16
    # A cached prefix wins over balance when it covers at least this share of the prompt...
    min_cached_share: float = 0.5
    # ...and the replica holding it has at most this many more requests than the least loaded one.
    max_imbalance: int = 32
    max_prefixes: int = 1 << 16   # remembered page prefixes per replica


def page_prefix_hashes(prompt_ids: Sequence[int], page_size: int) -> list[int]:
    """One hash per whole page of the prompt: of the prompt up to that page's end (chained, so equal hashes
    mean equal prefixes up to collisions)."""
    hashes, running = [], 0
    for end in range(page_size, len(prompt_ids) + 1, page_size):
        running = hash((running, *prompt_ids[end - page_size:end]))
        hashes.append(running)
    return hashes


class ReplicaRouter:
    def __init__(self, num_replicas: int, policy: RoutingPolicy = RoutingPolicy()) -> None:
        self.policy = policy
        self.prefixes: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_replicas)]
        self.sent_since: list[int] = [0] * num_replicas
        self.published: list[SchedulerStats | None] = [None] * num_replicas
        self.next_tie = 0

    def observe(self, replica: int, stats: SchedulerStats) -> None:
        """A replica's published stats; requests sent before them are counted there from now on."""
        if stats != self.published[replica]:
            self.published[replica], self.sent_since[replica] = stats, 0

    def forget_prefixes(self) -> None:
        """The replicas' prefix caches were flushed: nothing is known to be cached anywhere."""
        for known in self.prefixes:
            known.clear()

    def load(self, replica: int) -> int:
        stats = self.published[replica]
        published = stats.num_running + stats.num_waiting if stats is not None else 0
        return published + self.sent_since[replica]

    def route(self, prompt_ids: Sequence[int], choices: int = 1) -> int:
        """The replica for a request (all its `choices`, which share the prompt's pages there)."""
        n = len(self.prefixes)
        hashes = page_prefix_hashes(prompt_ids, self.policy.page_size)
        loads = [self.load(r) for r in range(n)]
        least = min(loads)
        # Ties go round-robin, so a burst that arrives between two publications still spreads.
        order = [(self.next_tie + i) % n for i in range(n)]
        chosen = min(order, key=lambda r: loads[r])
        cached = [self._cached_pages(r, hashes) for r in range(n)]
        best = max(order, key=lambda r: cached[r])
        if (hashes and cached[best] * self.policy.page_size >= self.policy.min_cached_share * len(prompt_ids)
                and loads[best] - least <= self.policy.max_imbalance):
            chosen = best
        self.next_tie = (chosen + 1) % n
        self.sent_since[chosen] += choices
        self._remember(chosen, hashes)
        return chosen

    def _cached_pages(self, replica: int, hashes: list[int]) -> int:
        known = self.prefixes[replica]
        count = 0
        for h in hashes:
            if h not in known:
                break
            count += 1
        return count

    def _remember(self, replica: int, hashes: list[int]) -> None:
        known = self.prefixes[replica]
        for h in hashes:
            known[h] = None
            known.move_to_end(h)
        while len(known) > self.policy.max_prefixes:
            known.popitem(last=False)
