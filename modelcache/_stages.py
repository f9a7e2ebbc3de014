"""The stages of a load: each runs only if anyone still wants the load, some in a load slot.

* A load whose callers have all gone stops at its next stage boundary with `Abandoned`
  (`check_wanted`): it never takes a limiter slot, reads, or evicts for nobody.
* `Abandonable`: a stage cancelled when the last waiter leaves (`DeviceTier.leave` cancels
  ``entry.abandon``), raising `Abandoned`: a stage that takes no load slot (a batched local
  header read) uses it alone, `Limited`'s abandonable stages inside the slot, so an abandoned
  load's read leaves the batch queue or the limiter's line at once. A load in a task of its
  own (`Background.start_load`) has its task's scope cancelled (one scope per load rather than
  one more per stage): the stage then ends the load with `Abandoned`.
* `Limited`: a stage that holds a token of the load limiter. A load whose waiters all leave
  while it waits for the token leaves the line at once; a free token with nobody queued is
  taken without a cancel scope or a trip through the scheduler.

Classes rather than generator context managers: a small model's load enters three stages, and
a generator, its frame and contextlib's wrapper each were a measurable part of its cost.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

import anyio

from ._concurrency import new_scope
from ._device import DeviceEntry
from ._tiers import Abandoned

__all__ = ["Abandonable", "Limited", "check_wanted"]


def check_wanted(entry: DeviceEntry) -> None:
    """At a stage boundary of a load: stop if nobody waits for it any more."""
    if entry.waiters == 0:
        raise Abandoned


class Abandonable:
    """``with Abandonable(entry):`` (or ``async with``) runs a stage of ``entry``'s load if
    anyone still wants it, cancelled when the last waiter leaves, raising `Abandoned`."""

    __slots__ = ("_entry", "_scope")

    def __init__(self, entry: DeviceEntry) -> None:
        self._entry = entry
        self._scope: anyio.CancelScope | None = None

    def __enter__(self) -> None:
        entry = self._entry
        check_wanted(entry)
        entry.abandoned = False
        if entry.scope is not None:  # the load's task's own scope: no scope more per load
            entry.abandon = entry.scope
            return
        scope = self._scope = new_scope()
        scope.__enter__()
        entry.abandon = scope

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        entry = self._entry
        entry.abandon = None
        scope = self._scope
        if scope is None:
            # The load's scope was cancelled for its waiters' leaving: the load ends here,
            # whether its read was cancelled or had just ended (a new caller, if one joined
            # since, starts another load). Another error of the stage propagates.
            if entry.abandoned and (exc is None or isinstance(exc, asyncio.CancelledError)):
                del exc, tb
                raise Abandoned
            return False
        self._scope = None
        swallowed = bool(scope.__exit__(exc_type, exc, tb))
        del exc, tb  # an `Abandoned` raised here keeps this frame: not the cancellation
        if scope.cancelled_caught:
            raise Abandoned
        return swallowed

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return self.__exit__(exc_type, exc, tb)


class Limited:
    """``async with Limited(limiter, entry):`` holds a token of ``limiter`` for one stage of
    ``entry``'s load, if anyone still wants it (see the module docstring). An ``abandonable``
    stage (the header and config reads: they move no weight byte) is `Abandonable` too: a read
    stalled on the store does not keep a load slot for a load nobody waits for."""

    __slots__ = ("_abandonable", "_entry", "_limiter", "_stage")

    def __init__(
        self, limiter: anyio.CapacityLimiter, entry: DeviceEntry, *, abandonable: bool = False
    ) -> None:
        self._limiter = limiter
        self._entry = entry
        self._abandonable = abandonable
        self._stage: Abandonable | None = None

    async def __aenter__(self) -> None:
        limiter, entry = self._limiter, self._entry
        check_wanted(entry)
        try:
            limiter.acquire_nowait()  # a free token and nobody queued: no scope, no trip
        except anyio.WouldBlock:
            while True:
                check_wanted(entry)
                with new_scope() as scope:
                    entry.abandon = scope
                    try:
                        await limiter.acquire()
                    finally:
                        entry.abandon = None
                if not scope.cancelled_caught:
                    break
                # Its waiters left; a new caller may have joined since: look again.
        try:
            if self._abandonable:
                stage = Abandonable(entry)
                stage.__enter__()
                self._stage = stage
            else:
                check_wanted(entry)
        except BaseException:
            limiter.release()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        stage, self._stage = self._stage, None
        try:
            return stage is not None and stage.__exit__(exc_type, exc, tb)
        finally:
            self._limiter.release()
