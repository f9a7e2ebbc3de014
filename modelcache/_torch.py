"""The torch device backend: one buffer per model, tensors as views into it.

Two ways to fill a CPU buffer, chosen per model:

* **zero-copy** (opt-in, see `TorchBackend`) - a local single-file model whose tensors are
  aligned in the file is mapped (copy-on-write, so writes never reach the file) and its pages
  are mapped eagerly, which ``safetensors.torch.load_file`` leaves to the first reads: a file
  in the page cache in 2 MiB folios with ``MADV_POPULATE_READ`` in the mapping's own worker
  call (`_populate_resident`; its small-folio head by the kernel's reads, `_faultin`), any
  other from a few threads (`_populate`), by the same madvise (a byte read a page where the kernel lacks it: a read past the end of a file cut
  short meanwhile is SIGBUS, the madvise an error). The model is ready when the call returns:
  no first-inference page faults.
* **copy** - everything else: a page-aligned private mapping on huge pages from the backend's
  `BufferPool`, whose pages a dead model may have left (small models: the heap), filled by the
  store's concurrent ranged reads.

A CUDA device gets one device allocation per model, filled through the backend's staging pool
(the `CudaStaging` core of `modelcache._cuda`, with `TorchCudaCopyEngine`): reads land in a few
reusable pinned chunks and are copied on a side stream while the next chunks are read; no host
buffer of the model's size is made. The pool and the copy engines are made on the first CUDA
load and reused by every load after it. Other
non-CPU devices get a host buffer copied into one device allocation. Tensors are views of the
one allocation at the layout's offsets. Mapped and device buffers are freed when the last view
is dropped: nothing here holds a reference beyond the returned `Weights`.

`to_device` and `to_host` move a whole buffer between a (pinned) host block and the device in
one asynchronous copy: promotion from and demotion to the host tier (`promote` and `demote`, the
`DeviceBackend` methods the cache calls). Host -> device copies (loads, promotions) and device ->
host copies (demotions) have a side stream each, so a multi-GiB demotion never queues ahead of a
load's chunks. Every copy is waited for, even when the caller is cancelled, before the call ends.

Every CUDA call of the backend runs with its device current (`device_guard`), whatever thread
makes it: ``cuda:1`` never costs a context on GPU 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import mmap
import os
import re
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import torch

from ._arena import HostArena, HostBlock, cuda_available, device_guard, host_view
from ._backend import LoadedWeights, ViewMapping, allocate_with_retry
from ._concurrency import gather
from ._cuda import CudaStaging, check_staging
from ._direct import DIRECT_BELOW, resident_fraction
from ._exceptions import ModelFormatError
from ._faultin import WINDOW, all_present, read_faults
from ._format import DTYPE_SIZES, ModelInfo
from ._hugepages import huge_pages_advised
from ._libc import bind
from ._loader import fill_buffer
from ._pool import BufferPool
from ._staging import Completion, CompletionWaiter, CopyHandle, StagingPool
from ._store import OPEN_FILE, Store
from ._versions import local_tag, reading, see

__all__ = [
    "TorchBackend",
    "TorchCudaCopyEngine",
    "Weights",
    "allocate_host",
    "tensor_views",
    "torch_dtype",
]

_DTYPE_ATTRS = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
    "C64": "complex64",
}
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_PAGE = mmap.PAGESIZE
#: Host buffers below this come from the heap rather than a mapping of their own.
_SMALL = 1 << 20
#: Models with more tensors than this get their views made in a worker thread.
_VIEWS_ON_LOOP = 256
#: A fresh buffer is faulted in ahead of the reads in steps of this many bytes.
_PREFAULT_STEP = 64 << 20
#: Threads that fault in a mapped file's pages together (`_populate`), on ranges that are
#: multiples of `_POPULATE_ALIGN` (a huge page: a large folio is never split between two).
_POPULATE_PARTS = max(1, min(4, os.cpu_count() or 1))
_POPULATE_ALIGN = 2 << 20
#: A PMD-mapped huge page, and how many places of a file `_faults_map_huge` tries.
_HUGE = 2 << 20
_PROBES = 8
#: Whether ``/proc/self/fd`` names open descriptors (Linux with /proc mounted).
_PROC_FDS = os.path.isdir("/proc/self/fd")


_madvise: Callable[[int, int, int], int] | None = bind(
    "madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


#: cachestat(2)'s number (Linux 6.5): the same on every architecture (numbers from 424 on are).
_SYS_CACHESTAT = 451


_syscall: Callable[..., int] | None = bind("syscall", None, ctypes.c_long)


def _cached_fraction(fd: int, size: int) -> float:
    """The fraction of the file's pages in the page cache: counted by cachestat (Linux 6.5) in
    one call (~0.15 ms for 1 GiB in 2 MiB folios), else sampled with mincore by
    `resident_fraction` (~0.75 ms: a mapping and 256 calls)."""
    if _syscall is not None and size > 0:
        span, stat = _CachestatRange(0, size), _Cachestat()
        flags = ctypes.c_uint(0)
        if (
            _syscall(
                ctypes.c_long(_SYS_CACHESTAT), fd, ctypes.byref(span), ctypes.byref(stat), flags
            )
            == 0
            and stat.cache
        ):
            return min(1.0, int(stat.cache) / -(-size // _PAGE))
    # No page counted is asked again of a mapping (mincore): cachestat counts the pages of the
    # descriptor's own inode, which overlayfs (a container's image layers) never fills (the
    # pages are the lower file's): a warm file there read 0.0 and was read ahead as cold.
    return resident_fraction(fd, 0, size)


def torch_dtype(name: str, *, model_id: str = "?", url: str = "?") -> torch.dtype:
    """The torch dtype of a safetensors dtype name; ModelFormatError if this torch lacks it."""
    dtype = getattr(torch, _DTYPE_ATTRS.get(name, "?"), None)
    if not isinstance(dtype, torch.dtype):
        raise ModelFormatError(
            f"model {model_id!r}: dtype {name} is not supported by torch {torch.__version__}",
            model_id=model_id,
            path=url,
        )
    return dtype


class Weights(ViewMapping[torch.Tensor]):
    """A model's tensors by name: views into one uint8 tensor (``buffer``), read-only as a
    mapping, with the model's ``info``."""

    __slots__ = ()

    def device_context(self) -> contextlib.AbstractContextManager[Any]:
        """Make the buffer's CUDA device current in this thread for the block (builders)."""
        return device_guard(self.buffer.device)

    def record_current_stream(self) -> None:
        """Keep the buffer from reuse until the work queued so far on the caller's current
        stream has run, when that stream is not the device's default one.

        The caching allocator orders a freed block only after the stream it was allocated on
        (the default stream); kernels a user queued on a stream of their own may still read the
        weights after the model is evicted and its memory handed to the next load.
        """
        buffer = self.buffer
        if buffer.device.type != "cuda":
            return
        stream = torch.cuda.current_stream(buffer.device)
        if stream != torch.cuda.default_stream(buffer.device):
            buffer.record_stream(stream)

    def __repr__(self) -> str:
        return (
            f"<Weights {self.info.model_id!r}: {len(self)} tensors, {self.info.nbytes} bytes "
            f"on {self.buffer.device}>"
        )


