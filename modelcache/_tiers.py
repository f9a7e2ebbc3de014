"""Byte accounting of a tier, and the host tier's entries.

A `ByteBudget` is the one mechanism every tier uses to stay within its bytes:

* ``reserved`` counts the bytes of resident entries, of loads that were granted room, and of
  entries being copied out (``freeing``); it never exceeds ``budget``.
* `try_reserve` is synchronous (plan first, then do I/O): it asks the policy for victims among
  evictable entries, hands each to the tier's ``evict`` callback, and grants the bytes only if
  they are free now. An ``evict`` callback either frees the victim's bytes at once
  (`drop_now`) or starts copying it to a lower tier and counts them as ``freeing`` until the
  copy ends (`start_freeing` / `finish_freeing`): a victim's bytes are never granted twice.
* Reservations that cannot be granted wait in line, first come first served; `pump` grants
  them, in order, whenever bytes are freed. A waiter that is no longer wanted is dropped from
  the line rather than left to block it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from ._exceptions import ModelTooLargeError
from ._policy import EvictionPolicy, LRUPolicy, PolicyEntry
from ._units import format_bytes

__all__ = ["Abandoned", "ByteBudget", "HostEntry", "TierStats", "check_fits", "host_evictable"]


class Abandoned(Exception):
    """A reservation waiting in line lost everyone who wanted it."""


@dataclass(frozen=True, slots=True)
class TierStats:
    """One tier's occupancy and traffic (``cache.stats().tiers["host"]``)."""

    #: Bytes of resident entries (in flight and moving out not included).
    bytes: int
    #: Bytes counted against the budget: resident, granted to loads, and being copied out.
    bytes_reserved: int
    budget: int
    entries: int
    #: Loads served from this tier (for the device tier: leases handed out without a load).
    hits: int
    #: Lookups that did not find the model here: for the device tier, ``use()`` calls that
    #: started or joined a load; for the host tier, device loads that found no host copy (a
    #: tier with a budget only); for the disk tier, lookups of remote models it did not hold.
    misses: int
    #: Models that moved up out of this tier.
    promotions: int
    #: Models that moved into this tier from the tier above.
    demotions: int
    #: Models that left this tier to make room (moved down or dropped).
    evictions: int


class _Waiter:
    __slots__ = ("event", "granted", "nbytes", "settled", "wanted")

    def __init__(self, nbytes: int, wanted: Callable[[], bool]) -> None:
        self.nbytes = nbytes
        self.wanted = wanted
        self.event = anyio.Event()
        self.settled = False  # left the line: granted, or dropped as unwanted
        self.granted = False


class ByteBudget:
    """Exact bytes of one tier with first-come first-served waiting."""

    def __init__(
        self,
        name: str,
        budget: int,
        *,
        evictable: Callable[[Any], bool],
        evict: Callable[[Any], None],
        policy: EvictionPolicy | None = None,
    ) -> None:
        self.name = name
        self.budget = budget
        self.policy: EvictionPolicy = policy if policy is not None else LRUPolicy()
        self.reserved = 0
        self.resident = 0
        self.freeing = 0
        self.hits = self.misses = self.promotions = self.demotions = self.evictions = 0
        self._evictable = evictable
        self._evict = evict
        self._line: deque[_Waiter] = deque()

    @property
    def waiting(self) -> int:
        return len(self._line)

    def stats(self, entries: int) -> TierStats:
        return TierStats(
            bytes=self.resident,
            bytes_reserved=self.reserved,
            budget=self.budget,
            entries=entries,
            hits=self.hits,
            misses=self.misses,
            promotions=self.promotions,
            demotions=self.demotions,
            evictions=self.evictions,
        )

    # -- reserving ------------------------------------------------------------------------------

    def try_reserve(self, nbytes: int) -> bool:
        """Grant ``nbytes`` now, evicting if that frees enough; False (nothing evicted) if not."""
        if self.budget - self.reserved < nbytes:
            need = nbytes - (self.budget - self.reserved) - self.freeing
            if need > 0:
                victims = self.policy.victims(need, self._evictable)
                if victims is None:
                    return False
                for victim in victims:
                    self._evict(victim)
            if self.budget - self.reserved < nbytes:
                return False  # the rest frees up when copies out of this tier finish
        self.reserved += nbytes
        return True

    async def reserve(self, nbytes: int, wanted: Callable[[], bool] = lambda: True) -> None:
        """Reserve ``nbytes``, waiting in line while leases or copies hold them.

        Raises `Abandoned` when ``wanted()`` turned false while waiting; on cancellation the
        place in line is given up (and bytes granted meanwhile are handed back).
        """
        if not self._line and self.try_reserve(nbytes):
            return
        waiter = _Waiter(nbytes, wanted)
        self._line.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if not waiter.settled:
                self._line.remove(waiter)
            elif waiter.granted:
                self.release(nbytes)  # granted while we were being cancelled
            raise
        if not waiter.granted:
            raise Abandoned

    def pump(self) -> None:
        """Grant waiting reservations in order while they fit."""
        while self._line:
            head = self._line[0]
            if not head.wanted():
                self._line.popleft()
                head.settled = True
                head.event.set()
                continue
            if not self.try_reserve(head.nbytes):
                return
            self._line.popleft()
            head.settled = head.granted = True
            head.event.set()

    # -- freeing --------------------------------------------------------------------------------

    def release(self, nbytes: int) -> None:
        """Give back reserved bytes (a failed load, a promotion) and serve the line."""
        self.reserved -= nbytes
        self.pump()

    def drop_now(self, nbytes: int) -> None:
        """Inside an ``evict`` callback: the victim's bytes are free at once (no pump: the
        caller is reserving)."""
        self.reserved -= nbytes
        self.evictions += 1

    def start_freeing(self, nbytes: int) -> None:
        """Inside an ``evict`` callback: the victim is being copied out; its bytes free later."""
        self.freeing += nbytes
        self.evictions += 1

    def finish_freeing(self, nbytes: int) -> None:
        """A copy out of this tier ended: its bytes are free."""
        self.freeing -= nbytes
        self.release(nbytes)


class HostEntry:
    """A model's weights held in host memory, not built, under the host tier's budget."""

    __slots__ = ("admitted", "detached", "info", "key", "model_id", "nbytes", "payload", "users")

    def __init__(self, info: Any, payload: Any) -> None:
        self.info = info
        self.model_id: str = info.model_id
        self.key = self.model_id
        self.nbytes: int = info.nbytes
        #: on_host backends: the model's loaded weights (moved, never copied); others: a
        #: (pinned) `HostBlock`.
        self.payload = payload
        #: Copies reading the payload right now (to the disk tier): not evictable while > 0.
        self.users = 0
        #: The entry left the tier while in use: the last user frees the payload.
        self.detached = False
        #: When it entered the tier (`_observe.clock`), for the age at eviction.
        self.admitted = 0.0


def host_evictable(entry: PolicyEntry) -> bool:
    e: HostEntry = entry  # type: ignore[assignment]
    return e.users == 0


def check_fits(tier: ByteBudget, info: Any) -> None:
    """ModelTooLargeError unless the model (a ModelInfo) can ever fit ``tier``'s budget."""
    if info.nbytes > tier.budget:
        raise ModelTooLargeError(
            f"model {info.model_id!r} needs {format_bytes(info.nbytes)}, more than the "
            f"whole {tier.name} budget of {format_bytes(tier.budget)}",
            model_id=info.model_id,
            path=info.url,
        )
