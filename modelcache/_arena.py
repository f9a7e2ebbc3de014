"""Host slabs: one allocation made once, handed out in page-aligned blocks.

Design note (the invariants):

* **One allocation.** A `HostArena` makes ONE host allocation for its whole life (on the first
  `alloc`, or ahead of time, off the event loop, with ``await arena.allocate()``) and carves every
  block out of it. Pinning is slow (every page is locked, under a driver-wide lock) and torch's
  pinned allocator rounds each request up to a power of two, so a 200 GiB host tier would lock
  256 GiB: we map the slab ourselves (page-aligned, exact size, transparent huge pages) and
  register it with ``cudaHostRegister`` once, falling back to torch's pinned allocator only if
  registration fails. The registration ends when the last tensor or view of the slab is gone.
  A backend that is not torch's (CuPy) registers the slab through its own `HostPinner`.
* **Page alignment.** The slab starts on a page; every block starts at a multiple of `PAGE` from
  it and reserves its request rounded up to `PAGE` (at least one page), so reads into a block
  are page-aligned and blocks never share a page.
* **No overlap, no leak.** Free runs are kept sorted by offset and merged with both neighbours
  on `free`, so the free runs and the live blocks tile the capacity exactly, and freeing every
  block leaves one run. Allocation is best-fit (the smallest run that fits, lowest offset among
  equals): big runs stay whole for big models.
* **The caller evicts.** `alloc` returns None when no run is large enough; the cache's planner
  decides what to evict and tries again. Freeing a block twice, or another arena's block, raises
  ValueError instead of corrupting the free list.
* `alloc` and `free` are plain methods for the event loop thread (plan synchronously); they never
  await and take no lock.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import logging
import mmap
import os
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import anyio.to_thread
import torch

from ._hugepages import huge_pages_advised

__all__ = [
    "PAGE",
    "ArenaStats",
    "HostArena",
    "HostBlock",
    "HostPinner",
    "TorchPinner",
    "allocate_slab",
    "cuda_available",
    "device_guard",
    "host_view",
]

#: Alignment and rounding unit of every block (and of staging chunks).
PAGE = 4096
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_MADV_DONTFORK = getattr(mmap, "MADV_DONTFORK", None)
_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, not only the current device's


def cuda_available() -> bool:
    """True when torch can use a CUDA device; never raises (CPU wheels, broken drivers)."""
    try:
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def device_guard(device: torch.device | str | int | None) -> contextlib.AbstractContextManager[Any]:
    """Make ``device`` this thread's current CUDA device for the block (a no-op for others).

    CUDA runtime calls act on the calling thread's current device, creating its context on first
    use: a worker thread (or a finalizer run by whichever thread drops the last reference) starts
    on device 0, so a call made there for ``cuda:1`` without this guard would cost a context
    (~0.5 GiB) on GPU 0. torch's guard restores the previous device without creating a context
    on it.
    """
    if device is None:
        return contextlib.nullcontext()
    resolved = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if resolved.type != "cuda" or resolved.index is None:
        return contextlib.nullcontext()
    return torch.cuda.device(resolved)


class HostPinner(Protocol):
    """Page-locks host memory for one device runtime (torch's is built in; CuPy brings one)."""

    def register(self, address: int, nbytes: int) -> bool:
        """Page-lock ``nbytes`` at ``address`` (page-aligned); False if it could not."""
        ...

    def unregister(self, address: int) -> None:
        """Undo `register` (called once the memory is no longer used); never raises."""
        ...


def _round_up(n: int) -> int:
    return max(PAGE, -(-n // PAGE) * PAGE)


def host_view(tensor: torch.Tensor) -> memoryview:
    """A writable 1-D ``'B'`` memoryview of a contiguous CPU uint8 tensor's bytes, without numpy.

    The view keeps the tensor (and so its memory) alive for as long as the view exists.
    """
    if tensor.device.type != "cpu" or tensor.dtype != torch.uint8 or not tensor.is_contiguous():
        raise ValueError(f"need a contiguous CPU uint8 tensor, got {tensor.dtype} {tensor.device}")
    n = tensor.numel()
    if n == 0:
        return memoryview(bytearray())
    array = (ctypes.c_ubyte * n).from_address(tensor.data_ptr())
    array.__dict__["owner"] = tensor  # the array only borrows the address: keep the memory alive
    return memoryview(array).cast("B")


def _clear_cuda_error() -> None:
    """Reset this thread's CUDA "last error" after a failed runtime call.

    torch checks ``cudaGetLastError`` after its kernel launches, so a failure left behind by a
    call of ours would surface later as an unrelated error. torch's ``cudart`` bindings lack
    ``cudaGetLastError``; the runtime torch loaded is reachable by its soname.
    """
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"):
        try:
            lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD)
        except OSError:
            continue
        with contextlib.suppress(Exception):
            lib.cudaGetLastError()
        return


def _cudart() -> Any:
    """torch's libcudart bindings (``cudaHostRegister``, ``cudaHostUnregister``)."""
    return torch.cuda.cudart()  # type: ignore[no-untyped-call]


class TorchPinner:
    """Page-locks host memory with torch's CUDA runtime, on ``device``'s context (a `HostPinner`).

    Both calls run under `device_guard`: registration happens in a worker thread and
    unregistration in whichever thread drops the slab, and either would otherwise act on (and
    create a context on) device 0.
    """

    def __init__(self, device: torch.device | str | int | None = None) -> None:
        self.device = device

    def __repr__(self) -> str:
        return f"TorchPinner({self.device!r})"

    def register(self, address: int, nbytes: int) -> bool:
        try:
            with device_guard(self.device):
                code = _cudart().cudaHostRegister(address, nbytes, _HOST_REGISTER_PORTABLE)
        except Exception:
            code = -1
        if int(code) != 0:
            _clear_cuda_error()
            return False
        return True

    def unregister(self, address: int) -> None:
        with contextlib.suppress(Exception), device_guard(self.device):
            if int(_cudart().cudaHostUnregister(address)) != 0:
                _clear_cuda_error()


def _mapped(
    nbytes: int, *, dontfork: bool = False
) -> tuple[torch.Tensor, ctypes.Array[ctypes.c_ubyte]]:
    """An anonymous private mapping (page-aligned, lazily zero-filled) as a uint8 tensor.

    ``dontfork``: a child made by ``fork()`` gets no copy of it (a pinned slab would otherwise be
    copied page by page into every child, which can neither use nor unpin it).
    """
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if _MADV_HUGEPAGE is not None and huge_pages_advised():  # not in some VMs: _hugepages.py
        with contextlib.suppress(OSError):
            mapping.madvise(_MADV_HUGEPAGE)
    if dontfork and _MADV_DONTFORK is not None:
        with contextlib.suppress(OSError):
            mapping.madvise(_MADV_DONTFORK)
    # The tensor owns a ctypes array that owns the mapping: a finalizer on the array runs while
    # the mapping is still mapped, once the last tensor or view of it is gone.
    array = (ctypes.c_ubyte * nbytes).from_buffer(mapping)
    return torch.frombuffer(array, dtype=torch.uint8), array


def _torch_pinned(nbytes: int) -> torch.Tensor:
    tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    if tensor.data_ptr() % PAGE == 0:  # cudaHostAlloc memory always is
        return tensor
    tensor = torch.empty(nbytes + PAGE, dtype=torch.uint8, pin_memory=True)
    start = -tensor.data_ptr() % PAGE
    return tensor[start : start + nbytes]


def allocate_slab(
    nbytes: int,
    *,
    pin: bool,
    pinner: HostPinner | None = None,
    device: torch.device | str | int | None = None,
) -> torch.Tensor:
    """ONE page-aligned host allocation of exactly ``nbytes``, page-locked when ``pin``.

    ``pinner`` page-locks it; by default a `TorchPinner` for ``device`` (the CUDA device whose
    context does the registration: never device 0 by accident). If a given ``pinner`` cannot,
    the slab stays pageable (correct, but device copies from it are synchronous); if torch's
    cannot, torch's pinned allocator is used, with a warning (it rounds up to a power of two and
    keeps the memory cached). Blocking (pinning locks every page): call it from a worker thread
    for large slabs.
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if pin and pinner is None and not cuda_available():
        raise ValueError("pinned host memory needs a CUDA device, and torch sees none")
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    tensor, array = _mapped(nbytes, dontfork=pin)
    if not pin:
        return tensor
    log = logging.getLogger("modelcache")
    address = tensor.data_ptr()
    own = pinner or TorchPinner(device)
    if own.register(address, nbytes):
        weakref.finalize(array, own.unregister, address)
        return tensor
    if pinner is not None:
        log.warning(
            "could not page-lock %d bytes of host memory: device copies will be synchronous",
            nbytes,
        )
        return tensor
    del tensor, array
    log.warning(
        "cudaHostRegister of %d bytes failed: falling back to torch's pinned allocator, which "
        "rounds the slab up to %d bytes and keeps it cached after it is freed",
        nbytes,
        1 << (nbytes - 1).bit_length(),
    )
    with device_guard(device):
        return _torch_pinned(nbytes)


class HostBlock:
    """``nbytes`` bytes of a `HostArena`, at ``offset`` from its page-aligned start."""

    __slots__ = ("_arena", "nbytes", "offset", "size", "tensor")

    def __init__(self, arena: HostArena, offset: int, nbytes: int, size: int, slab: torch.Tensor):
        self._arena = arena
        #: Offset in the arena (a multiple of PAGE).
        self.offset = offset
        #: Bytes requested: the length of `tensor` and `view()`.
        self.nbytes = nbytes
        #: Bytes reserved in the arena: nbytes rounded up to PAGE (at least one page).
        self.size = size
        #: A uint8 view of exactly these bytes of the slab (pinned when the arena is).
        self.tensor = slab[offset : offset + nbytes]

    def view(self) -> memoryview:
        """A writable memoryview of the block's bytes (what `Store.read_into` fills)."""
        return host_view(self.tensor)

    def __repr__(self) -> str:
        return f"<HostBlock offset={self.offset} nbytes={self.nbytes} size={self.size}>"


@dataclass(frozen=True, slots=True)
class ArenaStats:
    """A snapshot of a `HostArena`."""

    #: Usable bytes (the capacity asked for, rounded down to PAGE).
    capacity: int
    #: Bytes reserved by live blocks (requests rounded up to PAGE).
    used: int
    #: capacity - used.
    free: int
    #: The largest block that can be allocated now.
    largest_free: int
    #: 1 - largest_free / free: 0.0 when the free bytes are one run (or none).
    fragmentation: float
    blocks: int
    #: Page-locked (pinned) for fast device copies.
    pinned: bool
    #: Whether the one allocation has been made yet.
    allocated: bool


class HostArena:
    """A fixed host buffer of ``capacity`` bytes, sub-allocated in page-aligned blocks.

    ``pin=True`` page-locks it for asynchronous device copies: through ``pinner`` when given,
    else torch's CUDA runtime on ``device``'s context, which must be available (ValueError
    otherwise).
    """

    def __init__(
        self,
        capacity: int,
        *,
        pin: bool,
        pinner: HostPinner | None = None,
        device: torch.device | str | int | None = None,
    ) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if pin and pinner is None and not cuda_available():
            raise ValueError("a pinned HostArena needs a CUDA device, and torch sees none")
        self._capacity = capacity // PAGE * PAGE
        self._pin = pin
        self._pinner = pinner
        self._device = device
        self._slab: torch.Tensor | None = None
        self._allocating: anyio.Event | None = None
        # Free runs sorted by offset, never adjacent: parallel lists for bisect.
        self._run_offsets: list[int] = [0] if self._capacity else []
        self._run_sizes: list[int] = [self._capacity] if self._capacity else []
        self._live: dict[int, HostBlock] = {}
        self._used = 0

    @staticmethod
    def block_size(nbytes: int) -> int:
        """Bytes a request of ``nbytes`` reserves: rounded up to PAGE, at least one page."""
        return _round_up(nbytes)

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def pinned(self) -> bool:
        return self._pin

    @property
    def used(self) -> int:
        return self._used

    @property
    def largest_free(self) -> int:
        return max(self._run_sizes, default=0)

    @property
    def fragmentation(self) -> float:
        free = self._capacity - self._used
        return 1.0 - self.largest_free / free if free else 0.0

    def stats(self) -> ArenaStats:
        return ArenaStats(
            capacity=self._capacity,
            used=self._used,
            free=self._capacity - self._used,
            largest_free=self.largest_free,
            fragmentation=self.fragmentation,
            blocks=len(self._live),
            pinned=self._pin,
            allocated=self._slab is not None,
        )

    def __repr__(self) -> str:
        return (
            f"<HostArena {self._used}/{self._capacity} bytes used, {len(self._live)} blocks, "
            f"largest free {self.largest_free}{', pinned' if self._pin else ''}>"
        )

    async def allocate(self) -> None:
        """Make the one allocation now, in a worker thread (pinning a large slab takes seconds).

        Idempotent; concurrent callers share one allocation. `alloc` makes it on the event loop
        thread if this was never awaited.
        """
        while self._slab is None:
            if self._allocating is not None:
                await self._allocating.wait()
                continue
            self._allocating = done = anyio.Event()
            try:
                with anyio.CancelScope(shield=True):  # once started, finish: never allocate twice
                    slab = await anyio.to_thread.run_sync(self._make_slab)
                if self._slab is None:
                    self._slab = slab
            finally:
                self._allocating = None
                done.set()

    def _make_slab(self) -> torch.Tensor:
        return allocate_slab(
            self._capacity, pin=self._pin, pinner=self._pinner, device=self._device
        )

    def alloc(self, nbytes: int) -> HostBlock | None:
        """A block of ``nbytes`` bytes, or None when no free run is large enough."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        size = _round_up(nbytes)
        best = -1
        for i, run in enumerate(self._run_sizes):
            if run >= size and (best < 0 or run < self._run_sizes[best]):
                best = i
                if run == size:
                    break
        if best < 0:
            return None
        if self._slab is None:
            self._slab = self._make_slab()
        offset = self._run_offsets[best]
        if self._run_sizes[best] == size:
            del self._run_offsets[best], self._run_sizes[best]
        else:
            self._run_offsets[best] += size
            self._run_sizes[best] -= size
        block = HostBlock(self, offset, nbytes, size, self._slab)
        self._live[offset] = block
        self._used += size
        return block

    def free(self, block: HostBlock) -> None:
        """Return ``block``'s bytes to the arena; the caller must not use its tensor afterwards."""
        if block._arena is not self or self._live.get(block.offset) is not block:
            raise ValueError(f"{block!r} is not a live block of this arena (double free?)")
        del self._live[block.offset]
        self._used -= block.size
        offsets, sizes = self._run_offsets, self._run_sizes
        start, size = block.offset, block.size
        i = bisect.bisect_left(offsets, start)
        if i < len(offsets) and start + size == offsets[i]:  # merge with the next run
            size += sizes[i]
            del offsets[i], sizes[i]
        if i > 0 and offsets[i - 1] + sizes[i - 1] == start:  # merge into the previous run
            sizes[i - 1] += size
        else:
            offsets.insert(i, start)
            sizes.insert(i, size)
