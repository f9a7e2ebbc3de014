"""The device-backend contract: what the cache core needs from torch, CuPy or anything else.

The cache (`modelcache._cache`) and the tiers under it (`modelcache._lower`) move models between
a store, host memory and one device; a backend is the only code that knows what a device buffer
is. Two implementations ship: `TorchBackend` (``modelcache._torch``) and `CupyBackend`
(``modelcache._cupy``, behind the ``cuda`` extra). The contract, as the core relies on it:

* ``load`` fills one device allocation with a model and returns the weights handed to builders;
  the result has an ``info`` (the model's `ModelInfo`) and owns the device memory: dropping the
  last reference to it (and to views of it) frees the bytes.
* ``on_host`` backends keep the device tier in host memory: the host tier then takes the loaded
  weights themselves (no copy, no `HostArena`), and ``host_bytes`` gives their bytes to the disk
  tier. Other backends get a `HostArena` from ``host_arena`` and move models between its blocks
  and the device with ``promote`` (block -> new device allocation) and ``demote`` (device ->
  block of the same size).
* Every copy has ended when ``load``, ``promote`` or ``demote`` returns or raises, even when the
  caller is cancelled: the core frees or reuses the memory right after.
* A device allocation that fails for lack of memory is retried once after the garbage collector
  ran and the allocator's cached blocks were freed (`allocate_with_retry`); then it raises
  `DeviceOutOfMemoryError`, which the cache does not remember as the model's failure.
* The loaded weights' ``device_context()`` makes their device current in a thread (builders run
  under it); ``record_current_stream()`` keeps their memory from being reused before the work
  queued on the caller's current stream (when it is not the default one) has finished.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import torch

from ._arena import HostArena, HostBlock
from ._exceptions import DeviceOutOfMemoryError
from ._format import ModelInfo
from ._store import Store

__all__ = [
    "DeviceBackend",
    "LoadedWeights",
    "ViewMapping",
    "allocate_with_retry",
    "device_context",
    "record_current_stream",
]

A = TypeVar("A")
T = TypeVar("T")


def allocate_with_retry(
    allocate: Callable[[], T],
    *,
    is_oom: Callable[[BaseException], bool],
    free_cached: Callable[[], object],
    nbytes: int,
    device: str,
    model_id: str,
) -> T:
    """``allocate()``; on out-of-memory, collect garbage, free cached blocks and try once more.

    A failed allocation is often transient: a dropped model still in a reference cycle, or blocks
    the caching allocator keeps for reuse but cannot split to this size. If the second try fails
    too, `DeviceOutOfMemoryError` (not remembered as the model's failure) names the model.
    Blocking (the collector, the allocator): call it in a worker thread.
    """
    try:
        return allocate()
    except Exception as exc:
        if not is_oom(exc):
            raise
    # Retry outside the except block: the first error and its frames are gone by now.
    gc.collect()
    free_cached()
    try:
        return allocate()
    except Exception as exc:
        if not is_oom(exc):
            raise
        first_line = (str(exc).splitlines() or [""])[0]
        raise DeviceOutOfMemoryError(
            f"model {model_id!r}: {device} has no room for its {nbytes} bytes, even after "
            f"freeing cached blocks ({type(exc).__name__}: {first_line})",
            model_id=model_id,
        ) from exc


def device_context(weights: object) -> contextlib.AbstractContextManager[Any]:
    """The weights' ``device_context()`` (their device current in this thread), else a no-op."""
    make = getattr(weights, "device_context", None)
    return make() if callable(make) else contextlib.nullcontext()


def record_current_stream(weights: object) -> None:
    """Call the weights' ``record_current_stream()`` if they have one (leaving a lease)."""
    record = getattr(weights, "record_current_stream", None)
    if callable(record):
        record()


@runtime_checkable
class LoadedWeights(Protocol):
    """A model's weights as a backend loaded them (`Weights`, `CupyWeights`, ...)."""

    @property
    def info(self) -> ModelInfo:
        """The model's layout, metadata and config."""
        ...


class ViewMapping(Mapping[str, A], Generic[A]):
    """A model's arrays by name, all views into one ``buffer``; read-only as a mapping.

    The common shape of what backends load (`Weights` for torch, `CupyWeights` for CuPy).
    """

    __slots__ = ("_arrays", "buffer", "info")

    def __init__(self, arrays: dict[str, A], info: ModelInfo, buffer: A) -> None:
        self._arrays = arrays
        #: The model's ModelInfo (layout, metadata, config).
        self.info = info
        #: The one uint8 buffer every array is a view of.
        self.buffer = buffer

    def __getitem__(self, name: str) -> A:
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    def device_context(self) -> contextlib.AbstractContextManager[Any]:
        """Make this buffer's device the thread's current one for the block (no-op here)."""
        return contextlib.nullcontext()

    def record_current_stream(self) -> None:
        """Order the buffer's reuse after the caller's current stream (no-op here)."""


@runtime_checkable
class DeviceBackend(Protocol):
    """One device that models are loaded onto; see the module for the contract."""

    @property
    def device(self) -> torch.device:
        """Where the weights live (``cache.device``), as a torch device name."""
        ...

    @property
    def on_host(self) -> bool:
        """True when device buffers are host memory (the host tier then moves, never copies)."""
        ...

    def host_arena(self, capacity: int) -> HostArena:
        """The host tier's memory (pinned when the device copies faster from pinned memory).

        Not allocated yet: the core awaits ``arena.allocate()`` off the event loop. Called only
        when ``on_host`` is False.
        """
        ...

    async def load(self, store: Store, info: ModelInfo, *, zero_copy: bool = True) -> LoadedWeights:
        """Read ``info``'s weights from ``store`` onto the device.

        ``zero_copy=False`` forbids mapping the store's files (they may be deleted meanwhile).
        """
        ...

    async def promote(self, block: HostBlock, info: ModelInfo) -> LoadedWeights:
        """A new device copy of the model whose bytes are in ``block`` (not on_host backends)."""
        ...

    async def demote(self, loaded: LoadedWeights, block: HostBlock) -> None:
        """Copy ``loaded``'s device bytes into ``block`` of the same size (not on_host)."""
        ...

    def host_bytes(self, loaded: LoadedWeights) -> memoryview | None:
        """The model's buffer as host bytes (for the disk tier), or None if not in host memory."""
        ...
