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
  Each worker reads its own contiguous stripe of the range in order (`Store._run_stripes`), so the
  kernel's readahead follows it.
  At most ``max_concurrent_reads`` files are open for reads at once in a Store, however many
  reads are asked for: a read waits for a slot before it opens its file. With
  ``direct_reads=True``, a read of more than one chunk whose range is mostly not in the page
  cache switches its descriptor to O_DIRECT and reads straight into a destination congruent
  with the file, else through bounce buffers (``_direct.py``).
  ``is_cold`` answers the same question (mincore, one descriptor slot, no byte read) for a
  caller that overlaps other work with a read that will wait on the disk (``_torch.py``).
- A model's header costs one worker-thread call for a local file (``read_head``: open, fstat and
  read the first bytes together), and none for a ``memory://`` file, whose bytes are in this
  process: its size, its header and any read up to ``COPY_IN_THREAD`` bytes are copied on the
  event loop (fsspec's ``MemoryFileSystem.info`` scans every file it holds, which made each stat
  cost milliseconds with 10,000 models). A small local read opens and reads in one call too.
- ``read_scatter`` fills several views in order from one contiguous range of a file (a shard's
  data section cut into runs of different shifts): one open, or one request per chunk, for the
  whole run, whatever the number of views (``os.preadv`` takes up to IOV_MAX of them per call).
- Remote ``read_into`` is a sliding window of ranged reads: ``read_window`` workers each take the
  next ``read_chunk_size`` range in file order, so one call has at most ``read_window`` requests
  in flight and a new one starts as soon as any ends (no batch barrier). Each range is streamed
  straight into its slice of ``dest`` (``_ranged.py``). (For http the session also gets a
  1 MiB ``read_bufsize``.) A server that answers a ranged GET with the whole file (200) is
  remembered by host: its files are then read in one streamed request per ``read_into``, since a
  window of ranges would stream the file from its start once per chunk (``_ranged.py``).
- Remote ``read_range`` (headers, side files) streams too and stops at the range's end.
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
- Errors are translated at this boundary (``_faults.py``): a missing file -> ModelNotFoundError,
  any other Exception -> StoreError, naming the id and the path (and the attempts, after
  retries), with the cause chained; only a 404/410 means "not found". BaseException
  (cancellation) is never caught. Chunk tasks record their first error and cancel their siblings,
  so callers see one typed error, never an ExceptionGroup.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import io
import logging
import os
import random
import re
import stat
import urllib.parse
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
import fsspec
from fsspec.core import split_protocol
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from . import _direct
from ._aws import share_service_descriptions
from ._batch import SMALL_READ, SmallReads
from ._concurrency import gather
from ._exceptions import InvalidModelIdError, ModelCacheError, StoreError
from ._faults import describe, http_status, is_missing, is_transient, translated, truncated
from ._firstget import read_first, size_and_head
from ._ranged import COPY_IN_THREAD, RangeReader, is_http_class, range_reader
from ._sockets import SocketPool, socket_range_reader
from ._versions import VersionMismatch, changed, expected, local_tag, memory_tag, remote_tag, see

if TYPE_CHECKING:
    pass

__all__ = ["Store", "validate_model_id"]

logger = logging.getLogger("modelcache")

T = TypeVar("T")

_ID = re.compile(r"[A-Za-z0-9._\-+=@]+")
_ID_WITH_SLASH = re.compile(r"[A-Za-z0-9._\-+=@/]+")
_LOCAL_PROTOCOLS = frozenset(("file", "local"))  # LocalFileSystem.protocol
#: Local URLs of absolute POSIX paths, whose path `Store.local_path` cuts out directly.
_ABSOLUTE_LOCAL = ("file:///", "local:///")
_POSIX = os.sep == "/"
#: How model files are opened. ``O_NONBLOCK``: a FIFO in a model's place (no writer) opens at
#: once and reads empty, a short file, where a blocking open held its worker thread for good,
#: and close() with it (it waits for the cache's threads); regular files ignore the flag.
OPEN_FILE = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
# Keys of fsspec `info` dicts that carry a version tag or checksum (s3fs/http, gcsfs, ...).
_ETAG_KEYS = ("ETag", "etag", "md5Hash", "Content-MD5", "crc32c", "checksum")
_jitter = random.Random()
# Views one preadv call takes at most (the kernel's IOV_MAX).
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 16


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


