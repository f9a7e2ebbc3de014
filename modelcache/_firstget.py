"""A remote file's size, version tag and first bytes from one ranged GET.

A header read or a side file (config.json, an index) used to cost two requests on http(s) and
s3: a HEAD (fsspec ``info``) for the size and the ETag, then a ranged GET of the bytes. On an
object store each is a 10-50 ms first-byte latency, so half the wait of a small load's metadata
was the HEAD. One ranged GET from byte 0 says all three:

- the size: the total of a 206's ``Content-Range`` (``bytes 0-N/TOTAL``), or the
  ``Content-Length`` of a 200 (a server that ignores ``Range``: the body is then read only up to
  the limit and the connection closed, as `_ranged` does, and the host is remembered as one);
- the version tag: what `remote_tag` makes of fsspec's ``info`` of the same headers (ETag first),
  so the tag recorded here equals the one a later HEAD (`Store.file_tag`, the revalidation)
  records for the same object;
- the first ``limit`` bytes, streamed into a buffer of ``min(size, limit)``. With ``max_size``
  (a side file) a total above it is reported before any of the body is read: the response is
  closed unread, a huge file is never downloaded.

A 416 to ``bytes=0-...`` means the file is empty (size 0, no tag: the store names none). A 404
is a FileNotFoundError, as fsspec raises it, which the Store turns into ModelNotFoundError.
Pinning is as `_ranged`'s: with ``if_match`` a 412, or another ETag in the response, raises
`VersionMismatch`.

Only the plain fsspec HTTPFileSystem and s3fs's S3FileSystem take this path (`first_get` returns
None for any other filesystem, or an answer without a total, and the caller falls back to size
then read_range; on another async filesystem both at once, `size_and_head`). The Store owns the retries, the limiter and the version scope around it.
"""

from __future__ import annotations

import errno
import re
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._concurrency import gather
from ._faults import http_status, translated
from ._ranged import (
    ShortBody,
    _check_complete,
    _check_etag,
    _drain,
    _is_plain,
    _precondition_failed,
)
from ._versions import VersionMismatch, changed, expected, if_match, remote_tag, see

if TYPE_CHECKING:
    from ._store import Store

__all__ = [
    "FirstBytes",
    "first_get",
    "read_first",
    "read_small_file",
    "size_and_head",
    "supports_first_get",
]

# ``bytes 0-N/TOTAL`` of a 206, ``bytes */TOTAL`` of a 416.
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_UNSATISFIED = re.compile(r"bytes \*/(\d+)")
#: fsspec's http ``info`` keeps these response headers; `remote_tag` picks from them.
_HTTP_TAG_HEADERS = ("ETag", "Content-MD5", "Digest", "Last-Modified")


@dataclass(frozen=True, slots=True)
class FirstBytes:
    """What one GET from byte 0 said: the file's size, its version tag (None: the store names
    none) and its first ``min(size, limit)`` bytes (None: over ``max_size``, left unread)."""

    size: int
    tag: str | None
    data: bytes | None


def supports_first_get(fs: Any) -> bool:
    """Whether `first_get` reads from ``fs`` (plain fsspec http(s), s3fs)."""
    return _is_plain(fs, "fsspec.implementations.http", "HTTPFileSystem") or _is_plain(
        fs, "s3fs.core", "S3FileSystem"
    )


async def first_get(
    fs: Any,
    path: str,
    limit: int,
    *,
    max_size: int | None = None,
    if_match: str | None = None,
    on_whole_body: Callable[[], None] | None = None,
) -> FirstBytes | None:
    """One GET of ``bytes=0-(limit-1)`` of ``path``; None when ``fs`` is not one this reads (see
    the module notes) or the answer gives no total (the caller then asks the size)."""
    if limit < 1:  # no range asks for nothing
        return None
    if _is_plain(fs, "fsspec.implementations.http", "HTTPFileSystem"):
        return await _http_first(fs, path, limit, max_size, if_match, on_whole_body)
    if _is_plain(fs, "s3fs.core", "S3FileSystem"):
        return await _s3_first(fs, path, limit, max_size, if_match)
    return None


def _wanted(size: int, limit: int, max_size: int | None) -> int | None:
    """Bytes of the body to read: ``min(size, limit)``, or None when ``size`` is over max."""
    if max_size is not None and size > max_size:
        return None
    return min(size, limit)


