"""Small local reads (a header, a stat, a side file) run together in shared worker-thread calls.

A worker-thread call costs far more than a small read of a file in the page cache: the call is
queued to a thread, the thread must take the GIL from the busy event loop (up to the switch
interval, 5 ms, for every reacquire), and the result comes back through the loop's self-pipe.
Filling a cache with many small models made that hop most of a load's cost. `SmallReads` runs
every small read asked for while one batch is out in the next batch: one thread call for all.

Invariants:

* At most ``lanes`` batches of a `SmallReads` are out at a time (4 by default; each holds one
  token of the store's limiter while in its thread): a read that blocks (a stalled mount; a FIFO
  opens non-blocking, `_store.OPEN_FILE`) holds one lane, and the reads asked for after it go in the others, as loads
  did when each header read took one of the load slots. A batch takes every read queued when it
  starts, oldest first, up to `MAX_BATCH`.
* No task of its own: a batch is driven by the task of one of its callers. A caller that finds a
  lane free drives; when its batch ends it wakes the batch's callers and hands the lane to the
  caller of the oldest read still queued that holds none (whose read goes in its batch). Which
  reads wait and which drive is state (`_Read.ran`, `_Read.drive`); an event only wakes a caller
  to look at it, so no wake-up is lost.
* Cancellation: a caller cancelled while its read is queued marks it left (and passes on the lane
  it was handed, if any): batches skip it where it stands (taking it out would scan the queue, and
  thousands of callers leaving newest first stalled the loop for seconds). Once its read is in
  a batch it leaves at once and its read ends in the thread, its result dropped (each read is
  self-contained: it opens and closes its own file). A driver waits for its batch even when
  cancelled (the thread call is shielded): a caller whose task drives a batch holding a read that
  blocks waits with it (see the README); reads its batch did not run (cancelled before the thread
  started) go back to the queue's front, but for those whose callers left.
* Errors are per read: each caller raises its own read's exception, in its own task.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from ._concurrency import Event, new_signal

__all__ = ["LANES", "MAX_BATCH", "SMALL_READ", "SmallReads"]

T = TypeVar("T")

#: Reads one batch takes at most (a batch of small reads stays well under a millisecond).
MAX_BATCH = 64
#: Batches of one `SmallReads` out at once: a read that blocks holds up one lane, not all.
LANES = 4
#: Local reads up to this many bytes go through `SmallReads`; larger ones get a call each.
SMALL_READ = 64 << 10


class _Read(Generic[T]):
    """One read asked for: queued, then taken by a batch, then run (or not, if cancelled)."""

    __slots__ = ("args", "call", "done", "drive", "error", "left", "ran", "result")

    def __init__(self, call: Callable[..., T], args: tuple[Any, ...]) -> None:
        self.call = call
        self.args = args
        #: Wakes the caller to look at ``ran`` and ``drive`` again (a fresh one for each wait;
        #: None before the first: a change made then is seen before its caller waits).
        self.done: Event | None = None
        self.drive = False  # its caller holds a lane: it drives the next batch
        #: Its caller left: skipped where it stands in the queue, never put back in it by a batch
        #: that did not run (it could be handed the drive with nobody to take it).
        self.left = False
        self.ran = False  # run by the thread (set there): ``result`` or ``error`` holds the answer
        self.result: T | None = None
        self.error: Exception | None = None


def _run_batch(batch: list[_Read[Any]]) -> None:
    """In a worker thread: run each read, keeping its answer or its error."""
    for read in batch:
        try:
            read.result = read.call(*read.args)
        except Exception as exc:
            read.error = exc
        read.ran = True
    # A read's error keeps this frame (its traceback, its frames' f_back): without its locals,
    # an error kept by its caller does not keep every other read of the batch, results included.
    del batch, read


class SmallReads:
    """Batches of small blocking reads, one worker-thread call each (see the module docstring).

    ``limiter`` gives the limiter a batch's thread call holds (the store's, made in the loop);
    ``lanes`` is how many batches may be out at once."""

    __slots__ = ("_drivers", "_lanes", "_limiter", "_queue", "batches")

    def __init__(self, limiter: Callable[[], anyio.CapacityLimiter], lanes: int = LANES) -> None:
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, not {lanes}")
        self._limiter = limiter
        self._lanes = lanes
        self._queue: deque[_Read[Any]] = deque()
        #: Lanes held: callers driving a batch, or handed a lane and about to drive.
        self._drivers = 0
        #: Worker-thread calls made (for tests and benchmarks).
        self.batches = 0

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` in a worker thread, in a batch with the other reads asked for now."""
        read: _Read[T] = _Read(call, args)
        self._queue.append(read)
        if self._drivers < self._lanes:
            self._drivers += 1
            read.drive = True
        try:
            while not read.ran:
                if read.drive:
                    read.drive = False
                    await self._drive()  # this lane's batch: the oldest queued reads
                    continue  # its read went in it, or in another lane's batch, or waits
                read.done = new_signal()
                await read.done.wait()  # it ran, or its caller is handed a lane
        except BaseException:
            self._leave(read)
            raise
        if read.drive:  # handed a lane, but another lane's batch ran its read: pass it on
            read.drive = False
            self._pass_drive()
        error = read.error
        if error is not None:
            try:
                raise error
            finally:
                del error, read
        return read.result  # type: ignore[return-value]

    async def _drive(self) -> None:
        """Run the oldest queued reads in one thread call, then hand the lane on."""
        try:
            # Reads asked for in this turn of the event loop go in this batch, not one a lane.
            await anyio.lowlevel.checkpoint()
        except BaseException:
            self._pass_drive()
            raise
        queue = self._queue
        batch: list[_Read[Any]] = []
        while queue and len(batch) < MAX_BATCH:
            read = queue.popleft()
            if not read.left:
                batch.append(read)
        if not batch:  # the other lanes took them
            self._pass_drive()
            return
        self.batches += 1
        try:
            await anyio.to_thread.run_sync(_run_batch, batch, limiter=self._limiter())
        finally:
            # Cancelled before the thread started: what did not run goes back, oldest first.
            queue.extendleft(read for read in reversed(batch) if not (read.ran or read.left))
            for read in batch:
                if read.ran and read.done is not None:
                    read.done.set()
            # The worker thread that ran it holds its arguments a moment after handing back: the
            # list, emptied, keeps no read (their results are their callers' to keep or drop).
            batch.clear()
            self._pass_drive()

    def _pass_drive(self) -> None:
        """A lane goes to the caller of the oldest queued read holding none, or is let go."""
        queue = self._queue
        while queue and queue[0].left:
            queue.popleft()
        # Reads holding a lane are at most ``lanes``, near the front: a short scan.
        for read in queue:
            if not (read.drive or read.left):
                read.drive = True
                if read.done is not None:
                    read.done.set()
                return
        self._drivers -= 1

    def _leave(self, read: _Read[Any]) -> None:
        """``read``'s caller leaves (cancelled): its queued read goes, and the lane it held."""
        read.left = True  # queued (or put back by a call that never started): skipped there
        if read.drive:
            read.drive = False
            self._pass_drive()