def _is_a_directory(path: str) -> IsADirectoryError:
    return IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)


#: (store, opener): in this context, ``store`` opens local paths with ``opener`` instead of its
#: own. A ContextVar, like the version scope, so a caller (the side files' reads, which must
#: not follow a link out of the model's directory) keeps the Store's methods and subclasses.
_opener_override: ContextVar[tuple[Store, Callable[[str], int]] | None] = ContextVar(
    "modelcache_opener", default=None
)


@contextlib.contextmanager
def opening_with(store: Store, opener: Callable[[str], int]) -> Iterator[None]:
    """A scope in which ``store`` opens every local file it reads or stats with ``opener``
    (which may refuse a path by raising a `ModelCacheError`: it reaches the caller as is)."""
    token = _opener_override.set((store, opener))
    try:
        yield
    finally:
        _opener_override.reset(token)


def _open_plain(path: str) -> int:
    return os.open(path, OPEN_FILE)


def _stat_local(path: str, opener: Callable[[str], int]) -> os.stat_result:
    """``os.stat``, or the stat of what ``opener`` opens (it may refuse what stat follows)."""
    if opener is _open_plain:
        return os.stat(path)
    fd = opener(path)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def _open_regular(path: str, opened: list[int], opener: Callable[[str], int]) -> int:
    """Open ``path``, append the fd to ``opened`` (the caller closes it), return the file size."""
    fd = opener(path)
    opened.append(fd)
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise _is_a_directory(path)
    return st.st_size


class _Scatter:
    """Views filled in order as one run of bytes, and the slices of them that cover a range."""

    __slots__ = ("size", "starts", "views")

    def __init__(self, views: Sequence[memoryview]) -> None:
        self.views = [v for v in views if len(v)]
        self.starts: list[int] = []
        self.size = 0
        for v in self.views:
            self.starts.append(self.size)
            self.size += len(v)

    def slices(self, lo: int, hi: int) -> list[memoryview]:
        """The pieces of the views that hold bytes ``[lo, hi)`` of the run, in order."""
        out: list[memoryview] = []
        i = bisect_right(self.starts, lo) - 1
        while lo < hi:
            view, start = self.views[i], self.starts[i]
            end = min(len(view), hi - start)
            out.append(view[lo - start : end])
            lo = start + end
            i += 1
        return out


def _pread_full(fd: int, bufs: Sequence[memoryview], offset: int) -> int:
    """Fill ``bufs`` in order from ``fd`` at ``offset``; return the bytes read (fewer only at end
    of file).

    Linear in the number of views: a crafted header makes tens of thousands of them, and
    re-slicing the whole list after each call (as this once did) cost seconds of a worker thread
    holding the GIL for a 200 KB file.
    """
    pending = list(bufs)  # ours to shorten: a view a call filled in part is replaced by its rest
    filled = 0
    first = 0  # the first view not yet full
    while first < len(pending):
        n = os.preadv(fd, pending[first : first + _IOV_MAX], offset + filled)
        if n == 0:
            break
        filled += n
        while first < len(pending) and n >= len(pending[first]):
            n -= len(pending[first])
            first += 1
        if n:
            pending[first] = pending[first][n:]
    return filled


def _pread_run(fd: int, run: _Scatter, lo: int, hi: int, offset: int) -> int:
    """`_pread_full` of bytes ``[lo, hi)`` of ``run``; the views are cut here, in the worker
    thread (tens of thousands of them take the event loop tens of ms)."""
    return _pread_full(fd, run.slices(lo, hi), offset + lo)


def _pread_bytes(fd: int, start: int, end: int) -> bytes:
    parts: list[bytes] = []
    pos = start
    while pos < end:
        data = os.pread(fd, end - pos, pos)
        if not data:
            break
        parts.append(data)
        pos += len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _pread_range(
    path: str, start: int, end: int, opener: Callable[[str], int]
) -> tuple[bytes, str, str]:
    """Bytes ``[start, end)`` and the file's version tag before and after reading them."""
    fd = opener(path)
    try:
        before = local_tag(os.fstat(fd))
        data = _pread_bytes(fd, start, end)
        return data, before, local_tag(os.fstat(fd))
    finally:
        os.close(fd)


