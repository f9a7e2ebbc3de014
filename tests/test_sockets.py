"""Weight reads over http(s) and s3 by worker threads on kept-alive sockets (`_sockets`).

The behaviour every remote read must have (retries, version pinning, whole bodies, truncation)
is tested in test_remote.py, test_remote_requests.py and test_versions.py, which now go this
way; here is what is particular to it: who makes the requests, connection reuse and staleness,
cancellation while a thread reads, fallbacks, and what a closed Store or a child process keeps.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from modelcache import Store, StoreError, _sockets
from modelcache._faults import HttpStatusError, http_status, is_missing, is_transient, status_error

if TYPE_CHECKING:
    from modelcache._ranged import RangeReader
    from tests.servers import HttpServer, S3Prefix, SeaweedFS

pytest_plugins = ("tests.servers",)

KIB = 1 << 10
FAST_RETRIES: dict[str, Any] = {"retry_base_delay": 0.001, "retry_max_delay": 0.004}


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def count_fetches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path of every request a socket thread makes."""
    fetch = _sockets._fetch
    seen: list[str] = []

    def counted(read: Any, pool: Any, key: Any, target: str, *args: Any) -> int:
        seen.append(target)
        return fetch(read, pool, key, target, *args)

    monkeypatch.setattr(_sockets, "_fetch", counted)
    return seen


async def read_all(store: Store, url: str, size: int) -> bytearray:
    dest = bytearray(size)
    await store.read_into(url, 0, memoryview(dest), model_id="m1")
    return dest


