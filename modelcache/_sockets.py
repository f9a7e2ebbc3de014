"""Ranged GETs whose body a worker thread reads from the socket straight into its place.

Why: over aiohttp a response body arrives in pieces of at most 256 KiB, each a new bytes object
made by the event loop's receive and copied again by aiohttp's parser, then copied into place
(`_ranged._drain`), with Python work per piece. Loading 1 GiB from a SeaweedFS on 127.0.0.1 cost
the client 0.8-0.9 s of CPU that way, which the 2-core machine took from the server. Here the
request is made with the standard library's ``http.client`` in a worker thread and the body read
with ``readinto`` (``recv_into`` on the socket, the GIL released) into the destination views: one
copy, by the kernel, 0.4 s of client CPU for the same GiB.

Only plain set-ups go this way (`plain_http`, `plain_s3`: no proxy, no custom TLS or session
options, no request extras such as requester-pays or SSE-C keys): what the aiohttp path would
send is sent, nothing else. S3 requests are presigned by the filesystem's own client (so its
credentials, region and addressing style apply) once per reader, valid for `PRESIGN_SECONDS`.
Any status but 206 (a 200 from a server ignoring Range, a redirect, 403 of an expired URL, 404,
5xx) and a 416 aside, the request is closed and made again through aiohttp, whose handling
(errors, retries' classification, whole bodies) is then exactly what it was: `Fallback`.

Connections are kept alive per Store (`SocketPool`), made on the event loop (a connect can be
cancelled) and used by one thread at a time. A worker thread cannot be cancelled: a cancelled
read shuts its socket down, which ends the thread's blocked ``recv`` at once, and waits for the
thread before it returns, so nothing is written into the destination after the call has ended.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import anyio.to_thread

from ._faults import status_error
from ._ranged import (
    RangeReader,
    ShortBody,
    _check_complete,
    _check_etag,
    _check_partial,
    _is_plain,
    _range_header,
    _total,
)
from ._versions import VersionMismatch
from ._versions import if_match as strong_etag

__all__ = ["PRESIGN_SECONDS", "SocketPool", "socket_range_reader"]

#: Validity of a presigned S3 URL: one reader (one file of one load) uses it for all its ranges.
PRESIGN_SECONDS = 3600
#: Idle connections kept per host, and how long one may idle before it is not reused (servers
#: close idle keep-alive connections after 5-60 s; reusing one the server closed costs a retry).
_IDLE_PER_HOST = 16
_IDLE_SECONDS = 15.0
#: Threads reading at once per Store, at most (its ``max_concurrent_reads`` is the usual bound).
_THREADS = 64
#: Socket timeouts when the filesystem names none: connecting, and between two received bytes.
_CONNECT_TIMEOUT = 30.0
_READ_TIMEOUT = 60.0


class Fallback(Exception):
    """The server answered with something only the aiohttp path handles (see the module note)."""


class _Stale(Exception):
    """A kept-alive connection failed before any answer: the server had closed it."""


def _proxied(scheme: str, host: str) -> bool:
    """Whether an environment proxy applies to ``host`` (botocore honours these; we do not)."""
    proxies = urllib.request.getproxies()
    return bool(proxies.get(scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host)


def _plain_http(fs: Any) -> bool:
    """An fsspec HTTPFileSystem with no session or request options but headers (and the
    receive buffer size the Store sets)."""
    return set(fs.client_kwargs) <= {"read_bufsize"} and set(fs.kwargs) <= {"headers"}


def _plain_s3(fs: Any) -> bool:
    """An s3fs S3FileSystem with no request extras, proxies or TLS settings of its own."""
    return (
        not fs.req_kw
        and not fs.s3_additional_kwargs
        and not {"proxies", "proxies_config", "client_cert"} & set(fs.config_kwargs)
        and fs.client_kwargs.get("verify", True) is True
    )


class SocketPool:
    """Idle keep-alive connections of one Store, by (scheme, host, port). Thread-safe: threads
    give connections back, the event loop takes them. A child process never reuses its parent's
    sockets (they are shared with it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, str, int], list[tuple[http.client.HTTPConnection, float]]] = {}
        self._pid = os.getpid()
        self._closed = False
        #: Tokens for the threads reading (the Store's limiter bounds them too): a stalled
        #: server holds these, never anyio's default ones the application's threads use.
        self._threads: anyio.CapacityLimiter | None = None

    def threads(self) -> anyio.CapacityLimiter:
        if self._threads is None:  # made in the event loop, on the first read
            self._threads = anyio.CapacityLimiter(_THREADS)
        return self._threads

    def take(self, key: tuple[str, str, int]) -> http.client.HTTPConnection | None:
        """An idle connection to ``key`` that has not idled too long, or None."""
        stale: list[http.client.HTTPConnection] = []
        found = None
        with self._lock:
            self._check_pid()
            self._closed = False  # used again after `close`
            idle = self._idle.get(key, [])
            now = time.monotonic()
            while idle:
                conn, since = idle.pop()
                if now - since < _IDLE_SECONDS:
                    found = conn
                    break
                stale.append(conn)
        for conn in stale:
            conn.close()
        return found

    def give(self, key: tuple[str, str, int], conn: http.client.HTTPConnection) -> None:
        """Keep ``conn`` (its last response read whole) for the next request to ``key``."""
        with self._lock:
            self._check_pid()
            idle = self._idle.setdefault(key, [])
            if not self._closed and len(idle) < _IDLE_PER_HOST:
                idle.append((conn, time.monotonic()))
                return
        conn.close()

    def close(self) -> None:
        """Close every idle connection; connections given back later are closed too, until
        the pool is used again (`take`)."""
        with self._lock:
            idle, self._idle = self._idle, {}
            self._closed = True
        for conns in idle.values():
            for conn, _ in conns:
                conn.close()

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked: these sockets are the parent's too
            self._idle = {}
            self._pid = os.getpid()


