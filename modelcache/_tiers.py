"""Byte accounting of a tier, and the host tier's entries.

A `ByteBudget` is the one mechanism every tier uses to stay within its bytes:

* ``reserved`` counts the bytes of resident entries, of loads that were granted room, and of
  entries being copied out (``freeing``); it never exceeds ``budget``.
* `try_reserve` is synchronous (plan first, then do I/O): it asks the policy for victims among
  evictable entries, hands each to the tier's ``evict`` callback, and grants the bytes only if
  they are free now. An ``evict`` callback either frees the victim's bytes at once
  (`drop_now`) or starts copying it to a lower tier and counts them as ``freeing`` until the
  copy ends (`start_freeing` / `finish_freeing`): a victim's bytes are never granted twice.
* Reservations that cannot be granted wait in line, first come first served; `serve_line` grants
  them, in order, whenever bytes are freed. A waiter that is no longer wanted is dropped from
  the line rather than left to block it.
* Fairness (a tier given ``drainable``): when the head of the line does not fit, victims for it
  are chosen among *leased* entries too. Those are ``draining``: the tier's owner hands out no
  new lease on them (``drain`` / ``undrain`` tell it), so their leases end in bounded time and
  `try_reserve` evicts them first. Without this, overlapping leases on resident entries would
  keep them unevictable and starve the line forever. Drains last while the line has a head:
  they are given back (``undrain``) when a reservation is granted or the line empties, and
  chosen again for the next head; an entry that leaves the tier is `forget`-ed.
  ``draining_bytes`` = the bytes of the ``draining`` entries.
* One owner: a budget's counters are private; the tier that owns it changes them through its
  verbs only (`admit`, `remove`, `release`, `drop_now`, ...), and `check` states the
  invariants above against the owner's entries.
* The policy sees only this tier's entries: they cross its untyped contract in ``_victims`` and
  the cost given to it only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import anyio

from ._exceptions import ModelTooLargeError
from ._policy import EvictionPolicy, LRUPolicy, PolicyEntry, bind_cost
from ._units import format_bytes

T = TypeVar("T")

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


E = TypeVar("E", bound=PolicyEntry)


class ByteBudget(Generic[E]):
    """Exact bytes of one tier with first-come first-served waiting.

    Its counters are its own: the tier that owns it changes them through its verbs (reserve,
    `admit`, `remove`, `release`, ...), and reads them through `stats`, `free` and `check`.
    """

    def __init__(
        self,
        name: str,
        budget: int,
        *,
        evictable: Callable[[E], bool],
        evict: Callable[[E], None],
        policy: EvictionPolicy | None = None,
        drainable: Callable[[E], bool] | None = None,
        drain: Callable[[E], None] | None = None,
        undrain: Callable[[E], None] | None = None,
        cost: Callable[[E], float] | None = None,
    ) -> None:
        """``evictable(entry)``: may be evicted now. ``drainable(entry)``: may be chosen as a
        victim for the line while leased (then ``drain(entry)``; ``undrain(entry)`` when it
        is no longer one and stays). Without ``drainable``, only evictable entries are ever
        victims. ``cost(entry)``: seconds to bring an evicted entry back, offered to the
        policy (`bind_cost`)."""
        if drainable is not None and (drain is None or undrain is None):
            raise TypeError("drainable needs drain and undrain")
        self.name = name
        self._budget = budget
        self._policy: EvictionPolicy = policy if policy is not None else LRUPolicy()
        self._reserved = 0
        self._resident = 0
        self._freeing = 0
        self._hits = self._misses = self._promotions = self._demotions = self._evictions = 0
        self._evictable = evictable
        self._evict = evict
        self._drainable = drainable
        self._drain = drain
        self._undrain = undrain
        self._line: deque[_Waiter] = deque()
        #: Victims chosen for the head of the line, waiting for their leases to end (in order).
        self._draining: dict[E, None] = {}
        self._draining_bytes = 0
        #: The policy's victims query, typed for this tier's entries: the one place entries
        #: cross the policy's untyped contract. A policy is shown only this tier's entries (E)
        #: and returns only entries it was given. Bound once: the line is served on the event
        #: loop whenever a lease ends under pressure.
        self._victims = cast(
            "Callable[[int, Callable[[E], bool]], list[E] | None]", self._policy.victims
        )
        if cost is not None:
            bind_cost(self._policy, _as_policy_callable(cost))

    @property
    def budget(self) -> int:
        return self._budget

    @property
    def policy(self) -> EvictionPolicy:
        return self._policy

    @property
    def resident(self) -> int:
        """Bytes of the resident entries."""
        return self._resident

    @property
    def free(self) -> int:
        """Bytes neither reserved nor being copied out: grantable without evicting."""
        return self._budget - self._reserved

    @property
    def waiting(self) -> int:
        return len(self._line)

    def stats(self, entries: int) -> TierStats:
        return TierStats(
            bytes=self._resident,
            bytes_reserved=self._reserved,
            budget=self._budget,
            entries=entries,
            hits=self._hits,
            misses=self._misses,
            promotions=self._promotions,
            demotions=self._demotions,
            evictions=self._evictions,
        )

    def check(
        self, resident: Iterable[E] = (), *, in_flight: int = 0, draining: Iterable[E] = ()
    ) -> None:
        """The accounting invariants, against the owner's view: ``resident`` (its entries),
        ``in_flight`` (bytes it holds reserved outside them: loads granted room, copies in)
        and ``draining`` (its entries marked as drained). The tests call it after every step.

        reserved = resident + in flight + freeing <= budget; the policy holds the resident
        entries; drains are resident, known to both sides, and only while the line has a head.
        """
        name = self.name
        assert 0 <= self._reserved <= self._budget, (name, self._reserved, self._budget)
        assert self._freeing >= 0, (name, self._freeing)
        resident = list(resident)
        assert self._resident == sum(e.nbytes for e in resident), (name, self._resident)
        assert self._reserved == self._resident + in_flight + self._freeing, (
            name,
            self._reserved,
            self._resident,
            in_flight,
            self._freeing,
        )
        assert set(self._draining) == set(draining), (name, "drains disagree with the owner")
        assert self._draining_bytes == sum(e.nbytes for e in self._draining)
        assert not self._draining or self._line, "drains outlive the line they were chosen for"
        keys = {e.key for e in resident}
        assert all(e.key in keys for e in self._draining), (name, "a drain is not resident")
        policy_check = getattr(self._policy, "check", None)
        if policy_check is not None:
            policy_check()

    def check_line(self, resident: Iterable[E]) -> None:
        """Fairness, once the tier is quiet: a wanted head of the line that does not fit with
        the bytes coming free has victims chosen for it (draining), unless even every drainable
        entry of ``resident`` could not cover it."""
        if self._drainable is None or not self._line or not self._line[0].wanted():
            return
        head = self._line[0].nbytes
        coming = self._budget - self._reserved + self._freeing + self._draining_bytes
        if coming < head:
            drainable, draining = self._drainable, self._draining
            candidates = sum(e.nbytes for e in resident if e not in draining and drainable(e))
            assert coming + candidates < head, "no victims chosen for the waiting load"

    # -- the entries ----------------------------------------------------------------------------

    def admit(self, entry: E) -> None:
        """``entry`` is resident now, its bytes already reserved (granted to its load, or
        taken for a copy in)."""
        self._resident += entry.nbytes
        self._policy.admitted(entry)

    def remove(self, entry: E) -> None:
        """The resident ``entry`` left the tier; its bytes stay reserved until its owner frees
        them (`release`, `unreserve`, `drop_now`, `start_freeing`)."""
        self.forget(entry)
        self._policy.removed(entry)
        self._resident -= entry.nbytes

    def missed(self) -> None:
        """A lookup did not find its model here."""
        self._misses += 1

    def promoted(self) -> None:
        """A model moved up out of this tier: a load served from here."""
        self._promotions += 1
        self._hits += 1

    def demoted(self) -> None:
        """A model moved into this tier from the tier above."""
        self._demotions += 1

    # -- reserving ------------------------------------------------------------------------------

    def is_draining(self, entry: E) -> bool:
        return entry in self._draining

    def try_reserve(self, nbytes: int) -> bool:
        """Grant ``nbytes`` now, evicting if that frees enough; False if not, and then nothing
        is evicted: a victim keeps serving until its bytes are actually granted. Draining
        entries whose leases have ended are evicted first, then the policy's victims."""
        free = self._budget - self._reserved
        if free < nbytes:
            ready = [v for v in self._draining if self._evictable(v)] if self._draining else []
            need = nbytes - free - self._freeing - sum(v.nbytes for v in ready)
            if need > 0:
                draining, evictable = self._draining, self._evictable
                victims = self._victims(
                    need, (lambda e: e not in draining and evictable(e)) if draining else evictable
                )
                if victims is None:
                    return False
                ready += victims
            for victim in ready:
                self._evict(victim)  # a draining one is `forget`-ed by its owner as it leaves
            if self._budget - self._reserved < nbytes:
                return False  # the rest frees up when copies out of this tier finish
        self._reserved += nbytes
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
        if len(self._line) == 1 and self._choose_drains(nbytes):
            self.serve_line()  # at the head: victims were chosen for it; unleased ones may do
        try:
            await waiter.event.wait()
        except BaseException:
            if not waiter.settled:
                self._line.remove(waiter)
                if not self._line:
                    self._end_drains()
            elif waiter.granted:
                self.release(nbytes)  # granted while we were being cancelled
            raise
        if not waiter.granted:
            raise Abandoned

    def serve_line(self) -> None:
        """Grant waiting reservations in order while they fit; when the head does not fit,
        choose (drain) victims for it among leased entries too."""
        while self._line:
            head = self._line[0]
            if not head.wanted():
                self._line.popleft()
                head.settled = True
                head.event.set()
                continue
            if not self.try_reserve(head.nbytes) and not (
                self._choose_drains(head.nbytes) and self.try_reserve(head.nbytes)
            ):
                return
            self._line.popleft()
            head.settled = head.granted = True
            head.event.set()
            self._end_drains()  # chosen for this head; the next one chooses its own
        self._end_drains()

    def _choose_drains(self, nbytes: int) -> bool:
        """Choose victims for a head of ``nbytes`` that does not fit, leased or not; True if
        any were. None if even all of them could not free enough yet (loads in flight become
        candidates when they are ready, and serve the line again then). Unleased victims are not evicted
        here: they keep serving the tasks that hold leases (`ModelCache` serves those) until
        `try_reserve` can grant the whole head, so no bytes are freed for a load that cannot
        start yet."""
        if self._drainable is None:
            return False
        need = nbytes - (self._budget - self._reserved) - self._freeing - self._draining_bytes
        if need <= 0:
            return False
        drainable, draining = self._drainable, self._draining
        victims = self._victims(need, lambda e: e not in draining and drainable(e))
        if victims is None:
            return False
        assert self._drain is not None
        for victim in victims:
            draining[victim] = None
            self._draining_bytes += victim.nbytes
            self._drain(victim)
        return bool(victims)

    def _end_drains(self) -> None:
        if not self._draining:
            return
        assert self._undrain is not None
        ended, self._draining = list(self._draining), {}
        self._draining_bytes = 0
        for victim in ended:
            self._undrain(victim)

    def forget(self, entry: E) -> None:
        """``entry`` left the tier (evicted, failed, closed): it drains no more."""
        if entry in self._draining:
            del self._draining[entry]
            self._draining_bytes -= entry.nbytes
            assert self._undrain is not None
            self._undrain(entry)

    # -- freeing --------------------------------------------------------------------------------

    def release(self, nbytes: int) -> None:
        """Give back reserved bytes (a failed load, a promotion) and serve the line."""
        self._reserved -= nbytes
        self.serve_line()

    def unreserve(self, nbytes: int) -> None:
        """Give back reserved bytes without serving the line: the caller serves it when it is done
        changing the tier (or the tier is closing)."""
        self._reserved -= nbytes

    def drop_now(self, nbytes: int) -> None:
        """Inside an ``evict`` callback: the victim's bytes are free at once (the line is not served: the
        caller is reserving)."""
        self._reserved -= nbytes
        self._evictions += 1

    def start_freeing(self, nbytes: int) -> None:
        """Inside an ``evict`` callback: the victim is being copied out; its bytes free later."""
        self._freeing += nbytes
        self._evictions += 1

    def finish_freeing(self, nbytes: int) -> None:
        """A copy out of this tier ended: its bytes are free."""
        self._freeing -= nbytes
        self.release(nbytes)


