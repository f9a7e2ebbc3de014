"""Where a model lives, and async byte-range reads from there (any fsspec filesystem).

Design notes:

- Ids are checked against a whitelist before they touch a path (:func:`validate_model_id`), so an
  accepted id can never leave the store root, whatever the template.
- One filesystem instance per protocol per Store, made on first use and kept until `aclose`, so
  its session (the aiohttp session of http(s), the aiobotocore client of s3fs) and its keep-alive
  connections serve every read. Filesystems with ``async_impl`` are made inside the running loop
  with ``asynchronous=True`` and awaited directly (asyncio backend); sync ones run in threads.
- Local files (``file://``, ``local://``, plain paths) bypass fsspec: ``read_into`` opens the file
  once and reads chunks concurrently with ``os.preadv`` straight into the caller's buffer (the GIL
  is released while the kernel copies), so a load runs at page-cache or disk bandwidth, no copies.
- Remote ``read_into`` is a sliding window of ranged reads: ``read_window`` workers each take the
  next ``read_chunk_size`` range in file order, so one call has at most ``read_window`` requests
  in flight and a new one starts as soon as any ends (no batch barrier). For http(s) and s3 the
  ranged GET is made here, on the filesystem's own session, and the response is streamed into its
  slice of ``dest``: one copy, from aiohttp's receive buffers, never a bytes object of the whole
  range; a worker thread makes it in 4 MiB batches with the GIL released, so the copy and the page
  faults of a fresh buffer overlap the event loop's receiving. (For http the session also gets a
  1 MiB ``read_bufsize``.) Other async filesystems go through ``_cat_file`` and one copy.
- Every worker thread and every in-flight remote request holds a token of one CapacityLimiter
  (``max_concurrent_reads``): one Store never has more reads in flight than that.
- Retries: a remote request (stat, ranged read) that fails with a transient error (connection
  error or reset, timeout, truncated body, HTTP 408/429/5xx except 501, throttling codes) is made
  again, at most ``max_retries`` times, after an exponential backoff (``retry_base_delay * 2**n``
  capped at ``retry_max_delay``; equal jitter: half fixed, half random) during which it holds no
  limiter token. A missing file (404) and every other error (403, bad request...) fail at once.
  Cancellation is never caught. The Store is the only retry layer: on its s3fs instance it sets
  ``retries = 1`` and botocore's ``total_max_attempts=1`` (unless ``config_kwargs`` in
  storage_options set ``retries``), or a persistent 503 would cost up to 5 x 5 x 5 requests
  instead of ``1 + max_retries``.
- MemoryFileSystem hands every opener the same BytesIO, so seek-then-read would race with any
  concurrent read of that file: for a BytesIO we copy from its buffer at an absolute offset.
- Errors are translated at this boundary: a missing file -> ModelNotFoundError, any other
  Exception -> StoreError, naming the id and the path (and the attempts, after retries), with the
  cause chained. fsspec's http ``_info`` reports every failure, even a 503, as FileNotFoundError:
  the HTTP status in the cause decides, so only a 404/410 means "not found". BaseException
  (cancellation) is never caught. Chunk tasks record their first error and cancel their siblings,
  so callers see one typed error, never an ExceptionGroup.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import inspect
import io
import logging
import os
import random
import re
import stat
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
import fsspec
from fsspec.core import split_protocol
from fsspec.implementations.local import LocalFileSystem

from ._concurrency import gather
from ._exceptions import InvalidModelIdError, ModelCacheError, ModelNotFoundError, StoreError

if TYPE_CHECKING:
    import aiohttp

__all__ = ["Store", "validate_model_id"]

logger = logging.getLogger("modelcache")

T = TypeVar("T")

_ID = re.compile(r"[A-Za-z0-9._\-+=@]+")
_ID_WITH_SLASH = re.compile(r"[A-Za-z0-9._\-+=@/]+")
_LOCAL_PROTOCOLS = frozenset(("file", "local"))  # LocalFileSystem.protocol
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
# Async reads: a copy this large would hold the event loop for over ~0.1 ms, so it goes to a thread.
_COPY_IN_THREAD = 1 << 20
# Streamed responses are copied into their place by a worker thread in batches of this size.
_COPY_BATCH = 4 << 20
# S3 error codes that mean "try again later" whatever the HTTP status says.
_TRANSIENT_CODES = frozenset(
    (
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
    )
)
# Keys of fsspec `info` dicts that carry a version tag or checksum (s3fs/http, gcsfs, ...).
_ETAG_KEYS = ("ETag", "etag", "md5Hash", "Content-MD5", "crc32c", "checksum")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-")
_jitter = random.Random()


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate_model_id(model_id: object, *, allow_slash: bool = False, max_length: int = 200) -> str:
    """Return ``model_id`` if it is safe to put in a path, else raise InvalidModelIdError.

    Accepted: a non-empty str of at most ``max_length`` characters from ``A-Z a-z 0-9 . _ - + = @``
    (and ``/`` when ``allow_slash``) that starts with a letter or digit, has no ``..``, and, with
    ``allow_slash``, only non-empty segments that each start with a letter or digit.
    """
    if not isinstance(model_id, str):
        raise InvalidModelIdError(
            f"invalid model id {_show(model_id)}: it must be a str, not {type(model_id).__name__}"
        )
    problem = _id_problem(model_id, allow_slash, max_length)
    if problem is not None:
        raise InvalidModelIdError(
            f"invalid model id {_show(model_id)}: {problem}", model_id=model_id
        )
    return model_id


def _id_problem(model_id: str, allow_slash: bool, max_length: int) -> str | None:
    if not model_id:
        return "it is empty"
    if len(model_id) > max_length:
        return f"it has {len(model_id)} characters, more than the limit of {max_length}"
    pattern = _ID_WITH_SLASH if allow_slash else _ID
    if pattern.fullmatch(model_id) is None:
        bad = next(c for c in model_id if pattern.fullmatch(c) is None)
        hint = " (the store does not allow '/' in ids)" if bad == "/" else ""
        return (
            f"it contains the character {bad!r}{hint}; "
            "allowed are ASCII letters, digits and . _ - + = @"
        )
    if ".." in model_id:
        return "it contains '..'"
    for segment in model_id.split("/"):  # a single segment unless allow_slash
        if not segment:
            return "it has an empty path segment (a leading, trailing or doubled '/')"
        if not segment[0].isalnum():  # ASCII only here: the whitelist matched
            return f"{segment!r} does not start with a letter or digit"
    return None


# -- errors: which are transient, which mean "missing" ------------------------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes (or contexts), innermost last."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        yield current
        cause = current.__cause__
        current = (
            cause if cause is not None or current.__suppress_context__ else current.__context__
        )


def _own_status(exc: BaseException) -> int | None:
    """The HTTP status ``exc`` itself carries: aiohttp's, botocore's ClientError's, requests'."""
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None and isinstance(exc, aiohttp.ClientResponseError):
        status: int = exc.status
        return status
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):  # botocore ClientError
        meta = response.get("ResponseMetadata")
        found = meta.get("HTTPStatusCode") if isinstance(meta, Mapping) else None
        return found if isinstance(found, int) else None
    found = getattr(response, "status_code", None)  # requests.HTTPError
    return found if isinstance(found, int) else None


def _error_code(exc: BaseException) -> object:
    response = getattr(exc, "response", None)
    error = response.get("Error") if isinstance(response, Mapping) else None
    return error.get("Code") if isinstance(error, Mapping) else None


def _http_status(exc: BaseException) -> int | None:
    """The first HTTP status found along ``exc``'s cause chain."""
    for e in _chain(exc):
        status = _own_status(e)
        if status is not None:
            return status
    return None


