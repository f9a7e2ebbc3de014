"""Eviction policies: which unleased entries to drop to free bytes in a tier.

The contract is small on purpose (cachetools' ``popitem`` is the model): the cache tells the
policy what is resident and what was used, and asks it for victims; the cache alone decides which
entries may be evicted (``evictable``) and does the evicting. A policy never sees a leased entry
as a candidate and never mutates the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Protocol

__all__ = ["EvictionPolicy", "LRUPolicy", "PolicyEntry"]


class PolicyEntry(Protocol):
    """What a policy may read of a cache entry."""

    @property
    def key(self) -> Hashable: ...

    @property
    def nbytes(self) -> int: ...


class EvictionPolicy(Protocol):
    def admitted(self, entry: PolicyEntry) -> None:
        """``entry`` became resident."""

    def accessed(self, entry: PolicyEntry) -> None:
        """``entry`` was used (a hit). Called on the hit path: must be O(1) and cheap."""

    def removed(self, entry: PolicyEntry) -> None:
        """``entry`` left the tier (evicted, failed, closed)."""

    def victims(
        self, need: int, evictable: Callable[[PolicyEntry], bool]
    ) -> list[PolicyEntry] | None:
        """Entries whose eviction frees at least ``need`` bytes, or None if that is impossible.

        Only entries for which ``evictable(entry)`` is true may be returned.
        """


class LRUPolicy:
    """Least recently used first, by bytes: evict the oldest unleased entries until enough is free."""

    __slots__ = ("_order",)

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, PolicyEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def admitted(self, entry: PolicyEntry) -> None:
        self._order[entry.key] = entry

    def accessed(self, entry: PolicyEntry) -> None:
        self._order.move_to_end(entry.key)

    def removed(self, entry: PolicyEntry) -> None:
        self._order.pop(entry.key, None)

    def victims(
        self, need: int, evictable: Callable[[PolicyEntry], bool]
    ) -> list[PolicyEntry] | None:
        chosen: list[PolicyEntry] = []
        freed = 0
        for entry in self._order.values():
            if freed >= need:
                break
            if evictable(entry):
                chosen.append(entry)
                freed += entry.nbytes
        return chosen if freed >= need else None
