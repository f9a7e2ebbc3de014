"""Ranged reads of remote files straight into a caller's buffer, with the fewest copies.

For http(s) and s3 the ranged GET is made here, on the filesystem's own session (fsspec's
aiohttp session, s3fs's aiobotocore client), and the response body is streamed into its slice of
the destination: one copy, from aiohttp's receive buffers, never a bytes object of the whole
range; a worker thread makes it in 4 MiB batches with the GIL released, so the copy and the page
faults of a fresh buffer overlap the event loop's receiving. Other async filesystems go through
``_cat_file`` and one copy. The Store (``_store.py``) owns the sliding window, retries and error
translation around these.

A destination is a sequence of views filled in order (a scatter list): one contiguous range of the
file lands in several places, so a run of tensors that each need their own shift in the model's
buffer costs one request, not one per tensor.

An http server may ignore ``Range`` and answer 200 with the whole file: the body is then streamed,
the bytes before the range dropped, and the response closed as soon as the range is filled, so a
header read never downloads a whole model. ``on_whole_body`` tells the Store, which then reads
that host's files in one request each instead of a window of ranges (each of which would stream
the file from its start).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ._versions import VersionMismatch
from ._versions import if_match as strong_etag

if TYPE_CHECKING:
    import aiohttp

__all__ = ["COPY_IN_THREAD", "RangeReader", "copy_into", "is_http_class", "range_reader"]

# Async reads: a copy this large would hold the event loop for over ~0.1 ms, so it goes to a thread.
COPY_IN_THREAD = 1 << 20
# Streamed responses are copied into their place by a worker thread in batches of this size.
_COPY_BATCH = 4 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-")
_FULL_RANGE = re.compile(r"bytes (\d+)-(\d+)/")


class ShortBody(ConnectionError):
    """A response ended, cleanly, before the bytes its Content-Range announced (a proxy or a
    server that lost the rest, a Content-Length that lies): a cut transfer, retried as any
    connection error is, never taken for the file's end."""


def _check_complete(content_range: object, start: int, size: int, filled: int) -> int:
    """``filled``, or ShortBody when the Content-Range promised more of the range than came."""
    match = _FULL_RANGE.match(content_range) if isinstance(content_range, str) else None
    if match is not None and int(match[1]) == start:
        claimed = min(size, int(match[2]) + 1 - start)
        if filled < claimed:
            raise ShortBody(
                f"the body ended after {filled} of the {claimed} bytes from {start} that its "
                f"Content-Range ({content_range}) announced"
            )
    return filled


def copy_into(dest: memoryview, data: bytes) -> None:
    """``dest[:] = data``, with the GIL released for bytes (for worker threads; see `_scatter`)."""
    if not isinstance(data, bytes):
        dest[:] = data
        return
    target = (ctypes.c_char * len(dest)).from_buffer(dest)
    ctypes.memmove(ctypes.addressof(target), data, len(data))


#: ``read(start, dests)``: fill the views of ``dests``, in order, with the file's bytes from
#: ``start``; return the count (fewer at end of file).
RangeReader = Callable[[int, Sequence[memoryview]], Awaitable[int]]


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


def range_reader(
    fs: Any,
    path: str,
    *,
    on_whole_body: Callable[[], None] | None = None,
    if_match: str | None = None,
) -> RangeReader:
    """The way to read ranges of ``path`` into buffers that copies least on this filesystem.

    ``on_whole_body`` is called when an http server answers a ranged GET with the whole file.
    With ``if_match`` (the version tag a load recorded), http(s) and s3 reads are of that
    version only: another one raises `VersionMismatch` (other filesystems cannot pin a version
    and ignore it). A strong ETag is sent as If-Match; a weak one (``W/"..."``) is not, since a
    server compares If-Match strongly and would refuse every read (412): the response's ETag is
    checked against it instead.
    """
    if _is_plain(fs, "fsspec.implementations.http", "HTTPFileSystem"):
        return functools.partial(_http_read, fs, path, on_whole_body, if_match)
    if _is_plain(fs, "s3fs.core", "S3FileSystem"):
        bucket, key, version = fs.split_path(path)
        return functools.partial(_s3_read, fs, bucket, key, version, if_match)
    return functools.partial(_cat_read, fs, path)