def _transient_types() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(transient, permanent-though-they-look-transient) exception types of loaded libraries."""
    transient: list[type[BaseException]] = [TimeoutError, ConnectionError]
    permanent: list[type[BaseException]] = []
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        transient += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
        permanent.append(aiohttp.ClientSSLError)  # a bad certificate stays bad
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None:
        for name in (
            "ConnectionError",  # EndpointConnectionError, ConnectTimeoutError, ...
            "HTTPClientError",  # ConnectionClosedError, ReadTimeoutError, ...
            "IncompleteReadError",
            "ResponseStreamingError",
        ):
            transient += [getattr(botocore, name)] if hasattr(botocore, name) else []
        permanent += [botocore.SSLError] if hasattr(botocore, "SSLError") else []
    return tuple(transient), tuple(permanent)


def _is_transient(exc: BaseException) -> bool:
    """Whether a request that raised ``exc`` may succeed if made again.

    Yes for connection errors and resets, timeouts, truncated bodies, HTTP 408, 429 and 5xx except
    501, and S3 throttling and timeout codes; no for everything else (404, 403, TLS errors, our own
    errors). The first error code or HTTP status along the cause chain decides.
    """
    transient, permanent = _transient_types()
    for e in _chain(exc):
        if isinstance(e, ModelCacheError):
            return False
        if _error_code(e) in _TRANSIENT_CODES:  # before the status: S3's RequestTimeout is a 400
            return True
        status = _own_status(e)
        if status is not None:
            return status in (408, 429) or (500 <= status < 600 and status != 501)
        if isinstance(e, permanent):
            return False
        if isinstance(e, transient):
            return True
    return False


def _is_missing(exc: BaseException) -> bool:
    """A FileNotFoundError that means the file is not there (not a 503 or a reset in disguise)."""
    if not isinstance(exc, FileNotFoundError):
        return False
    status = _http_status(exc)
    if status is not None:
        return status in (404, 410)
    return not _is_transient(exc)


def _describe(exc: BaseException) -> str:
    """``Type: message`` of ``exc`` and of its direct cause (fsspec's http reports a 503 as a
    FileNotFoundError from the aiohttp error; s3fs an OSError from botocore's)."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    return text if cause is None else f"{text} (from {type(cause).__name__}: {cause})"


@contextlib.contextmanager
def _translated(op: str, url: str, model_id: str) -> Iterator[None]:
    """Turn filesystem errors into the library's typed errors; let ours and BaseException pass."""
    try:
        yield
    except ModelCacheError:
        raise
    except Exception as exc:
        if _is_missing(exc):
            raise ModelNotFoundError(
                f"model {model_id!r} not found: no file at {url}", model_id=model_id, path=url
            ) from exc
        raise StoreError(
            f"cannot {op} {url} for model {model_id!r}: {_describe(exc)}",
            model_id=model_id,
            path=url,
        ) from exc


def _truncated(url: str, model_id: str, offset: int, expected: int, got: int) -> StoreError:
    return StoreError(
        f"{url} of model {model_id!r} is truncated: expected {expected} bytes from offset "
        f"{offset}, got {got}",
        model_id=model_id,
        path=url,
    )


def _is_a_directory(path: str) -> IsADirectoryError:
    return IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)


