"""The C library's calls (Linux), bound once through ctypes: the memory calls for the modules
that map and inspect memory themselves (the buffer pool `_pool`, the cold-read check
`_direct`), and `bind` for any one function (`_torch`'s madvise and syscall, `_faultin`'s
writev)."""

from __future__ import annotations

import ctypes
from typing import Any

__all__ = ["MAP_FAILED", "Libc", "bind", "libc"]

#: What ``mmap`` and ``mremap`` return on failure.
MAP_FAILED = ctypes.c_void_p(-1).value


class Libc:
    """``mmap``, ``munmap``, ``mremap``, ``madvise`` and ``mincore`` with their C signatures."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(None, use_errno=True)
        self.mmap = lib.mmap
        self.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        self.mmap.restype = ctypes.c_void_p
        self.munmap = lib.munmap
        self.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.munmap.restype = ctypes.c_int
        self.mremap = lib.mremap
        self.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
        self.mremap.restype = ctypes.c_void_p
        self.madvise = lib.madvise
        self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.madvise.restype = ctypes.c_int
        self.mincore = lib.mincore
        self.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self.mincore.restype = ctypes.c_int


def bind(name: str, argtypes: list[Any] | None, restype: Any) -> Any:
    """The C library's function ``name`` with its C signature (``argtypes`` None: a variadic
    one, its arguments converted by ctypes' defaults), or None where the library lacks it."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    if argtypes is not None:
        function.argtypes = argtypes
    function.restype = restype
    return function


def _load() -> Libc | None:
    try:
        return Libc()
    except (OSError, AttributeError):  # not Linux: callers fall back (see each module)
        return None


#: The bound calls, or None where the C library lacks them.
libc = _load()
