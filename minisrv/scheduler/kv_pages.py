"""The KV page pool's bookkeeping: a free list and reference counts over fixed-size pages.

Every page is in exactly one of three states, and this module is the one place that knows which:

    free     on the free list; reference count 0.
    in use   reference count > 0: that many running requests' page tables hold it.
    idle     reference count 0 but kept by the prefix cache, so a later request with the same prefix
             can reuse its K/V. Idle pages are the evictable ones; they are kept in the order they
             became idle, oldest first, which is the prefix cache's LRU order.

A cached page moves between "in use" and "idle" as requests retain and release it; the prefix cache
(prefix_cache.py) decides which pages are cached and evicts idle ones back to the free list.
"""
from __future__ import annotations

from collections.abc import Iterable


def pages_for_tokens(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold the K/V of num_tokens tokens."""
    return -(-num_tokens // page_size)


class PagePool:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # A stack: pages freed last are handed out first, while their memory is still warm.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._ref_count = [0] * num_pages
        self._cached = [False] * num_pages
        # Insertion-ordered dict used as an ordered set: oldest idle page first.
        self._idle: dict[int, None] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    @property
    def num_in_use(self) -> int:
        return self.num_pages - len(self._free) - len(self._idle)

    def ref_count(self, page: int) -> int:
        return self._ref_count[page]

    def is_cached(self, page: int) -> bool:
        return self._cached[page]

    def is_idle(self, page: int) -> bool:
        return page in self._idle

    def free_pages(self) -> list[int]:
        return list(self._free)

    def idle_pages(self) -> list[int]:
        """Idle pages, least recently used first."""
        return list(self._idle)

    def allocate(self, num: int) -> list[int]:
        """Take num free pages, each with reference count 1 (held by the caller)."""
        if num > len(self._free):
            raise RuntimeError(f"asked for {num} KV pages but only {len(self._free)} are free")
        pages = [self._free.pop() for _ in range(num)]
        for page in pages:
            self._ref_count[page] = 1
        return pages

    def retain(self, pages: Iterable[int]) -> None:
        """One more holder for each page; pages must be in use or idle, never free."""
        for page in pages:
            if self._ref_count[page] == 0:
                if page not in self._idle:
                    raise RuntimeError(f"KV page {page} is free; only in-use or cached pages can be retained")
                del self._idle[page]
            self._ref_count[page] += 1

    def release(self, pages: list[int]) -> None:
        """One holder fewer for each page of a page table; unheld pages go idle (if cached) or free.

        Released last page first: a page that extends a prefix then always becomes idle before the
        page it extends, so the oldest idle page is never a prefix of another cached page and the
        prefix cache can evict in idle order without leaving orphans in its tree.
        """
        for page in reversed(pages):
            count = self._ref_count[page]
            if count == 0:
                raise RuntimeError(f"KV page {page} released more often than it was retained")
            self._ref_count[page] = count - 1
            if count == 1:
                if self._cached[page]:
                    self._idle[page] = None
                else:
                    self._free.append(page)

    def mark_cached(self, page: int) -> None:
        """Hand a held page to the prefix cache too: when its holders release it, it goes idle, not free."""
        if self._ref_count[page] == 0 or self._cached[page]:
            raise RuntimeError(f"KV page {page} must be in use and not yet cached to be cached")
        self._cached[page] = True

    def oldest_idle(self) -> int | None:
        return next(iter(self._idle), None)

    def uncache(self, page: int) -> None:
        """The prefix cache drops an idle page: it becomes free."""
        if page not in self._idle:
            raise RuntimeError(f"KV page {page} is not idle; only idle cached pages can be evicted")
        del self._idle[page]
        self._cached[page] = False
        self._free.append(page)