def _open_regular(path: str, opened: list[int]) -> int:
    """Open ``path``, append the fd to ``opened`` (the caller closes it), return the file size."""
    fd = os.open(path, _OPEN_FLAGS)
    opened.append(fd)
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise _is_a_directory(path)
    return st.st_size


def _pread_full(fd: int, buf: memoryview, offset: int) -> int:
    """Fill ``buf`` from ``fd`` at ``offset``; return the bytes read (fewer only at end of file)."""
    filled, size = 0, len(buf)
    while filled < size:
        n = os.preadv(fd, [buf[filled:]], offset + filled)
        if n == 0:
            break
        filled += n
    return filled


def _pread_range(path: str, start: int, end: int) -> bytes:
    fd = os.open(path, _OPEN_FLAGS)
    try:
        parts: list[bytes] = []
        pos = start
        while pos < end:
            data = os.pread(fd, end - pos, pos)
            if not data:
                break
            parts.append(data)
            pos += len(data)
        return b"".join(parts)
    finally:
        os.close(fd)


def _sync_read_into(fs: Any, path: str, offset: int, dest: memoryview) -> int:
    """Read into ``dest`` from a sync fsspec file; return bytes read (< len(dest) at EOF)."""
    with fs.open(path, "rb") as f:
        if isinstance(f, io.BytesIO):  # shared by every opener (memory://): copy at an offset
            with f.getbuffer() as buf, buf[offset : offset + len(dest)] as src:
                dest[: len(src)] = src
                return len(src)
        f.seek(offset)
        filled = 0
        while filled < len(dest):
            n = f.readinto(dest[filled:])
            if not n:
                break
            filled += n
        return filled


