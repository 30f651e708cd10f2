"""Radix-tree prefix cache over full KV pages.

Each tree node is one full page; the edge into it is labelled with that page's token ids. A page is
found only by walking from the root through the pages before it, because its K/V depend on the whole
prefix, not only on its own tokens. Requests hold tree pages through the pool's reference counts;
a tree page that no request holds is idle (kv_pages.py) and is evicted least recently used first
when the pool runs out of free pages.

Invariant the eviction relies on: a request's page table is a path from the root (its cached pages)
followed by private pages, so whenever a request holds a tree page it also holds all the page's
ancestors. Hence an idle page's descendants are all idle too, and, because page tables are released
last page first, became idle before it: the oldest idle page is always a leaf.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from minisrv.scheduler.kv_pages import PagePool

PageKey = tuple[int, ...]


@dataclass(eq=False)
class CacheNode:
    page: int                       # -1 for the root, which holds no page
    depth: int                      # pages on the path from the root, this one included
    key: PageKey                    # the page's token ids
    parent: CacheNode | None
    children: dict[PageKey, CacheNode] = field(default_factory=dict)


class PrefixCache:
    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.root = CacheNode(page=-1, depth=0, key=(), parent=None)
        self._node_of_page: dict[int, CacheNode] = {}

    @property
    def num_cached_pages(self) -> int:
        return len(self._node_of_page)

    def node_of_page(self, page: int) -> CacheNode | None:
        return self._node_of_page.get(page)

    def _key(self, token_ids: list[int], index: int) -> PageKey:
        return tuple(token_ids[index * self.page_size:(index + 1) * self.page_size])

    def match(self, token_ids: list[int]) -> tuple[list[int], CacheNode]:
        """The cached pages of the longest whole-page prefix of token_ids, and the node of the last one.

        The pages are retained for the caller, who releases them with the rest of its page table.
        """
        node = self.root
        pages: list[int] = []
        for index in range(len(token_ids) // self.page_size):
            child = node.children.get(self._key(token_ids, index))
            if child is None:
                break
            pages.append(child.page)
            node = child
        self.pool.retain(pages)
        return pages, node

    def insert(self, cursor: CacheNode, token_ids: list[int], pages: list[int], num_full_pages: int) -> CacheNode:
        """Cache a request's pages cursor.depth .. num_full_pages-1 (full, computed); return the new cursor.

        cursor is the deepest tree node already on the request's path. Where another request cached the
        same prefix first, the request switches to that page and frees its own duplicate (pages is its
        page table and is updated in place), so equal prefixes share memory and the request's page table
        stays a tree path followed by private pages.
        """
        node = cursor
        for index in range(cursor.depth, num_full_pages):
            key = self._key(token_ids, index)
            own_page = pages[index]
            child = node.children.get(key)
            if child is None:
                child = CacheNode(page=own_page, depth=index + 1, key=key, parent=node)
                node.children[key] = child
                self._node_of_page[own_page] = child
                self.pool.mark_cached(own_page)
            elif child.page != own_page:
                self.pool.retain([child.page])
                self.pool.release([own_page])
                pages[index] = child.page
            node = child
        return node

    def evict(self, num_pages: int) -> int:
        """Free up to num_pages idle pages, least recently used first; returns how many were freed."""
        evicted = 0
        while evicted < num_pages:
            page = self.pool.oldest_idle()
            if page is None:
                break
            node = self._node_of_page.pop(page)
            if node.children:
                raise RuntimeError(f"prefix cache: idle page {page} still has cached successors; "
                                   "a page table was released out of order")
            assert node.parent is not None
            del node.parent.children[node.key]
            self.pool.uncache(page)
            evicted += 1
        return evicted
