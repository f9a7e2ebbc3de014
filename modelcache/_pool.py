"""Host buffers for CPU-device models that keep their pages from one load to the next.

Writing into fresh memory costs a page fault per page (zeroing it, and compacting for a huge
page): for a 1 GiB model that is as slow as the read itself. A `BufferPool` keeps the mappings
of dead model buffers *idle* instead of unmapping them, so the next load of a similar size
writes into pages that are already there.

Design note (the invariants):

* **Reuse only what nothing references.** Each buffer handed out is one private anonymous
  mapping of ours, seen through a ctypes array that every tensor, view and memoryview of it
  keeps alive (``torch.frombuffer`` holds the array). The mapping becomes idle only from the
  array's finalizer: once the last tensor of a model is gone, however long a user kept one past
  its lease. A buffer still referenced is never handed out again.
* **Bounded by the budget.** ``live`` counts the bytes of mappings in use (alive), ``idle`` the
  bytes kept for reuse. When the pool grows (`take` maps or extends memory), idle buffers are
  unmapped, oldest first, until ``live + idle <= limit`` (the cache sets ``limit`` to its device
  plus host budget, which is what its models may hold in host memory). A buffer counts there at
  the bytes asked for, as the cache's budget counts its model, not at its mapping's whole pages:
  a budget of exactly k models of a size that is no page multiple still keeps a dead model's
  buffer for the next (the pages exceed the limit by under a page per buffer, two with a
  `take` lead). A buffer dying only moves bytes from ``live`` to ``idle``, so it never adds
  memory, and the bound is restored at the next `take`, `stats` or `close`. A pool with ``limit == 0`` (a backend used without a cache, or
  after `close`) keeps nothing: memory goes back to the system when its last tensor dies.
* **Fragmentation.** A request takes the smallest idle mapping that fits and shrinks it to the
  request (the tail's pages go back to the system: a live buffer never holds more than its model
  needs, rounded to a page). When none fits, the largest idle mapping is grown in place
  (``mremap``: its faulted pages are kept, only the extension is fresh), and only when nothing is
  idle is a fresh mapping made. The pool never evicts anything: the cache's byte budget decides
  what is resident; the pool only decides where the bytes go.
* **Threads.** Finalizers run in whichever thread drops the last reference (the event loop, a
  worker, the garbage collector in the middle of anything), so they never wait for the lock: a
  dead mapping is queued, and whoever holds or next takes the lock drains the queue (a
  finalizer takes the lock itself when it is free). `take` does system calls on large mappings:
  call it in a worker thread. Giving memory back costs ~0.1 ms a MiB (munmap of 1 GiB: over
  100 ms), and a buffer often dies on the event loop's thread (a lease ending after its model
  was evicted) or the pool is closed there: mappings given back anywhere but in `take` are
  unmapped by a thread of the pool's own (`_Unmapper`) once they total `_UNMAP_ASIDE` bytes.
"""

from __future__ import annotations

import bisect
import collections
import ctypes
import mmap
import os
import threading
import weakref
from dataclasses import dataclass

import torch

from ._hugepages import huge_pages_advised
from ._libc import MAP_FAILED
from ._libc import libc as _libc

__all__ = ["BufferPool", "PoolStats", "pool_of"]

_PAGE = mmap.PAGESIZE
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_PRIVATE_ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_MREMAP_MAYMOVE = 1
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
_MADV_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", 15)
#: Mappings given back outside `take` totalling at least this are unmapped in `_Unmapper`'s
#: thread (starting one costs ~0.1 ms, the munmap of this many bytes ~0.4 ms).
_UNMAP_ASIDE = 4 << 20