def _check_partial(sent: str, length: int | None, start: int, size: int) -> None:
    """A 206 must answer the range asked for: its Content-Range (when it has one) starting at
    ``start``, its Content-Length no more than ``size``; else EIO (not retried)."""
    match = _CONTENT_RANGE.match(sent)
    if (match is not None and int(match[1]) != start) or (length or 0) > size:
        raise OSError(
            errno.EIO,
            f"asked for {size} bytes from {start}, the server sent {length} bytes of {sent!r}",
        )


def _check_etag(if_match: str | None, sent: object) -> None:
    """A server that ignores If-Match (or was not sent a weak one) still names what it sent: it
    must be what we asked for. Tags that are no ETag (``lm:``: a Last-Modified) are not compared."""
    if (
        if_match is not None
        and if_match.startswith(('"', 'W/"'))
        and isinstance(sent, str)
        and sent
        and sent != if_match
    ):
        raise VersionMismatch(errno.ESTALE, f"asked for ETag {if_match}, the store sent {sent}")


def _range_header(start: int, size: int) -> str:
    return f"bytes={start}-{start + size - 1}"


def _total(dests: Sequence[memoryview]) -> int:
    return sum(len(d) for d in dests)


def _scatter(parts: list[tuple[int, bytes]]) -> None:
    """Copy each ``(address, data)`` to its address.

    ``ctypes.memmove`` releases the GIL, so in a worker thread the copy (and the page faults of a
    fresh destination) runs on another core while the event loop goes on receiving.
    """
    for address, data in parts:
        ctypes.memmove(address, data, len(data))


async def _drain(content: aiohttp.StreamReader, dests: Sequence[memoryview], skip: int) -> int:
    """Copy a response body into ``dests`` as it arrives, after dropping its first ``skip`` bytes.

    ``readchunk`` hands over aiohttp's receive buffers one by one (``read(n)`` would join them
    into a new bytes first): each byte is copied once, straight into its place, in batches of
    ``_COPY_BATCH`` bytes by a worker thread (see `_scatter`; faster loads over loopback http
    than copying on the loop: benches/README.md, remote_load). The thread always finishes before this returns or raises.
    Reading stops once ``dests`` are full, whatever is left of the body.
    """
    # The views' addresses, and a hold on each (a view cannot be released while held).
    holds = [(ctypes.c_char * len(d)).from_buffer(d) for d in dests if len(d)]
    targets = [(ctypes.addressof(h), len(h)) for h in holds]
    filled, size = 0, _total(dests)
    index = used = 0  # the target being filled, and how much of it is
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
            while data and filled < size:
                address, length = targets[index]
                n = min(len(data), length - used)
                if n == len(data):
                    parts.append((address + used, data))
                    data = b""
                else:  # the chunk ends this target (or the range): split it
                    parts.append((address + used, data[:n]))
                    data = data[n:]
                used += n
                filled += n
                pending += n
                if used == length:
                    index, used = index + 1, 0
            if pending >= _COPY_BATCH:
                await anyio.to_thread.run_sync(_scatter, parts)
                parts, pending = [], 0
        if pending >= COPY_IN_THREAD:
            await anyio.to_thread.run_sync(_scatter, parts)
        else:
            _scatter(parts)
        return filled
    finally:
        del holds, targets