async def test_http_weight_reads_are_made_by_socket_threads_on_kept_alive_connections(
    http_server: HttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each ranged read is one request of a socket thread; a Store reuses its connections:
    at most a window's worth for any number of reads."""
    root, url = http_server.fresh_dir()
    data = random_bytes(256 * KIB + 7)
    (root / "w.bin").write_bytes(data)
    seen = count_fetches(monkeypatch)
    store = Store(f"{url}/{{model_id}}", read_chunk_size=16 * KIB, read_window=2)
    try:
        for _ in range(3):
            assert await read_all(store, f"{url}/w.bin", len(data)) == data
    finally:
        await store.aclose()
    assert len(seen) == 3 * 17
    assert http_server.count("GET", f"{url}/w.bin") == 3 * 17
    assert http_server.connections <= 2


async def test_a_kept_alive_connection_closed_while_idle_is_made_again_without_a_retry(
    http_server: HttpServer,
) -> None:
    """A pooled connection that died while idle is replaced at once: the read succeeds and the
    Store counts no retry (as aiohttp does for its pooled connections)."""
    root, url = http_server.fresh_dir()
    data = random_bytes(64 * KIB, seed=1)
    (root / "w.bin").write_bytes(data)
    store = Store(f"{url}/{{model_id}}", read_chunk_size=64 * KIB, **FAST_RETRIES)
    try:
        assert await read_all(store, f"{url}/w.bin", len(data)) == data
        idle = [conn for conns in store._sockets._idle.values() for conn, _ in conns]
        assert idle, "the connection was kept"
        for conn in idle:
            assert isinstance(conn.sock, socket.socket)
            conn.sock.shutdown(socket.SHUT_RDWR)  # as a server closing it would leave it
        assert await read_all(store, f"{url}/w.bin", len(data)) == data
        assert store.retries == 0
    finally:
        await store.aclose()


async def test_a_cancelled_read_stops_its_thread_and_writes_nothing_after(
    http_server: HttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling a read whose thread waits on the server shuts its socket down: the call ends
    at once, the thread with it, and the destination is never written after (the connection
    is not kept)."""
    root, url = http_server.fresh_dir()
    data = random_bytes(64 * KIB, seed=2)
    (root / "w.bin").write_bytes(data)
    store = Store(f"{url}/{{model_id}}", read_chunk_size=16 * KIB, read_window=4)
    dest = bytearray(len(data))
    fetch = _sockets._fetch
    active = [0]

    def tracked(*args: Any) -> int:
        active[0] += 1
        try:
            return fetch(*args)
        finally:
            active[0] -= 1

    monkeypatch.setattr(_sockets, "_fetch", tracked)
    http_server.hold()
    try:
        async with anyio.create_task_group() as tg:

            async def read() -> None:
                await store.read_into(f"{url}/w.bin", 0, memoryview(dest), model_id="m1")

            tg.start_soon(read)
            await anyio.to_thread.run_sync(http_server.wait_in_flight, 4)
            tg.cancel_scope.cancel()
        assert active[0] == 0  # the threads ended before the cancelled read did
        http_server.release()
        await anyio.to_thread.run_sync(http_server.wait_in_flight, 0)
        assert dest == bytearray(len(data))
        assert sum(len(c) for c in store._sockets._idle.values()) == 0
        assert await read_all(store, f"{url}/w.bin", len(data)) == data
    finally:
        http_server.release()
        await store.aclose()


async def test_http_error_statuses_are_one_request_each_and_classified_as_aiohttp_s(
    http_server: HttpServer,
) -> None:
    """A 404 is missing, a 503 transient (retried), a 403 neither: each costs one request per
    attempt (no second request through aiohttp)."""
    root, url = http_server.fresh_dir()
    (root / "w.bin").write_bytes(random_bytes(32 * KIB, seed=3))
    store = Store(f"{url}/{{model_id}}", max_retries=2, **FAST_RETRIES)
    try:
        http_server.fail(f"{url}/w.bin", times=None, status=403, methods=("GET",))
        with pytest.raises(StoreError, match="403"):
            await read_all(store, f"{url}/w.bin", 32 * KIB)
        assert http_server.count("GET", f"{url}/w.bin") == 1
        http_server.reset()
        http_server.fail(f"{url}/w.bin", times=None, status=503, methods=("GET",))
        with pytest.raises(StoreError, match=r"after 3 attempts.*503"):
            await read_all(store, f"{url}/w.bin", 32 * KIB)
        assert http_server.count("GET", f"{url}/w.bin") == 3
    finally:
        await store.aclose()
    missing = status_error(404, "Not Found", "http://h/x")
    assert isinstance(missing, FileNotFoundError) and is_missing(missing)
    assert http_status(missing) == 404
    assert is_transient(HttpStatusError(503, "Service Unavailable", "http://h/x"))
    assert not is_transient(HttpStatusError(403, "Forbidden", "http://h/x"))


async def test_a_server_ignoring_ranges_is_read_through_aiohttp(
    http_server: HttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 200 to a ranged GET falls back to the aiohttp reader (which streams the whole body and
    marks the host): every later read of that host goes there directly."""
    root, url = http_server.fresh_dir()
    data = random_bytes(96 * KIB, seed=4)
    (root / "w.bin").write_bytes(data)
    http_server.ignore_ranges = True
    seen = count_fetches(monkeypatch)
    store = Store(f"{url}/{{model_id}}", read_chunk_size=16 * KIB, read_window=2)
    try:
        assert await read_all(store, f"{url}/w.bin", len(data)) == data
        first = len(seen)
        assert await read_all(store, f"{url}/w.bin", len(data)) == data
        assert len(seen) == first  # the host ignores ranges: no socket read tried again
    finally:
        http_server.ignore_ranges = False
        await store.aclose()


async def test_an_environment_proxy_sends_reads_through_aiohttp(
    http_server: HttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an http proxy in the environment for the host, reads go the aiohttp way (s3's
    botocore honours such proxies; a socket thread would not)."""
    root, url = http_server.fresh_dir()
    data = random_bytes(32 * KIB, seed=5)
    (root / "w.bin").write_bytes(data)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    seen = count_fetches(monkeypatch)
    store = Store(f"{url}/{{model_id}}")
    try:
        assert await read_all(store, f"{url}/w.bin", len(data)) == data
    finally:
        await store.aclose()
    assert seen == []


async def test_closing_a_store_closes_its_idle_connections(http_server: HttpServer) -> None:
    """aclose closes every kept connection; a Store used again makes new ones."""
    root, url = http_server.fresh_dir()
    data = random_bytes(48 * KIB, seed=6)
    (root / "w.bin").write_bytes(data)
    store = Store(f"{url}/{{model_id}}", read_chunk_size=16 * KIB, read_window=3)
    assert await read_all(store, f"{url}/w.bin", len(data)) == data
    kept = [conn for conns in store._sockets._idle.values() for conn, _ in conns]
    assert kept
    await store.aclose()
    assert all(conn.sock is None for conn in kept)
    assert await read_all(store, f"{url}/w.bin", len(data)) == data
    await store.aclose()


def test_a_pool_hands_out_no_connection_idle_too_long_nor_one_of_its_parent_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """take() closes connections idle past the limit, and in a forked child forgets its
    parent's (their sockets are shared with it)."""
    pool = _sockets.SocketPool()
    key = ("http", "127.0.0.1", 1)
    closed: list[int] = []

    class Conn:
        def __init__(self, n: int) -> None:
            self.n = n

        def close(self) -> None:
            closed.append(self.n)

    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    pool.give(key, Conn(1))  # type: ignore[arg-type]
    clock[0] += _sockets._IDLE_SECONDS + 1
    pool.give(key, Conn(2))  # type: ignore[arg-type]
    got = pool.take(key)
    assert getattr(got, "n", None) == 2
    assert pool.take(key) is None
    assert closed == [1]
    pool.give(key, Conn(3))  # type: ignore[arg-type]
    pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: pid + 1)
    assert pool.take(key) is None
    assert closed == [1]  # the parent's to close, not the child's


async def test_s3_weight_reads_are_presigned_gets_on_socket_threads(
    seaweedfs: SeaweedFS, s3_prefix: S3Prefix, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On S3 each ranged read is a GET of a URL the filesystem's client presigned, made once
    per file read; the bytes are exact."""
    data = random_bytes(200 * KIB, seed=7)
    s3_prefix.put("m1/w.bin", data)
    seen = count_fetches(monkeypatch)
    store = Store(
        f"{s3_prefix.url}/{{model_id}}",
        storage_options=seaweedfs.s3_options,
        read_chunk_size=64 * KIB,
    )
    try:
        assert await read_all(store, f"{s3_prefix.url}/m1/w.bin", len(data)) == data
    finally:
        await store.aclose()
    assert len(seen) == 4
    assert len(set(seen)) == 1 and "Signature=" in seen[0]  # v2 or v4: botocore chooses


def test_only_plain_filesystems_get_socket_readers() -> None:
    """Session options, request extras, proxies or TLS settings keep the aiohttp reader."""
    from fsspec.implementations.http import HTTPFileSystem

    pool = _sockets.SocketPool()

    async def fallback(start: int, dests: Sequence[memoryview]) -> int:
        raise AssertionError("not called")

    plain = HTTPFileSystem(skip_instance_cache=True, client_kwargs={"read_bufsize": 1 << 20})
    assert _sockets.socket_range_reader(pool, plain, "http://h/x", if_match=None, fallback=fallback)
    for options in (
        {"client_kwargs": {"trust_env": True}},
        {"auth": object()},
        {"proxy": "http://p:3128"},
    ):
        fs = HTTPFileSystem(skip_instance_cache=True, **options)
        assert (
            _sockets.socket_range_reader(pool, fs, "http://h/x", if_match=None, fallback=fallback)
            is None
        ), options


async def test_remote_ranges_are_cut_at_multiples_of_the_chunk_size_in_the_file(
    http_server: HttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read from an offset that is not a multiple of read_chunk_size asks first for the bytes
    up to the next multiple, then whole aligned chunks (an object store's parts)."""
    root, url = http_server.fresh_dir()
    data = random_bytes(300 * KIB, seed=8)
    (root / "w.bin").write_bytes(data)
    fetch = _sockets._fetch
    ranges: list[str] = []

    def recorded(read: Any, pool: Any, key: Any, target: str, headers: Any, *args: Any) -> int:
        ranges.append(headers["Range"])
        return fetch(read, pool, key, target, headers, *args)

    monkeypatch.setattr(_sockets, "_fetch", recorded)
    store = Store(f"{url}/{{model_id}}", read_chunk_size=64 * KIB, read_window=2)
    dest = bytearray(200 * KIB)
    try:
        await store.read_into(f"{url}/w.bin", 8 * KIB, memoryview(dest), model_id="m1")
    finally:
        await store.aclose()
    assert dest == data[8 * KIB : 208 * KIB]
    k = KIB
    assert sorted(ranges, key=lambda r: int(r[6:].split("-")[0])) == [
        f"bytes={8 * k}-{64 * k - 1}",
        f"bytes={64 * k}-{128 * k - 1}",
        f"bytes={128 * k}-{192 * k - 1}",
        f"bytes={192 * k}-{208 * k - 1}",
    ]


def _self_signed(directory: Any) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, as PEM files in ``directory``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = str(directory / "cert.pem"), str(directory / "key.pem")
    with open(cert_file, "wb") as out:
        out.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_file, key_file


async def test_https_reads_make_their_tls_handshake_in_the_thread_and_keep_the_connection(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over https the thread makes the handshake of a new connection, verifying the server's
    certificate, and the TLS connection is kept alive for the next read."""
    import ssl

    cert_file, key_file = _self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert_file, key_file)
    monkeypatch.setattr(_sockets, "_TLS", ssl.create_default_context(cafile=cert_file))
    data = random_bytes(64 * KIB, seed=5)
    connections = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        with pytest.raises(asyncio.IncompleteReadError):  # until the client closes
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lo, hi = (int(x) for x in head.split(b"bytes=")[1].split(b"\r\n")[0].split(b"-"))
                writer.write(
                    f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {lo}-{hi}/{len(data)}"
                    f"\r\nContent-Length: {hi + 1 - lo}\r\n\r\n".encode()
                    + data[lo : hi + 1]
                )
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_tls)
    pool = _sockets.SocketPool()
    read = _https_reader(pool, server)
    dest = bytearray(len(data))
    half = len(data) // 2
    assert await read(0, [memoryview(dest)[:half]]) == half
    assert await read(half, [memoryview(dest)[half:]]) == len(data) - half
    assert dest == data
    assert connections[0] == 1
    pool.close()
    server.close()
    await server.wait_closed()


async def _no_fallback(start: int, dests: Sequence[memoryview]) -> int:
    raise AssertionError("no read here goes through aiohttp")


def _https_reader(pool: _sockets.SocketPool, server: asyncio.Server) -> RangeReader:
    """A socket reader of ``https://`` ``server``'s /w.bin through ``pool`` (none by aiohttp)."""
    from fsspec.implementations.http import HTTPFileSystem

    port = server.sockets[0].getsockname()[1]
    read = _sockets.socket_range_reader(
        pool,
        HTTPFileSystem(asynchronous=True),
        f"https://127.0.0.1:{port}/w.bin",
        if_match=None,
        fallback=_no_fallback,
    )
    assert read is not None
    return read


async def test_a_read_cancelled_during_its_tls_handshake_ends_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read cancelled while its thread waits for the server's side of the TLS handshake
    shuts that socket down and ends at once, not after the read timeout."""
    monkeypatch.setattr(_sockets, "_READ_TIMEOUT", 3600.0)
    hello = asyncio.Event()
    let_go = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the client hello: the thread now waits for the server's
        hello.set()
        await let_go.wait()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pool = _sockets.SocketPool()
    read = _https_reader(pool, server)
    ended = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:

            async def reading() -> None:
                try:
                    await read(0, [memoryview(bytearray(KIB))])
                finally:
                    ended.set()

            tg.start_soon(reading)
            await hello.wait()
            tg.cancel_scope.cancel()
            with anyio.CancelScope(shield=True), anyio.move_on_after(20):  # a failure's bound
                await ended.wait()
            by_cancel = ended.is_set()  # not by the server letting go of the handshake
            let_go.set()
            assert by_cancel, "the cancelled read waited for its handshake to time out"
    finally:
        let_go.set()
        server.close()
        await server.wait_closed()


async def test_a_read_cancelled_as_its_connection_goes_back_leaves_that_connection_alive(
    http_server: HttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancellation that comes after the body was read whole, as the thread gives its
    connection back, does not shut down that connection: the pool holds no dead socket."""
    import select
    import threading

    root, url = http_server.fresh_dir()
    data = random_bytes(16 * KIB, seed=6)
    (root / "w.bin").write_bytes(data)
    store = Store(f"{url}/{{model_id}}", read_chunk_size=16 * KIB, read_window=1)
    cancelled = threading.Event()
    cancel = _sockets._Read.cancel

    def cancelling(read: Any) -> bool:
        try:
            return cancel(read)
        finally:
            cancelled.set()

    monkeypatch.setattr(_sockets._Read, "cancel", cancelling)
    give = store._sockets.give

    def give_when_cancelled(key: Any, conn: Any) -> None:
        anyio.from_thread.run_sync(scope.cancel)
        assert cancelled.wait(30)
        give(key, conn)

    monkeypatch.setattr(store._sockets, "give", give_when_cancelled)
    try:
        with anyio.CancelScope() as scope:
            await read_all(store, f"{url}/w.bin", len(data))
        idle = [conn for conns in store._sockets._idle.values() for conn, _ in conns]
        assert len(idle) == 1
        for conn in idle:  # alive: nothing to read (an EOF would be readable at once)
            assert not select.select([conn.sock], [], [], 0)[0]
    finally:
        await store.aclose()
