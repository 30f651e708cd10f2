"""The requests waiting to run, in the order the scheduler admits them, and which running request makes room.

First come, first served (--scheduling-policy fcfs): new requests queue at the back, a preempted one goes back to
the front, and the most recently admitted running request is preempted first. By priority (vLLM's `priority`
policy): the lowest `priority` value first, then the earliest arrival (a preempted request keeps its arrival, so
it goes ahead of later ones of its priority), and the running request of the highest value, then the latest
arrival, is preempted first.
"""
from __future__ import annotations

import bisect
from collections import deque
from typing import Iterator

from minisrv.scheduler.request import Request


def priority_key(req: Request) -> tuple[int, int]:
    return req.priority, req.arrival_order


class WaitingQueue:
    def __init__(self, by_priority: bool) -> None:
        self.by_priority = by_priority
        # By priority: kept sorted by priority_key (few requests wait at once; an insertion is a list shift).
        self._queue: deque[Request] | list[Request] = [] if by_priority else deque()

    def add(self, req: Request, preempted: bool = False) -> None:
        """A new request, or one `preempted` to make room, which recomputes what it had."""
        if self.by_priority:
            bisect.insort(self._queue, req, key=priority_key)
        elif preempted:
            self._queue.appendleft(req)
        else:
            self._queue.append(req)

    def pop_first(self) -> Request:
        return self._queue.pop(0) if self.by_priority else self._queue.popleft()

    def remove(self, req: Request) -> None:
        self._queue.remove(req)

    def preemption_victim(self, running: dict[int, Request]) -> Request:
        """The running request (`running`: in admission order) that gives up its pages first."""
        if self.by_priority:
            return max(running.values(), key=priority_key)
        return next(reversed(running.values()))

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)

    def __getitem__(self, index: int) -> Request:
        return self._queue[index]