async def _http_read(
    fs: Any,
    url: str,
    on_whole_body: Callable[[], None] | None,
    if_match: str | None,
    start: int,
    dests: Sequence[memoryview],
) -> int:
    """One ranged GET on fsspec's HTTPFileSystem session, as its ``_cat_file`` makes it."""
    size = _total(dests)
    if not size:  # no Range header asks for nothing (``bytes=0--1`` is a 500 or a 400)
        return 0
    kwargs = dict(fs.kwargs)
    headers = dict(kwargs.pop("headers", None) or {})
    headers["Range"] = _range_header(start, size)
    if (strong := strong_etag(if_match)) is not None:
        headers["If-Match"] = strong
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), headers=headers, **kwargs) as response:
        if response.status == 416:  # the range starts at or past the end of the file
            return 0
        if response.status == 412:
            raise VersionMismatch(errno.ESTALE, f"the store has another version than {if_match}")
        fs._raise_not_found_for_status(response, url)
        _check_etag(if_match, response.headers.get("ETag"))
        skip = start  # a 200 is the whole file: the server ignored Range
        if response.status == 206:
            _check_partial(
                response.headers.get("Content-Range", ""), response.content_length, start, size
            )
            skip = 0
        elif on_whole_body is not None:
            on_whole_body()
        # Leaving the block with body unread closes the connection rather than reading on.
        filled = await _drain(response.content, dests, skip)
        if response.status == 206:
            return _check_complete(response.headers.get("Content-Range"), start, size, filled)
        return filled


async def _s3_read(
    fs: Any,
    bucket: str,
    key: str,
    version: str | None,
    if_match: str | None,
    start: int,
    dests: Sequence[memoryview],
) -> int:
    """One ranged GetObject through s3fs's client, its body streamed into ``dests``."""
    if not _total(dests):  # as `_http_read`: no request for nothing
        return 0
    extra = {"VersionId": version} if version else {}
    if (strong := strong_etag(if_match)) is not None:
        extra["IfMatch"] = strong
    try:
        response = await fs._call_s3(
            "get_object", Bucket=bucket, Key=key, Range=_range_header(start, _total(dests)), **extra
        )
    except Exception as exc:
        if if_match is not None and _precondition_failed(exc):
            raise VersionMismatch(
                errno.ESTALE, f"the store has another version than {if_match}"
            ) from exc
        raise
    body = response["Body"]
    try:
        _check_etag(if_match, response.get("ETag"))
    except BaseException:
        body.close()
        raise
    try:
        aiohttp = sys.modules.get("aiohttp")
        content = getattr(getattr(body, "raw_stream", None), "content", None)
        if aiohttp is not None and isinstance(content, aiohttp.StreamReader):
            filled = await _drain(content, dests, 0)
            return _check_complete(response.get("ContentRange"), start, _total(dests), filled)
        filled = 0  # another HTTP backend (httpx): its readinto copies once too
        for dest in dests:
            done = 0
            while done < len(dest):
                n: int = await body.readinto(dest[done:])
                if not n:
                    return filled + done
                done += n
            filled += done
        return filled
    finally:
        body.close()  # after a whole body the connection is already back in the pool


def _precondition_failed(exc: BaseException) -> bool:
    """A 412 from s3 (botocore's ClientError; s3fs may translate it to an OSError)."""
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            meta = response.get("ResponseMetadata") or {}
            code = (response.get("Error") or {}).get("Code")
            if meta.get("HTTPStatusCode") == 412 or code == "PreconditionFailed":
                return True
        if "PreconditionFailed" in str(e) or "Precondition Failed" in str(e):
            return True
    return False


def _copy_out(dests: Sequence[memoryview], data: bytes) -> None:
    """Copy ``data`` into ``dests`` in order (GIL released for large pieces; see copy_into)."""
    pos = 0
    for dest in dests:
        if pos >= len(data):
            return
        if not len(dest):
            continue
        piece = data if pos == 0 and len(dest) >= len(data) else data[pos : pos + len(dest)]
        copy_into(dest[: len(piece)], piece)
        pos += len(piece)


async def _cat_read(fs: Any, path: str, start: int, dests: Sequence[memoryview]) -> int:
    """Any async filesystem: ``_cat_file`` of the range, then one copy into ``dests``."""
    size = _total(dests)
    data: bytes = await fs._cat_file(path, start=start, end=start + size)
    if len(data) > size:
        raise OSError(errno.EIO, f"the store returned {len(data)} bytes for a {size}-byte range")
    if len(data) >= COPY_IN_THREAD:
        await anyio.to_thread.run_sync(_copy_out, dests, data)
    else:
        _copy_out(dests, data)
    return len(data)