def _round_up(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


class _Mapping:
    """One anonymous mapping of ours: ``size`` bytes at ``address`` (both page multiples), of
    which ``nbytes`` were asked for: what it counts against the limit; ``huge`` once `take`
    advised it to use huge pages for a buffer direct reads fill (the advice stays with it)."""

    __slots__ = ("address", "huge", "nbytes", "size")

    def __init__(self, address: int, size: int) -> None:
        self.address = address
        self.size = size
        self.nbytes = size
        self.huge = False


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of a `BufferPool` (bytes are whole pages)."""

    #: Bound of ``live_bytes + idle_bytes`` whenever the pool grows, counting each buffer at the
    #: bytes asked for (its pages exceed that by under one, two with a lead); 0: keep nothing idle.
    limit: int
    #: Bytes of buffers in use: referenced by a model or by anyone else.
    live_bytes: int
    live_buffers: int
    #: Bytes of dead buffers kept mapped (and faulted) for the next loads.
    idle_bytes: int
    idle_buffers: int
    #: Buffers handed out in memory already mapped (whole, or grown in place).
    reused: int
    #: Buffers handed out in a fresh mapping.
    fresh: int
    #: Idle buffers given back to the system (over the limit, or at close).
    released: int


class BufferPool:
    """Page-aligned host buffers whose pages outlive the models in them (see the module)."""

    def __init__(self, limit: int = 0) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self._limit = limit
        self._lock = threading.Lock()
        # Idle mappings sorted by size (parallel lists for bisect), and in the order they came
        # back (trimming gives back the oldest first).
        self._idle_sizes: list[int] = []
        self._idle: list[_Mapping] = []
        self._idle_order: collections.OrderedDict[int, _Mapping] = collections.OrderedDict()
        self._idle_bytes = 0
        self._live: set[int] = set()  # addresses of mappings handed out and not yet dead
        self._live_bytes = 0
        # The bytes asked for of the live and idle mappings: what the limit bounds (see the module).
        self._live_charge = self._idle_charge = 0
        # Mappings whose last reference died, waiting for the lock (appended by finalizers).
        self._dead: collections.deque[_Mapping] = collections.deque()
        self._reused = self._fresh = self._released = 0

    @staticmethod
    def available() -> bool:
        """Whether this platform has the calls the pool needs (Linux's mmap and mremap)."""
        return _libc is not None

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, nbytes: int) -> None:
        """Set the bound; idle buffers over it are given back now."""
        if nbytes < 0:
            raise ValueError(f"limit must be >= 0, got {nbytes}")
        with self._lock:
            self._limit = nbytes
            released = self._drain_and_trim()
        _give_back(released)
        self._drain_dead()

    def stats(self) -> PoolStats:
        """The counters now (no system call: buffers over the limit are given back by the next
        `take`, or by the finalizer that made them idle)."""
        with self._lock:
            self._drain()
            stats = PoolStats(
                limit=self._limit,
                live_bytes=self._live_bytes,
                live_buffers=len(self._live),
                idle_bytes=self._idle_bytes,
                idle_buffers=len(self._idle),
                reused=self._reused,
                fresh=self._fresh,
                released=self._released,
            )
        self._drain_dead()
        return stats

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<BufferPool {s.live_bytes} bytes live in {s.live_buffers}, {s.idle_bytes} idle in "
            f"{s.idle_buffers}, limit {s.limit}>"
        )

    def close(self) -> None:
        """Give every idle buffer back to the system and keep none from now on (limit 0).

        Buffers still in use are unmapped when their last tensor dies. Large ones are unmapped
        in a thread of the pool's (see the module): the memory is back moments later."""
        self.limit = 0

    def take(
        self, nbytes: int, lead: int = 0, huge: bool = False
    ) -> tuple[torch.Tensor, memoryview, int]:
        """A buffer of ``nbytes`` (> 0): a uint8 tensor, a writable memoryview of the same bytes,
        and how many bytes from its start were already faulted in (reused memory, whose old
        contents are still there: the caller overwrites them).

        The buffer starts ``lead`` bytes (``0 <= lead < `` a page) into its mapping, whose first
        page holds them: a direct read lands straight in a buffer congruent with its file
        (`_direct.aligned_lead`). It counts against the limit at ``nbytes`` all the same.
        ``huge`` asks for transparent huge pages where `huge_pages_advised` does not already (a
        buffer direct reads fill: their DMA into scattered 4 KiB pages is cut into more
        requests, `_direct`); pages already faulted in stay as they are. Without it, a reused
        mapping that asked for them stops asking (its new pages are small, as a fresh one's).

        Blocking (mmap, mremap, munmap of large mappings): call it in a worker thread.
        """
        if _libc is None:
            raise RuntimeError("BufferPool needs Linux's mmap and mremap")
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes}")
        if not 0 <= lead < _PAGE:
            raise ValueError(f"lead must be in [0, {_PAGE}), got {lead}")
        size = _round_up(lead + nbytes)
        with self._lock:
            self._drain()
            mapping, faulted = self._reuse(size)
            if mapping is not None:
                self._reused += 1
            self._live_bytes += size  # counted before it exists: trimming makes room for it
            self._live_charge += nbytes
            released = self._trim()
        self._unmap(released)
        if mapping is None:
            try:
                mapping = self._map(size)
            except BaseException:
                with self._lock:
                    self._live_bytes -= size
                    self._live_charge -= nbytes
                raise
            faulted = 0
            with self._lock:
                self._fresh += 1
        if huge != mapping.huge and not huge_pages_advised():
            # The advice stays with the mapping (also over mremap): a buffer for buffered reads
            # reusing one a direct-read buffer advised would fault its new pages in 2 MiB at a
            # time, the cost `_hugepages` keeps fresh buffers from here.
            advice = _MADV_HUGEPAGE if huge else _MADV_NOHUGEPAGE
            _libc.madvise(mapping.address, mapping.size, advice)
            mapping.huge = huge
        mapping.nbytes = nbytes  # before the finalizer can see it
        with self._lock:
            self._live.add(mapping.address)
        array = (ctypes.c_ubyte * nbytes).from_address(mapping.address + lead)
        # The finalizer holds the mapping, not the array: it runs once the array (and with it
        # every tensor and view of these bytes) is gone.
        finalizer = weakref.finalize(array, self._died, mapping)
        finalizer.atexit = False
        tensor = torch.frombuffer(array, dtype=torch.uint8)
        view = memoryview(array).cast("B")
        self._drain_dead()
        return tensor, view, max(0, min(faulted, lead + nbytes) - lead)

    # -- under the lock -------------------------------------------------------------------------

    def _reuse(self, size: int) -> tuple[_Mapping | None, int]:
        """An idle mapping resized to ``size`` and the bytes of it already faulted in, or
        (None, 0) when nothing is idle. Best fit, shrunk to size; else the largest, grown."""
        assert _libc is not None
        if not self._idle:
            return None, 0
        i = bisect.bisect_left(self._idle_sizes, size)
        if i == len(self._idle):
            i -= 1  # none fits: grow the largest
        mapping = self._idle[i]
        del self._idle[i], self._idle_sizes[i]
        del self._idle_order[mapping.address]
        self._idle_bytes -= mapping.size
        self._idle_charge -= mapping.nbytes
        old = mapping.size
        if old != size:
            # Shrinking stays in place; growing may move the pages (without copying them).
            address = _libc.mremap(mapping.address, old, size, _MREMAP_MAYMOVE)
            if address is None or address == MAP_FAILED:
                # Could not grow (address space): give it back and map fresh memory instead.
                self._released += 1
                _libc.munmap(mapping.address, old)
                return None, 0
            mapping.address, mapping.size = address, size
        return mapping, min(old, size)

    def _drain(self) -> None:
        """Move the mappings whose buffers died from live to idle."""
        while self._dead:
            mapping = self._dead.popleft()
            self._live.discard(mapping.address)
            self._live_bytes -= mapping.size
            self._live_charge -= mapping.nbytes
            i = bisect.bisect_right(self._idle_sizes, mapping.size)
            self._idle_sizes.insert(i, mapping.size)
            self._idle.insert(i, mapping)
            self._idle_order[mapping.address] = mapping
            self._idle_bytes += mapping.size
            self._idle_charge += mapping.nbytes

    def _trim(self) -> list[_Mapping]:
        """Remove idle mappings, oldest first, until live + idle <= limit (counted at the bytes
        asked for); the caller unmaps them once the lock is released."""
        released: list[_Mapping] = []
        while self._idle and self._live_charge + self._idle_charge > self._limit:
            _, mapping = self._idle_order.popitem(last=False)
            i = bisect.bisect_left(self._idle_sizes, mapping.size)
            while self._idle[i] is not mapping:
                i += 1
            del self._idle[i], self._idle_sizes[i]
            self._idle_bytes -= mapping.size
            self._idle_charge -= mapping.nbytes
            self._released += 1
            released.append(mapping)
        return released

    def _drain_and_trim(self) -> list[_Mapping]:
        self._drain()
        return self._trim()

    # -- without the lock -----------------------------------------------------------------------

    def _died(self, mapping: _Mapping) -> None:
        """Finalizer of a buffer's array: never waits for the lock (see the module)."""
        self._dead.append(mapping)
        self._drain_dead()

    def _drain_dead(self) -> None:
        """Drain the dead queue if the lock is free; whoever holds it drains after releasing."""
        while self._dead and self._lock.acquire(blocking=False):
            try:
                released = self._drain_and_trim()
            finally:
                self._lock.release()
            _give_back(released)

    @staticmethod
    def _map(size: int) -> _Mapping:
        assert _libc is not None
        address = _libc.mmap(None, size, _PROT_RW, _MAP_PRIVATE_ANON, -1, 0)
        if address is None or address == MAP_FAILED:
            raise MemoryError(f"could not map {size} bytes of host memory")
        if huge_pages_advised():  # 512 faults instead of 262,144 a GiB; not in some VMs
            _libc.madvise(address, size, _MADV_HUGEPAGE)
        return _Mapping(address, size)

    @staticmethod
    def _unmap(mappings: list[_Mapping]) -> None:
        libc = _libc
        if libc is None:  # never mapped anything; or the interpreter is shutting down
            return
        for mapping in mappings:
            libc.munmap(mapping.address, mapping.size)