def _copy(dest: memoryview, data: bytes) -> None:
    """``dest[:] = data``, with the GIL released for bytes (for worker threads; see `_scatter`)."""
    if not isinstance(data, bytes):
        dest[:] = data
        return
    target = (ctypes.c_char * len(dest)).from_buffer(dest)
    ctypes.memmove(ctypes.addressof(target), data, len(data))


# -- remote ranged reads into a buffer -----------------------------------------------------------

#: ``read(start, dest)``: fill ``dest`` with the file's bytes from ``start``; return the count
#: (fewer at end of file).
_RangeReader = Callable[[int, memoryview], Awaitable[int]]


def _is_plain(fs: Any, module: str, name: str) -> bool:
    """``fs`` is an instance of ``module.name`` whose ``_cat_file`` no subclass overrides."""
    cls = getattr(sys.modules.get(module), name, None)
    return (
        isinstance(cls, type)
        and isinstance(fs, cls)
        and getattr(type(fs), "_cat_file", None) is getattr(cls, "_cat_file", None)
    )


def _is_http_class(cls: type) -> bool:
    http = getattr(sys.modules.get("fsspec.implementations.http"), "HTTPFileSystem", None)
    return isinstance(http, type) and issubclass(cls, http)


def _range_reader(fs: Any, path: str) -> _RangeReader:
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
        if pending >= _COPY_IN_THREAD:
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
    if len(data) >= _COPY_IN_THREAD:
        await anyio.to_thread.run_sync(_copy, window, data)
    else:
        window[:] = data
    return len(data)


