"""Fault in a file mapping's pages by reading them in the kernel: a file cut short is an error.

``MADV_POPULATE_READ`` maps a range through the kernel's get-user-pages walk, which costs
~200 ns for every 4 KiB entry, even one already mapped (Linux 6.18): ~2.7 ms for the 40 MiB
of small folios at the head of a 1 GiB file read sequentially. A read fault instead maps the
64 KiB around it at once (the kernel's fault-around, ``fault_around_bytes``: 64 KiB by
default), so one byte read per 64 KiB maps the same pages in ~1.8 ms. A read from user space
of a page past the end of a file cut short meanwhile is SIGBUS, which kills the process; the
same read made by the kernel, copying the bytes a ``writev`` is given into a pipe, faults the
same way (fault-around included) but fails the call with EFAULT. So `read_faults` hands the
kernel one byte of every 64 KiB to write into a pipe of its own: one system call per 1024
windows (64 MiB), a short write where the file ends early.

Whether fault-around mapped each whole window is the caller's to check (`_torch` reads the
head's entries in /proc/self/pagemap): a kernel with a smaller ``fault_around_bytes``, or
pages not in the page cache (fault-around maps cached pages only), leave pages unmapped,
which ``MADV_POPULATE_READ`` then maps.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from array import array
from collections.abc import Callable

from ._libc import bind

__all__ = ["WINDOW", "all_present", "read_faults"]

#: The range one read fault maps (Linux's default ``fault_around_bytes``).
WINDOW = 64 << 10
#: iovecs one ``writev`` takes at most (Linux's IOV_MAX); a byte each, well within a pipe.
_IOV_MAX = 1024


_writev: Callable[[int, int, int], int] | None = bind(
    "writev", [ctypes.c_int, ctypes.c_void_p, ctypes.c_int], ctypes.c_ssize_t
)


def read_faults(address: int, nbytes: int) -> bool:
    """Read one byte of every `WINDOW` of ``[address, address + nbytes)`` in the kernel (a
    ``writev`` into a pipe): each read faults its window in where it is not mapped yet.

    True once every window was read; False where it could not be (no ``writev``, no pipe) or a
    read failed: a page past the end of a file cut short (EFAULT), left for the caller's
    ``MADV_POPULATE_READ`` to report."""
    if _writev is None or nbytes <= 0:
        return False
    count = -(-nbytes // WINDOW)
    iovecs = array("Q", bytes(16 * count))  # (base, length) pairs: struct iovec on 64 bits
    if iovecs.itemsize != 8 or ctypes.sizeof(ctypes.c_void_p) != 8:
        return False
    iovecs[0::2] = array("Q", range(address, address + count * WINDOW, WINDOW))
    iovecs[1::2] = array("Q", [1]) * count
    base = iovecs.buffer_info()[0]
    try:
        reader, writer = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        for first in range(0, count, _IOV_MAX):
            calls = min(_IOV_MAX, count - first)
            if _writev(writer, base + 16 * first, calls) != calls:
                return False  # EFAULT (a window past the file's end), or a partial write
            os.read(reader, calls)  # emptied: the next call's bytes fit
    finally:
        os.close(reader)
        os.close(writer)
    return True


class _ScanArg(ctypes.Structure):
    """``struct pm_scan_arg`` (Linux 6.7, include/uapi/linux/fs.h)."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "size",
            "flags",
            "start",
            "end",
            "walk_end",
            "vec",
            "vec_len",
            "max_pages",
            "category_inverted",
            "category_mask",
            "category_anyof_mask",
            "return_mask",
        )
    ]


class _Region(ctypes.Structure):
    """``struct page_region``."""

    _fields_ = [(name, ctypes.c_uint64) for name in ("start", "end", "categories")]


#: ``_IOWR('f', 16, struct pm_scan_arg)`` and its ``PAGE_IS_PRESENT`` category.
_PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(_ScanArg) << 16) | (ord("f") << 8) | 16
_PAGE_IS_PRESENT = 1 << 3
_PAGE = os.sysconf("SC_PAGE_SIZE")


def all_present(pagemap: int, address: int, nbytes: int) -> bool | None:
    """Whether every page of ``[address, address + nbytes)`` is mapped, asked of
    /proc/self/pagemap open at ``pagemap`` in one ``PAGEMAP_SCAN`` ioctl for the first page
    not present; None where the kernel lacks it (before 6.7), for the caller to read the
    entries. Not the entries where it has it: their read computes each page's map count,
    ~13 us a MiB of a file in large folios (0.2 ms for a 16 MiB head), the scan ~0.4 us a MiB."""
    start, end = address // _PAGE * _PAGE, -(-(address + nbytes) // _PAGE) * _PAGE  # whole pages
    region = _Region()
    arg = _ScanArg(
        size=ctypes.sizeof(_ScanArg),
        start=start,
        end=end,
        vec=ctypes.addressof(region),
        vec_len=1,
        category_inverted=_PAGE_IS_PRESENT,
        category_mask=_PAGE_IS_PRESENT,
        return_mask=_PAGE_IS_PRESENT,
    )
    try:
        found = fcntl.ioctl(pagemap, _PAGEMAP_SCAN, arg, True)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    # One region of pages not present, or none; a walk stopped short (it may, and says where)
    # is not a range known mapped.
    return bool(found == 0 and arg.walk_end == end)
