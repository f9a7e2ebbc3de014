"""A fake CuPy on numpy, with N fake CUDA devices, that records the current device of every call.

It is just enough of CuPy for `CupyBackend`: ``cuda.Device`` (a context manager that sets a
per-thread current device, as CUDA's runtime does: a new thread starts on device 0), the runtime
calls (``hostRegister``, ``hostUnregister``, ``memcpyAsync``, ``memcpy``), streams, events and
``empty``. Device arrays are numpy arrays; copies move real bytes, at once (a fake stream runs
its work when it is queued), so loads through it are checked byte for byte.

Every call is recorded as ``(what, current device, thread)``: a test asserts that each ran
with the backend's device current, and where (the event loop thread or a worker).
"""

from __future__ import annotations

import ctypes
import threading
import types
from collections.abc import Callable
from typing import Any

import numpy as np


class FakeOutOfMemoryError(MemoryError):
    """cupy.cuda.memory.OutOfMemoryError."""


class _Device:
    def __init__(self, cupy: FakeCupy, device_id: int) -> None:
        self._cupy = cupy
        self.id = device_id
        self._previous: list[int] = []

    def __enter__(self) -> _Device:
        self._previous.append(self._cupy.current())
        self._cupy._local.device = self.id
        return self

    def __exit__(self, *exc: object) -> None:
        self._cupy._local.device = self._previous.pop()


class _Memory:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class FakeArray:
    """A device array: a numpy array, its device, and CuPy's ``data.ptr``."""

    def __init__(self, array: np.ndarray[Any, Any], device: _Device) -> None:
        self._array = array
        self.device = device
        self.data = _Memory(array.ctypes.data)
        self.dtype = array.dtype
        self.shape = array.shape
        self.ndim = array.ndim
        self.size = array.size
        self.nbytes = array.nbytes
        self.flags = array.flags

    def __getitem__(self, key: Any) -> FakeArray:
        return FakeArray(self._array[key], self.device)

    def view(self, dtype: Any) -> FakeArray:
        return FakeArray(self._array.view(dtype), self.device)

    def reshape(self, shape: Any) -> FakeArray:
        return FakeArray(self._array.reshape(shape), self.device)

    def get(self) -> np.ndarray[Any, Any]:
        return self._array.copy()


class _Event:
    def __init__(self, cupy: FakeCupy, block: bool = False, disable_timing: bool = False) -> None:
        self._cupy = cupy
        self.block = block
        cupy.record("Event")

    def record(self, stream: Any = None) -> None:
        self._cupy.record("Event.record")

    def synchronize(self) -> None:
        # Only blocking-sync events sleep in the driver; others spin a CPU core while waiting.
        self._cupy.record("Event.synchronize" if self.block else "Event.synchronize (spinning)")
        gate = self._cupy.sync_gate
        if gate is not None:
            gate(self)

    @property
    def done(self) -> bool:
        self._cupy.record("Event.done")
        return True


class _Stream:
    def __init__(self, cupy: FakeCupy, non_blocking: bool = False) -> None:
        self._cupy = cupy
        self.ptr = id(self)
        cupy.record("Stream")

    def wait_event(self, event: _Event) -> None:
        self._cupy.record("Stream.wait_event")

    def record(self) -> _Event:
        self._cupy.record("Stream.record")
        return _Event(self._cupy)

    def synchronize(self) -> None:
        self._cupy.record("Stream.synchronize")


class _Pool:
    def __init__(self, cupy: FakeCupy) -> None:
        self._cupy = cupy

    def free_all_blocks(self) -> None:
        self._cupy.record("free_all_blocks")
        self._cupy.freed_blocks += 1


class FakeCupy(types.ModuleType):
    """``sys.modules["cupy"]`` for a test (see the module)."""

    uint8 = np.uint8

    def __init__(self, devices: int = 2) -> None:
        super().__init__("cupy")
        self.devices = devices
        self._local = threading.local()
        self._lock = threading.Lock()
        #: (call, current device, thread name) for every call, in order.
        self.calls: list[tuple[str, int, str]] = []
        #: Allocations larger than this raise FakeOutOfMemoryError (until `freed_blocks` grows
        #: past `oom_until_freed`).
        self.oom_above: int | None = None
        self.oom_until_freed = 1 << 30
        self.freed_blocks = 0
        #: Called with the event by Event.synchronize (in the waiter thread), e.g. to block.
        self.sync_gate: Callable[[_Event], object] | None = None
        self.register_ok = True
        self._pool = _Pool(self)
        runtime = types.SimpleNamespace(
            getDeviceCount=lambda: self.devices,
            hostRegister=self._host_register,
            hostUnregister=lambda address: self.record("hostUnregister"),
            memcpyAsync=self._memcpy_async,
            memcpy=self._memcpy,
        )
        self.cuda = types.SimpleNamespace(
            Device=lambda device_id=0: _Device(self, device_id),
            runtime=runtime,
            Stream=lambda non_blocking=False: _Stream(self, non_blocking),
            Event=lambda block=False, disable_timing=False: _Event(self, block, disable_timing),
            get_current_stream=lambda: _Stream(self),
            memory=types.SimpleNamespace(OutOfMemoryError=FakeOutOfMemoryError),
        )

    def current(self) -> int:
        return int(getattr(self._local, "device", 0))

    def record(self, what: str) -> None:
        with self._lock:
            self.calls.append((what, self.current(), threading.current_thread().name))

    def devices_of(self, *names: str) -> set[int]:
        """The current devices seen by the calls named ``names`` (all calls if none named)."""
        return {d for what, d, _ in self.calls if not names or what in names}

    def _host_register(self, address: int, nbytes: int, flags: int) -> None:
        self.record("hostRegister")
        if not self.register_ok:
            raise RuntimeError("cudaErrorHostMemoryAlreadyRegistered (fake)")

    def _memcpy_async(self, dst: int, src: int, n: int, kind: int, stream: int) -> None:
        self.record("memcpyAsync")
        ctypes.memmove(dst, src, n)

    def _memcpy(self, dst: int, src: int, n: int, kind: int) -> None:
        self.record("memcpy")
        ctypes.memmove(dst, src, n)

    def empty(self, shape: Any, dtype: Any = np.uint8) -> FakeArray:
        self.record("empty")
        array = np.empty(shape, dtype=dtype)
        if (
            self.oom_above is not None
            and array.nbytes > self.oom_above
            and self.freed_blocks < self.oom_until_freed
        ):
            raise FakeOutOfMemoryError(f"Out of memory allocating {array.nbytes} bytes (fake)")
        return FakeArray(array, _Device(self, self.current()))

    def get_default_memory_pool(self) -> _Pool:
        return self._pool

    def asnumpy(self, array: FakeArray) -> np.ndarray[Any, Any]:
        return array.get()
