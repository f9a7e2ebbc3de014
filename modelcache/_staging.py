"""Store -> device copies through a reusable pinned staging pool, overlapped with the reads.

Design note (the invariants):

* **One allocation.** A `StagingPool` carves its ``count`` chunks out of ONE host allocation
  (pinned on CUDA), made on first use in a worker thread and reused by every load after it:
  never an allocation per load or per tensor.
* **No chunk is reused before its copy completed.** A chunk goes back to the pool only after
  the engine's ``wait`` for the copy that reads it has returned (or raised: an engine's ``wait``
  never ends while its copy can still read the source). On an error or a cancellation, a piece
  whose copy was submitted waits for it, shielded, before its chunk is released; so afterwards
  every chunk is back in the pool and no copy of this load is in flight.
* **Overlap.** Each load runs up to ``pool.count`` workers; each takes the next piece, acquires a
  chunk (FIFO, shared fairly with other loads), reads into it, submits the copy and waits for
  it. While one chunk's copy runs, the other chunks are being read.
* **Errors.** The first error cancels the other workers and is raised as itself (a StoreError
  stays a StoreError, never an ExceptionGroup).
* **Completion is waited for, not polled.** Each engine has one `CompletionWaiter` thread that
  synchronizes its copies' events in submission order (blocking-sync events: the thread sleeps
  in the driver, it does not spin) and wakes the event loop once per finished copy with a
  thread-safe callback. Copies on one stream finish in order, so FIFO waits lose nothing, and a
  chunk is released as soon as its copy ends instead of at the next timer tick.
* **Pieces.** The device buffer is cut into windows of at most ``chunk_size`` bytes, each filled
  by the reads of the segments that cover it (usually one) and copied in one go. Padding bytes
  between segments (alignment shifts, shard starts) are copied too: they hold no tensor and are
  undefined, as in ``torch.empty``. A model costs ``ceil(nbytes / chunk_size)`` copies however
  many segments it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import anyio
import anyio.to_thread
import torch

from ._arena import PAGE, HostPinner, allocate_slab, cuda_available, host_view
from ._concurrency import gather
from ._format import ModelInfo
from ._store import Store

__all__ = [
    "Completion",
    "CompletionWaiter",
    "CopyEngine",
    "CopyHandle",
    "StagingChunk",
    "StagingPool",
    "StagingStats",
    "copy_and_wait",
    "plan_pieces",
    "stage_to_device",
]


def _thread_safe_caller() -> Callable[[Callable[[], object]], None]:
    """A function that runs a callback on the current event loop, callable from any thread.

    It never blocks the calling thread (anyio's ``from_thread.run_sync`` would wait for the loop
    to run the callback); once the loop has closed, callbacks are dropped.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        trio: Any = importlib.import_module("trio")  # anyio's only other backend
        token = trio.lowlevel.current_trio_token()

        def call_trio(callback: Callable[[], object]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(callback)

        return call_trio

    def call_asyncio(callback: Callable[[], object]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            loop.call_soon_threadsafe(callback)

    return call_asyncio


class Completion:
    """The end of one device operation, as the event loop sees it.

    Made on the event loop thread; the `CompletionWaiter` thread finishes it. `wait` may be
    awaited more than once (a cancelled wait is retried, shielded) and by several tasks.
    """

    __slots__ = ("_call", "_event", "error", "finished")

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._call = _thread_safe_caller()
        #: True once the operation ended (set on the event loop thread).
        self.finished = False
        #: What waiting for it raised, if anything.
        self.error: BaseException | None = None

    def _finish(self, error: BaseException | None) -> None:
        """From the waiter thread: record the outcome and wake the loop."""
        self.error = error
        self._call(self._set)

    def _set(self) -> None:
        self.finished = True
        self._event.set()

    async def wait(self) -> None:
        """Return when the operation has ended; raise what waiting for it raised."""
        await self._event.wait()
        if self.error is not None:
            raise self.error


def _wait_in_order(
    pending: queue.SimpleQueue[tuple[Callable[[], object], Completion] | None],
) -> None:
    """The waiter thread: block on each operation in submission order, then wake its waiter."""
    while (item := pending.get()) is not None:
        sync, completion = item
        error: BaseException | None = None
        try:
            sync()
        except BaseException as exc:  # a device error: it is the waiter's to raise
            error = exc.with_traceback(None)  # no frame of this thread kept alive by it
        completion._finish(error)
        del item, sync, completion, error


class CompletionWaiter:
    """One daemon thread that waits, in FIFO order, for blocking ``sync`` calls (CUDA events).

    `watch` is called on the event loop thread; the returned `Completion` ends when its ``sync``
    has returned (or raised). The thread starts on the first `watch` and stops at `close` or
    when this object is garbage collected; it holds no reference to it.
    """

    def __init__(self, name: str = "modelcache completion waiter") -> None:
        self.name = name
        self._pending: queue.SimpleQueue[tuple[Callable[[], object], Completion] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<CompletionWaiter {self.name!r}{' closed' if self._closed else ''}>"

    def watch(self, sync: Callable[[], object]) -> Completion:
        """Wait for ``sync()`` to return in the waiter thread, after every earlier one."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        completion = Completion()
        if self._thread is None:
            self._thread = threading.Thread(
                target=_wait_in_order, args=(self._pending,), name=self.name, daemon=True
            )
            self._thread.start()
            weakref.finalize(self, self._pending.put, None)
        self._pending.put((sync, completion))
        return completion

    def close(self) -> None:
        """Stop the thread once the operations already watched have ended."""
        if not self._closed:
            self._closed = True
            self._pending.put(None)


@dataclass(slots=True, eq=False)
class CopyHandle:
    """One submitted copy: the buffers it must keep alive, and the engine's completion token.

    ``src`` and ``dst`` are torch tensors, or the device arrays of another backend (CuPy).
    """

    src: Any
    dst: Any
    #: Engine-specific: a `Completion` for the torch and CuPy CUDA engines.
    token: Any = None


class CopyEngine(Protocol):
    """Asynchronous copies of uint8 buffers of the same length (host chunk -> device slice).

    Buffers are torch tensors, or for another backend's engine its device arrays.
    """

    def submit(self, src: Any, dst: Any) -> CopyHandle:
        """Start copying ``src`` into ``dst`` without blocking; both stay untouched by the caller
        (``src`` unwritten, ``dst`` unread) until `wait` for the returned handle ends."""
        ...

    async def wait(self, handle: CopyHandle) -> None:
        """Return when the copy is finished, without blocking the event loop.

        May raise; must not return or raise (other than by cancellation) while the copy can
        still read ``src`` or write ``dst``.
        """
        ...


async def copy_and_wait(engine: CopyEngine, src: Any, dst: Any) -> None:
    """Submit one copy and wait for it; cancelled, it still waits (shielded) for the copy."""
    await _wait_out(engine, engine.submit(src, dst))


async def _wait_out(engine: CopyEngine, handle: CopyHandle) -> None:
    try:
        await engine.wait(handle)
    except BaseException:
        # Whatever ended the wait, the copy may still be running: its source and destination
        # are not ours to reuse until it ends.
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await engine.wait(handle)
        raise


@dataclass(frozen=True, slots=True, eq=False)
class StagingChunk:
    """One chunk of a `StagingPool`: ``chunk_size`` bytes as a tensor and a writable view."""

    index: int
    tensor: torch.Tensor
    view: memoryview


@dataclass(frozen=True, slots=True)
class StagingStats:
    """A snapshot of a `StagingPool`."""

    chunk_size: int
    count: int
    pinned: bool
    #: Host allocations made (1 once used, ever after).
    allocations: int
    #: Chunks acquired since creation.
    acquired: int
    in_use: int
    max_in_use: int
    #: Tasks waiting for a chunk.
    waiting: int


class _Waiter:
    __slots__ = ("chunk", "event")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.chunk: StagingChunk | None = None


class StagingPool:
    """``count`` reusable host chunks of ``chunk_size`` bytes from one allocation (see module).

    ``pin=True`` page-locks the chunks through ``pinner``, or else torch's CUDA runtime on
    ``device``'s context, which must be available (ValueError otherwise). Chunks start on page
    boundaries.
    """

    def __init__(
        self,
        chunk_size: int = 32 << 20,
        count: int = 4,
        *,
        pin: bool,
        pinner: HostPinner | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if chunk_size < 1 or count < 1:
            raise ValueError(f"chunk_size and count must be >= 1, got {chunk_size} and {count}")
        if pin and pinner is None and not cuda_available():
            raise ValueError("a pinned StagingPool needs a CUDA device, and torch sees none")
        self.chunk_size = chunk_size
        self.count = count
        self.pin = pin
        self._pinner = pinner
        self._device = device
        self._stride = -(-chunk_size // PAGE) * PAGE
        self._chunks: list[StagingChunk] | None = None
        self._allocating: anyio.Event | None = None
        self._free: deque[StagingChunk] = deque()
        self._in_use: set[int] = set()
        self._waiters: deque[_Waiter] = deque()
        self._allocations = 0
        self._acquired = 0
        self._max_in_use = 0

    @property
    def in_use(self) -> int:
        return len(self._in_use)

    def stats(self) -> StagingStats:
        return StagingStats(
            chunk_size=self.chunk_size,
            count=self.count,
            pinned=self.pin,
            allocations=self._allocations,
            acquired=self._acquired,
            in_use=len(self._in_use),
            max_in_use=self._max_in_use,
            waiting=len(self._waiters),
        )

    def __repr__(self) -> str:
        return (
            f"<StagingPool {self.count} x {self.chunk_size} bytes, {len(self._in_use)} in use"
            f"{', pinned' if self.pin else ''}>"
        )

    async def allocate(self) -> None:
        """Make the pool's one allocation (in a worker thread) if it is not made yet."""
        while self._chunks is None:
            if self._allocating is not None:
                await self._allocating.wait()
                continue
            self._allocating = done = anyio.Event()
            try:
                with anyio.CancelScope(shield=True):  # once started, finish: never allocate twice
                    slab = await anyio.to_thread.run_sync(
                        partial(
                            allocate_slab,
                            self._stride * self.count,
                            pin=self.pin,
                            pinner=self._pinner,
                            device=self._device,
                        )
                    )
                self._allocations += 1
                view = host_view(slab)
                self._chunks = [
                    StagingChunk(
                        i,
                        slab[i * self._stride : i * self._stride + self.chunk_size],
                        view[i * self._stride : i * self._stride + self.chunk_size],
                    )
                    for i in range(self.count)
                ]
                self._free.extend(self._chunks)
            finally:
                self._allocating = None
                done.set()

    async def acquire(self) -> StagingChunk:
        """A free chunk; waits (first come, first served) while every chunk is in use."""
        if self._chunks is None:
            await self.allocate()
        if self._free and not self._waiters:
            chunk = self._free.popleft()
            self._take(chunk)
            self._acquired += 1
            return chunk
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.chunk is not None:  # handed over as we were cancelled: pass it on
                self.release(waiter.chunk)
            else:
                self._waiters.remove(waiter)
            raise
        assert waiter.chunk is not None
        self._acquired += 1
        return waiter.chunk

    def _take(self, chunk: StagingChunk) -> None:
        self._in_use.add(chunk.index)
        self._max_in_use = max(self._max_in_use, len(self._in_use))

    def release(self, chunk: StagingChunk) -> None:
        """Give ``chunk`` back. Only once no copy can still read it (see module)."""
        if (
            self._chunks is None
            or chunk.index >= len(self._chunks)
            or self._chunks[chunk.index] is not chunk
            or chunk.index not in self._in_use
        ):
            raise ValueError(f"chunk {chunk.index} is not an acquired chunk of this pool")
        self._in_use.discard(chunk.index)
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.chunk = chunk
            self._take(chunk)
            waiter.event.set()
        else:
            self._free.append(chunk)


@dataclass(frozen=True, slots=True)
class _Read:
    url: str
    src: int
    #: Offset in the chunk (and from the piece's start in the device buffer).
    at: int
    length: int


@dataclass(frozen=True, slots=True)
class Piece:
    """``length`` bytes at ``dst`` in the device buffer: filled by ``reads``, copied at once."""

    dst: int
    length: int
    reads: tuple[_Read, ...]


def plan_pieces(info: ModelInfo, chunk_size: int) -> list[Piece]:
    """Cut ``info``'s buffer into pieces of at most ``chunk_size`` bytes, in buffer order."""
    pieces: list[Piece] = []
    reads: list[_Read] = []
    start = 0

    def flush() -> None:
        last = reads[-1]
        pieces.append(Piece(start, last.at + last.length, tuple(reads)))
        reads.clear()

    for seg in sorted(info.segments, key=lambda s: s.dst):
        pos, end = seg.dst, seg.dst + seg.length
        while pos < end:
            if reads and pos >= start + chunk_size:
                flush()
            if not reads:
                start = pos
            n = min(end - pos, start + chunk_size - pos)
            reads.append(_Read(seg.url, seg.src + pos - seg.dst, pos - start, n))
            pos += n
    if reads:
        flush()
    return pieces


async def stage_to_device(
    store: Store,
    info: ModelInfo,
    device_buffer: Any,
    pool: StagingPool,
    engine: CopyEngine,
) -> None:
    """Fill ``device_buffer`` (``info.nbytes`` uint8 elements) with ``info``'s segments.

    ``device_buffer`` is a torch tensor, or a 1-D uint8 array of another backend that slices
    like one (a CuPy array) for an engine that copies into it. Reads go into pool chunks,
    chunks are copied by ``engine``; see the module's invariants. Raises what the store raises
    (StoreError, ModelNotFoundError) or the engine raises.
    """
    if not _is_byte_buffer(device_buffer, info.nbytes):
        raise ValueError(
            f"device buffer must be a contiguous 1-D uint8 tensor of {info.nbytes} elements "
            f"for model {info.model_id!r}, got {device_buffer.dtype} {tuple(device_buffer.shape)}"
        )
    planned = plan_pieces(info, pool.chunk_size)
    pieces = iter(planned)

    async def worker() -> None:
        for piece in pieces:  # shared: each piece goes to the worker that takes it first
            await _stage_piece(store, info.model_id, piece, device_buffer, pool, engine)

    await gather([worker] * min(pool.count, len(planned)))


def _is_byte_buffer(buffer: Any, nbytes: int) -> bool:
    """A contiguous 1-D uint8 buffer of ``nbytes`` elements (a torch tensor or an array)."""
    if isinstance(buffer, torch.Tensor):
        return (
            buffer.dtype == torch.uint8
            and buffer.dim() == 1
            and buffer.is_contiguous()
            and buffer.numel() == nbytes
        )
    dtype = getattr(buffer, "dtype", None)
    flags = getattr(buffer, "flags", None)
    return (
        getattr(dtype, "char", None) == "B"
        and getattr(buffer, "ndim", None) == 1
        and getattr(buffer, "size", None) == nbytes
        and bool(getattr(flags, "c_contiguous", False))
    )


async def _stage_piece(
    store: Store,
    model_id: str,
    piece: Piece,
    device_buffer: Any,
    pool: StagingPool,
    engine: CopyEngine,
) -> None:
    chunk = await pool.acquire()
    try:
        view = chunk.view
        # Reads that continue one another in one file are one scattered read (a run of
        # misaligned tensors would otherwise cost a read, and a request or a descriptor, each).
        runs: list[list[_Read]] = []
        for r in piece.reads:
            last = runs[-1][-1] if runs else None
            if last is not None and last.url == r.url and last.src + last.length == r.src:
                runs[-1].append(r)
            else:
                runs.append([r])
        await gather(
            [
                partial(
                    store.read_into, r.url, r.src, view[r.at : r.at + r.length], model_id=model_id
                )
                if len(run) == 1
                else partial(
                    store.read_scatter,
                    r.url,
                    r.src,
                    [view[x.at : x.at + x.length] for x in run],
                    model_id=model_id,
                )
                for run in runs
                for r in run[:1]
            ]
        )
        dst = device_buffer[piece.dst : piece.dst + piece.length]
        await copy_and_wait(engine, chunk.tensor[: piece.length], dst)
    finally:
        pool.release(chunk)
