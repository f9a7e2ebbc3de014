"""Leases: the handle ``cache.use(model_id)`` returns, the hit path, and the leases a task holds.

The hit path (`Lease.__aenter__` finding a ready entry of an open cache) does no I/O and never
awaits, so it is not a scheduler checkpoint: a dict lookup, `DeviceTier.take_lease`, and a
float compare (``check_at``: a due revalidation check is started in the background). Any
other case is the cache's slow path (``ModelCache._acquire``).
"""

from __future__ import annotations

from contextvars import ContextVar
from enum import Enum
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._backend import record_current_stream
from ._builders import ModelBuilder
from ._device import DeviceEntry, Key
from ._refresh import _clock as _revalidation_clock

if TYPE_CHECKING:
    from ._cache import ModelCache

__all__ = ["BoundUse", "Lease", "State", "holds_lease"]

T = TypeVar("T")


class State(Enum):
    """A cache's lifecycle: entered once, closed once."""

    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


#: The leases entered in this task (and inherited by the tasks it starts): a use by a task that
#: holds a lease is served by a draining model rather than wait for it, since the drain may be
#: waiting for that very task. Entries whose lease has ended are dropped at the next enter.
_held_leases: ContextVar[tuple[Lease[Any], ...]] = ContextVar("modelcache_held_leases", default=())


class Lease(Generic[T]):
    """``async with cache.use(model_id) as model``: the model stays resident inside the block."""

    __slots__ = ("_cache", "_entry", "_key")

    def __init__(self, cache: ModelCache, key: Key) -> None:
        self._cache = cache
        self._key = key
        self._entry: DeviceEntry | None = None

    async def __aenter__(self) -> T:
        if self._entry is not None:
            raise RuntimeError("a lease is entered once; call cache.use() again")
        cache = self._cache
        entry = cache._entries.get(self._key)
        if (
            entry is not None
            and entry.ready
            and entry.draining is None
            and cache._state is State.OPEN
        ):
            cache._device.take_lease(entry)  # the hit path: no await, no I/O
            if entry.check_at <= _revalidation_clock():  # stale-while-revalidate
                entry.check_at = cache._revalidator.due(entry.model_id)
        else:
            entry = await cache._acquire(self._key)
        self._entry = entry
        held = _held_leases.get()
        if held:  # nested (or an earlier lease was left out of order): drop the ended ones
            _held_leases.set((*[lease for lease in held if lease._entry is not None], self))
        else:
            _held_leases.set((self,))
        return entry.value  # type: ignore[no-any-return]

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            cache = self._cache
            if entry.weights is not None and not cache._backend.on_host:
                # Kernels the caller queued on a stream of its own may still read the weights:
                # their memory is not reused (after an eviction) before that work has run.
                record_current_stream(entry.weights)
            cache._device.release_lease(entry)
            held = _held_leases.get()
            if held and held[-1] is self:  # the usual, last-in first-out exit
                _held_leases.set(held[:-1])


class BoundUse:
    """``Cls.use(model_id)`` on a class decorated with ``@cache.model``."""

    __slots__ = ("_builder", "_cache")

    def __init__(self, cache: ModelCache, builder: ModelBuilder) -> None:
        self._cache = cache
        self._builder = builder

    def __call__(self, model_id: str) -> Lease[Any]:
        return self._cache._lease(model_id, self._builder)


def holds_lease(cache: ModelCache) -> bool:
    """Whether the current task (or the task that started it) holds a lease on ``cache`` now."""
    return any(lease._entry is not None and lease._cache is cache for lease in _held_leases.get())