def _read_head_local(
    path: str, limit: int, opener: Callable[[str], int]
) -> tuple[int, bytes, str, str]:
    """The file's size, its first ``min(size, limit)`` bytes, and its version tag before and
    after reading them, from one open."""
    fd = opener(path)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise _is_a_directory(path)
        data = _pread_bytes(fd, 0, min(st.st_size, limit))
        return st.st_size, data, local_tag(st), local_tag(os.fstat(fd))
    finally:
        os.close(fd)


def _read_heads_local(
    paths: Sequence[str | None], limit: int, opener: Callable[[str], int]
) -> list[tuple[int, bytes, str, str] | None]:
    """`_read_head_local` of each path, None for one that is None or fails (`Store.read_heads`)."""
    heads: list[tuple[int, bytes, str, str] | None] = []
    for path in paths:
        try:
            heads.append(None if path is None else _read_head_local(path, limit, opener))
        except Exception:
            heads.append(None)
    return heads


def _open_and_read(
    path: str, opened: list[int], opener: Callable[[str], int], offset: int, run: _Scatter
) -> tuple[int, int, str, str]:
    """Open ``path`` (the fd goes in ``opened``) and fill all of ``run`` from ``offset``, in one
    worker-thread call: (file size, bytes read, version tag at open, after the read); nothing
    is read from a file too short."""
    size = _open_regular(path, opened, opener)
    before = local_tag(os.fstat(opened[0]))
    if size < offset + run.size:
        return size, 0, before, before
    got = _pread_full(opened[0], run.views, offset)
    return size, got, before, local_tag(os.fstat(opened[0]))


def _list_local(root: str) -> list[str]:
    names: list[str] = []
    for directory, _dirs, files in os.walk(root):
        for file in files:
            path = os.path.join(directory, file)
            names.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return names


def _memory_file(fs: Any, path: str) -> io.BytesIO | None:
    """The in-process file of a ``memory://`` filesystem at ``path``, or None (not one, or not
    a file there: the filesystem's own calls then answer, with its errors)."""
    if isinstance(fs, MemoryFileSystem):
        found = fs.store.get(path)
        if isinstance(found, io.BytesIO) and path not in fs.pseudo_dirs:
            return found
    return None


def _memory_size(file: io.BytesIO) -> int:
    with file.getbuffer() as buf:
        return buf.nbytes


def _memory_range(file: io.BytesIO, start: int, end: int) -> bytes:
    with file.getbuffer() as buf, buf[start:end] as part:
        return bytes(part)


def _copy_from_buffer(file: io.BytesIO, offset: int, dests: list[memoryview]) -> int:
    """Fill ``dests`` in order from ``file``'s buffer at ``offset``; the bytes copied (fewer at
    its end). Never seeks: a memory:// file is one BytesIO shared by every opener."""
    filled = 0
    with file.getbuffer() as buf:
        for dest in dests:
            with buf[offset + filled : offset + filled + len(dest)] as src:
                dest[: len(src)] = src
                filled += len(src)
                if len(src) < len(dest):
                    break
    return filled


def _sync_read_into(fs: Any, path: str, offset: int, dests: list[memoryview]) -> int:
    """Read into ``dests`` in order from a sync fsspec file; return bytes read (fewer at EOF)."""
    filled = 0
    with fs.open(path, "rb") as f:
        if isinstance(f, io.BytesIO):  # shared by every opener (memory://): copy at an offset
            return _copy_from_buffer(f, offset, dests)
        f.seek(offset)
        for dest in dests:
            done = 0
            while done < len(dest):
                n = f.readinto(dest[done:])
                if not n:
                    return filled + done
                done += n
            filled += done
        return filled