def _as_policy_callable(func: Callable[[E], T]) -> Callable[[PolicyEntry], T]:
    """``func`` as the policy sees it: a policy calls it only with entries this tier gave it."""
    return cast("Callable[[PolicyEntry], T]", func)


class HostEntry:
    """A model's weights held in host memory, not built, under the host tier's budget."""

    __slots__ = ("admitted", "detached", "info", "key", "model_id", "nbytes", "payload", "users")

    def __init__(self, info: Any, payload: Any) -> None:
        self.info = info
        self.model_id: str = info.model_id
        self.key = self.model_id
        #: Host bytes: the weights and the side files read with them (`_sidefiles`).
        self.nbytes: int = info.nbytes + info.side_bytes
        #: on_host backends: the model's loaded weights (moved, never copied); others: a
        #: (pinned) `HostBlock`.
        self.payload = payload
        #: Copies reading the payload right now (to the disk tier): not evictable while > 0.
        self.users = 0
        #: The entry left the tier while in use: the last user frees the payload.
        self.detached = False
        #: When it entered the tier (`_observe.clock`), for the age at eviction.
        self.admitted = 0.0


def host_evictable(entry: HostEntry) -> bool:
    return entry.users == 0


def check_fits(tier: ByteBudget[Any], info: Any) -> None:
    """ModelTooLargeError unless the model (a ModelInfo) can ever fit ``tier``'s budget."""
    if info.nbytes > tier.budget:
        raise ModelTooLargeError(
            f"model {info.model_id!r} needs {format_bytes(info.nbytes)}, more than the "
            f"whole {tier.name} budget of {format_bytes(tier.budget)}",
            model_id=info.model_id,
            path=info.url,
        )
