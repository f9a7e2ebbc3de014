"""Ranged reads of remote files straight into a caller's buffer, with the fewest copies.

For http(s) and s3 the ranged GET is made here, on the filesystem's own session (fsspec's
aiohttp session, s3fs's aiobotocore client), and the response body is streamed into its slice of
the destination: one copy, from aiohttp's receive buffers, never a bytes object of the whole
range; a worker thread makes it in 4 MiB batches with the GIL released, so the copy and the page
faults of a fresh buffer overlap the event loop's receiving. Other async filesystems go through
``_cat_file`` and one copy. The Store (``_store.py``) owns the sliding window, retries and error
translation around these.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import re
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

if TYPE_CHECKING:
    import aiohttp

__all__ = ["COPY_IN_THREAD", "RangeReader", "copy_into", "is_http_class", "range_reader"]

# Async reads: a copy this large would hold the event loop for over ~0.1 ms, so it goes to a thread.
COPY_IN_THREAD = 1 << 20
# Streamed responses are copied into their place by a worker thread in batches of this size.
_COPY_BATCH = 4 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-")


def copy_into(dest: memoryview, data: bytes) -> None:
    """``dest[:] = data``, with the GIL released for bytes (for worker threads; see `_scatter`)."""
    if not isinstance(data, bytes):
        dest[:] = data
        return
    target = (ctypes.c_char * len(dest)).from_buffer(dest)
    ctypes.memmove(ctypes.addressof(target), data, len(data))


#: ``read(start, dest)``: fill ``dest`` with the file's bytes from ``start``; return the count
#: (fewer at end of file).
RangeReader = Callable[[int, memoryview], Awaitable[int]]


def _is_plain(fs: Any, module: str, name: str) -> bool:
    """``fs`` is an instance of ``module.name`` whose ``_cat_file`` no subclass overrides."""
    cls = getattr(sys.modules.get(module), name, None)
    return (
        isinstance(cls, type)
        and isinstance(fs, cls)
        and getattr(type(fs), "_cat_file", None) is getattr(cls, "_cat_file", None)
    )


def is_http_class(cls: type) -> bool:
    http = getattr(sys.modules.get("fsspec.implementations.http"), "HTTPFileSystem", None)
    return isinstance(http, type) and issubclass(cls, http)


def range_reader(fs: Any, path: str) -> RangeReader:
    """The way to read ranges of ``path`` into buffers that copies least on this filesystem."""
    if _is_plain(fs, "fsspec.implementations.http", "HTTPFileSystem"):
        return functools.partial(_http_read, fs, path)
    if _is_plain(fs, "s3fs.core", "S3FileSystem"):
        bucket, key, version = fs.split_path(path)
        return functools.partial(_s3_read, fs, bucket, key, version)
    return functools.partial(_cat_read, fs, path)


def _range_header(start: int, size: int) -> str:
    return f"bytes={start}-{start + size - 1}"


def _scatter(base: int, parts: list[tuple[int, bytes]]) -> None:
    """Copy each ``(offset, data)`` to address ``base + offset``.

    ``ctypes.memmove`` releases the GIL, so in a worker thread the copy (and the page faults of a
    fresh destination) runs on another core while the event loop goes on receiving.
    """
    for offset, data in parts:
        ctypes.memmove(base + offset, data, len(data))


async def _drain(content: aiohttp.StreamReader, dest: memoryview, skip: int) -> int:
    """Copy a response body into ``dest`` as it arrives, after dropping its first ``skip`` bytes.

    ``readchunk`` hands over aiohttp's receive buffers one by one (``read(n)`` would join them
    into a new bytes first): each byte is copied once, straight into its place, in batches of
    ``_COPY_BATCH`` bytes by a worker thread (see `_scatter`; 30% faster loads over loopback
    http than copying on the loop). The thread always finishes before this returns or raises.
    """
    filled, size = 0, len(dest)
    target = (ctypes.c_char * size).from_buffer(dest)  # dest's address (and a hold on it)
    base = ctypes.addressof(target)
    parts: list[tuple[int, bytes]] = []
    pending = 0
    try:
        while filled < size:
            data, end_of_http_chunk = await content.readchunk()
            if not data:
                if end_of_http_chunk:
                    continue
                break  # end of the body
            if skip:  # only when a server ignored the Range header
                if len(data) <= skip:
                    skip -= len(data)
                    continue
                data, skip = data[skip:], 0
            n = min(len(data), size - filled)
            parts.append((filled, data if n == len(data) else data[:n]))
            filled += n
            pending += n
            if pending >= _COPY_BATCH:
                await anyio.to_thread.run_sync(_scatter, base, parts)
                parts, pending = [], 0
        if pending >= COPY_IN_THREAD:
            await anyio.to_thread.run_sync(_scatter, base, parts)
        else:
            _scatter(base, parts)
        return filled
    finally:
        del target


async def _http_read(fs: Any, url: str, start: int, dest: memoryview) -> int:
    """One ranged GET on fsspec's HTTPFileSystem session, as its ``_cat_file`` makes it."""
    kwargs = dict(fs.kwargs)
    headers = dict(kwargs.pop("headers", None) or {})
    headers["Range"] = _range_header(start, len(dest))
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), headers=headers, **kwargs) as response:
        if response.status == 416:  # the range starts at or past the end of the file
            return 0
        fs._raise_not_found_for_status(response, url)
        skip = start  # a 200 is the whole file: the server ignored Range
        if response.status == 206:
            sent = response.headers.get("Content-Range", "")
            match = _CONTENT_RANGE.match(sent)
            length = response.content_length
            if (match is not None and int(match[1]) != start) or (length or 0) > len(dest):
                raise OSError(
                    errno.EIO,
                    f"asked for {len(dest)} bytes from {start}, the server sent {length} bytes "
                    f"of {sent!r}",
                )
            skip = 0
        return await _drain(response.content, dest, skip)


async def _s3_read(
    fs: Any, bucket: str, key: str, version: str | None, start: int, dest: memoryview
) -> int:
    """One ranged GetObject through s3fs's client, its body streamed into ``dest``."""
    extra = {"VersionId": version} if version else {}
    response = await fs._call_s3(
        "get_object", Bucket=bucket, Key=key, Range=_range_header(start, len(dest)), **extra
    )
    body = response["Body"]
    try:
        aiohttp = sys.modules.get("aiohttp")
        content = getattr(getattr(body, "raw_stream", None), "content", None)
        if aiohttp is not None and isinstance(content, aiohttp.StreamReader):
            return await _drain(content, dest, 0)
        filled = 0  # another HTTP backend (httpx): its readinto copies once too
        while filled < len(dest):
            n: int = await body.readinto(dest[filled:])
            if not n:
                break
            filled += n
        return filled
    finally:
        body.close()  # after a whole body the connection is already back in the pool


async def _cat_read(fs: Any, path: str, start: int, dest: memoryview) -> int:
    """Any async filesystem: ``_cat_file`` of the range, then one copy into ``dest``."""
    data: bytes = await fs._cat_file(path, start=start, end=start + len(dest))
    if len(data) > len(dest):
        raise OSError(
            errno.EIO, f"the store returned {len(data)} bytes for a {len(dest)}-byte range"
        )
    window = dest[: len(data)]
    if len(data) >= COPY_IN_THREAD:
        await anyio.to_thread.run_sync(copy_into, window, data)
    else:
        window[:] = data
    return len(data)