def allocate_host(
    nbytes: int, lead: int = 0, huge: bool = False
) -> tuple[torch.Tensor, memoryview]:
    """A host buffer as a uint8 tensor and a writable memoryview of the same bytes; a large one
    starts ``lead`` bytes into its mapping and asks for huge pages with ``huge`` wherever
    (`BufferPool.take`).

    Large buffers are private anonymous mappings (page-aligned) advised to use transparent huge
    pages: a fresh 1 GiB buffer then takes 512 page faults instead of 262,144, which makes copies
    into it faster (measured: benches/README.md, load_throughput); except in a VM whose balloon
    reports free pages, where fresh huge pages cost several times more (`_hugepages`). Small ones come from the heap,
    so thousands of small models do not each cost a mapping (the kernel allows ~65,000 per
    process) and a whole page.
    """
    if nbytes < _SMALL:
        heap = bytearray(nbytes)
        tensor = (
            torch.frombuffer(heap, dtype=torch.uint8)
            if nbytes
            else torch.empty(0, dtype=torch.uint8)
        )
        return tensor, memoryview(heap)
    mapping = mmap.mmap(-1, lead + nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if _MADV_HUGEPAGE is not None and (huge or huge_pages_advised()):  # _hugepages.py
        mapping.madvise(_MADV_HUGEPAGE)
    return torch.frombuffer(mapping, dtype=torch.uint8)[lead:], memoryview(mapping)[lead:]


def _prefault(address: int, nbytes: int, stop: threading.Event) -> None:
    """Fault in (allocate and zero) a fresh mapping's pages, front to back, until ``stop``.

    Run in a thread beside the reads that fill the buffer: the kernel's page allocation and
    zeroing (a large part of a load's time, more with huge-page compaction: benches/README.md,
    remote_load) then overlaps the transfer instead of stalling each write that first touches a
    page. Pages the reads reach first are skipped by the kernel; a failure (old kernel) just
    leaves the faults to the reads.
    """
    if _madvise is None:
        return
    for offset in range(0, nbytes, _PREFAULT_STEP):
        if stop.is_set():
            return
        step = min(_PREFAULT_STEP, nbytes - offset)
        if _madvise(address + offset, step, _MADV_POPULATE_WRITE) != 0:
            return


async def fill_fresh(
    store: Store,
    info: ModelInfo,
    buffer: torch.Tensor,
    view: memoryview,
    faulted: int = 0,
    cold: bool | None = None,
) -> None:
    """`fill_buffer` into a host buffer whose first ``faulted`` bytes are in memory already
    (reused) and the rest fresh; from a remote store, or a local file mostly not in the page
    cache, the fresh pages are faulted in alongside by another thread.

    A remote read leaves the CPU waiting on the network, and a cold local one on the disk, so
    the faults (and huge-page compaction) overlap it (measured: benches/README.md, remote_load
    and peer_loaders' local_cold). Reads of cached local files are CPU-bound copies already
    spread over threads: there the extra thread only competes with them, so they fault as they
    copy. (Only the first shard is looked at: one mincore call, no byte read; ``cold``: the
    caller's answer, `_first_shard_cold`.)
    """
    fresh = info.nbytes - faulted
    if fresh < _SMALL:
        await fill_buffer(store, info, view)
        return
    first = info.shards[0]
    if store.local_path(first.url) is not None and not (
        cold if cold is not None else await _first_shard_cold(store, info)
    ):
        await fill_buffer(store, info, view)
        return
    stop = threading.Event()

    async def fill() -> None:
        try:
            await fill_buffer(store, info, view)
        finally:
            stop.set()

    start = (buffer.data_ptr() + faulted) // _PAGE * _PAGE  # a lead puts it mid-page
    prefault = partial(
        anyio.to_thread.run_sync,
        _prefault,
        start,
        buffer.data_ptr() + info.nbytes - start,
        stop,
    )
    calls: list[Callable[[], Awaitable[None]]] = [prefault, fill]
    await gather(calls)


async def _first_shard_cold(store: Store, info: ModelInfo) -> bool:
    """Whether the first shard's data is a local file mostly not in the page cache
    (`Store.is_cold`)."""
    first = info.shards[0]
    return await store.is_cold(first.url, first.data_start, first.data_size, model_id=info.model_id)


#: The largest item size of a dtype: a buffer lead that is a multiple of it keeps every tensor
#: aligned to its item size (`_direct_lead`).
_ITEM_ALIGN = max(DTYPE_SIZES.values())


def _direct_lead(store: Store, info: ModelInfo) -> int | None:
    """Where a large model's host buffer starts in its page-aligned mapping when the store reads
    its first shard with direct reads: congruent with that file (`Store.direct_lead`), so the
    reads land straight in it. None for small models (the heap), remote files, buffered reads,
    and a lead that is no multiple of every item size (the tensors would be misaligned: those
    reads go through the bounce buffer)."""
    if info.nbytes < _SMALL or not info.segments:
        return None
    first = info.segments[0]
    lead = store.direct_lead(first.url, first.src, first.dst)
    # The layout puts every tensor at a multiple of its item size from the buffer's start: a
    # lead off that (a data section starting off an 8-byte boundary: a header not padded)
    # would put them all off it, and a buffer sliced from its mapping (`allocate_host`) could
    # not be viewed as the wider dtypes at all. Such a file goes through the bounce buffer.
    return lead if lead is not None and lead % _ITEM_ALIGN == 0 else None


def _zero_gaps(buffer: torch.Tensor, info: ModelInfo, upto: int) -> None:
    """Zero the bytes of ``buffer[:upto]`` that no segment writes (alignment padding), as in a
    fresh buffer: reused memory must not show the previous model's bytes there."""
    cursor = 0
    for seg in sorted(info.segments, key=lambda s: s.dst):
        if seg.dst > cursor:
            buffer[cursor : min(seg.dst, upto)].zero_()
        cursor = max(cursor, seg.dst + seg.length)
        if cursor >= upto:
            return
    if cursor < upto:
        buffer[cursor:upto].zero_()


def pooled_buffer(
    pool: BufferPool, info: ModelInfo, lead: int = 0, huge: bool = False
) -> tuple[torch.Tensor, memoryview, int]:
    """A buffer for ``info`` from ``pool`` (blocking: a worker thread's call; ``lead`` and
    ``huge`` as for `BufferPool.take`), with its reused bytes' padding zeroed; returns the
    tensor, a view and the bytes already faulted in."""
    tensor, view, faulted = pool.take(info.nbytes, lead, huge)
    if faulted:
        _zero_gaps(tensor, info, faulted)
    return tensor, view, faulted


def tensor_views(buffer: torch.Tensor, info: ModelInfo, base: int = 0) -> dict[str, torch.Tensor]:
    """Typed views of ``buffer`` at the layout's offsets (shifted by ``base``).

    One typed view of the whole buffer per dtype, and one ``as_strided`` of it per tensor: a
    slice, a dtype view and a shape view per tensor cost three torch calls (~9 us a tensor,
    0.6 ms for 64, on every load); this costs one (~1.6 us). ``as_strided`` takes an offset in
    items from the storage's start, so it is used only where every tensor's byte offset there
    is a multiple of its item size (always, for a layout's offsets in a fresh or mapped
    buffer); anywhere else the three calls make the view (and raise for a misaligned one)."""
    tensors: dict[str, torch.Tensor] = {}
    typed: dict[str, tuple[torch.Tensor, int] | None] = {}
    start0 = buffer.storage_offset() + base
    for name, t in info.tensors.items():
        whole = typed.get(t.dtype, _UNSET)
        if whole is _UNSET:
            whole = typed[t.dtype] = _typed_whole(buffer, t.dtype, info)
        if t.nbytes == 0:
            dtype = torch_dtype(t.dtype, model_id=info.model_id, url=info.url)
            tensors[name] = torch.empty(t.shape, dtype=dtype, device=buffer.device)
            continue
        if whole is not None:
            view, itemsize = whole
            offset, extra = divmod(start0 + t.offset, itemsize)
            if not extra and t.offset >= 0 and base + t.offset + t.nbytes <= buffer.numel():
                tensors[name] = view.as_strided(t.shape, _contiguous_strides(t.shape), offset)
                continue
        dtype = torch_dtype(t.dtype, model_id=info.model_id, url=info.url)
        start = base + t.offset
        tensors[name] = buffer[start : start + t.nbytes].view(dtype).view(t.shape)
    return tensors


_T = TypeVar("_T")
_UNSET: Any = object()


def _typed_whole(
    buffer: torch.Tensor, name: str, info: ModelInfo
) -> tuple[torch.Tensor, int] | None:
    """``buffer``'s storage from its start as one flat tensor of the dtype ``name``, and the
    dtype's item size; None where the buffer does not start at an item boundary of its
    storage (the tensors' views are then made one by one)."""
    dtype = torch_dtype(name, model_id=info.model_id, url=info.url)
    itemsize = dtype.itemsize
    begin = buffer.storage_offset()
    if begin % itemsize:
        return None
    end = begin + buffer.numel()
    # The whole storage up to the buffer's end, from 0: as_strided's offsets count from there.
    flat = buffer.as_strided((end,), (1,), 0)[: end // itemsize * itemsize]
    return flat.view(dtype), itemsize


@functools.lru_cache(maxsize=4096)
def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of ``shape``, in items (a model's shapes repeat: one per layer)."""
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


async def build_views(
    buffer: torch.Tensor, info: ModelInfo, base: int = 0
) -> dict[str, torch.Tensor]:
    """`tensor_views`, in a worker thread for a model of many tensors (~5 us each)."""
    if len(info.tensors) > _VIEWS_ON_LOOP:
        return await anyio.to_thread.run_sync(tensor_views, buffer, info, base)
    return tensor_views(buffer, info, base)


def _map_file(path: str, info: ModelInfo) -> tuple[torch.Tensor, bool]:
    """Map the model's file copy-on-write; the mapping is the buffer. Returns it and whether
    its pages are all mapped already.

    A file all in the page cache (`_cached_fraction`) whose faults map 2 MiB at a time
    (`_faults_map_huge`) has its pages mapped here, in this same worker call
    (`_populate_resident`): no thread hop, no thread beside it. Any other file is returned
    unmapped, for `_populate`'s threads, which wait on the disk together, advised to use huge
    pages (`_advise_huge_reads`: what they read goes into 2 MiB folios); where the kernel
    refuses that, one mostly not in the page cache is first asked to be read ahead
    (``POSIX_FADV_WILLNEED``: Linux reads at most one readahead window of it, 8 MiB here, so
    the faults' own readahead does the rest).

    torch's file mapping closes its descriptor once mapped (Python's mmap keeps a duplicate
    open, which capped resident models at the open-file limit).
    """
    shard = info.shards[0]
    fd = os.open(path, OPEN_FILE)  # a FIFO put in its place meanwhile: no blocking open
    try:
        st = os.fstat(fd)
        size = st.st_size
        # The file the header was read from (`_versions`): one renamed over it since (another
        # inode) or written since is a ModelChangedError, so the load begins again from the new
        # headers (`load_one_version`); its size alone let another layout of the same size be
        # mapped under the old header.
        with reading(info.version):
            see(shard.url, local_tag(st), info.model_id)
        if size != shard.data_start + shard.data_size:
            raise _changed_size(info, shard.data_start + shard.data_size, size)
        resident = _cached_fraction(fd, size)
        try:  # this descriptor's file, not whatever the path names by now
            storage = torch.UntypedStorage.from_file(_fd_path(fd, path), shared=False, nbytes=size)
        except RuntimeError as exc:  # cut short since the fstat (torch's size check), or an
            # open or mmap that failed (no descriptor, no address space): as an OSError
            now = os.fstat(fd).st_size
            if now != size:
                raise _changed_size(info, size, now) from exc
            error = _os_error(exc)
            if error is None:
                raise
            raise error from exc
        buffer = torch.empty(0, dtype=torch.uint8).set_(storage)  # type: ignore[arg-type]
        if resident < 1.0 and not _advise_huge_reads(buffer) and resident < DIRECT_BELOW:
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
    try:
        huge_from = _huge_from(buffer, _file_key(st)) if resident == 1.0 else None
        return buffer, huge_from is not None and _populate_resident(buffer, huge_from)
    except OSError as exc:  # EFAULT: the file shrank after its size was checked
        raise _changed_size(info, size, -1) from exc


#: How torch ends the first line of the RuntimeError of a failed open or mmap of a file
#: (ATen's MapAllocator): ``...: Too many open files (24)``.
_ERRNO_AT_END = re.compile(r": ([^:]+) \((\d+)\)$")


def _os_error(exc: RuntimeError) -> OSError | None:
    """The OSError behind torch's RuntimeError for a file it could not open or map (None for
    another RuntimeError): the failure memory then sees a load that ran out of descriptors or memory
    (EMFILE, ENOMEM) as the process's state, not the model's (`_failures`)."""
    # Its first line: with ``TORCH_SHOW_CPP_STACKTRACES`` set, a C++ traceback follows it.
    found = _ERRNO_AT_END.search(str(exc).partition("\n")[0])
    return None if found is None else OSError(int(found[2]), found[1])


def _advise_huge_reads(buffer: torch.Tensor) -> bool:
    """Advise a file mapping whose file is not all in the page cache to use huge pages
    (``MADV_HUGEPAGE``): its faults then read what is missing into 2 MiB folios from the first
    one (Linux's mmap readahead, for a mapping so advised), where a sequential read or the
    ``WILLNEED`` readahead leave the first 8-48 MiB in small ones, which every later warm load
    of the file maps a page at a time (~2 ms for 40 MiB: `_populate_resident`). Measured
    (2-core VM, 1 GiB, 3 cold loads each, load 3-7): small-folio head after our cold load 16-48
    MiB as before, 8 with ``WILLNEED`` kept, none without it; the cold load 514-681 ms against
    554-708. Not ``WILLNEED`` then: its window is read in small folios. Not gated on
    `huge_pages_advised` as fresh buffers are: the page cache takes 2 MiB folios for the rest of
    a sequentially read file anyway; this only changes its head. False where the kernel refuses
    (built without transparent huge pages): ``WILLNEED`` as before. With them set to ``never``
    the kernel accepts the advice and ignores it (a breaker measured no cold load slower)."""
    if _madvise is None or _MADV_HUGEPAGE is None:
        return False
    return _madvise(buffer.data_ptr(), buffer.numel(), _MADV_HUGEPAGE) == 0


def _fd_path(fd: int, path: str) -> str:
    """A path that opens the file ``fd`` has open (``/proc/self/fd``), else ``path``."""
    return f"/proc/self/fd/{fd}" if _PROC_FDS else path


#: Where faults began to map 2 MiB (`_faults_map_huge`) in the files mapped last, by file
#: (`_file_key`): the next load of one checks that place alone (two probes, not ~20).
_HUGE_HINTS: dict[tuple[int, ...], int] = {}
_HINTS_KEPT = 256


def _file_key(st: os.stat_result) -> tuple[int, ...]:
    """A file's identity and version: device, inode, size and modification time."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _huge_from(buffer: torch.Tensor, key: tuple[int, ...]) -> int | None:
    """`_faults_map_huge`, answered from `_HUGE_HINTS` where the file's last answer still
    holds at its own place: faults map a whole 2 MiB at that region and not at the one
    before it (0.10-0.15 ms in a warm load of a 1 GiB file, where the full probe took 0.4-0.65).

    A hint is only ever a matter of speed: whatever place is taken, `_populate_resident`
    maps every page of the file (the head by `_populate_range`, the rest by
    ``MADV_POPULATE_READ``, which maps small folios too, at ~170 ns a page instead of ~30).
    What a hint skips is the full probe's check that the rest is in 2 MiB folios; the page
    cache of an unchanged file (same inode, size and mtime) keeps its folios until evicted,
    and one evicted and read again sequentially mostly gets the same ones (its readahead
    window grows the same way), so the check would mostly find what it found before."""
    hint = _HUGE_HINTS.get(key)
    if hint is not None and _hint_holds(buffer, hint):
        return hint
    found = _faults_map_huge(buffer)
    if found is None:
        _HUGE_HINTS.pop(key, None)
        return None
    if len(_HUGE_HINTS) >= _HINTS_KEPT:
        # All go at once, in one step: finding the oldest iterates the table, which raises
        # (RuntimeError) where another worker thread's load inserts its file's hint meanwhile.
        _HUGE_HINTS.clear()
    _HUGE_HINTS[key] = found
    return found


def _hint_holds(buffer: torch.Tensor, huge_from: int) -> bool:
    """Whether a read fault maps a whole 2 MiB at ``huge_from`` in this mapping and (unless it
    is 0) not in the 2 MiB before it: the boundary `_faults_map_huge` would find there."""
    size, address = buffer.numel(), buffer.data_ptr()
    region = huge_from // _HUGE
    if address % _HUGE or huge_from % _HUGE or region >= size // _HUGE:
        return False
    return _asking_pagemap(
        lambda fd: (
            _maps_whole(fd, address, region)
            and (region == 0 or not _maps_whole(fd, address, region - 1))
        ),
        False,
    )


def _asking_pagemap(ask: Callable[[int], _T], otherwise: _T) -> _T:
    """``ask(fd)`` of /proc/self/pagemap open at ``fd``; ``otherwise`` where it cannot be
    opened or read, but OSError(EFAULT) raised: a page of the file past its end (cut short
    meanwhile), which fails the load (`_populate_read`)."""
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return otherwise
    try:
        return ask(fd)
    except OSError as exc:
        if exc.errno == errno.EFAULT:
            raise
        return otherwise
    finally:
        os.close(fd)


def _maps_whole(pagemap: int, address: int, region: int) -> bool:
    """After one read fault at 2 MiB region ``region`` of the mapping at ``address``, whether
    all its pages are mapped (/proc/self/pagemap open at ``pagemap``)."""
    start = address + region * _HUGE
    _populate_read(start, _PAGE)  # one read fault
    return _range_mapped(pagemap, address=start, nbytes=_HUGE)


def _faults_map_huge(buffer: torch.Tensor) -> int | None:
    """Where, in this file mapping, one read fault maps a whole 2 MiB: None unless it does at
    all but one of `_PROBES` places spread over it; else the offset from which it does (the
    first such place, found by probing 0, 2, 4, 8, ... MiB up to the first of those places,
    then bisecting between the last miss and the first hit: to within 2 MiB).

    It does where the page cache holds the file in 2 MiB folios: a sequential read with a
    readahead window of 2 MiB or more leaves them, but its first tens of MiB, read while the
    window grew, and whatever memory was too fragmented for them, in smaller ones. It does not
    where the page cache holds small ones (a 128 KiB window, random reads) or the mapping is
    not 2 MiB-aligned. Told from /proc/self/pagemap's present bits after one byte read per
    place (~10 us each).

    Why ask: ``MADV_POPULATE_READ`` walks every 4 KiB entry it maps (~170 ns each), against
    ~30 ns for a byte read, so it wins only where 2 MiB entries spare the walk: above ~85 %
    of the file, and not in the small folios before the offset returned.
    """
    size, address = buffer.numel(), buffer.data_ptr()
    regions = size // _HUGE
    if regions == 0 or address % _HUGE:
        return None
    return _asking_pagemap(partial(_huge_from_probes, address=address, regions=regions), None)


def _huge_from_probes(fd: int, *, address: int, regions: int) -> int | None:
    """`_faults_map_huge`'s probes of the mapping at ``address`` (``regions`` 2 MiB regions),
    through /proc/self/pagemap open at ``fd``."""

    def whole(region: int) -> bool:
        return _maps_whole(fd, address, region)

    places = sorted({(2 * i + 1) * regions // (2 * _PROBES) for i in range(_PROBES)})
    misses = sum(not whole(n) for n in places)
    if misses * _PROBES > len(places):  # 1 miss in 8; none in fewer
        return None
    region, below = 0, -1  # ``below``: the last place found not mapped whole
    while region < places[0] and not whole(region):
        below, region = region, max(1, 2 * region)
    region = min(region, places[0])
    # Then bisect between the last miss and the first hit. The doubling alone stopped
    # at 64 MiB where a sequential read's small folios end at ~40 (1 GiB file, 8 MiB
    # readahead window): the head's byte reads cost ~140 ns a page, MADV_POPULATE_READ
    # ~0 on 2 MiB entries, so each MiB the head overshoots costs ~36 us, a probe ~15 us.
    while region - below > 1:
        middle = (below + region) // 2
        below, region = (below, middle) if whole(middle) else (middle, region)
    return region * _HUGE


def _populate_read(address: int, nbytes: int) -> bool:
    """``MADV_POPULATE_READ`` of a range: True once mapped; False where the kernel refuses
    it (EINVAL before 5.14; EINTR, ENOMEM); raises OSError(EFAULT) for pages past the file's
    end (a read of them would be SIGBUS)."""
    if _madvise is None:
        return False
    if _madvise(address, nbytes, _MADV_POPULATE_READ) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EFAULT:
        raise OSError(err, os.strerror(err))
    return False


def _changed_size(info: ModelInfo, expected: int, size: int) -> ModelFormatError:
    """``size`` -1: shorter than ``expected``, by how much not known."""
    now = "fewer" if size < 0 else str(size)
    return ModelFormatError(
        f"model {info.model_id!r}: {info.shards[0].url} changed size while loading "
        f"({expected} -> {now} bytes)",
        model_id=info.model_id,
        path=info.shards[0].url,
    )


def _populate_resident(buffer: torch.Tensor, huge_from: int) -> bool:
    """Map every page of a mapped file that is in the page cache: those before ``huge_from``
    (in small folios) by `_populate_head`, the rest without reading them
    (``MADV_POPULATE_READ``: read-only entries, so copy-on-write stays). False where the
    kernel lacks it (before 5.14): `_populate` then does it all.

    Why not the reads everywhere: after a sequential read (a download, ``cat``) the page
    cache holds the file mostly in 2 MiB folios, each mapped by one fault with one page-table
    entry, so the faults are cheap and the reads were most of the cost, a cache miss for every
    4 KiB page (~8 ms a GiB), paid again by the model's first pass. Measured on the 2-core VM,
    1 GiB file, Linux 6.18 (benches/README.md, peer_loaders; best of 7): the whole mapping 3.8
    ms against 8.0 ms for the reads, from one thread; 3.25 ms of the 3.8 in its first 40 MiB
    of small folios, which the reads map in 2.1 ms, but a read of a page past the end of a
    file cut short meanwhile is SIGBUS (`_populate_range`: the whole call 3.91 ms against
    3.63 ms best of 15, alternated, load 11), where the kernel's reads (`_populate_head`)
    fail with EFAULT; two threads did not help (one
    page-middle-directory table, whose lock every 2 MiB entry takes, maps 1 GiB).
    """
    size = buffer.numel()
    if huge_from:
        _populate_head(buffer, huge_from)
    return huge_from >= size or _populate_read(buffer.data_ptr() + huge_from, size - huge_from)


def _populate_range(buffer: torch.Tensor, start: int, stop: int) -> None:
    """Fault in the pages of ``buffer[start:stop]``: ``MADV_POPULATE_READ``, else (a kernel
    before 5.14) one byte read per page; OSError(EFAULT) for pages past the file's end.

    Not the reads where the kernel has it: a read of a page the file no longer reaches (cut
    short since its size was checked) kills the process with SIGBUS, where the madvise fails
    with EFAULT and the load with it. Their cost is about the same (Linux 6.18, 2-core VM
    shared with other jobs, best of 5-9: 512 MiB in 4 KiB folios 319 ms against 332 ms for the
    reads, a cold 1 GiB from 2 threads 688 ms against 768 ms, the 64 MiB small-folio head of a
    cached 1 GiB 5.74 ms against 5.46 ms).
    """
    if not _populate_read(buffer.data_ptr() + start, stop - start):
        buffer[start:stop:_PAGE].max()


def _populate_head(buffer: torch.Tensor, stop: int) -> None:
    """Map the pages of ``buffer[:stop]``, a file in the page cache in small folios: by
    `read_faults` (one read per 64 KiB, in the kernel: ~1.8 ms for 40 MiB against ~2.7 for
    ``MADV_POPULATE_READ``, which walks every 4 KiB entry) where the kernel's fault-around
    maps the whole 64 KiB each read faults (every page of the head looked at), else, and for
    a file cut short meanwhile (OSError(EFAULT)), by `_populate_range`.

    Every page, not the first window's: fault-around maps only pages in the page cache, so a
    page evicted since the residency check (memory pressure), or still being read, is left
    unmapped in any window, and the load would return with it unmapped (a breaker: 225 of
    the 256 pages of a 1 MiB head). One ``PAGEMAP_SCAN`` where the kernel has it (6.7)."""
    address = buffer.data_ptr()
    if not (
        address % WINDOW == 0
        and read_faults(address, stop)
        and _asking_pagemap(partial(_range_mapped, address=address, nbytes=stop), False)
    ):
        _populate_range(buffer, 0, stop)


#: Pagemap entries read at once by `_range_mapped` (8 bytes each: 64 KiB maps 32 MiB).
_PAGEMAP_CHUNK = 8 << 10
#: The last bytes of pagemap entries whose page is present (bit 63 set).
_PRESENT_BYTES = bytes(range(0x80, 0x100))


def _range_mapped(pagemap: int, *, address: int, nbytes: int) -> bool:
    """Whether every page of ``[address, address + nbytes)`` is mapped (/proc/self/pagemap),
    by one ``PAGEMAP_SCAN`` (`all_present`), else its entries read a chunk at a time: a head
    of a GiB is not 2 MiB of entries in one buffer."""
    scanned = all_present(pagemap, address, nbytes)
    if scanned is not None:
        return scanned
    first, stop = address // _PAGE, -(-(address + nbytes) // _PAGE)
    for page in range(first, stop, _PAGEMAP_CHUNK):
        count = min(_PAGEMAP_CHUNK, stop - page)
        entries = os.pread(pagemap, count * 8, page * 8)
        # Bit 63 of each little-endian 8-byte entry (the top bit of its last byte): present.
        # Those bytes deleted, any left is a page not mapped (in C: ``min`` of the 10,240
        # bytes of a 40 MiB head took 0.15 ms, three times the pread).
        if len(entries) != count * 8 or entries[7::8].translate(None, _PRESENT_BYTES):
            return False
    return True


async def _populate(buffer: torch.Tensor) -> None:
    """Fault in every page of a mapped file, from `_POPULATE_PARTS` threads over disjoint
    ranges: the page-table work of one range does not wait for another's (the kernel locks
    page tables per table, not per process), and a cold file's faults wait on the disk
    together."""
    size = buffer.numel()
    step = max(_POPULATE_ALIGN, -(-size // _POPULATE_PARTS // _POPULATE_ALIGN) * _POPULATE_ALIGN)
    await gather(
        [
            partial(anyio.to_thread.run_sync, _populate_range, buffer, lo, min(lo + step, size))
            for lo in range(0, size, step)
        ]
    )


def _is_cuda_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _empty_cache(device: torch.device) -> None:
    with device_guard(device):  # empty_cache acts on the current device
        torch.cuda.empty_cache()


def _resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device with its index; ValueError for a CUDA device torch lacks."""
    resolved = torch.device(device)
    if resolved.type != "cuda":
        return resolved
    if not cuda_available():
        raise ValueError(
            f"device {str(device)!r} is not available: torch {torch.__version__} sees no CUDA device"
        )
    if resolved.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if resolved.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {str(device)!r} is not available: torch sees "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    return resolved


def _own(loaded: LoadedWeights) -> Weights:
    if not isinstance(loaded, Weights):
        raise TypeError(f"TorchBackend got weights it did not load: {loaded!r}")
    return loaded


def _check_buffer(tensor: torch.Tensor, what: str) -> None:
    if tensor.dtype != torch.uint8 or tensor.dim() != 1 or not tensor.is_contiguous():
        raise ValueError(
            f"{what} must be a contiguous 1-D uint8 tensor, got {tensor.dtype} "
            f"{tuple(tensor.shape)}"
        )


def _device_empty(device: torch.device, nbytes: int, model_id: str) -> torch.Tensor:
    """A CUDA buffer of ``nbytes`` (blocking: `CudaStaging` calls it in a worker thread)."""
    return allocate_with_retry(
        partial(torch.empty, nbytes, dtype=torch.uint8, device=device),
        is_oom=_is_cuda_oom,
        free_cached=partial(_empty_cache, device),
        nbytes=nbytes,
        device=str(device),
        model_id=model_id,
    )


def _synchronize(device: torch.device, event: Any) -> None:
    with device_guard(device):
        event.synchronize()


class TorchCudaCopyEngine:
    """Copies on one side stream of ``device``; a `CompletionWaiter` thread waits for them.

    Copies are asynchronous only from and to pinned host memory (torch copies pageable memory
    synchronously). Call `fence` before the first copy into memory that was allocated or used on
    another stream, from the thread whose current stream that is. Every CUDA call runs with
    ``device`` current (`device_guard`), whichever thread makes it.
    """

    def __init__(self, device: torch.device | str) -> None:
        if not cuda_available():
            raise ValueError("TorchCudaCopyEngine needs a CUDA device, and torch sees none")
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"TorchCudaCopyEngine needs a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        with device_guard(self.device):
            self.stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        self.waiter = CompletionWaiter(f"modelcache copies on {self.device}")

    def __repr__(self) -> str:
        return f"TorchCudaCopyEngine({str(self.device)!r})"

    def fence(self) -> None:
        """Order later copies after the work already queued on this thread's current stream.

        A buffer fresh from the caching allocator may still be in use by kernels queued on the
        stream it was allocated on; the side stream must not write it before they finish.
        """
        with device_guard(self.device):
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def submit(self, src: torch.Tensor, dst: torch.Tensor) -> CopyHandle:
        if src.numel() != dst.numel():
            raise ValueError(f"copy of {src.numel()} bytes into {dst.numel()}")
        # The device guard first: the stream context saves and restores the current stream of
        # the current device, which must be ours (not device 0's, whose context it would make).
        with device_guard(self.device), torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]
            event.record(self.stream)
        return CopyHandle(src, dst, self.waiter.watch(partial(_synchronize, self.device, event)))

    async def wait(self, handle: CopyHandle) -> None:
        completion: Completion = handle.token
        await completion.wait()


class TorchBackend:
    """Loads models as torch tensors on one device (``"cpu"``, ``"cuda:0"``, ...).

    On CUDA, loads stream through ``staging_chunks`` pinned chunks of ``staging_chunk_size``
    bytes (one allocation, made on the first load). A CUDA device that torch cannot use is a
    ValueError here, not a torch error later.

    ``zero_copy=True`` (CPU devices) serves a local, aligned single-file model of 1 MiB or more
    from a mapping of the store's file instead of a copy: opt in only where files are never changed in place. A
    mapping shares the file's pages until they are written, so a file truncated under it makes
    the next access to the weights kill the process (SIGBUS), and a file rewritten in place
    changes the weights being served. Replacing a file by rename is safe. Copying (the default)
    reads the file once and serves the copy whatever happens to the file.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        *,
        zero_copy: bool = False,
        staging_chunk_size: int = 32 << 20,
        staging_chunks: int = 4,
    ) -> None:
        check_staging(staging_chunk_size, staging_chunks)
        self.device = _resolve_device(device)
        #: Map local aligned single-file models instead of copying them (CPU devices only).
        self.zero_copy = zero_copy
        self.staging_chunk_size = staging_chunk_size
        self.staging_chunks = staging_chunks
        #: Where CPU model buffers come from: freed ones keep their pages for the next loads,
        #: up to ``pool.limit`` bytes (0, keeping nothing, until a cache sets its budget).
        self.pool: BufferPool | None = (
            BufferPool() if self.device.type == "cpu" and BufferPool.available() else None
        )
        #: The staging pool and copy engines of a CUDA device, made on its first load.
        self._cuda = CudaStaging(
            staging_chunk_size,
            staging_chunks,
            engine=partial(TorchCudaCopyEngine, self.device),
            allocate=partial(_device_empty, self.device),
            device=self.device,
        )

    def __repr__(self) -> str:
        return f"TorchBackend({str(self.device)!r})"

    # -- the DeviceBackend contract (modelcache._backend) ----------------------------------------

    @property
    def on_host(self) -> bool:
        """True on the CPU: the device tier is host memory."""
        return self.device.type == "cpu"

    def host_arena(self, capacity: int) -> HostArena:
        """Host-tier memory: pinned (cudaHostRegister) for CUDA devices."""
        return HostArena(capacity, pin=self.device.type == "cuda", device=self.device)

    async def promote(self, block: HostBlock, info: ModelInfo) -> Weights:
        """The model in ``block`` copied to a new device buffer, as `Weights`."""
        buffer = await self.to_device(block.tensor, model_id=info.model_id)
        return Weights(await build_views(buffer, info), info, buffer)

    async def demote(self, loaded: LoadedWeights, block: HostBlock) -> None:
        """Copy ``loaded`` (this backend's `Weights`) into ``block``."""
        await self.to_host(_own(loaded).buffer, block)

    def host_bytes(self, loaded: LoadedWeights) -> memoryview | None:
        """The buffer's bytes when it is in host memory (CPU devices), else None."""
        buffer = _own(loaded).buffer
        return host_view(buffer) if buffer.device.type == "cpu" else None

    @property
    def staging_pool(self) -> StagingPool | None:
        """The pinned staging pool (CUDA devices, after the first load), for statistics."""
        return self._cuda.pool

    async def load(self, store: Store, info: ModelInfo, *, zero_copy: bool = True) -> Weights:
        """Read the model's weights onto the device; returns views into one buffer.

        ``zero_copy=False`` forces a copy where the backend would otherwise map the file (for
        files that may be deleted while the model lives, such as the disk tier's).
        """
        if self.device.type == "cuda":
            buffer = await self._cuda.load(store, info)
            return Weights(await build_views(buffer, info), info, buffer)
        base = 0
        path = None
        # Not below _SMALL: each mapping counts against the kernel's limit per process (~65,000,
        # vm.max_map_count), past which every mmap of the process fails; small models are
        # copied to the heap, as without zero-copy.
        if (
            self.device.type == "cpu"
            and self.zero_copy
            and zero_copy
            and info.mappable
            and info.nbytes >= _SMALL
        ):
            path = store.local_path(info.shards[0].url)
        if path is not None:
            buffer, populated = await anyio.to_thread.run_sync(_map_file, path, info)
            if not populated:
                try:
                    await _populate(buffer)
                except OSError as exc:  # EFAULT: the file shrank after its size was checked
                    raise _changed_size(info, buffer.numel(), -1) from exc
            base = info.shards[0].data_start
        else:
            faulted = 0
            # A store with direct reads: congruent with the file, and, where the file is cold
            # (read direct, not from the page cache), on huge pages: the disk's DMA into 4 KiB
            # pages scattered in memory is cut into more requests (`_direct`), while copies out
            # of the page cache into fresh huge pages pay what `_hugepages` avoids.
            lead = _direct_lead(store, info)
            cold = None if lead is None else await _first_shard_cold(store, info)
            if self.pool is not None and info.nbytes >= _SMALL:
                buffer, view, faulted = await anyio.to_thread.run_sync(
                    pooled_buffer, self.pool, info, lead or 0, bool(cold)
                )
            else:
                buffer, view = allocate_host(info.nbytes, lead or 0, bool(cold))
            await fill_fresh(store, info, buffer, view, faulted, cold)
            del view
            if self.device.type != "cpu":
                buffer = await anyio.to_thread.run_sync(self._to_device, buffer)
        return Weights(await build_views(buffer, info, base), info, buffer)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        device_buffer = torch.empty(host.numel(), dtype=torch.uint8, device=self.device)
        device_buffer.copy_(host)
        return device_buffer

    async def to_device(self, host: torch.Tensor, *, model_id: str = "?") -> torch.Tensor:
        """A device copy of a host uint8 buffer: one allocation, one copy (async if pinned).

        Returns once the copy is complete; cancelled, it still waits for the copy to end.
        """
        _check_buffer(host, "host buffer")
        if self.device.type != "cuda":
            return await anyio.to_thread.run_sync(self._to_device, host)
        # torch copies pageable memory synchronously: that copy runs in a worker thread.
        sync_copy = None if host.is_pinned() else torch.Tensor.copy_
        buffer: torch.Tensor = await self._cuda.to_device(
            host, host.numel(), model_id, sync_copy=sync_copy
        )
        return buffer

    async def to_host(self, device_buffer: torch.Tensor, block: HostBlock) -> None:
        """Copy a device buffer into a host block of the same size (async when it is pinned).

        Returns once the copy is complete; cancelled, it still waits for the copy to end.
        """
        _check_buffer(device_buffer, "device buffer")
        if device_buffer.numel() != block.nbytes:
            raise ValueError(
                f"device buffer is {device_buffer.numel()} bytes, the block {block.nbytes}"
            )
        if self.device.type != "cuda":
            await anyio.to_thread.run_sync(partial(block.tensor.copy_, device_buffer))
            return
        sync_copy = None if block.tensor.is_pinned() else torch.Tensor.copy_
        await self._cuda.to_host(device_buffer, block.tensor, sync_copy=sync_copy)