class _Unmapper:
    """Unmaps mappings in a thread of its own, started when there is work and ending when there
    is none (no thread is left behind): a finalizer on the event loop's thread hands it a dead
    model's mapping rather than holding the loop for the munmap."""

    def __init__(self) -> None:
        # Reentrant (Condition's default lock): a finalizer may run inside a `with` of it.
        self._lock = threading.Condition()
        self._queue: list[_Mapping] = []
        self._running = False

    def _after_fork(self) -> None:
        """In a child made by ``fork()``: the parent's thread is not there, and its lock may
        have been held when the parent forked. A running flag copied from the parent would
        queue every mapping the child gives back for no thread, and `wait` would never return;
        what is queued is unmapped by the child's first thread."""
        self._lock = threading.Condition()
        self._running = False

    def wait(self) -> None:
        """Return once every mapping handed over so far is unmapped."""
        with self._lock:
            self._lock.wait_for(lambda: not self._running)

    def submit(self, mappings: list[_Mapping]) -> None:
        with self._lock:
            self._queue.extend(mappings)
            if self._running:
                return
            self._running = True
        try:
            threading.Thread(target=self._run, name="modelcache-unmap", daemon=True).start()
        except RuntimeError:  # no new thread at interpreter shutdown: unmap here
            self._run()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._running = False
                    self._lock.notify_all()
                    return
                mappings, self._queue = self._queue, []
            BufferPool._unmap(mappings)


_UNMAPPER = _Unmapper()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_UNMAPPER._after_fork)


def _give_back(mappings: list[_Mapping]) -> None:
    """Unmap ``mappings``: here when they are small, else in `_UNMAPPER`'s thread."""
    if sum(m.size for m in mappings) >= _UNMAP_ASIDE:
        _UNMAPPER.submit(mappings)
    else:
        BufferPool._unmap(mappings)


def pool_of(backend: object) -> BufferPool | None:
    """The `BufferPool` a device backend takes its buffers from (``backend.pool``), if any."""
    pool = getattr(backend, "pool", None)
    return pool if isinstance(pool, BufferPool) else None