class _Read:
    """One request's thread work, and what a cancellation needs to stop it."""

    __slots__ = ("cancelled", "conn", "dests", "finished", "kept", "lock", "reused", "started")

    def __init__(
        self, conn: http.client.HTTPConnection, reused: bool, dests: Sequence[memoryview]
    ) -> None:
        self.lock = threading.Lock()
        self.started = self.cancelled = self.kept = False
        self.conn, self.reused = conn, reused
        #: The views, here rather than among the thread's arguments: anyio's worker drops its
        #: call's arguments only after handing back the result, and a caller may resize the
        #: buffer behind the views as soon as it has it (`Store.read_range`). Emptied when done.
        self.dests = dests
        self.finished = threading.Event()

    def begin(self) -> bool:
        with self.lock:
            if self.cancelled:
                return False
            self.started = True
            return True

    def keep(self) -> bool:
        """Whether the connection (its response read whole) may go back to the pool: not once
        cancelled (its socket may be shut down), and a cancellation after this leaves it be."""
        with self.lock:
            self.kept = not self.cancelled
            return self.kept

    def cancel(self) -> bool:
        """Stop the thread's read; True when the thread runs (or ran) and must be waited for."""
        with self.lock:
            self.cancelled = True
            if not self.started:
                return False
            if self.kept:  # in the pool, or about to be: another read's now
                return True
            # Under the lock: `_ready` swaps a `_TlsPending` for its TLS socket under it too.
            sock = getattr(self.conn, "sock", None)
        if isinstance(sock, _TlsPending):
            sock = sock.sock
        if isinstance(sock, socket.socket):
            # The socket's own shutdown, not SSLSocket's (which drops its TLS state first); an
            # error means closed already.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the blocked recv returns
        return True


async def _connect(
    scheme: str, host: str, port: int, connect_timeout: float, read_timeout: float
) -> http.client.HTTPConnection:
    """A new connection, connected on the event loop (cancellable); TLS is set up by the
    thread that first uses it (the handshake blocks)."""
    addresses = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            with anyio.fail_after(connect_timeout):
                await _sock_connect(sock, address)
        except TimeoutError:
            sock.close()
            error = OSError(errno.ETIMEDOUT, f"connecting to {host}:{port} timed out")
            continue
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        sock.setblocking(True)
        sock.settimeout(read_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn: http.client.HTTPConnection
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=read_timeout)
            conn.sock = _TlsPending(sock, host)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=read_timeout)
            conn.sock = sock
        return conn
    raise error or OSError(errno.EHOSTUNREACH, f"no address for {host}:{port}")