class Store:
    """Maps model ids to URLs and reads byte ranges from there, translating errors.

    ``max_concurrent_reads`` bounds the reads in flight in the whole Store (worker threads and
    remote requests together); ``read_chunk_size`` is the size of each read of ``read_into``;
    ``read_window`` bounds the remote requests one ``read_into`` call keeps in flight (a sliding
    window). A remote request failing with a transient error is made again up to ``max_retries``
    times, after ``retry_base_delay * 2**n`` seconds (capped at ``retry_max_delay``, jittered).
    """

    def __init__(
        self,
        location: str | Callable[[str], str],
        *,
        storage_options: Mapping[str, Any] | None = None,
        allow_slash_in_ids: bool = False,
        max_id_length: int = 200,
        max_concurrent_reads: int = 8,
        read_chunk_size: int = 16 << 20,
        read_window: int = 8,
        max_retries: int = 4,
        retry_base_delay: float = 0.05,
        retry_max_delay: float = 2.0,
    ) -> None:
        if isinstance(location, str):
            if location.count("{model_id}") != 1:
                raise ValueError(
                    f"store location {location!r} must contain '{{model_id}}' exactly once"
                )
        elif not callable(location):
            raise TypeError(f"store location must be a str or a callable, not {location!r}")
        for name, value in (
            ("max_id_length", max_id_length),
            ("max_concurrent_reads", max_concurrent_reads),
            ("read_chunk_size", read_chunk_size),
            ("read_window", read_window),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name, number in (
            ("max_retries", max_retries),
            ("retry_base_delay", retry_base_delay),
            ("retry_max_delay", retry_max_delay),
        ):
            if not number >= 0:  # also refuses NaN
                raise ValueError(f"{name} must not be negative, got {number}")
        self._location = location
        self._storage_options = dict(storage_options or {})
        self._allow_slash = allow_slash_in_ids
        self._max_id_length = max_id_length
        self._max_reads = max_concurrent_reads
        self._chunk = read_chunk_size
        self._window = read_window
        self._max_retries = max_retries
        self._retry_base_delay = retry_base_delay
        self._retry_max_delay = retry_max_delay
        self._filesystems: dict[str, Any] = {}
        self._limiter: anyio.CapacityLimiter | None = None  # made in the loop, on first read
        self._bytes_read = 0
        self._retries = 0

    def __repr__(self) -> str:
        return f"Store({self._location!r}, bytes_read={self._bytes_read})"

    @property
    def location(self) -> str | Callable[[str], str]:
        """The location template or resolver this Store was made with."""
        return self._location

    @property
    def bytes_read(self) -> int:
        """Total payload bytes this Store has read."""
        return self._bytes_read

    @property
    def retries(self) -> int:
        """Requests this Store has made again after a transient error."""
        return self._retries

    def model_url(self, model_id: str) -> str:
        """Validate ``model_id``; return its URL (a directory, or one file for single-file models)."""
        validate_model_id(model_id, allow_slash=self._allow_slash, max_length=self._max_id_length)
        if isinstance(self._location, str):
            return self._location.replace("{model_id}", model_id).rstrip("/")
        url = self._location(model_id)
        if not isinstance(url, str):
            raise TypeError(f"store resolver returned {url!r} for model {model_id!r}, not a str")
        return url

    def join(self, url: str, name: str) -> str:
        """Return the URL of file ``name`` (already validated) inside directory ``url``."""
        return url + name if url.endswith("/") else f"{url}/{name}"

    def local_path(self, url: str) -> str | None:
        """Return the OS path of ``url`` when it is on the local filesystem, else None."""
        protocol, _ = split_protocol(url)
        if protocol is None or protocol in _LOCAL_PROTOCOLS:
            path: str = LocalFileSystem._strip_protocol(url)
            return path
        return None

    async def size(self, url: str, *, model_id: str) -> int:
        """Return the size in bytes of the file at ``url``."""
        with _translated("stat", url, model_id):
            path = self.local_path(url)
            if path is not None:
                st = await anyio.to_thread.run_sync(os.stat, path, limiter=self._get_limiter())
                if stat.S_ISDIR(st.st_mode):
                    raise _is_a_directory(path)
                return st.st_size
            info = await self._remote_info(url, model_id)
            size = info.get("size")
            if not isinstance(size, int):
                raise StoreError(
                    f"cannot stat {url} for model {model_id!r}: the store reports no size",
                    model_id=model_id,
                    path=url,
                )
            return size

    async def etag(self, url: str, *, model_id: str) -> str | None:
        """The store's ETag (or checksum) of the file at ``url``, or None where it has none.

        It changes when the file does, so a copy of the file can record it and be checked
        against the store later. Given as the store gives it (an S3 ETag keeps its quotes).
        Local files and directories have none (for a sharded model, ask for its index file).
        """
        with _translated("stat", url, model_id):
            if self.local_path(url) is not None:
                return None
            info = await self._remote_info(url, model_id, directory_ok=True)
            if info.get("type") == "directory":
                return None
        for key in _ETAG_KEYS:
            value = info.get(key)
            if isinstance(value, str) and value:
                return value
        return None

    async def read_range(self, url: str, start: int, end: int, *, model_id: str) -> bytes:
        """Return bytes ``[start, end)`` of the file; fewer only if the file ends before ``end``."""
        if not 0 <= start <= end:
            raise ValueError(f"invalid byte range [{start}, {end})")
        limiter = self._get_limiter()
        with _translated("read", url, model_id):
            path = self.local_path(url)
            if path is not None:
                data = await anyio.to_thread.run_sync(
                    _pread_range, path, start, end, limiter=limiter
                )
            else:
                fs, fspath = await self._remote(url)

                async def cat() -> bytes:
                    try:
                        if fs.async_impl:
                            async with limiter:
                                got: bytes = await fs._cat_file(fspath, start=start, end=end)
                                return got
                        read = functools.partial(fs.cat_file, fspath, start=start, end=end)
                        return await anyio.to_thread.run_sync(read, limiter=limiter)
                    except Exception as exc:
                        if _http_status(exc) == 416:  # starts at or past the end of the file
                            return b""
                        raise

                data = await self._retrying("read", url, model_id, cat)
            if len(data) > end - start:
                raise StoreError(
                    f"cannot read {url} for model {model_id!r}: the store returned {len(data)} "
                    f"bytes for the {end - start}-byte range [{start}, {end})",
                    model_id=model_id,
                    path=url,
                )
        self._bytes_read += len(data)
        return data

    async def read_into(self, url: str, offset: int, dest: memoryview, *, model_id: str) -> None:
        """Fill all of ``dest`` with the file's bytes from ``offset``; StoreError if it is short."""
        if not (
            isinstance(dest, memoryview)
            and not dest.readonly
            and dest.c_contiguous
            and dest.ndim == 1
            and dest.format == "B"
        ):
            raise ValueError("dest must be a writable, C-contiguous, 1-D unsigned-byte memoryview")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        with _translated("read", url, model_id):
            path = self.local_path(url)
            if path is not None:
                got = await self._read_local(path, url, model_id, offset, dest)
            else:
                fs, fspath = await self._remote(url)
                if fs.async_impl:
                    got = await self._read_window(fs, fspath, url, model_id, offset, dest)
                else:
                    read = functools.partial(
                        anyio.to_thread.run_sync,
                        _sync_read_into,
                        fs,
                        fspath,
                        offset,
                        dest,
                        limiter=self._get_limiter(),
                    )
                    got = await self._retrying("read", url, model_id, read)
            self._bytes_read += got
            if got < len(dest):
                raise _truncated(url, model_id, offset, len(dest), got)

    async def aclose(self) -> None:
        """Close the sessions of async filesystems (they are made again if the Store is reused)."""
        closing = [fs for fs in self._filesystems.values() if fs.async_impl]
        self._filesystems = {p: fs for p, fs in self._filesystems.items() if not fs.async_impl}
        errors: list[Exception] = []
        with anyio.CancelScope(shield=True):
            for fs in closing:
                # aiohttp sessions (http, gcsfs) live in `_session`; s3fs's client in `_s3`.
                for attr in ("_session", "_s3"):
                    close = getattr(getattr(fs, attr, None), "close", None)
                    if close is not None and inspect.iscoroutinefunction(close):
                        try:
                            await close()
                        except Exception as exc:
                            errors.append(exc)
                        setattr(fs, attr, None)
        if errors:
            raise StoreError(f"closing the store's sessions failed: {errors[0]!r}") from errors[0]

    # -- internals -------------------------------------------------------------------------------

    def _get_limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._max_reads)
        return self._limiter

    async def _remote(self, url: str) -> tuple[Any, str]:
        """Return this Store's filesystem for ``url``'s protocol and the path within it."""
        protocol = split_protocol(url)[0] or "file"  # local URLs do not get here, in fact
        fs: Any = self._filesystems.get(protocol)
        if fs is None:
            cls = fsspec.get_filesystem_class(protocol)
            # Our own instance: aclose() must not close a session someone else shares.
            options = {**self._storage_options, "skip_instance_cache": True}
            is_s3fs = cls.__module__.partition(".")[0] == "s3fs"
            if is_s3fs:
                # We are the retry layer (see the module notes); the pool fits our reads.
                config = dict(options.get("config_kwargs") or {})
                config.setdefault("retries", {"total_max_attempts": 1})
                config.setdefault("max_pool_connections", max(10, self._max_reads))
                options["config_kwargs"] = config
            elif _is_http_class(cls) and "get_client" not in options:
                # aiohttp pauses a connection whenever 128 KiB wait unread (the default
                # read_bufsize is 64 KiB): a pause and a resume per 256 KiB received. 1 MiB lets
                # a window of 16 MiB responses stream without that (-13% load time here).
                client = {"read_bufsize": 1 << 20, **(options.get("client_kwargs") or {})}
                options["client_kwargs"] = client
            if getattr(cls, "async_impl", False):
                fs = cls(asynchronous=True, **options)
            else:  # a sync constructor may connect (sftp...): not on the event loop
                make = functools.partial(cls, **options)
                fs = await anyio.to_thread.run_sync(make, limiter=self._get_limiter())
            if is_s3fs:
                fs.retries = 1  # a class attribute of s3fs, not a constructor argument
            fs = self._filesystems.setdefault(protocol, fs)
        path: str = fs._strip_protocol(url)
        return fs, path

    async def _remote_info(
        self, url: str, model_id: str, *, directory_ok: bool = False
    ) -> Mapping[str, Any]:
        """fsspec's ``info`` of a remote file (retried); IsADirectoryError for a directory."""
        fs, path = await self._remote(url)

        async def info() -> Mapping[str, Any]:
            if fs.async_impl:
                found: Mapping[str, Any] = await fs._info(path)
                return found
            return await anyio.to_thread.run_sync(fs.info, path, limiter=self._get_limiter())

        found = await self._retrying("stat", url, model_id, info)
        if found.get("type") == "directory" and not directory_ok:
            raise _is_a_directory(path)
        return found

    async def _retrying(
        self, op: str, url: str, model_id: str, call: Callable[[], Awaitable[T]]
    ) -> T:
        """Await ``call()``; make it again after a backoff while it fails with a transient error.

        A missing file, our own errors and a first non-transient error are raised as they are;
        otherwise the last error is raised as a StoreError that counts the attempts.
        """
        attempt = 1
        while True:
            try:
                return await call()
            except Exception as exc:
                if isinstance(exc, ModelCacheError) or _is_missing(exc):
                    raise
                transient = _is_transient(exc)
                if not transient and attempt == 1:
                    raise
                if not transient or attempt > self._max_retries:
                    raise StoreError(
                        f"cannot {op} {url} for model {model_id!r} after {attempt} "
                        f"attempt{'s' if attempt > 1 else ''} (max_retries={self._max_retries}): "
                        f"{_describe(exc)}",
                        model_id=model_id,
                        path=url,
                    ) from exc
                delay = self._backoff(attempt)
                self._retries += 1
                logger.debug(
                    "store: retrying %s of %s for model %r in %.3f s (attempt %d failed: %r)",
                    op,
                    url,
                    model_id,
                    delay,
                    attempt,
                    exc,
                )
            await anyio.sleep(delay)  # outside `except`: nothing holds the error while we wait
            attempt += 1

    def _backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based): exponential, equal jitter."""
        ceiling = min(self._retry_max_delay, self._retry_base_delay * 2.0 ** (attempt - 1))
        return ceiling / 2 + _jitter.uniform(0, ceiling / 2)

    async def _run_chunks(self, size: int, read: Callable[[int, int], Awaitable[int]]) -> int:
        """Run ``read(lo, hi)`` over ``[0, size)`` in concurrent chunks; return the bytes read."""
        if size <= self._chunk:
            return await read(0, size)
        bounds = [(lo, min(lo + self._chunk, size)) for lo in range(0, size, self._chunk)]
        return sum(await gather([functools.partial(read, lo, hi) for lo, hi in bounds]))

    async def _read_local(
        self, path: str, url: str, model_id: str, offset: int, dest: memoryview
    ) -> int:
        limiter = self._get_limiter()
        opened: list[int] = []  # the worker puts the fd here, so a cancelled open still closes it
        try:
            file_size = await anyio.to_thread.run_sync(_open_regular, path, opened, limiter=limiter)
            if file_size < offset + len(dest):  # fail before moving any byte
                raise _truncated(url, model_id, offset, len(dest), max(0, file_size - offset))
            fd = opened[0]

            async def read(lo: int, hi: int) -> int:
                return await anyio.to_thread.run_sync(
                    _pread_full, fd, dest[lo:hi], offset + lo, limiter=limiter
                )

            return await self._run_chunks(len(dest), read)
        finally:
            for fd in opened:
                os.close(fd)

    async def _read_window(
        self, fs: Any, path: str, url: str, model_id: str, offset: int, dest: memoryview
    ) -> int:
        """Ranged reads of ``read_chunk_size`` into ``dest``, ``read_window`` at a time at most."""
        size, chunk = len(dest), self._chunk
        if size == 0:
            return 0
        reader = _range_reader(fs, path)
        limiter = self._get_limiter()
        starts = iter(range(0, size, chunk))  # shared: each chunk is taken by one worker
        got = 0

        async def fetch(lo: int) -> int:
            async with limiter:
                try:
                    return await reader(offset + lo, dest[lo : min(lo + chunk, size)])
                except Exception as exc:
                    if _http_status(exc) == 416:  # starts at or past the end of the file
                        return 0
                    raise

        async def worker() -> None:
            nonlocal got
            for lo in starts:
                n = await self._retrying("read", url, model_id, functools.partial(fetch, lo))
                got += n  # not `got += await ...`: that reads `got` before the await

        workers = min(self._window, -(-size // chunk))
        await gather([worker] * workers)
        return got
