"""The CuPy device backend: models as CuPy arrays (and DLPack capsules) for non-torch users.

Install with ``pip install 'modelcache[cuda]'`` (cupy-cuda12x); pass
``ModelCache(..., backend=CupyBackend(0))``. CuPy is imported only when a `CupyBackend` or
`CupyCopyEngine` is made, never by ``import modelcache``.

The same pipeline as torch's CUDA path (`modelcache._torch`), from the same core
(`modelcache._cuda`):

* one ``cupy.empty(nbytes, uint8)`` device allocation per model; tensors are views of it at the
  layout's offsets; the memory goes back to CuPy's pool when the last view is dropped;
* loads stream through the shared `StagingPool` (pinned with ``cudaHostRegister`` through CuPy)
  and a `CupyCopyEngine`: ``cudaMemcpyAsync`` on a non-blocking side stream, one blocking-sync
  event per copy, waited for in order by the engine's `CompletionWaiter` thread;
* promotion and demotion are one asynchronous copy between a pinned `HostBlock` of the host
  tier's arena and the device allocation, on a host -> device and a device -> host engine;
* host memory that could not be pinned is copied synchronously in the waiter thread, never on
  the event loop (``cudaMemcpyAsync`` from pageable memory returns only when the copy is done);
* every CUDA call runs inside ``cupy.cuda.Device(device_id)``, whatever thread makes it;
* an allocation that fails for lack of memory frees CuPy's pool blocks and retries once, then
  raises `DeviceOutOfMemoryError`.

Machines without CUDA get a ValueError when the backend is made (CuPy imports there, and raises
``CUDARuntimeError`` on first use): never a CuPy error later.
"""

from __future__ import annotations

import bisect
import contextlib
import importlib
from collections.abc import Mapping
from functools import partial
from types import MappingProxyType
from typing import Any

import torch

from ._arena import HostArena, HostBlock, cuda_available, device_guard
from ._backend import LoadedWeights, ViewMapping, allocate_with_retry
from ._cuda import CudaStaging, check_staging
from ._exceptions import ModelFormatError
from ._format import ModelInfo
from ._staging import Completion, CompletionWaiter, CopyHandle, StagingPool
from ._store import Store

__all__ = ["CupyBackend", "CupyCopyEngine", "CupyPinner", "CupyWeights", "numpy_dtype"]

#: safetensors dtype -> numpy dtype name. BF16 and the F8 types have no numpy dtype: their
#: arrays are the raw bits (uint16 / uint8), listed in `RAW_DTYPES`.
NUMPY_DTYPES: Mapping[str, str] = MappingProxyType(
    {
        "BOOL": "bool",
        "U8": "uint8",
        "I8": "int8",
        "I16": "int16",
        "U16": "uint16",
        "F16": "float16",
        "I32": "int32",
        "U32": "uint32",
        "F32": "float32",
        "I64": "int64",
        "U64": "uint64",
        "F64": "float64",
        "C64": "complex64",
        "BF16": "uint16",
        "F8_E5M2": "uint8",
        "F8_E4M3": "uint8",
        "F8_E4M3FNUZ": "uint8",
        "F8_E5M2FNUZ": "uint8",
        "F8_E8M0": "uint8",
    }
)
RAW_DTYPES = frozenset({"BF16", "F8_E5M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0"})

_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the direction follows from the (unified) addresses
_HOST_REGISTER_PORTABLE = 1


def numpy_dtype(name: str, *, model_id: str = "?", url: str = "?") -> str:
    """The numpy dtype name for a safetensors dtype (raw bits for BF16 / F8, see module)."""
    dtype = NUMPY_DTYPES.get(name)
    if dtype is None:
        raise ModelFormatError(
            f"model {model_id!r}: dtype {name} has no CuPy array type", model_id=model_id, path=url
        )
    return dtype


def _import_cupy() -> Any:
    try:
        return importlib.import_module("cupy")
    except ImportError as exc:
        raise ImportError(
            "the CuPy backend needs CuPy: pip install 'modelcache[cuda]' (cupy-cuda12x)"
        ) from exc


