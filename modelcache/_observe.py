"""Observer hooks: per-event figures (timings, ages) for metrics, without a dependency.

Counters and occupancy are read from ``cache.stats()`` when someone asks; what a snapshot cannot
give - how long each load took, how long each caller waited, how old a model was when it was
evicted - is reported to observers as it happens. Design notes:

* Calls are synchronous, on the event loop's thread, and never on the hit path: a hit costs what
  it cost before any observer existed.
* An observer that raises is logged and skipped; the cache goes on as if it had returned.
* The tuple of observers is replaced, never mutated, so an observer may add or remove observers
  (itself included) while being called.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

__all__ = ["CacheObserver", "Observers", "clock"]

logger = logging.getLogger("modelcache")

#: Clock of admission times, eviction ages and waits (a module attribute so tests can move time).
clock = time.monotonic


class CacheObserver(Protocol):
    """Receives a cache's events (``cache.add_observer(obs)``). Subclass it to get no-op defaults.

    Every method is called synchronously on the event loop's thread, some while the cache is
    choosing victims: keep it to a few counter updates, and do not call back into the cache
    (reading ``cache.stats()`` is fine). Exceptions are logged and otherwise ignored.
    """

    def load_finished(self, model_id: str, source: str, nbytes: int, seconds: float) -> None:
        """A load made ``model_id`` resident on the device: ``nbytes`` read from ``source``
        ("host", "disk" or "store") in ``seconds`` (headers, waiting for bytes and building
        included; the sum over loads is ``stats().load_seconds``)."""

    def load_failed(self, model_id: str, error: BaseException) -> None:
        """A load of ``model_id`` failed with ``error`` (the typed error its waiters get)."""

    def waited(self, model_id: str, seconds: float) -> None:
        """A ``use()`` (or device prefetch) waited ``seconds`` for a load of ``model_id`` to end,
        however it ended (loaded, failed, or the caller was cancelled)."""

    def evicted(self, model_id: str, tier: str, nbytes: int, age_seconds: float) -> None:
        """``model_id`` left ``tier`` ("device" or "host") to make room or by ``evict()``,
        ``age_seconds`` after it entered that tier. Whether it moved down is in the tier stats'
        ``demotions`` (a copy down may still fail after this call)."""


class Observers:
    """The observers of one cache, each call dispatched to all of them, exception-safe."""

    __slots__ = ("_observers",)

    def __init__(self) -> None:
        self._observers: tuple[CacheObserver, ...] = ()

    def __bool__(self) -> bool:
        return bool(self._observers)

    def add(self, observer: CacheObserver) -> None:
        if any(o is observer for o in self._observers):
            raise ValueError(f"{observer!r} is already observing this cache")
        self._observers = (*self._observers, observer)

    def remove(self, observer: CacheObserver) -> None:
        kept = tuple(o for o in self._observers if o is not observer)
        if len(kept) == len(self._observers):
            raise ValueError(f"{observer!r} is not observing this cache")
        self._observers = kept

    def load_finished(self, model_id: str, source: str, nbytes: int, seconds: float) -> None:
        for observer in self._observers:
            try:
                observer.load_finished(model_id, source, nbytes, seconds)
            except Exception:
                _log(observer, "load_finished")

    def load_failed(self, model_id: str, error: BaseException) -> None:
        for observer in self._observers:
            try:
                observer.load_failed(model_id, error)
            except Exception:
                _log(observer, "load_failed")

    def waited(self, model_id: str, seconds: float) -> None:
        for observer in self._observers:
            try:
                observer.waited(model_id, seconds)
            except Exception:
                _log(observer, "waited")

    def evicted(self, model_id: str, tier: str, nbytes: int, age_seconds: float) -> None:
        for observer in self._observers:
            try:
                observer.evicted(model_id, tier, nbytes, age_seconds)
            except Exception:
                _log(observer, "evicted")


def _log(observer: CacheObserver, event: str) -> None:
    logger.exception("cache observer %r raised in %s; ignored", observer, event)
