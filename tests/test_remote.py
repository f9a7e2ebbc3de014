"""Remote stores end to end: http(s) against an aiohttp file server, s3 against SeaweedFS.

Loads must be bit-exact against ``safetensors.torch.load_file`` of the same file; a read keeps at
most ``read_window`` requests in flight (and the store at most ``max_concurrent_reads``), reuses
its connections, retries transient failures a bounded number of times, never retries a 403 and
never swallows a cancellation. The servers are in ``tests/servers.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import anyio.to_thread
import pytest
import torch
from fsspec.implementations.http import HTTPFileSystem
from multidict import CIMultiDict, CIMultiDictProxy
from safetensors.torch import load_file
from yarl import URL

from modelcache import ModelCache, ModelNotFoundError, Store, StoreError
from modelcache._faults import is_missing, is_transient
from tests.safetensors_files import misaligned_pairs, shard_name, write_model, write_sharded

if TYPE_CHECKING:  # imported by pytest as a plugin: importing it here first would skip rewriting
    from tests.servers import HttpServer, S3Prefix, SeaweedFS

pytest_plugins = ("tests.servers",)

KIB = 1 << 10
MIB = 1 << 20
FAST_RETRIES: dict[str, Any] = {"retry_base_delay": 0.001, "retry_max_delay": 0.004}


# -- helpers --------------------------------------------------------------------------------------


def mixed_tensors(seed: int, scale: int = 1) -> dict[str, torch.Tensor]:
    """Tensors of many dtypes (float8 where torch has it), about ``scale`` x 300 KiB, seeded."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "f32": torch.randn(96 * scale, 256, generator=g),
        "bf16": torch.randn(128 * scale, 256, generator=g).to(torch.bfloat16),
        "f16": torch.randn(64 * scale, 255, generator=g).to(torch.float16),
        "i64": torch.randint(-(2**62), 2**62, (1000 * scale,), generator=g),
        "i32": torch.randint(-(2**31), 2**31 - 1, (4097 * scale,), generator=g, dtype=torch.int32),
        "u8": torch.randint(0, 256, (77_777 * scale,), generator=g, dtype=torch.uint8),
        "i8": torch.randint(-128, 128, (999,), generator=g, dtype=torch.int8),
        "flag": torch.randint(0, 2, (321,), generator=g).bool(),
        "scalar": torch.tensor(3.5),
    }
    f8 = getattr(torch, "float8_e4m3fn", None)
    if isinstance(f8, torch.dtype):
        tensors["f8"] = torch.randint(0, 256, (5000,), generator=g, dtype=torch.uint8).view(f8)
    return tensors


def expected_tensors(*files: Path) -> dict[str, torch.Tensor]:
    """What ``safetensors.torch.load_file`` reads from ``files``, merged."""
    out: dict[str, torch.Tensor] = {}
    for file in files:
        out.update(load_file(str(file)))
    return out


def assert_bit_exact(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), name
        g_bytes = g.contiguous().reshape(-1).view(torch.uint8)
        w_bytes = w.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(g_bytes, w_bytes), name


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@contextlib.asynccontextmanager
async def open_store(store: Store) -> AsyncIterator[Store]:
    """Close the store's sessions afterwards, whatever happened."""
    try:
        yield store
    finally:
        await store.aclose()