async def _sock_connect(sock: socket.socket, address: Any) -> None:
    import asyncio  # fsspec's async filesystems, hence these reads, run on asyncio only

    await asyncio.get_running_loop().sock_connect(sock, address)


class _TlsPending:
    """A connected TCP socket whose TLS handshake the first thread to use it makes."""

    __slots__ = ("host", "sock")

    def __init__(self, sock: socket.socket, host: str) -> None:
        self.sock, self.host = sock, host

    def close(self) -> None:
        self.sock.close()


_TLS = ssl.create_default_context()


def _ready(read: _Read) -> None:
    """Make the TLS handshake of a new https connection. The TLS socket is put in place before
    its handshake, under the read's lock: wrapping detaches the TCP socket, and a cancellation
    must find the socket the handshake blocks on to shut it down (else it waits for the read
    timeout: 60 s)."""
    conn = read.conn
    pending = conn.sock
    if isinstance(pending, _TlsPending):
        try:
            with read.lock:
                conn.sock = _TLS.wrap_socket(
                    pending.sock, server_hostname=pending.host, do_handshake_on_connect=False
                )
            conn.sock.do_handshake()
        except BaseException:
            pending.close()
            if conn.sock is not pending:
                conn.sock.close()
            conn.sock = None
            raise


def _fetch(
    read: _Read,
    pool: SocketPool,
    key: tuple[str, str, int],
    target: str,
    headers: dict[str, str],
    statuses: bool,
    if_match: str | None,
    start: int,
) -> int:
    """The thread's part: send the request, check the response, read its body into ``dests``.
    The connection goes back to the pool only after a whole body was read. With ``statuses``
    an error status raises `status_error`; without it (s3, whose errors botocore reads from
    the body) it is a `Fallback`."""
    conn, dests = read.conn, read.dests
    try:
        if not read.begin():
            conn.close()
            raise OSError(errno.ECANCELED, "cancelled before it started")
        keep = False
        try:
            _ready(read)
            try:
                conn.request("GET", target, headers=headers)
                response = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                if read.reused:  # closed by the server while idle, before this request
                    raise _Stale from exc
                raise
            size = _total(dests)
            status = response.status
            if status == 416:  # the range starts at or past the end of the file
                return 0
            if status == 412:
                raise VersionMismatch(
                    errno.ESTALE, f"the store has another version than {if_match}"
                )
            if status != 206:
                if statuses and status >= 400:
                    raise status_error(
                        status, response.reason, f"{key[0]}://{key[1]}:{key[2]}{target}"
                    )
                raise Fallback(status)
            sent = response.getheader("Content-Range", "")
            _check_partial(sent, response.length, start, size)
            _check_etag(if_match, response.getheader("ETag"))
            filled = 0
            for dest in dests:
                done = 0
                while done < len(dest):
                    n = response.readinto(dest[done:])
                    if not n:
                        if response.length:  # http.client returns 0, not IncompleteRead
                            raise ShortBody(
                                f"the body ended after {filled + done} bytes, "
                                f"{response.length} short of its Content-Length"
                            )
                        break
                    done += n
                filled += done
                if done < len(dest):
                    break
            if read.cancelled:
                raise OSError(errno.ECANCELED, "cancelled while reading")
            filled = _check_complete(sent, start, size, filled)
            keep = response.isclosed() and not response.will_close
            return filled
        except http.client.HTTPException as exc:
            if isinstance(exc, ConnectionError):  # RemoteDisconnected: see `_reader`
                raise
            # A cut body, a garbled status line: transient, as aiohttp's payload errors are.
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if keep and read.keep():
                pool.give(key, conn)
            else:
                conn.close()
    finally:
        read.dests = dests = ()
        read.finished.set()


#: ``target()``: the URL to GET (made on a reader's first read: a presigned one) and the
#: connect and read timeouts in seconds.
Target = Callable[[], Awaitable[tuple[str, float, float]]]


