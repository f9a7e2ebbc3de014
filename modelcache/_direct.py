"""Local reads of files that are not in the page cache: O_DIRECT, in parallel, straight into
the destination where it is congruent with the file, else through bounce buffers.

Why: a cold buffered read makes the kernel allocate a page-cache page for every 4 KiB it reads
(reclaiming others when memory is short), insert it, copy out of it and later evict it. A
direct read lands the disk's DMA in a buffer of ours: no page-cache pages at all; Run:ai's
streamer and fastsafetensors read local files this way.

Straight in, or through a bounce buffer: a direct read needs the file offset, the length and
the memory aligned (to `ALIGN`), and a model's data section starts anywhere in its file. The
torch backend therefore starts a large model's host buffer where it is congruent with the file
(`aligned_lead`: its address and the file offset equal modulo `ALIGN`), and then every whole
block of the file lands straight in the buffer; only the partial blocks at a chunk's two ends
go through a bounce buffer (`pread_run_direct`). Any other destination (a CUDA staging chunk, a
run of several views, a caller's buffer) is read a piece at a time into a bounce buffer and
copied out. Measured on the 2-core VM (1 GiB, cold, 8 readers of 16 MiB chunks into memory
already faulted in, quiet, 5 rounds): straight 567-583 ms with ~30 ms of CPU, through 4 MiB
bounce buffers 728-836 ms with ~280 ms of CPU (the copies), buffered stripes 647-849 ms; in
peer_loaders' local_cold row a long-lived cache with ``direct_reads=True`` took 600 ms best, 606
median, the narrowest spread of any row (fastsafetensors, O_DIRECT into fresh memory, 615 and
955; the default buffered copy 670 and 774).

On huge pages: a direct read maps its destination's pages into the disk's requests, one
segment per physically contiguous run, and a virtio disk takes at most 254 segments a request
(``/sys/block/*/queue/max_segments``): into 4 KiB pages scattered in physical memory a 16 MiB
read becomes ~16 requests of ~1 MiB, into 2 MiB pages a few of 4 MiB. Which pages a buffer
gets depends on the free lists and on which threads faulted it (two threads faulting at once
take every other page): measured (1 GiB, 8 readers of 16 MiB, interleaved), into buffers whose
physically contiguous runs averaged 1.8-4.9 pages 609-872 ms, into ones of 106-142 pages or on
huge pages (512) 585-651 ms. So the buffers direct reads fill ask for transparent huge pages
(`BufferPool.take(huge=True)`), also where `_hugepages` keeps them off for other buffers: a
fresh one's first load 619-694 ms against 836-891 on 4 KiB pages in the same rounds.

Still opt-in (``Store(direct_reads=True)``): a direct read leaves nothing in the page cache, so
the next load of a file evicted from the cache reads the disk again (a buffered read leaves a
copy the kernel may keep: ~100 ms a GiB to read again instead of ~600), and a bounce-buffered
read (CUDA staging) costs its copies. Earlier figures, all bounce-buffered (load 3-23): 1.06 s
best against 2.6-3.0 s buffered at a load of 10-23; 2,061 ms against 1,154 ms at 3-5.

Depth changes little. A sweep of the disk's ceiling (1 GiB, evicted before every run, reads
into reused buffers so only the disk is timed, 3-5 rounds interleaved, load 7-16): O_DIRECT from
4-64 threads at 1, 4 and 16 MiB a request, 642-1,518 ms best and 1,201-1,544 ms median, no
depth or size consistently ahead; quiet, 8 and 16 threads of 16 MiB 567-627 ms alike. Buffered,
4-8 readers each walking its own stripe of the file with ``POSIX_FADV_SEQUENTIAL``, 599-830 ms
best and 651-1,218 median; 8 readers taking 16 MiB chunks in order (the old pattern) 860-1,063
best. The buffered readers walk stripes (`Store._run_stripes`); Run:ai's io_uring reads at
CONCURRENCY=32 took 780-2,677 ms in the same sweep.

How (`Store._read_local` asks, with ``direct_reads=True``, for a read of more than one chunk):

- `open_run` opens the file as before and looks at how much of the range is resident
  (``mincore`` on a read-only mapping of it: no page is faulted in, no descriptor added). Less
  than `DIRECT_BELOW` resident: the descriptor is switched to O_DIRECT (``fcntl``; a
  filesystem without it, such as an old tmpfs, refuses and the read stays buffered). Mostly
  resident: buffered, since the page cache is faster than any disk.
- `pread_run_direct` is `_pread_run` for such a descriptor: each worker thread reads its chunk
  straight into a congruent one-view destination (the whole blocks inside it, one call), else
  in aligned pieces of at most `PIECE` bytes into a page-aligned bounce buffer, copying the
  wanted bytes into the destination views (``memmove``, which releases the GIL). The chunks run
  concurrently as before (``max_concurrent_reads``), which keeps that many requests queued at
  the disk.
- Bounce buffers come from a small free list (at most `KEEP_SCRATCH` kept), so a load costs no
  fresh mapping per piece and an idle process keeps at most ``KEEP_SCRATCH * (PIECE + 2 * ALIGN)``
  bytes.
- Nothing else changes: the version tag is taken before and after as for buffered reads, a
  short read (a file truncated meanwhile) returns the bytes read so far, and the kernel writes
  back dirty cached pages of the range before a direct read of it, so both reads see the same
  bytes. A direct read refused by the kernel (EINVAL: an alignment this device does not take)
  turns the descriptor back to buffered and goes on from where it was.
- The cost: a direct read leaves nothing in the page cache, so the next load of the same file
  reads the disk again.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._libc import MAP_FAILED
from ._libc import libc as _libc

if TYPE_CHECKING:
    from ._store import _Scatter

__all__ = [
    "ALIGN",
    "DIRECT_BELOW",
    "PIECE",
    "aligned_lead",
    "congruent",
    "is_cold",
    "is_cold_fd",
    "open_run",
    "pread_run_direct",
    "resident_fraction",
]

#: Alignment of direct reads: offset, length and memory (a page covers every logical block
#: size up to 4 KiB).
ALIGN = 4096
#: Bytes one direct read asks for at most (the size of a bounce buffer, less its alignment).
PIECE = 4 << 20
#: Ranges less resident than this are read with O_DIRECT.
DIRECT_BELOW = 0.5
#: Bounce buffers kept for reuse.
KEEP_SCRATCH = 8
#: Pages `resident_fraction` looks at: about this many, evenly spread (all, for fewer pages
#: than twice this).
_SAMPLES = 256
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def resident_fraction(fd: int, offset: int, length: int) -> float:
    """The fraction of the pages of bytes ``[offset, offset + length)`` of ``fd`` that are in
    the page cache; 1.0 where this cannot be told (then nothing changes: buffered reads).

    Estimated from about `_SAMPLES` pages spread evenly over the range (exact below that):
    mincore costs ~80 ns a page, 20 ms for 1 GiB asked whole, which a warm zero-copy load of
    that size (~10 ms in all) paid on every load."""
    if _libc is None or length <= 0:
        return 1.0
    start = offset // mmap.PAGESIZE * mmap.PAGESIZE
    size = offset + length - start
    # A shared read-only mapping: mapping faults nothing in, and holds no descriptor.
    address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if address is None or address == MAP_FAILED:
        return 1.0
    try:
        pages = -(-size // mmap.PAGESIZE)
        stride = max(1, pages // _SAMPLES)
        vector = (ctypes.c_ubyte * 1)()
        resident = sampled = 0
        for page in range(0, pages, stride):
            if _libc.mincore(address + page * mmap.PAGESIZE, mmap.PAGESIZE, vector) != 0:
                return 1.0
            resident += vector[0] & 1  # bit 0 says resident; the others are reserved
            sampled += 1
        return resident / sampled
    finally:
        _libc.munmap(address, size)


def is_cold(opener: Callable[[str], int], path: str, offset: int, length: int) -> bool:
    """Whether bytes ``[offset, offset + length)`` of ``path`` are mostly (`DIRECT_BELOW`) not
    in the page cache; False where this cannot be told, or the file cannot be opened (the read
    that follows reports that). One open, no byte read."""
    try:
        fd = opener(path)
    except OSError:
        return False
    try:
        return is_cold_fd(fd, offset, length)
    finally:
        os.close(fd)


def is_cold_fd(fd: int, offset: int, length: int) -> bool:
    """`is_cold` of an open file."""
    try:
        return resident_fraction(fd, offset, length) < DIRECT_BELOW
    except OSError:
        return False


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for ``fd``; False where the filesystem refuses it."""
    if not _O_DIRECT:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT if on else flags & ~_O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    return True