def _check_device(cupy: Any, device_id: int) -> None:
    """ValueError unless CuPy can use CUDA device ``device_id`` (no CUDARuntimeError escapes)."""
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError without a driver or device, ImportErrors of libs
        raise ValueError(
            f"CUDA device {device_id} is not available: CuPy sees no CUDA device "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not 0 <= device_id < count:
        raise ValueError(
            f"CUDA device {device_id} is not available: CuPy sees {count} CUDA device(s)"
        )


def _pointer(buffer: Any) -> tuple[int, int]:
    """Address and byte length of a CPU torch tensor or a CuPy array."""
    if isinstance(buffer, torch.Tensor):
        return buffer.data_ptr(), buffer.numel() * buffer.element_size()
    return int(buffer.data.ptr), int(buffer.nbytes)


class CupyPinner:
    """Page-locks host slabs through CuPy's CUDA runtime (a `HostPinner`), on ``device_id``.

    Remembers what it registered: `is_pinned` tells a copy engine whether an asynchronous copy
    from a host address would really be asynchronous.
    """

    def __init__(self, cupy: Any, device_id: int) -> None:
        self._cupy = cupy
        self.device_id = device_id
        # Registered ranges, sorted by start: parallel lists for bisect.
        self._starts: list[int] = []
        self._ends: list[int] = []

    def register(self, address: int, nbytes: int) -> bool:
        try:
            with self._cupy.cuda.Device(self.device_id):
                self._cupy.cuda.runtime.hostRegister(address, nbytes, _HOST_REGISTER_PORTABLE)
        except Exception:
            return False
        i = bisect.bisect(self._starts, address)
        self._starts.insert(i, address)
        self._ends.insert(i, address + nbytes)
        return True

    def unregister(self, address: int) -> None:
        i = bisect.bisect_left(self._starts, address)
        if i < len(self._starts) and self._starts[i] == address:
            del self._starts[i], self._ends[i]
        # Run by whichever thread drops the slab: without the guard, on device 0's context.
        with contextlib.suppress(Exception), self._cupy.cuda.Device(self.device_id):
            self._cupy.cuda.runtime.hostUnregister(address)

    def is_pinned(self, address: int, nbytes: int) -> bool:
        """Whether ``nbytes`` at ``address`` lie in one range this pinner registered."""
        i = bisect.bisect(self._starts, address) - 1
        return i >= 0 and address + nbytes <= self._ends[i]


class CupyCopyEngine:
    """Copies on one non-blocking CuPy stream; a `CompletionWaiter` thread waits for them.

    A `CopyEngine` whose buffers are CPU torch tensors (staging chunks, host blocks) and CuPy
    arrays. Copies from and to host memory that ``pinner`` did not pin run synchronously in the
    waiter thread instead (an "asynchronous" copy from pageable memory would block the event
    loop). Call `fence` before the first copy into memory allocated on another stream, from the
    thread that allocated it.
    """

    def __init__(self, device_id: int = 0, pinner: CupyPinner | None = None) -> None:
        cupy = _import_cupy()
        _check_device(cupy, device_id)
        self._cupy = cupy
        self.device_id = device_id
        self._pinner = pinner
        with cupy.cuda.Device(device_id):
            self.stream = cupy.cuda.Stream(non_blocking=True)
        self.waiter = CompletionWaiter(f"modelcache copies on CUDA device {device_id}")

    def __repr__(self) -> str:
        return f"CupyCopyEngine({self.device_id})"

    def fence(self) -> None:
        """Order later copies after the work queued on this thread's current stream."""
        with self._cupy.cuda.Device(self.device_id):
            self.stream.wait_event(self._cupy.cuda.get_current_stream().record())

    def _pinned(self, buffer: Any, address: int, nbytes: int) -> bool:
        if not isinstance(buffer, torch.Tensor):
            return True  # device memory
        return self._pinner is None or self._pinner.is_pinned(address, nbytes)

    def submit(self, src: Any, dst: Any) -> CopyHandle:
        src_ptr, n = _pointer(src)
        dst_ptr, m = _pointer(dst)
        if n != m:
            raise ValueError(f"copy of {n} bytes into {m}")
        if not (self._pinned(src, src_ptr, n) and self._pinned(dst, dst_ptr, n)):
            copy = partial(self._copy_now, dst_ptr, src_ptr, n)
            return CopyHandle(src, dst, self.waiter.watch(copy))
        cuda = self._cupy.cuda
        with cuda.Device(self.device_id):
            cuda.runtime.memcpyAsync(dst_ptr, src_ptr, n, _MEMCPY_DEFAULT, self.stream.ptr)
            event = cuda.Event(block=True, disable_timing=True)
            event.record(self.stream)
        return CopyHandle(src, dst, self.waiter.watch(partial(self._synchronize, event)))

    def _copy_now(self, dst_ptr: int, src_ptr: int, n: int) -> None:
        """In the waiter thread: a copy with pageable host memory, after the earlier copies."""
        with self._cupy.cuda.Device(self.device_id):
            self.stream.synchronize()
            self._cupy.cuda.runtime.memcpy(dst_ptr, src_ptr, n, _MEMCPY_DEFAULT)

    def _synchronize(self, event: Any) -> None:
        with self._cupy.cuda.Device(self.device_id):
            event.synchronize()

    async def wait(self, handle: CopyHandle) -> None:
        completion: Completion = handle.token
        await completion.wait()


def _device_empty(cupy: Any, device_id: int, nbytes: int, model_id: str) -> Any:
    """A device array of ``nbytes`` (blocking: `CudaStaging` calls it in a worker thread)."""
    with cupy.cuda.Device(device_id):
        return allocate_with_retry(
            partial(cupy.empty, nbytes, dtype=cupy.uint8),
            is_oom=lambda exc: isinstance(exc, cupy.cuda.memory.OutOfMemoryError),
            free_cached=cupy.get_default_memory_pool().free_all_blocks,
            nbytes=nbytes,
            device=f"CUDA device {device_id}",
            model_id=model_id,
        )


class CupyWeights(ViewMapping[Any]):
    """A model's tensors by name as CuPy arrays: views into one device buffer, read-only mapping.

    dtypes follow `NUMPY_DTYPES`. BF16 and the F8 types have no numpy dtype: their arrays are
    the raw bits as uint16 (BF16) or uint8 (F8); ``raw`` names them. Reinterpret them in the
    consumer (for example ``jax.lax.bitcast_convert_type(x, jnp.bfloat16)`` after `dlpack`).
    """

    __slots__ = ("raw",)

    def __init__(self, arrays: dict[str, Any], info: ModelInfo, buffer: Any) -> None:
        super().__init__(arrays, info, buffer)
        #: Names of the tensors exposed as raw bits (BF16, F8).
        self.raw = frozenset(n for n, t in info.tensors.items() if t.dtype in RAW_DTYPES)

    def dlpack(self, name: str) -> Any:
        """Tensor ``name`` as an object with ``__dlpack__`` / ``__dlpack_device__`` (the array
        itself), for ``jax.dlpack.from_dlpack``, ``torch.from_dlpack``, ``np.from_dlpack`` and
        other DLPack consumers; the consumer shares the device memory, no copy.

        Not a legacy capsule: CuPy deprecates ``toDlpack()``, and the protocol lets the consumer
        ask for the stream to synchronize with.
        """
        return self._arrays[name]

    def device_context(self) -> contextlib.AbstractContextManager[Any]:
        """Make the buffer's CUDA device current in this thread, for CuPy and torch alike."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.buffer.device)
        if cuda_available():  # a CPU build of torch beside CuPy has no device to guard
            stack.enter_context(device_guard(torch.device("cuda", int(self.buffer.device.id))))
        return stack

    def __repr__(self) -> str:
        return (
            f"<CupyWeights {self.info.model_id!r}: {len(self)} arrays, {self.info.nbytes} bytes "
            f"on cuda:{self.buffer.device.id}>"
        )


def _array_views(cupy: Any, buffer: Any, info: ModelInfo) -> dict[str, Any]:
    arrays: dict[str, Any] = {}
    for name, t in info.tensors.items():
        dtype = numpy_dtype(t.dtype, model_id=info.model_id, url=info.url)
        if t.nbytes == 0:
            arrays[name] = cupy.empty(t.shape, dtype=dtype)
        else:
            arrays[name] = buffer[t.offset : t.offset + t.nbytes].view(dtype).reshape(t.shape)
    return arrays


class CupyBackend:
    """Loads models as CuPy arrays on CUDA device ``device_id`` (a `DeviceBackend`).

    Loads stream through ``staging_chunks`` pinned chunks of ``staging_chunk_size`` bytes (one
    allocation, made on the first load). Without CuPy: ImportError; without a usable CUDA
    device: ValueError, both here.
    """

    def __init__(
        self,
        device_id: int = 0,
        *,
        staging_chunk_size: int = 32 << 20,
        staging_chunks: int = 4,
    ) -> None:
        check_staging(staging_chunk_size, staging_chunks)
        cupy = _import_cupy()
        _check_device(cupy, device_id)
        self._cupy = cupy
        self.device_id = device_id
        self.staging_chunk_size = staging_chunk_size
        self.staging_chunks = staging_chunks
        self._pinner = CupyPinner(cupy, device_id)
        #: The staging pool and copy engines, made on the first load.
        self._cuda = CudaStaging(
            staging_chunk_size,
            staging_chunks,
            engine=partial(CupyCopyEngine, device_id, self._pinner),
            allocate=partial(_device_empty, cupy, device_id),
            pinner=self._pinner,
        )

    def __repr__(self) -> str:
        return f"CupyBackend({self.device_id})"

    @property
    def device(self) -> torch.device:
        """The device as torch names it (``cache.device``); torch itself is not used."""
        return torch.device("cuda", self.device_id)

    @property
    def on_host(self) -> bool:
        return False

    @property
    def staging_pool(self) -> StagingPool | None:
        """The pinned staging pool (after the first load), for statistics."""
        return self._cuda.pool

    def host_arena(self, capacity: int) -> HostArena:
        """Host-tier memory, pinned through CuPy."""
        return HostArena(capacity, pin=True, pinner=self._pinner)

    def _weights(self, buffer: Any, info: ModelInfo) -> CupyWeights:
        with self._cupy.cuda.Device(self.device_id):
            return CupyWeights(_array_views(self._cupy, buffer, info), info, buffer)

    async def load(self, store: Store, info: ModelInfo, *, zero_copy: bool = True) -> CupyWeights:
        """Read the model onto the device through the staging pool (``zero_copy`` is unused)."""
        return self._weights(await self._cuda.load(store, info), info)

    async def promote(self, block: HostBlock, info: ModelInfo) -> CupyWeights:
        """The model in ``block`` copied to a new device buffer (one asynchronous copy)."""
        if block.nbytes != info.nbytes:
            raise ValueError(f"host block is {block.nbytes} bytes, the model {info.nbytes}")
        buffer = await self._cuda.to_device(block.tensor, info.nbytes, info.model_id)
        return self._weights(buffer, info)

    async def demote(self, loaded: LoadedWeights, block: HostBlock) -> None:
        """Copy ``loaded`` (this backend's `CupyWeights`) into ``block``."""
        if not isinstance(loaded, CupyWeights):
            raise TypeError(f"CupyBackend got weights it did not load: {loaded!r}")
        if loaded.buffer.nbytes != block.nbytes:
            raise ValueError(
                f"device buffer is {loaded.buffer.nbytes} bytes, the block {block.nbytes}"
            )
        await self._cuda.to_host(loaded.buffer, block.tensor)

    def host_bytes(self, loaded: LoadedWeights) -> memoryview | None:
        """None: the weights live in device memory."""
        return None