async def load(store: Store | str, model_id: str, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Load ``model_id`` through a fresh ModelCache; return copies of its tensors."""
    async with (
        ModelCache(store, device_budget="64MiB", **kwargs) as cache,
        cache.use(model_id) as weights,
    ):
        return {name: t.clone() for name, t in weights.items()}


def read_into_call(store: Store, url: str, dest: bytearray) -> functools.partial[Any]:
    return functools.partial(store.read_into, url, 0, memoryview(dest), model_id="m1")


def response_error(status: int) -> aiohttp.ClientResponseError:
    url = URL("http://127.0.0.1/x")
    info = aiohttp.RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)
    return aiohttp.ClientResponseError(info, (), status=status, message="injected")


# -- error classification -------------------------------------------------------------------------


def _caused(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


def _boto(status: int, code: str) -> Exception:
    botocore = pytest.importorskip("botocore.exceptions")
    translate_boto_error = pytest.importorskip("s3fs.errors").translate_boto_error
    error = botocore.ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )
    translated: Exception = translate_boto_error(error)
    return translated


def _botocore_connection_errors() -> list[Exception]:
    botocore = pytest.importorskip("botocore.exceptions")
    return [
        botocore.EndpointConnectionError(endpoint_url="http://x"),
        botocore.ReadTimeoutError(endpoint_url="x"),
    ]


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses(status: int) -> None:
    """HTTP 408, 429 and 5xx (not 501) are transient, as aiohttp and as s3fs errors."""
    assert is_transient(response_error(status))
    assert is_transient(_boto(status, "Whatever"))
    assert not is_missing(_caused(FileNotFoundError("x"), response_error(status)))


@pytest.mark.parametrize("status", [400, 401, 403, 404, 416, 501])
def test_permanent_statuses(status: int) -> None:
    """Client errors and 501 are not transient."""
    assert not is_transient(response_error(status))
    assert not is_transient(_boto(status, "Whatever"))


def test_transient_exception_types() -> None:
    """Resets, disconnects, truncated bodies, timeouts and S3 throttling codes are transient."""
    transient: list[BaseException] = [
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("cut short"),
        ConnectionResetError(),
        TimeoutError(),
        _boto(400, "SlowDown"),
        _caused(FileNotFoundError("u"), aiohttp.ServerDisconnectedError()),
        *_botocore_connection_errors(),
    ]
    for exc in transient:
        assert is_transient(exc), exc
    permanent: list[BaseException] = [
        PermissionError("no"),
        ValueError("bad"),
        StoreError("ours"),
        _boto(403, "AccessDenied"),
        FileNotFoundError("u"),
    ]
    for exc in permanent:
        assert not is_transient(exc), exc


def test_missing_means_404() -> None:
    """Only a FileNotFoundError of a 404/410 (or with no status and no transient cause) is missing."""
    assert is_missing(FileNotFoundError("u"))
    assert is_missing(_boto(404, "NoSuchKey"))
    assert is_missing(_caused(FileNotFoundError("u"), response_error(404)))
    assert not is_missing(_caused(FileNotFoundError("u"), response_error(403)))
    assert not is_missing(_caused(FileNotFoundError("u"), aiohttp.ServerDisconnectedError()))
    assert not is_missing(PermissionError("no"))


def test_store_checks_new_arguments() -> None:
    """read_window must be >= 1; retries and delays must not be negative."""
    with pytest.raises(ValueError, match="read_window"):
        Store("memory://x/{model_id}", read_window=0)
    with pytest.raises(ValueError, match="max_retries"):
        Store("memory://x/{model_id}", max_retries=-1)
    with pytest.raises(ValueError, match="retry_base_delay"):
        Store("memory://x/{model_id}", retry_base_delay=float("nan"))


def test_backoff_is_exponential_jittered_and_capped() -> None:
    """Delay n lies in [d/2, d] for d = min(cap, base * 2**(n-1))."""
    store = Store("memory://x/{model_id}", retry_base_delay=0.05, retry_max_delay=2.0)
    for attempt in range(1, 12):
        ceiling = min(2.0, 0.05 * 2 ** (attempt - 1))
        for _ in range(20):
            assert ceiling / 2 <= store._backoff(attempt) <= ceiling


# -- http: loads ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("chunk", "window"), [(16 * MIB, 8), (64 * KIB, 3)])
async def test_http_load_is_bit_exact(http_server: HttpServer, chunk: int, window: int) -> None:
    """A model of many dtypes loads over http exactly as safetensors reads the file."""
    root, url = http_server.fresh_dir()
    write_model(root / "m1", mixed_tensors(1))
    store = Store(f"{url}/{{model_id}}/", read_chunk_size=chunk, read_window=window)
    got = await load(store, "m1")
    assert_bit_exact(got, expected_tensors(root / "m1" / "model.safetensors"))
    assert http_server.count("GET", f"{url}/m1/model.safetensors") >= 2  # header, then weights


async def test_http_load_by_template(http_server: HttpServer) -> None:
    """ModelCache given an http URL template (default store settings) loads bit-exact."""
    root, url = http_server.fresh_dir()
    write_model(root / "m1", mixed_tensors(2))
    got = await load(f"{url}/{{model_id}}/", "m1")
    assert_bit_exact(got, expected_tensors(root / "m1" / "model.safetensors"))


async def test_http_sharded_load_is_bit_exact(http_server: HttpServer) -> None:
    """A sharded model loads over http, in small chunks, bit-exact, shards concurrently."""
    root, url = http_server.fresh_dir()
    shards = [mixed_tensors(10 + i) for i in range(3)]
    shards = [{f"s{i}.{k}": v for k, v in s.items()} for i, s in enumerate(shards)]
    write_sharded(root / "m1", shards)
    store = Store(f"{url}/{{model_id}}/", read_chunk_size=48 * KIB, read_window=4)
    got = await load(store, "m1")
    files = [root / "m1" / shard_name(i, 3) for i in range(3)]
    assert_bit_exact(got, expected_tensors(*files))


async def test_http_misaligned_tensors_cost_a_bounded_number_of_requests(
    http_server: HttpServer,
) -> None:
    """A header of 3,000 tensors that each need their own shift costs a few GETs (headers, then
    one for the data), not one per tensor, and the model loads bit-exact."""
    root, url = http_server.fresh_dir()
    write_model(root / "m1", misaligned_pairs(3000), misalign=True)
    got = await load(f"{url}/{{model_id}}/", "m1")
    assert_bit_exact(got, misaligned_pairs(3000))
    assert http_server.count("GET", f"{url}/m1/model.safetensors") <= 3


async def test_http_server_ignoring_range_serves_loads_with_bounded_transfer(
    http_server: HttpServer,
) -> None:
    """A server that answers every ranged GET with the whole file (200): the model loads
    bit-exact, a header read stops early instead of downloading the file, and the host's files
    are then read in one request each, not one per chunk (each would stream from the start)."""
    root, url = http_server.fresh_dir()
    g = torch.Generator().manual_seed(9)
    write_model(root / "m1", {"w": torch.randint(0, 1 << 30, (8 * MIB,), generator=g)})
    size = (root / "m1" / "model.safetensors").stat().st_size
    http_server.ignore_ranges = True
    store = Store(f"{url}/{{model_id}}/", read_chunk_size=4 * MIB)
    got = await load(store, "m1")
    assert_bit_exact(got, expected_tensors(root / "m1" / "model.safetensors"))
    assert http_server.bytes_sent < 1.5 * size, (http_server.bytes_sent, size)


async def test_http_host_found_ignoring_range_mid_read_is_read_in_one_more_request(
    http_server: HttpServer,
) -> None:
    """A server that honours Range for header reads but answers data reads with the whole file:
    once a read finds that out, the rest of it is one request, so the transfer stays within
    (read_window + 1) x the file, not one whole-file stream per chunk; and it loads bit-exact."""
    root, url = http_server.fresh_dir()
    g = torch.Generator().manual_seed(10)
    write_model(root / "m1", {"w": torch.randint(0, 1 << 30, (8 * MIB,), generator=g)})
    size = (root / "m1" / "model.safetensors").stat().st_size
    http_server.ignore_ranges_from = 1
    store = Store(f"{url}/{{model_id}}/", read_chunk_size=MIB, read_window=2)
    got = await load(store, "m1")
    assert_bit_exact(got, expected_tensors(root / "m1" / "model.safetensors"))
    assert http_server.bytes_sent <= 3 * size, (http_server.bytes_sent, size)


async def test_http_missing_model_is_not_found(http_server: HttpServer) -> None:
    """A model the server does not have (404) raises ModelNotFoundError, not StoreError."""
    _, url = http_server.fresh_dir()
    with pytest.raises(ModelNotFoundError) as info:
        await load(f"{url}/{{model_id}}/", "ghost")
    assert info.value.model_id == "ghost"


# -- http: retries --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["status", "drop", "truncate"])
async def test_http_load_survives_transient_failures(http_server: HttpServer, kind: Any) -> None:
    """The first requests failing (503, dropped connection, cut body) are retried; load is exact."""
    root, url = http_server.fresh_dir()
    write_model(root / "m1", mixed_tensors(3))
    file_url = f"{url}/m1/model.safetensors"
    methods = ("GET", "HEAD") if kind == "status" else ("GET",)
    http_server.fail(file_url, times=3, kind=kind, methods=methods)
    store = Store(f"{url}/{{model_id}}/", read_chunk_size=64 * KIB, read_window=4, **FAST_RETRIES)
    got = await load(store, "m1")
    assert_bit_exact(got, expected_tensors(root / "m1" / "model.safetensors"))
    assert store.retries >= 1


@pytest.mark.parametrize("kind", ["status", "drop", "truncate", "short"])
async def test_http_read_into_retries_each_failed_chunk(http_server: HttpServer, kind: Any) -> None:
    """Failed ranged reads are made again, each once per failure, and every byte lands."""
    root, url = http_server.fresh_dir()
    data = random_bytes(MIB + 123)
    (root / "w.bin").write_bytes(data)
    http_server.fail(f"{url}/w.bin", times=3, kind=kind, methods=("GET",))
    store = Store(f"{url}/{{model_id}}", read_chunk_size=64 * KIB, read_window=4, **FAST_RETRIES)
    dest = bytearray(len(data))
    async with open_store(store):
        await read_into_call(store, f"{url}/w.bin", dest)()
    assert dest == data
    # aiohttp itself makes a GET again once when a pooled connection turns out to be closed.
    assert store.retries == 3 if kind != "drop" else store.retries <= 3
    assert http_server.count("GET", f"{url}/w.bin") == 17 + 3
    assert store.bytes_read == len(data)


async def test_http_persistent_503_fails_after_max_retries(http_server: HttpServer) -> None:
    """A 503 that never ends costs 1 + max_retries attempts, then StoreError says so."""
    root, url = http_server.fresh_dir()
    write_model(root / "m1", mixed_tensors(4))
    file_url = f"{url}/m1/model.safetensors"
    http_server.fail(file_url, times=None, status=503)
    store = Store(f"{url}/{{model_id}}/", max_retries=2, **FAST_RETRIES)
    with pytest.raises(StoreError) as info:
        await load(store, "m1")
    assert not isinstance(info.value, ModelNotFoundError)
    message = str(info.value)
    assert "after 3 attempts" in message
    assert "'m1'" in message
    assert file_url in message
    assert "503" in message
    # The header's one request (a ranged GET that also gives the size), made 3 times.
    assert http_server.count("GET", file_url) + http_server.count("HEAD", file_url) == 3
    assert store.retries == 2


async def test_http_persistent_chunk_failure_names_attempts(http_server: HttpServer) -> None:
    """A ranged read failing on every attempt raises StoreError with the count, id and path."""
    root, url = http_server.fresh_dir()
    (root / "w.bin").write_bytes(random_bytes(256 * KIB))
    http_server.fail(f"{url}/w.bin", times=None, kind="drop", methods=("GET",))
    store = Store(
        f"{url}/{{model_id}}",
        read_chunk_size=64 * KIB,
        max_retries=3,
        read_window=2,
        **FAST_RETRIES,
    )
    async with open_store(store):
        with pytest.raises(StoreError, match=r"after 4 attempts.*RemoteDisconnected") as info:
            await read_into_call(store, f"{url}/w.bin", bytearray(256 * KIB))()
    assert (info.value.model_id, info.value.path) == ("m1", f"{url}/w.bin")


async def test_http_forbidden_is_not_retried(http_server: HttpServer) -> None:
    """A 403 fails at once as StoreError (not ModelNotFoundError), with one request made."""
    root, url = http_server.fresh_dir()
    write_model(root / "m1", mixed_tensors(5))
    file_url = f"{url}/m1/model.safetensors"
    http_server.fail(file_url, times=None, status=403)
    store = Store(f"{url}/{{model_id}}/", **FAST_RETRIES)
    async with open_store(store):
        with pytest.raises(StoreError) as info:
            await store.size(file_url, model_id="m1")
        assert not isinstance(info.value, ModelNotFoundError)
        assert "attempt" not in str(info.value)
        assert http_server.count("HEAD", file_url) == 1
        with pytest.raises(StoreError, match="403"):
            await store.read_range(file_url, 0, 100, model_id="m1")
        with pytest.raises(StoreError, match="403"):
            await read_into_call(store, file_url, bytearray(1000))()
    assert http_server.count("GET", file_url) == 1 + 1 + 1  # size's GET fallback, 2 reads
    assert store.retries == 0


async def test_http_truncated_file_is_store_error(http_server: HttpServer) -> None:
    """A file shorter than asked (later ranges answer 416) raises StoreError 'truncated'."""
    root, url = http_server.fresh_dir()
    (root / "w.bin").write_bytes(random_bytes(100 * KIB))
    store = Store(f"{url}/{{model_id}}", read_chunk_size=16 * KIB, read_window=3)
    async with open_store(store):
        with pytest.raises(StoreError, match="truncated") as info:
            await read_into_call(store, f"{url}/w.bin", bytearray(200 * KIB))()
        assert f"got {100 * KIB}" in str(info.value)
        assert await store.read_range(f"{url}/w.bin", 200 * KIB, 300 * KIB, model_id="m1") == b""


# -- http: window, connections, cancellation -----------------------------------------------------


async def test_http_window_bounds_requests_in_flight(http_server: HttpServer) -> None:
    """One read keeps exactly read_window requests in flight while they are held, never more."""
    root, url = http_server.fresh_dir()
    data = random_bytes(MIB)
    (root / "w.bin").write_bytes(data)
    store = Store(
        f"{url}/{{model_id}}", read_chunk_size=64 * KIB, read_window=4, max_concurrent_reads=16
    )
    dest = bytearray(len(data))
    async with open_store(store):
        http_server.hold()
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_into_call(store, f"{url}/w.bin", dest))
            await anyio.to_thread.run_sync(http_server.wait_in_flight, 4)
            await anyio.wait_all_tasks_blocked()
            assert http_server.in_flight == 4
            http_server.release()
    assert dest == data
    assert http_server.peak == 4
    assert http_server.count("GET", f"{url}/w.bin") == 16
    assert http_server.connections <= 4


async def test_store_bounds_requests_across_reads(http_server: HttpServer) -> None:
    """Concurrent reads share max_concurrent_reads: 2 windows of 4 get 6 requests in flight."""
    root, url = http_server.fresh_dir()
    files = {name: random_bytes(512 * KIB, seed=i) for i, name in enumerate(("a", "b"))}
    for name, data in files.items():
        (root / name).write_bytes(data)
    store = Store(
        f"{url}/{{model_id}}", read_chunk_size=32 * KIB, read_window=4, max_concurrent_reads=6
    )
    dests = {name: bytearray(len(data)) for name, data in files.items()}
    async with open_store(store):
        http_server.hold()
        async with anyio.create_task_group() as tg:
            for name, dest in dests.items():
                tg.start_soon(read_into_call(store, f"{url}/{name}", dest))
            await anyio.to_thread.run_sync(http_server.wait_in_flight, 6)
            await anyio.wait_all_tasks_blocked()
            assert http_server.in_flight == 6
            http_server.release()
    assert dests == files
    assert http_server.peak == 6


async def test_http_connections_and_session_are_reused(http_server: HttpServer) -> None:
    """Sequential reads reuse the Store's one filesystem, its session and its connections."""
    root, url = http_server.fresh_dir()
    data = random_bytes(MIB)
    (root / "w.bin").write_bytes(data)
    store = Store(f"{url}/{{model_id}}", read_chunk_size=64 * KIB, read_window=4)
    async with open_store(store):
        sessions = []
        for _ in range(3):
            dest = bytearray(len(data))
            await read_into_call(store, f"{url}/w.bin", dest)()
            assert dest == data
            fs = store._filesystems["http"]
            sessions.append((fs, fs._session))
        assert all(s == sessions[0] for s in sessions)
    assert http_server.count("GET", f"{url}/w.bin") == 48
    assert http_server.connections <= 4


async def test_http_reads_stream_without_cat_file(
    http_server: HttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_into on http streams responses into dest itself: fsspec's _cat_file is not called."""
    root, url = http_server.fresh_dir()
    data = random_bytes(300 * KIB)
    (root / "w.bin").write_bytes(data)

    async def no_cat_file(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("_cat_file called")

    monkeypatch.setattr(HTTPFileSystem, "_cat_file", no_cat_file)
    store = Store(f"{url}/{{model_id}}", read_chunk_size=64 * KIB)
    dest = bytearray(len(data))
    async with open_store(store):
        await read_into_call(store, f"{url}/w.bin", dest)()
    assert dest == data


async def test_http_cancel_mid_read_leaves_no_task(http_server: HttpServer) -> None:
    """Cancelling a read with requests in flight raises the cancellation and leaves no task."""
    root, url = http_server.fresh_dir()
    data = random_bytes(MIB)
    (root / "w.bin").write_bytes(data)
    store = Store(f"{url}/{{model_id}}", read_chunk_size=64 * KIB, read_window=4)
    outcome: list[type[BaseException]] = []

    async def read() -> None:
        try:
            await read_into_call(store, f"{url}/w.bin", bytearray(len(data)))()
        except BaseException as exc:
            outcome.append(type(exc))
            raise

    async with open_store(store):
        before = asyncio.all_tasks()
        http_server.hold()
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await anyio.to_thread.run_sync(http_server.wait_in_flight, 4)
            tg.cancel_scope.cancel()
        assert outcome == [anyio.get_cancelled_exc_class()]
        assert {t for t in asyncio.all_tasks() if not t.done()} <= before
        assert store._limiter is not None and store._limiter.borrowed_tokens == 0
        http_server.release()
        dest = bytearray(len(data))
        await read_into_call(store, f"{url}/w.bin", dest)()  # the store still works
        assert dest == data


async def test_http_cancel_during_backoff_is_not_swallowed(http_server: HttpServer) -> None:
    """A read cancelled while it waits to retry raises the cancellation and retries no more."""
    root, url = http_server.fresh_dir()
    (root / "w.bin").write_bytes(b"x" * 1000)
    http_server.fail(f"{url}/w.bin", times=None, status=503, methods=("GET",))
    store = Store(f"{url}/{{model_id}}", retry_base_delay=60, retry_max_delay=60)
    outcome: list[type[BaseException]] = []

    async def read() -> None:
        try:
            await store.read_range(f"{url}/w.bin", 0, 10, model_id="m1")
        except BaseException as exc:
            outcome.append(type(exc))
            raise

    async with open_store(store):
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await anyio.to_thread.run_sync(http_server.wait_requests, "GET", f"{url}/w.bin", 1)
                tg.cancel_scope.cancel()
    assert outcome == [anyio.get_cancelled_exc_class()]
    assert http_server.count("GET", f"{url}/w.bin") == 1


async def test_http_etag(http_server: HttpServer, tmp_path: Path) -> None:
    """etag is the server's ETag for http, stable while the file is; None for local files."""
    root, url = http_server.fresh_dir()
    (root / "w.bin").write_bytes(b"abc")
    store = Store(f"{url}/{{model_id}}")
    async with open_store(store):
        tag = await store.etag(f"{url}/w.bin", model_id="m1")
        assert isinstance(tag, str) and tag
        assert await store.etag(f"{url}/w.bin", model_id="m1") == tag
        with pytest.raises(ModelNotFoundError):
            await store.etag(f"{url}/nope.bin", model_id="m1")
    (tmp_path / "f").write_bytes(b"abc")
    assert await Store(f"{tmp_path}/{{model_id}}").etag(str(tmp_path / "f"), model_id="m1") is None


# -- s3 (SeaweedFS) -------------------------------------------------------------------------------


def s3_store(server: SeaweedFS, prefix: S3Prefix, **kwargs: Any) -> Store:
    return Store(f"{prefix.url}/{{model_id}}/", storage_options=server.s3_options, **kwargs)


async def test_s3_load_is_bit_exact(
    seaweedfs: SeaweedFS, s3_prefix: S3Prefix, tmp_path: Path
) -> None:
    """ModelCache over s3:// with storage_options loads a many-dtype model bit-exact."""
    write_model(tmp_path / "m1", mixed_tensors(20))
    s3_prefix.put_dir(tmp_path / "m1", "m1")
    got = await load(f"{s3_prefix.url}/{{model_id}}/", "m1", storage_options=seaweedfs.s3_options)
    assert_bit_exact(got, expected_tensors(tmp_path / "m1" / "model.safetensors"))


async def test_s3_sharded_multi_chunk_load_is_bit_exact(
    seaweedfs: SeaweedFS, s3_prefix: S3Prefix, tmp_path: Path
) -> None:
    """A sharded model read in many small ranges over s3 is bit-exact, through s3fs's client."""
    shards = [{f"s{i}.{k}": v for k, v in mixed_tensors(30 + i).items()} for i in range(2)]
    write_sharded(tmp_path / "m1", shards)
    s3_prefix.put_dir(tmp_path / "m1", "m1")
    store = s3_store(seaweedfs, s3_prefix, read_chunk_size=40 * KIB, read_window=4)
    got = await load(store, "m1")
    files = [tmp_path / "m1" / shard_name(i, 2) for i in range(2)]
    assert_bit_exact(got, expected_tensors(*files))
    assert store.retries == 0


async def test_s3_missing_model_is_not_found(seaweedfs: SeaweedFS, s3_prefix: S3Prefix) -> None:
    """A model not in the bucket raises ModelNotFoundError."""
    with pytest.raises(ModelNotFoundError):
        await load(s3_store(seaweedfs, s3_prefix), "ghost")


async def test_s3_bad_credentials_are_not_retried(
    seaweedfs: SeaweedFS, s3_prefix: S3Prefix
) -> None:
    """A wrong secret fails at once as StoreError caused by a PermissionError."""
    s3_prefix.put("m1/w.bin", b"abc")
    options = {**seaweedfs.s3_options, "secret": "wrong"}
    store = Store(f"{s3_prefix.url}/{{model_id}}", storage_options=options, **FAST_RETRIES)
    async with open_store(store):
        with pytest.raises(StoreError) as info:
            await store.read_range(f"{s3_prefix.url}/m1/w.bin", 0, 3, model_id="m1")
    assert isinstance(info.value.__cause__, PermissionError)
    assert "attempt" not in str(info.value)
    assert store.retries == 0


async def test_s3_streams_ranges_and_keeps_its_client(
    seaweedfs: SeaweedFS, s3_prefix: S3Prefix, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_into on s3 streams into dest (no _cat_file), keeps one client, sees EOF as truncation."""
    s3fs_class = pytest.importorskip("s3fs").S3FileSystem
    data = random_bytes(700 * KIB)
    s3_prefix.put("m1/w.bin", data)
    url = f"{s3_prefix.url}/m1/w.bin"

    async def no_cat_file(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("_cat_file called")

    store = s3_store(seaweedfs, s3_prefix, read_chunk_size=64 * KIB, read_window=4)
    async with open_store(store):
        assert await store.read_range(url, 5, 9, model_id="m1") == data[5:9]
        monkeypatch.setattr(s3fs_class, "_cat_file", no_cat_file)
        fs = store._filesystems["s3"]
        client = fs._s3
        assert fs.retries == 1  # the Store is the one retry layer
        for offset in (0, 1234):
            dest = bytearray(len(data) - offset)
            await store.read_into(url, offset, memoryview(dest), model_id="m1")
            assert dest == data[offset:]
        assert store._filesystems["s3"] is fs and fs._s3 is client
        with pytest.raises(StoreError, match=f"truncated.*got {len(data) - 1000}"):
            await store.read_into(url, 1000, memoryview(bytearray(len(data))), model_id="m1")


_OFFLINE_S3 = {
    "key": "k",
    "secret": "s",
    "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
}


async def test_s3_clients_share_parsed_service_descriptions() -> None:
    """Every Store's s3 client reads botocore's service descriptions through one loader (parsed
    once per process, not once per fresh cache), while each Store keeps a session of its own."""
    pytest.importorskip("s3fs")
    stores = [Store("s3://bucket/{model_id}", storage_options=_OFFLINE_S3) for _ in range(2)]
    sessions = []
    try:
        for store in stores:
            fs, _ = await store._remote("s3://bucket/m1")
            await fs.set_session()  # makes the client; connects to nothing
            sessions.append(fs.session)
        assert sessions[0] is not sessions[1]
        loaders = [s.get_component("data_loader") for s in sessions]
        assert loaders[0] is loaders[1]
    finally:
        for store in stores:
            await store.aclose()


async def test_s3_session_given_in_storage_options_is_kept() -> None:
    """A session the caller passes to s3fs (``session=``) is the one its client is made from."""
    aio_session = pytest.importorskip("aiobotocore.session")
    session = aio_session.AioSession()
    store = Store("s3://bucket/{model_id}", storage_options={**_OFFLINE_S3, "session": session})
    try:
        fs, _ = await store._remote("s3://bucket/m1")
        await fs.set_session()
        assert fs.session is session
    finally:
        await store.aclose()


async def test_s3_etag_is_the_object_etag(seaweedfs: SeaweedFS, s3_prefix: S3Prefix) -> None:
    """etag on s3 returns the object's ETag as S3 reports it; a directory has none."""
    s3_prefix.put("m1/w.bin", b"abc")
    store = s3_store(seaweedfs, s3_prefix)
    async with open_store(store):
        tag = await store.etag(f"{s3_prefix.url}/m1/w.bin", model_id="m1")
        assert await store.etag(f"{s3_prefix.url}/m1", model_id="m1") is None
    head = seaweedfs.client().head_object(
        Bucket=seaweedfs.bucket, Key=f"{s3_prefix.prefix}/m1/w.bin"
    )
    assert tag == head["ETag"]