def _is_direct(fd: int) -> bool:
    return bool(_O_DIRECT) and bool(fcntl.fcntl(fd, fcntl.F_GETFL) & _O_DIRECT)


def open_run(
    open_regular: Callable[[str, list[int], Callable[[str], int]], int],
    path: str,
    opened: list[int],
    opener: Callable[[str], int],
    offset: int,
    length: int,
    direct_ok: bool = True,
) -> tuple[int, bool]:
    """Open ``path`` with ``open_regular`` (the fd goes in ``opened``); with ``direct_ok``,
    switch it to O_DIRECT when bytes ``[offset, offset + length)`` are mostly not in the page
    cache. A descriptor left buffered is advised ``POSIX_FADV_SEQUENTIAL``. Returns the file
    size and whether reads of it are direct. One worker-thread call."""
    size = open_regular(path, opened, opener)
    fd = opened[0]
    if size < offset + length or length <= 0:  # the caller reports the short file
        return size, False
    if direct_ok and resident_fraction(fd, offset, length) < DIRECT_BELOW and _set_direct(fd, True):
        return size, True
    _advise_sequential(fd)
    return size, False


def _advise_sequential(fd: int) -> None:
    """Ask for the larger readahead window of a sequential reader (twice the device's) on this
    descriptor's own readahead state: each of the read's workers walks its stripe in order
    (`Store._run_stripes`). Nothing else changes, and pages already cached are not read."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        with contextlib.suppress(OSError):  # advice: a filesystem may refuse it
            advise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


class _ScratchPool:
    """Page-aligned bounce buffers of ``PIECE + 2 * ALIGN`` bytes (a piece and the alignment
    at either end), reused across reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []

    def take(self, size: int) -> mmap.mmap:
        """A buffer of at least ``size`` bytes (kept ones that are smaller are dropped)."""
        with self._lock:
            while self._free:
                buffer = self._free.pop()
                if len(buffer) >= size:
                    return buffer
                buffer.close()
        return mmap.mmap(-1, size)

    def give(self, buffer: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < KEEP_SCRATCH:
                self._free.append(buffer)
                return
        buffer.close()


_scratch = _ScratchPool()


def _address(view: memoryview) -> int:
    """The address of a writable view's first byte (the ctypes object is dropped at once)."""
    anchor = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def congruent(view: memoryview, offset: int) -> bool:
    """Whether a read of the file from ``offset`` into ``view`` can go straight in: the view's
    address and the file offset leave the same remainder by `ALIGN`, so every aligned block of
    the file lands on an aligned address (`aligned_lead` gives buffers that)."""
    return (_address(view) - offset) % ALIGN == 0


def aligned_lead(offset: int, dst: int) -> int:
    """The bytes to skip at the start of a page-aligned buffer so that its byte ``dst`` holds
    file byte ``offset`` with both congruent (`congruent`): ``(offset - dst) % ALIGN``."""
    return (offset - dst) % ALIGN


def pread_run_direct(fd: int, run: _Scatter, lo: int, hi: int, offset: int) -> int:
    """Fill bytes ``[lo, hi)`` of ``run`` from ``fd`` (O_DIRECT) at ``offset + lo``; return the
    bytes read (fewer only at end of file).

    A run that is one view congruent with the file (`congruent`) has the aligned blocks inside
    ``[lo, hi)`` read straight into it (the disk's DMA lands in the destination: no copy, ~30
    ms of CPU a GiB); only the partial blocks at either end go through a bounce buffer. Any
    other run is read a piece at a time through one (`_pread_bounced`)."""
    if len(run.views) == 1 and congruent(run.views[0], offset):
        return _pread_straight(fd, run, lo, hi, offset)
    return _pread_bounced(fd, run, lo, hi, offset)


def _pread_straight(fd: int, run: _Scatter, lo: int, hi: int, offset: int) -> int:
    """`pread_run_direct` of a congruent one-view run."""
    first = -(-(offset + lo) // ALIGN) * ALIGN - offset  # run offsets of the aligned blocks
    last = (offset + hi) // ALIGN * ALIGN - offset
    if first >= last:  # no whole block inside: all of it through the bounce buffer
        return _pread_bounced(fd, run, lo, hi, offset)
    got = _pread_bounced(fd, run, lo, first, offset) if first > lo else 0
    if got < first - lo:
        return got  # end of file
    view = run.views[0]
    try:
        got += _read_aligned(fd, view[first:last], offset + first)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        # An alignment this device does not take: buffered from here on (`_pread_bounced`,
        # which raises an EINVAL of the buffered read). Not asked whether the descriptor is
        # still direct: another chunk's thread, refused too, may have turned it back already.
        _set_direct(fd, False)
        return got + _pread_bounced(fd, run, first, hi, offset)
    if got < last - lo:
        return got
    return got + (_pread_bounced(fd, run, last, hi, offset) if last < hi else 0)


def _pread_bounced(fd: int, run: _Scatter, lo: int, hi: int, offset: int) -> int:
    """Fill bytes ``[lo, hi)`` of ``run`` a piece at a time through a bounce buffer: each
    direct read of the aligned blocks that cover a piece, then the wanted bytes copied out."""
    piece = PIECE
    scratch = _scratch.take(piece + 2 * ALIGN)
    view = memoryview(scratch)
    try:
        base = _address(view)
        pos = lo
        refused = False
        while pos < hi:
            end = min(pos + piece, hi)
            start = (offset + pos) // ALIGN * ALIGN  # the aligned piece that covers [pos, end)
            stop = -(-(offset + end) // ALIGN) * ALIGN
            try:
                n = _read_aligned(fd, view[: stop - start], start)
            except OSError as exc:
                if exc.errno != errno.EINVAL or refused:
                    raise
                # Buffered from here on, for every chunk of this descriptor: it reads the same
                # aligned piece without the device's alignment rules. Once, whether or not the
                # descriptor is still direct: another chunk's thread, refused too, may have
                # turned it back between this read's refusal and now (it then failed the load).
                refused = True
                _set_direct(fd, False)
                continue
            skip = offset + pos - start  # where byte `pos` of the run is in the piece
            got = min(end - pos, max(0, n - skip))  # fewer only at end of file
            at = base + skip
            for dest in run.slices(pos, pos + got):
                ctypes.memmove(_address(dest), at, len(dest))  # releases the GIL
                at += len(dest)
            pos += got
            if pos < end:
                break
        return pos - lo
    finally:
        view.release()
        _scratch.give(scratch)


def _read_aligned(fd: int, buf: memoryview, start: int) -> int:
    """Read into all of ``buf`` from ``start``; fewer bytes only at end of file (a count that
    is no block multiple is the end: a direct read from there would be refused)."""
    filled = 0
    while filled < len(buf):
        n = os.preadv(fd, [buf[filled:]], start + filled)
        if n == 0:
            break
        filled += n
        if filled % ALIGN:
            break
    return filled
