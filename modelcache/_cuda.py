"""The CUDA staging core that `TorchBackend` and `CupyBackend` both compose.

A backend brings what only it knows: how to make a copy engine on its device (a blocking call,
run in a worker thread), how to allocate ``nbytes`` of device memory (with
`allocate_with_retry`), and how host memory is pinned (a `HostPinner`, or torch's runtime on a
device). `CudaStaging` holds the rest, once for both:

* **Arguments.** ``chunk_size`` and ``count`` are checked when the backend is made
  (`check_staging`), not at the first load.
* **Made once, lazily.** The `StagingPool` and two copy engines (host -> device for loads and
  promotions, device -> host for demotions, so a multi-GiB demotion never queues ahead of a
  load's chunks) are made on the first CUDA call, under a lock (concurrent first loads share
  them), the engines in worker threads (CUDA initialisation blocks).
* **Fenced allocations.** A device buffer is allocated and the host -> device engine fenced in
  the same worker thread: memory the caching allocator hands out may still be in use by kernels
  queued on the stream it came from (that thread's current one), and the side stream must not
  write it before they finish.
* **Demotions are fenced too**, on the calling thread: the kernels it queued may still write
  the weights being copied out.
* **Every copy is waited for** before a call returns or raises, even when cancelled
  (`copy_and_wait`).

No framework's device code is here: a buffer is whatever the backend's allocator returns and
its engine copies.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import anyio
import anyio.to_thread

from ._arena import HostPinner
from ._format import ModelInfo
from ._staging import CopyEngine, StagingPool, copy_and_wait, stage_to_device
from ._store import Store

if TYPE_CHECKING:
    import torch

__all__ = ["CudaStaging", "FencedCopyEngine", "check_staging"]


class FencedCopyEngine(CopyEngine, Protocol):
    """A `CopyEngine` on a side stream that can be ordered after the caller's current stream."""

    def fence(self) -> None:
        """Order later copies after the work already queued on this thread's current stream."""
        ...


EngineT = TypeVar("EngineT", bound=FencedCopyEngine)

#: A blocking copy for host memory that is not pinned: ``copy(dst, src)``, run in a thread.
SyncCopy = Callable[[Any, Any], object]


def check_staging(chunk_size: int, count: int) -> None:
    """ValueError unless the staging pool's chunk size and count are both at least 1."""
    if chunk_size < 1 or count < 1:
        raise ValueError(
            f"staging_chunk_size and staging_chunks must be >= 1, got {chunk_size} and {count}"
        )


class CudaStaging(Generic[EngineT]):
    """A backend's staging pool and copy engines, made once, and the copies made with them.

    ``engine()`` makes one copy engine (blocking); ``allocate(nbytes, model_id)`` one device
    buffer of ``nbytes`` (blocking; raises `DeviceOutOfMemoryError`); ``pinner`` or ``device``
    say how the pool's chunks are pinned (see `StagingPool`). See the module for the invariants.
    """

    def __init__(
        self,
        chunk_size: int,
        count: int,
        *,
        engine: Callable[[], EngineT],
        allocate: Callable[[int, str], Any],
        pinner: HostPinner | None = None,
        device: torch.device | None = None,
    ) -> None:
        check_staging(chunk_size, count)
        self.chunk_size = chunk_size
        self.count = count
        self._engine = engine
        self._allocate = allocate
        self._pinner = pinner
        self._device = device
        self._made: tuple[StagingPool, EngineT, EngineT] | None = None
        self._lock: anyio.Lock | None = None

    @property
    def pool(self) -> StagingPool | None:
        """The staging pool, once the first CUDA call has made it (for statistics)."""
        return None if self._made is None else self._made[0]

    async def parts(self) -> tuple[StagingPool, EngineT, EngineT]:
        """The staging pool and the host -> device and device -> host engines, made once."""
        if self._made is None:
            if self._lock is None:
                self._lock = anyio.Lock()
            async with self._lock:
                if self._made is None:
                    to_device = await anyio.to_thread.run_sync(self._engine)
                    to_host = await anyio.to_thread.run_sync(self._engine)
                    pool = StagingPool(
                        self.chunk_size,
                        self.count,
                        pin=True,
                        pinner=self._pinner,
                        device=self._device,
                    )
                    self._made = (pool, to_device, to_host)
        return self._made

    def _fenced(self, nbytes: int, model_id: str, engine: EngineT) -> Any:
        # Same thread for both: the fence orders the side stream after the stream that the
        # allocation came from (memory freed there may still be in use by queued kernels).
        buffer = self._allocate(nbytes, model_id)
        engine.fence()
        return buffer

    async def load(self, store: Store, info: ModelInfo) -> Any:
        """A new device buffer filled with ``info``'s weights through the staging pool."""
        pool, engine, _ = await self.parts()
        buffer = await anyio.to_thread.run_sync(self._fenced, info.nbytes, info.model_id, engine)
        await stage_to_device(store, info, buffer, pool, engine)
        return buffer

    async def to_device(
        self, host: Any, nbytes: int, model_id: str, *, sync_copy: SyncCopy | None = None
    ) -> Any:
        """A new device buffer of ``nbytes`` copied from ``host`` in one asynchronous copy, or
        by ``sync_copy`` in a worker thread when given (memory the engine cannot copy
        asynchronously)."""
        _, engine, _ = await self.parts()
        buffer = await anyio.to_thread.run_sync(self._fenced, nbytes, model_id, engine)
        if sync_copy is None:
            await copy_and_wait(engine, host, buffer)
        else:
            await anyio.to_thread.run_sync(partial(sync_copy, buffer, host))
        return buffer

    async def to_host(
        self, device_buffer: Any, host: Any, *, sync_copy: SyncCopy | None = None
    ) -> None:
        """Copy a device buffer into host memory of the same size, after the kernels this thread
        queued; by ``sync_copy`` in a worker thread when given."""
        _, _, engine = await self.parts()
        engine.fence()  # after the kernels this thread queued (they may still write the weights)
        if sync_copy is None:
            await copy_and_wait(engine, device_buffer, host)
        else:
            await anyio.to_thread.run_sync(partial(sync_copy, host, device_buffer))