async def _http_first(
    fs: Any,
    url: str,
    limit: int,
    max_size: int | None,
    if_match: str | None,
    on_whole_body: Callable[[], None] | None,
) -> FirstBytes | None:
    kwargs = dict(fs.kwargs)
    headers = dict(kwargs.pop("headers", None) or {})
    headers["Range"] = f"bytes=0-{limit - 1}"
    # As fsspec's HEAD asks: a compressed body's length is not the file's size.
    headers["Accept-Encoding"] = "identity"
    if if_match is not None:
        headers["If-Match"] = if_match
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), headers=headers, **kwargs) as response:
        if response.status == 412:
            raise VersionMismatch(errno.ESTALE, f"the store has another version than {if_match}")
        sent = response.headers
        if response.status == 416:  # bytes=0-... is unsatisfiable only for an empty file
            match = _UNSATISFIED.match(sent.get("Content-Range", ""))
            if match is not None and int(match[1]) != 0:
                raise OSError(errno.EIO, f"416 for bytes=0-{limit - 1} of a {match[1]}-byte file")
            return FirstBytes(0, None, b"")
        fs._raise_not_found_for_status(response, url)
        _check_etag(if_match, sent.get("ETag"))
        if sent.get("Content-Encoding", "identity") not in ("identity", ""):
            return None  # a length of the encoded body: not the file's size
        if response.status == 206:
            match = _CONTENT_RANGE.match(sent.get("Content-Range", ""))
            if match is None:
                return None  # no total (``bytes 0-N/*``): the size is asked for
            if int(match[1]) != 0 or (response.content_length or 0) > limit:
                raise OSError(
                    errno.EIO,
                    f"asked for bytes=0-{limit - 1}, the server sent {response.content_length} "
                    f"bytes of {sent.get('Content-Range')!r}",
                )
            size = int(match[3])
            if sent.get("Content-MD5") and not sent.get("ETag"):
                return None  # the part's MD5, not the file's that a HEAD names it by
        elif response.status == 200 and response.content_length is not None:
            size = response.content_length  # the whole file: the server ignored Range
            if on_whole_body is not None:
                on_whole_body()
        else:
            return None  # a 200 of unknown length, another 2xx or 3xx: today's path
        info: dict[str, Any] = {h: sent[h] for h in _HTTP_TAG_HEADERS if sent.get(h)}
        info["size"] = size
        tag = remote_tag(info)
        want = _wanted(size, limit, max_size)
        if want is None:
            return FirstBytes(size, tag, None)  # leaving unread closes the connection
        buf = bytearray(want)
        filled = await _drain(response.content, [memoryview(buf)], 0)
        if response.status == 206:
            _check_complete(sent.get("Content-Range"), 0, want, filled)
        if filled < want:
            raise ShortBody(f"the body ended after {filled} of the {want} bytes from 0")
        return FirstBytes(size, tag, bytes(buf))


async def _s3_first(
    fs: Any, path: str, limit: int, max_size: int | None, if_match: str | None
) -> FirstBytes | None:
    bucket, key, version = fs.split_path(path)
    extra = {"VersionId": version} if version else {}
    if if_match is not None:
        extra["IfMatch"] = if_match
    try:
        response = await fs._call_s3(
            "get_object", Bucket=bucket, Key=key, Range=f"bytes=0-{limit - 1}", **extra
        )
    except Exception as exc:
        if if_match is not None and _precondition_failed(exc):
            raise VersionMismatch(
                errno.ESTALE, f"the store has another version than {if_match}"
            ) from exc
        if http_status(exc) == 416:  # bytes=0-... is unsatisfiable only for an empty object
            return FirstBytes(0, None, b"")
        raise
    body = response["Body"]
    try:
        _check_etag(if_match, response.get("ETag"))
        content_range = response.get("ContentRange")
        match = _CONTENT_RANGE.match(content_range) if isinstance(content_range, str) else None
        if match is not None:
            size = int(match[3])
        elif content_range is None and isinstance(response.get("ContentLength"), int):
            size = response["ContentLength"]  # a 200: the whole object
        else:
            return None
        # The keys s3fs's ``info`` (head_object) gives, so the tag is the same as its.
        tag = remote_tag(
            {
                "ETag": response.get("ETag", ""),
                "LastModified": response.get("LastModified", ""),
                "size": size,
                "VersionId": response.get("VersionId"),
            }
        )
        want = _wanted(size, limit, max_size)
        if want is None:
            return FirstBytes(size, tag, None)
        buf = bytearray(want)
        filled = await _read_body(body, memoryview(buf))
        _check_complete(content_range, 0, want, filled)
        if filled < want:
            raise ShortBody(f"the body ended after {filled} of the {want} bytes from 0")
        return FirstBytes(size, tag, bytes(buf))
    finally:
        body.close()