class Store:
    """Maps model ids to URLs and reads byte ranges from there, translating errors.

    ``max_concurrent_reads`` bounds the reads in flight in the whole Store (worker threads and
    remote requests together); ``read_chunk_size`` is the size of each read of ``read_into``;
    ``read_window`` bounds the remote requests one ``read_into`` call keeps in flight (a sliding
    window). A remote request failing with a transient error is made again up to ``max_retries``
    times, after ``retry_base_delay * 2**n`` seconds (capped at ``retry_max_delay``, jittered).
    ``direct_reads=True`` (opt-in) reads a local range of more than one chunk that is mostly not
    in the page cache with O_DIRECT (`_direct`): no page-cache pages are allocated for it, and so
    none are left for a later read of the same file, which reads the disk again. Into a CPU
    model's host buffer (which the torch backend starts congruent with the file: `direct_lead`)
    the disk's DMA lands straight in it, the fastest and steadiest cold read measured here
    (`_direct`); off by default for that page-cache cost.
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
        opener: Callable[[str], int] | None = None,
        direct_reads: bool = False,
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
        #: Opens a local path for reading (the disk tier's never follows a link in an entry).
        self._opener = opener if opener is not None else _open_plain
        #: Read local ranges mostly not in the page cache with O_DIRECT (`_direct`).
        self._direct_reads = direct_reads
        self._filesystems: dict[str, Any] = {}
        self._limiter: anyio.CapacityLimiter | None = None  # made in the loop, on first read
        self._open_files: anyio.Semaphore | None = None  # likewise: local files open for reads
        #: Small local reads and stats, batched into shared worker-thread calls (`_batch`).
        self._small = SmallReads(self._get_limiter)
        #: Hosts that answered a ranged GET with the whole file (see the module notes).
        self._whole_body_hosts: set[str] = set()
        #: Keep-alive connections of the http(s) and s3 weight reads (`_sockets`).
        self._sockets = SocketPool()
        self._bytes_read = 0
        self._retries = 0
        #: A subclass that intercepts size or read_range (a wrapper, a test's gate) sees them
        #: called by `read_head` rather than bypassed.
        cls = type(self)
        self._compose_head = cls.size is not Store.size or cls.read_range is not Store.read_range

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
        if _POSIX and url.startswith(_ABSOLUTE_LOCAL) and "://" not in url[8:]:
            # A load asks this of its URLs several times: the result fsspec gives (a POSIX
            # path absolute already is left as it is), without its general parsing.
            return url[url.index("//") + 2 :].rstrip("/") or "/"
        protocol, _ = split_protocol(url)
        if protocol is None or protocol in _LOCAL_PROTOCOLS:
            path: str = LocalFileSystem._strip_protocol(url)
            return path
        return None

    def direct_lead(self, url: str, offset: int, dst: int) -> int | None:
        """Where a buffer filled from file byte ``offset`` at its byte ``dst`` should start in a
        page-aligned mapping: the lead (`_direct.aligned_lead`, under 4 KiB) that lets this
        Store's direct reads of the local file at ``url`` land straight in it (no bounce copy);
        None where it reads the file buffered, or it is no local file."""
        if not self._direct_reads or self.local_path(url) is None:
            return None
        return _direct.aligned_lead(offset, dst)

    def batches_headers(self, url: str) -> bool:
        """Whether the headers of a model at ``url`` are read as small local reads batched into
        shared worker-thread calls (`_batch`): a local file, read by this class's own methods."""
        return not self._compose_head and self.local_path(url) is not None

    async def is_cold(self, url: str, offset: int, length: int, *, model_id: str) -> bool:
        """Whether bytes ``[offset, offset + length)`` of the local file at ``url`` are mostly
        not in the page cache (``mincore``; nothing is read): a read of them will wait on the
        disk. False for other files, and where it cannot be told. It holds a descriptor slot
        (``max_concurrent_reads``) while its file is open."""
        path = self.local_path(url)
        if path is None or length <= 0:
            return False
        with translated("stat", url, model_id):
            async with self._get_open_files():
                return await anyio.to_thread.run_sync(
                    _direct.is_cold,
                    self._local_opener(),
                    path,
                    offset,
                    length,
                    limiter=self._get_limiter(),
                )

    async def size(self, url: str, *, model_id: str) -> int:
        """Return the size in bytes of the file at ``url``."""
        with translated("stat", url, model_id):
            path = self.local_path(url)
            if path is not None:
                st = await self._small.run(_stat_local, path, self._local_opener())
                if stat.S_ISDIR(st.st_mode):
                    raise _is_a_directory(path)
                see(url, local_tag(st), model_id)
                return st.st_size
            fs, fspath = await self._remote(url)
            file = _memory_file(fs, fspath)
            if file is not None:
                see(url, memory_tag(file), model_id)
                return _memory_size(file)
            info = await self._remote_info(url, model_id)
            see(url, remote_tag(info), model_id)
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
        with translated("stat", url, model_id):
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

    async def file_tag(self, url: str, *, model_id: str) -> str | None:
        """What identifies the content of the file at ``url`` now (`_versions`): one stat or
        HEAD; None where the store says nothing that does. Records nothing."""
        with translated("stat", url, model_id):
            path = self.local_path(url)
            if path is not None:
                st = await self._small.run(_stat_local, path, self._local_opener())
                return local_tag(st)
            fs, fspath = await self._remote(url)
            file = _memory_file(fs, fspath)
            if file is not None:
                return memory_tag(file)
            return remote_tag(await self._remote_info(url, model_id))

    async def list_files(self, url: str, *, model_id: str) -> list[str]:
        """Names of the files under the directory ``url``, relative to it, ``/``-separated (for
        side-file globs; links to directories are not followed)."""
        with translated("list", url, model_id):
            path = self.local_path(url)
            if path is not None:
                return await anyio.to_thread.run_sync(
                    _list_local, path, limiter=self._get_limiter()
                )
            fs, fspath = await self._remote(url)

            async def find() -> list[str]:
                if fs.async_impl:
                    found: list[str] = await fs._find(fspath)
                    return found
                return await anyio.to_thread.run_sync(fs.find, fspath, limiter=self._get_limiter())

            root = fspath.rstrip("/") + "/"
            found = await self._retrying("list", url, model_id, find)
            return [name[len(root) :] for name in found if name.startswith(root)]

    async def read_range(self, url: str, start: int, end: int, *, model_id: str) -> bytes:
        """Return bytes ``[start, end)`` of the file; fewer only if the file ends before ``end``."""
        if not 0 <= start <= end:
            raise ValueError(f"invalid byte range [{start}, {end})")
        limiter = self._get_limiter()
        with translated("read", url, model_id):
            path = self.local_path(url)
            if path is not None:
                if end - start <= SMALL_READ:  # a header's rest, a side file: batched
                    read = self._small.run(_pread_range, path, start, end, self._local_opener())
                else:
                    read = anyio.to_thread.run_sync(
                        _pread_range, path, start, end, self._local_opener(), limiter=limiter
                    )
                data, before, after = await read
                see(url, before, model_id)
                see(url, after, model_id)
            else:
                fs, fspath = await self._remote(url)
                file = _memory_file(fs, fspath) if end - start <= COPY_IN_THREAD else None
                if file is not None:
                    see(url, memory_tag(file), model_id)
                    data = _memory_range(file, start, end)
                    self._bytes_read += len(data)
                    return data
                reader = self._range_reader(fs, fspath, url, model_id)

                async def cat() -> bytes:
                    try:
                        if fs.async_impl:  # streamed: stops at the range's end, whatever is sent
                            buf = bytearray(end - start)
                            async with limiter:
                                n = await reader(start, [memoryview(buf)])
                            del buf[n:]
                            if n >= COPY_IN_THREAD:  # a copy that would hold the loop
                                return await anyio.to_thread.run_sync(bytes, buf)
                            return bytes(buf)
                        read = functools.partial(fs.cat_file, fspath, start=start, end=end)
                        return await anyio.to_thread.run_sync(read, limiter=limiter)
                    except Exception as exc:
                        if http_status(exc) == 416:  # starts at or past the end of the file
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

    async def read_head(self, url: str, limit: int, *, model_id: str) -> tuple[int, bytes]:
        """The size of the file at ``url`` and its first ``min(size, limit)`` bytes: what `size`
        and then `read_range` from 0 return, in one worker-thread call for a local file, none
        for a ``memory://`` one and one ranged GET over http(s) and s3 (`_firstget`). A subclass
        that overrides `size` or `read_range` gets them called, as before this method existed."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        if not self._compose_head:
            path = self.local_path(url)
            with translated("read", url, model_id):
                if path is not None:
                    if limit <= SMALL_READ:  # the usual header read: batched (`_batch`)
                        head = self._small.run(_read_head_local, path, limit, self._local_opener())
                    else:
                        head = anyio.to_thread.run_sync(
                            _read_head_local,
                            path,
                            limit,
                            self._local_opener(),
                            limiter=self._get_limiter(),
                        )
                    size, data, before, after = await head
                    see(url, before, model_id)
                    see(url, after, model_id)
                    self._bytes_read += len(data)
                    return size, data
                fs, fspath = await self._remote(url)
                file = _memory_file(fs, fspath)
                if file is not None and limit <= COPY_IN_THREAD:
                    see(url, memory_tag(file), model_id)
                    size = _memory_size(file)
                    data = _memory_range(file, 0, min(size, limit))
                    self._bytes_read += len(data)
                    return size, data
                # http(s), s3: size, tag and bytes from one ranged GET, not a HEAD and a GET.
                first = await read_first(self, fs, fspath, url, limit, model_id=model_id)
                if first is not None and first.data is not None:
                    return first.size, first.data
                if first is None and fs.async_impl:  # gcsfs, adlfs, ...: both at once
                    return await size_and_head(self, url, limit, model_id=model_id)
        size = await self.size(url, model_id=model_id)
        return size, await self.read_range(url, 0, min(size, limit), model_id=model_id)

    # -- issue 16: a device prefetch's headers, many in one worker-thread call (`_prefill`) ------
    async def read_heads(
        self, urls: Sequence[str], limit: int
    ) -> list[tuple[int, bytes, str, str] | None]:
        """For each local file of ``urls`` (`batches_headers`), what `read_head` reads of it:
        its size, its first ``min(size, limit)`` bytes, and its version tag before and after
        reading them; all in ONE small read (`_batch`). None for a file that is not local or
        fails: its load reads it again as usual, raising what it raises. Records no version."""
        if not 0 <= limit <= SMALL_READ:
            raise ValueError(f"limit must be within [0, {SMALL_READ}], got {limit}")
        paths = [None if self._compose_head else self.local_path(url) for url in urls]
        heads = await self._small.run(_read_heads_local, paths, limit, self._local_opener())
        self._bytes_read += sum(len(head[1]) for head in heads if head is not None)
        return heads

    async def read_into(self, url: str, offset: int, dest: memoryview, *, model_id: str) -> None:
        """Fill all of ``dest`` with the file's bytes from ``offset``; StoreError if it is short."""
        await self.read_scatter(url, offset, [dest], model_id=model_id)

    async def read_scatter(
        self, url: str, offset: int, dests: Sequence[memoryview], *, model_id: str
    ) -> None:
        """Fill ``dests`` in order with the file's bytes from ``offset`` (one contiguous range);
        StoreError if the file is short. One open or one window of requests for all of them."""
        for dest in dests:
            if not (
                isinstance(dest, memoryview)
                and not dest.readonly
                and dest.c_contiguous
                and dest.ndim == 1
                and dest.format == "B"
            ):
                raise ValueError(
                    "dest must be a writable, C-contiguous, 1-D unsigned-byte memoryview"
                )
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        run = _Scatter(dests)
        with translated("read", url, model_id):
            path = self.local_path(url)
            if path is not None:
                got = await self._read_local(path, url, model_id, offset, run)
            else:
                fs, fspath = await self._remote(url)
                file = _memory_file(fs, fspath) if run.size <= COPY_IN_THREAD else None
                if file is not None:
                    see(url, memory_tag(file), model_id)
                    got = _copy_from_buffer(file, offset, run.views)
                elif fs.async_impl:
                    got = await self._read_window(fs, fspath, url, model_id, offset, run)
                else:
                    read = functools.partial(
                        anyio.to_thread.run_sync,
                        _sync_read_into,
                        fs,
                        fspath,
                        offset,
                        run.views,
                        limiter=self._get_limiter(),
                    )
                    got = await self._retrying("read", url, model_id, read)
            self._bytes_read += got
            if got < run.size:
                raise truncated(url, model_id, offset, run.size, got)

    async def aclose(self) -> None:
        """Close the sessions of async filesystems (they are made again if the Store is reused)."""
        self._sockets.close()
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

    def _local_opener(self) -> Callable[[str], int]:
        override = _opener_override.get()
        return override[1] if override is not None and override[0] is self else self._opener

    def _get_limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._max_reads)
        return self._limiter

    def _get_open_files(self) -> anyio.Semaphore:
        if self._open_files is None:
            self._open_files = anyio.Semaphore(self._max_reads)
        return self._open_files

    def _range_reader(self, fs: Any, path: str, url: str, model_id: str) -> RangeReader:
        """Ranged reads of ``url``, pinned to the version this load has seen of it (If-Match for
        a strong ETag; the response's ETag checked for a weak one: see `range_reader`)."""
        host = _host(url)
        pin = expected(url)
        read = range_reader(
            fs, path, on_whole_body=lambda: self._whole_body_hosts.add(host), if_match=pin
        )
        if host not in self._whole_body_hosts:  # such a host's every answer is a fallback
            read = socket_range_reader(self._sockets, fs, path, if_match=pin, fallback=read) or read

        async def pinned(start: int, dests: Sequence[memoryview]) -> int:
            try:
                return await read(start, dests)
            except VersionMismatch as exc:
                raise changed(url, model_id, exc) from exc

        return pinned

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
            elif is_http_class(cls) and "get_client" not in options:
                # aiohttp pauses a connection whenever 128 KiB wait unread (the default
                # read_bufsize is 64 KiB): a pause and a resume per 256 KiB received. 1 MiB lets
                # a window of 16 MiB responses stream without that (benches/README.md).
                client = {"read_bufsize": 1 << 20, **(options.get("client_kwargs") or {})}
                options["client_kwargs"] = client
            if getattr(cls, "async_impl", False):
                fs = cls(asynchronous=True, **options)
            else:  # a sync constructor may connect (sftp...): not on the event loop
                make = functools.partial(cls, **options)
                fs = await anyio.to_thread.run_sync(make, limiter=self._get_limiter())
            if is_s3fs:
                fs.retries = 1  # a class attribute of s3fs, not a constructor argument
                share_service_descriptions(fs)  # a fresh client in ms, not 100s of ms (_aws.py)
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
                if isinstance(exc, ModelCacheError) or is_missing(exc):
                    raise
                transient = is_transient(exc)
                if not transient and attempt == 1:
                    raise
                if not transient or attempt > self._max_retries:
                    raise StoreError(
                        f"cannot {op} {url} for model {model_id!r} after {attempt} "
                        f"attempt{'s' if attempt > 1 else ''} (max_retries={self._max_retries}): "
                        f"{describe(exc)}",
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

    async def _run_stripes(
        self, size: int, read: Callable[[int, int], Awaitable[int]], skew: int = 0
    ) -> int:
        """Run ``read(lo, hi)`` over ``[0, size)`` in chunks, by at most ``max_concurrent_reads``
        workers that each read one contiguous stripe of chunks in file order; return the bytes
        read. The first chunk is ``skew`` bytes longer, so the others start at ``skew`` plus a
        multiple of the chunk size (direct reads: at aligned file offsets, see below).

        Why stripes, not chunks handed out in order (as reads were before): a cold local file is read
        through the kernel's readahead, which grows its window only along a sequential stream.
        Eight readers each taking the next 16 MiB chunk start a fresh stream at every chunk;
        eight readers each walking their own eighth of the file are eight streams it follows.
        Measured (1 GiB, cold, load 7-16, benches/README.md): 16 MiB x 8 in order 860-1,063 ms
        best, in stripes 750-830 ms. A chunk is still one worker-thread call, so a cancelled
        load stops within a chunk per worker.
        """
        if size <= self._chunk + skew:
            return await read(0, size)
        cuts = [0, *range(skew + self._chunk, size, self._chunk), size]
        chunks = len(cuts) - 1
        workers = min(self._max_reads, chunks)

        async def stripe(first: int, last: int) -> int:
            got = 0
            for index in range(first, last):
                lo, hi = cuts[index], cuts[index + 1]
                n = await read(lo, hi)
                got += n
                if n < hi - lo:  # end of file: the caller reports the short read
                    break
            return got

        bounds = [(w * chunks // workers, (w + 1) * chunks // workers) for w in range(workers)]
        return sum(await gather([functools.partial(stripe, a, b) for a, b in bounds]))

    async def _read_local(
        self, path: str, url: str, model_id: str, offset: int, run: _Scatter
    ) -> int:
        limiter = self._get_limiter()
        opened: list[int] = []  # the worker puts the fd here, so a cancelled open still closes it
        # A slot before the open: however many reads are asked for at once, this Store holds at
        # most max_concurrent_reads descriptors (it once ran a process out of them).
        async with self._get_open_files():
            try:
                if run.size <= self._chunk:  # one chunk: open and read in the same call
                    file_size, got, before, after = await anyio.to_thread.run_sync(
                        _open_and_read,
                        path,
                        opened,
                        self._local_opener(),
                        offset,
                        run,
                        limiter=limiter,
                    )
                    see(url, before, model_id)
                    if file_size < offset + run.size:  # nothing was read
                        raise truncated(url, model_id, offset, run.size, max(0, file_size - offset))
                    see(url, after, model_id)
                    return got
                # A range mostly not in the page cache is read with O_DIRECT (`_direct`).
                file_size, direct = await anyio.to_thread.run_sync(
                    _direct.open_run,
                    _open_regular,
                    path,
                    opened,
                    self._local_opener(),
                    offset,
                    run.size,
                    self._direct_reads,
                    limiter=limiter,
                )
                see(url, local_tag(os.fstat(opened[0])), model_id)
                if file_size < offset + run.size:  # fail before moving any byte
                    raise truncated(url, model_id, offset, run.size, max(0, file_size - offset))
                fd = opened[0]
                pread = _direct.pread_run_direct if direct else _pread_run

                async def read(lo: int, hi: int) -> int:
                    return await anyio.to_thread.run_sync(
                        pread, fd, run, lo, hi, offset, limiter=limiter
                    )

                # Direct reads: chunks that start at aligned file offsets, so a congruent
                # destination's chunks are read straight in whole; only the run's first and
                # last partial blocks go through a bounce buffer. Cut where the file's offsets
                # fell (a partial block at each end of every chunk), the small reads of those
                # blocks queued behind the chunks' large ones at the disk: ~25 ms each, two a
                # chunk, in each worker's turn (1 GiB: 750 ms against 600 aligned).
                skew = (-offset) % _direct.ALIGN if direct else 0
                got = await self._run_stripes(run.size, read, skew)
                see(url, local_tag(os.fstat(fd)), model_id)  # not written to while we read
                return got
            finally:
                for fd in opened:
                    os.close(fd)

    async def _read_window(
        self, fs: Any, path: str, url: str, model_id: str, offset: int, run: _Scatter
    ) -> int:
        """Ranged reads of ``read_chunk_size`` into ``run``, ``read_window`` at a time at most;
        one read of it all from a host known to ignore ranges.

        The ranges are cut at multiples of ``read_chunk_size`` in the file, not in the run (a
        model's data starts after its header): an object store keeps a large object in parts
        of a few MiB, and a range across two parts costs the server both. Measured on the local
        SeaweedFS (16 MiB parts, 1 GiB): 1.4-1.6 s of server CPU aligned, 1.6-2.0 s shifted by
        8 KiB; one more request (the run's first, up to the first multiple) per file."""
        size = run.size
        if size == 0:
            return 0
        chunk = size if _host(url) in self._whole_body_hosts else self._chunk
        reader = self._range_reader(fs, path, url, model_id)
        limiter = self._get_limiter()
        head = -offset % chunk or chunk  # the run's first range ends at a multiple in the file
        bounds = [0, *range(head, size, chunk)] if chunk < size else [0]
        starts = iter(bounds)  # shared: each range is taken by one worker
        got = 0

        async def fetch(lo: int, hi: int) -> int:
            async with limiter:
                try:
                    return await reader(offset + lo, run.slices(lo, hi))
                except Exception as exc:
                    if http_status(exc) == 416:  # starts at or past the end of the file
                        return 0
                    raise

        async def worker() -> None:
            nonlocal got
            for lo in starts:
                hi = min(lo + chunk - (offset + lo) % chunk, size) if chunk < size else size
                if chunk < size and _host(url) in self._whole_body_hosts:
                    # The host was found ignoring Range during this read: every further chunk
                    # would stream the file from its start again (O(size^2 / chunk) bytes). The
                    # rest goes in this one request; the other workers find no chunk left.
                    hi = size
                    for _ in starts:
                        pass
                read = functools.partial(fetch, lo, hi)
                n = await self._retrying("read", url, model_id, read)
                got += n  # not `got += await ...`: that reads `got` before the await

        workers = min(self._window, len(bounds))
        await gather([worker] * workers)
        return got


def _host(url: str) -> str:
    """The host part of a remote URL (what a server's Range support is remembered by)."""
    return urllib.parse.urlsplit(url).netloc