def socket_range_reader(
    pool: SocketPool, fs: Any, path: str, *, if_match: str | None, fallback: RangeReader
) -> RangeReader | None:
    """A `RangeReader` of ``path`` by `SocketPool` connections when ``fs`` is a plain http(s)
    or s3 filesystem (see the module note), else None. ``fallback`` (the aiohttp reader of the
    same file and version) serves the answers only it handles."""
    if _is_plain(fs, "fsspec.implementations.http", "HTTPFileSystem") and _plain_http(fs):
        headers = {str(k): str(v) for k, v in (fs.kwargs.get("headers") or {}).items()}

        async def http_target() -> tuple[str, float, float]:
            return str(fs.encode_url(path)), _CONNECT_TIMEOUT, _READ_TIMEOUT

        return _reader(pool, http_target, headers, True, if_match, fallback)
    if _is_plain(fs, "s3fs.core", "S3FileSystem") and _plain_s3(fs):
        bucket, key, version = fs.split_path(path)

        async def s3_target() -> tuple[str, float, float]:
            await fs.set_session()
            s3 = await fs.get_s3(bucket)
            params = {"Bucket": bucket, "Key": key}
            if version:
                params["VersionId"] = version
            url: str = await s3.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=PRESIGN_SECONDS
            )
            config = s3.meta.config
            return (
                url,
                config.connect_timeout or _CONNECT_TIMEOUT,
                config.read_timeout or _READ_TIMEOUT,
            )

        return _reader(pool, s3_target, {}, False, if_match, fallback)
    return None


def _reader(
    pool: SocketPool,
    target: Target,
    headers: dict[str, str],
    statuses: bool,
    if_match: str | None,
    fallback: RangeReader,
) -> RangeReader:
    #: Made on the first read, once: the connection key, the request target and the timeouts;
    #: None when this file's reads all go to ``fallback`` (not http(s), or an env proxy).
    made: list[tuple[tuple[str, str, int], str, float, float] | None] = []
    strong = strong_etag(if_match)

    async def read(start: int, dests: Sequence[memoryview]) -> int:
        size = _total(dests)
        if not size:  # no Range header asks for nothing
            return 0
        if not made:
            url, connect_timeout, read_timeout = await target()
            parts = urllib.parse.urlsplit(url)
            scheme = parts.scheme.lower()
            host = parts.hostname
            if scheme not in ("http", "https") or not host or _proxied(scheme, host):
                made.append(None)
            else:
                port = parts.port or (443 if scheme == "https" else 80)
                query = f"?{parts.query}" if parts.query else ""
                target_path = (parts.path or "/") + query
                made.append(((scheme, host, port), target_path, connect_timeout, read_timeout))
        if made[0] is None:
            return await fallback(start, dests)
        key, path, connect_timeout, read_timeout = made[0]
        sent = {**headers, "Range": _range_header(start, size)}
        if strong is not None:
            sent["If-Match"] = strong
        for attempt in (0, 1):
            conn = None if attempt else pool.take(key)
            reused = conn is not None
            if conn is None:
                conn = await _connect(*key, connect_timeout, read_timeout)
            try:
                return await _in_thread(
                    conn, reused, dests, pool, key, path, sent, statuses, if_match, start
                )
            except Fallback:
                return await fallback(start, dests)
            except _Stale:
                # Made again once, at once, on a new connection (a GET of a range is
                # idempotent); a new connection's failure is the Store's to retry or report.
                continue
        raise AssertionError("unreachable: the second attempt is on a new connection")

    return read


async def _in_thread(
    conn: http.client.HTTPConnection,
    reused: bool,
    dests: Sequence[memoryview],
    pool: SocketPool,
    *args: Any,
) -> int:
    """`_fetch` in a worker thread. On cancellation (or any interrupt) while it runs, its socket
    is shut down and the thread waited for, shielded, before the cancellation goes on: nothing
    is written into the views after this returns."""
    read = _Read(conn, reused, dests)
    del dests  # the thread's, through `read`
    try:
        return await anyio.to_thread.run_sync(
            _fetch, read, pool, *args, abandon_on_cancel=True, limiter=pool.threads()
        )
    except BaseException:
        if not read.finished.is_set():
            if read.cancel():
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(read.finished.wait)
            else:  # never started, and will not: its connection is ours to close
                conn.close()
        raise