async def _read_body(body: Any, dest: memoryview) -> int:
    """Stream an aiobotocore body into ``dest`` (as `_ranged._s3_read`); the bytes read."""
    aiohttp = sys.modules.get("aiohttp")
    content = getattr(getattr(body, "raw_stream", None), "content", None)
    if aiohttp is not None and isinstance(content, aiohttp.StreamReader):
        return await _drain(content, [dest], 0)
    done = 0  # another HTTP backend (httpx): its readinto copies once too
    while done < len(dest):
        n: int = await body.readinto(dest[done:])
        if not n:
            break
        done += n
    return done


async def read_first(
    store: Store,
    fs: Any,
    fspath: str,
    url: str,
    limit: int,
    *,
    model_id: str,
    max_size: int | None = None,
) -> FirstBytes | None:
    """`first_get` as the Store makes a read: retried, under its limiter, pinned to the tag this
    load has seen of ``url`` (If-Match; a change is ModelChangedError) and recording the tag it
    finds (`see`), so later reads of the load are pinned to this very response's version."""
    if not supports_first_get(fs):
        return None
    pin = if_match(expected(url))
    host = urllib.parse.urlsplit(url).netloc
    limiter = store._get_limiter()

    def whole_body() -> None:
        store._whole_body_hosts.add(host)  # its files are read in one request each from now

    async def get() -> FirstBytes | None:
        async with limiter:
            try:
                return await first_get(
                    fs, fspath, limit, max_size=max_size, if_match=pin, on_whole_body=whole_body
                )
            except VersionMismatch as exc:
                raise changed(url, model_id, exc) from exc

    first = await store._retrying("read", url, model_id, get)
    if first is not None:
        see(url, first.tag, model_id)
        if first.data is not None:
            store._bytes_read += len(first.data)
    return first


async def read_small_file(
    store: Store, url: str, max_size: int, *, model_id: str
) -> tuple[int, bytes | None]:
    """The size of the file at ``url`` (a side file: a config, an index) and its bytes, None
    when it is over ``max_size`` bytes (never read then: the caller refuses it). One GET on
    http(s) and s3 (`first_get`), else `Store.size` then `Store.read_range`: a Store subclass
    that overrides them gets them called. A missing file is ModelNotFoundError."""
    first = None
    if not store._compose_head and store.local_path(url) is None:
        with translated("read", url, model_id):
            fs, fspath = await store._remote(url)
            if supports_first_get(fs):
                # One byte past the limit: a total over it is refused from the headers alone.
                first = await read_first(
                    store, fs, fspath, url, max_size + 1, model_id=model_id, max_size=max_size
                )
            elif fs.async_impl:
                limit = min(max_size + 1, _GUESS)
                size, data = await size_and_head(store, url, limit, model_id=model_id)
                if size > max_size:
                    return size, None
                if len(data) < size:  # larger than the guess: the rest
                    data += await store.read_range(url, len(data), size, model_id=model_id)
                return size, data
    if first is not None:
        return first.size, first.data
    size = await store.size(url, model_id=model_id)
    if size > max_size:
        return size, None
    return size, await store.read_range(url, 0, size, model_id=model_id)


#: Bytes of a side file read with its size on a filesystem without `first_get`: most configs
#: and indexes fit; a larger one costs a second read, and a file over the side-file limit
#: no more than this.
_GUESS = 64 << 10


async def size_and_head(store: Store, url: str, limit: int, *, model_id: str) -> tuple[int, bytes]:
    """`Store.size` of a remote file and its first ``min(size, limit)`` bytes, both asked at
    once: on an async filesystem without `first_get` (gcsfs, adlfs, ...) one round trip to the
    store instead of two. A range past the file's end reads as its end there."""
    got: dict[str, Any] = {}

    async def stat() -> None:
        got["size"] = await store.size(url, model_id=model_id)

    async def head() -> None:
        got["data"] = await store.read_range(url, 0, limit, model_id=model_id)

    await gather([stat, head])
    size: int = got["size"]
    data: bytes = got["data"]
    return size, data[:size]
