"""modelcache._store: id validation, id -> URL templates, ranged reads, error translation."""

from __future__ import annotations

import errno
import functools
import os
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anyio
import fsspec
import pytest
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import given
from hypothesis import strategies as st

from modelcache._exceptions import (
    InvalidModelIdError,
    ModelFormatError,
    ModelNotFoundError,
    StoreError,
)
from modelcache._store import Store, validate_model_id

from .conftest import LocalDescriptors

# -- test filesystems -----------------------------------------------------------------------------


class _AsyncMemory(AsyncFileSystemWrapper):  # type: ignore[misc]
    """memory:// behind fsspec's async wrapper, under its own protocol."""

    protocol = "mcasyncmem"
    _cat_file: Callable[..., Awaitable[bytes]]  # set per instance by the wrapper

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(fs=MemoryFileSystem(), **kwargs)
        self._strip_protocol = self._strip  # the wrapper copies memory's, which keeps our prefix

    def _strip(self, path: str) -> str:
        prefix = f"{type(self).protocol}://"  # self.protocol is the wrapped filesystem's
        stripped: str = MemoryFileSystem._strip_protocol(path.removeprefix(prefix))
        return stripped


class _Gate:
    """Holds every _cat_file of a _GatedAsyncMemory until `release` is set; counts them."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.in_flight = 0
        self.peak = 0


class _GatedAsyncMemory(_AsyncMemory):
    protocol = "mcgatedmem"
    gate: _Gate | None = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._plain_cat_file: Callable[..., Awaitable[bytes]] = self._cat_file
        self._cat_file = self._gated_cat_file

    async def _gated_cat_file(self, path: str, start: int, end: int) -> bytes:
        gate = type(self).gate
        assert gate is not None
        gate.in_flight += 1
        gate.peak = max(gate.peak, gate.in_flight)
        try:
            await gate.release.wait()
        finally:
            gate.in_flight -= 1
        data: bytes = await self._plain_cat_file(path, start=start, end=end)
        return data


class _FakeSession:
    def __init__(self) -> None:
        self.closed = 0

    async def close(self) -> None:
        self.closed += 1


class _SessionAsyncMemory(_AsyncMemory):
    """Carries an aiohttp-like `_session`, as http:// and gcs:// filesystems do."""

    protocol = "mcsessionmem"
    made: ClassVar[list[_SessionAsyncMemory]] = []

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.session = _FakeSession()
        self._session: _FakeSession | None = self.session
        type(self).made.append(self)


for _cls in (_AsyncMemory, _GatedAsyncMemory, _SessionAsyncMemory):
    fsspec.register_implementation(_cls.protocol, _cls, clobber=True)

# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A unique memory:// root; the global memory store is restored afterwards."""
    saved_store = dict(MemoryFileSystem.store)
    saved_dirs = list(MemoryFileSystem.pseudo_dirs)
    yield f"t-{uuid.uuid4().hex}"
    MemoryFileSystem.store.clear()
    MemoryFileSystem.store.update(saved_store)
    MemoryFileSystem.pseudo_dirs[:] = saved_dirs


@dataclass
class Backend:
    name: str
    location: str  # a template with {model_id}
    write: Callable[[str, bytes], None]  # path relative to the root, e.g. "m1/w.bin"
    mkdir: Callable[[str], None]


@pytest.fixture(params=["file", "memory", "async"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, memory_root: str) -> Backend:
    """The same model tree on a local, a sync in-memory and an async in-memory filesystem."""
    if request.param == "file":

        def write_file(rel: str, data: bytes) -> None:
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_bytes(data)

        def mkdir_file(rel: str) -> None:
            (tmp_path / rel).mkdir(parents=True)

        return Backend("file", f"file://{tmp_path}/{{model_id}}/", write_file, mkdir_file)
    mem = MemoryFileSystem()
    protocol = "memory" if request.param == "memory" else _AsyncMemory.protocol
    return Backend(
        request.param,
        f"{protocol}://{memory_root}/{{model_id}}",
        lambda rel, data: mem.pipe_file(f"/{memory_root}/{rel}", data),
        lambda rel: mem.mkdir(f"/{memory_root}/{rel}"),
    )


def _random(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# -- validate_model_id ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_id", "allow_slash"),
    [
        ("tenant-42", False),
        ("bert_base.v2", False),
        ("a=b@c+d", False),
        ("A", False),
        ("org/model", True),
        ("org/model.v2/x", True),
        ("x" * 200, False),
    ],
)
def test_validate_accepts_safe_ids(model_id: str, allow_slash: bool) -> None:
    """Safe ids come back unchanged."""
    assert validate_model_id(model_id, allow_slash=allow_slash) == model_id


@pytest.mark.parametrize(
    ("model_id", "allow_slash"),
    [
        ("", False),
        (".", False),
        ("..", False),
        ("../x", False),
        ("../x", True),
        ("a/../b", True),
        ("a..b", False),
        ("/abs", False),
        ("/abs", True),
        ("a/b", False),
        ("a\\b", False),
        ("s3://x", False),
        ("s3://x", True),
        ("http:x", False),
        ("a?b", False),
        ("a#b", False),
        ("%2e%2e", False),
        ("~root", False),
        ("a\x00b", False),
        ("a\nb", False),
        ("tenant-42\n", False),
        ("x" * 201, False),
        ("a//b", True),
        ("a/", True),
        ("a/./b", True),
        ("a/.b", True),
        ("_x", False),
        ("é", False),
    ],
)
def test_validate_refuses_unsafe_ids(model_id: str, allow_slash: bool) -> None:
    """Ids that could escape the root or carry URL/path syntax raise InvalidModelIdError."""
    with pytest.raises(InvalidModelIdError) as info:
        validate_model_id(model_id, allow_slash=allow_slash)
    assert info.value.model_id == model_id
    assert repr(model_id)[:40] in str(info.value)


@pytest.mark.parametrize("model_id", [None, 5, b"x", ["a"]])
def test_validate_refuses_non_str(model_id: object) -> None:
    """A non-str id raises InvalidModelIdError (a ValueError) naming its type."""
    with pytest.raises(InvalidModelIdError, match="must be a str") as info:
        validate_model_id(model_id)
    assert isinstance(info.value, ValueError)
    assert info.value.model_id is None


def test_validate_message_says_what_is_wrong() -> None:
    """The message names the offending character / limit and repr()s the id, truncated."""
    with pytest.raises(InvalidModelIdError, match=r"character ':'"):
        validate_model_id("s3:x")
    with pytest.raises(InvalidModelIdError, match=r"'\.\.'"):
        validate_model_id("a..b")
    with pytest.raises(InvalidModelIdError, match="limit of 10") as info:
        validate_model_id("y" * 500, max_length=10)
    assert len(str(info.value)) < 200


@given(model_id=st.one_of(st.text(), st.text(alphabet="a0./\\:%~_-@")), allow_slash=st.booleans())
def test_validate_never_lets_an_id_escape(model_id: str, allow_slash: bool) -> None:
    """Any accepted id stays under the root when joined to it, and has no ':'."""
    try:
        validate_model_id(model_id, allow_slash=allow_slash)
    except InvalidModelIdError:
        return
    assert os.path.normpath(os.path.join("/root", model_id)).startswith("/root/")
    assert ":" not in model_id


# -- templates ------------------------------------------------------------------------------------


def test_file_template() -> None:
    """A file:// template gives the model's URL without a trailing slash, and a local path."""
    store = Store("file:///data/models/{model_id}/")
    url = store.model_url("m1")
    assert url == "file:///data/models/m1"
    assert store.join(url, "model.safetensors") == "file:///data/models/m1/model.safetensors"
    assert store.local_path(url) == "/data/models/m1"


def test_plain_path_template() -> None:
    """A plain path template is local; its URL is the path itself."""
    store = Store("/plain/local/path/{model_id}")
    assert store.model_url("m1") == "/plain/local/path/m1"
    assert store.local_path("/plain/local/path/m1") == "/plain/local/path/m1"


def test_remote_templates_are_not_local() -> None:
    """memory:// and s3:// URLs have no local path."""
    store = Store("memory://models/{model_id}")
    assert store.model_url("m1") == "memory://models/m1"
    assert store.local_path("memory://models/m1") is None
    assert Store("s3://bucket/m/{model_id}/").local_path("s3://bucket/m/x") is None


def test_single_file_template() -> None:
    """A template ending in .safetensors names one file per model."""
    store = Store("file:///data/{model_id}.safetensors")
    assert store.model_url("tenant-42") == "file:///data/tenant-42.safetensors"


def test_resolver_gets_only_validated_ids() -> None:
    """A resolver's URL is used as given, and it is never called with an invalid id."""
    seen: list[str] = []

    def resolve(model_id: str) -> str:
        seen.append(model_id)
        return f"s3://bucket/{model_id[::-1]}/"

    store = Store(resolve)
    assert store.model_url("abc") == "s3://bucket/cba/"
    with pytest.raises(InvalidModelIdError):
        store.model_url("../etc")
    assert seen == ["abc"]


@pytest.mark.parametrize(
    "location", ["file:///data/models/", "s3://b/{id}", "/{model_id}/{model_id}"]
)
def test_template_needs_model_id_once(location: str) -> None:
    """A template without exactly one {model_id} is refused at construction."""
    with pytest.raises(ValueError, match="model_id"):
        Store(location)


def test_model_url_validates_with_store_settings() -> None:
    """model_url applies the store's slash and length settings."""
    with pytest.raises(InvalidModelIdError):
        Store("memory://m/{model_id}").model_url("org/model")
    assert Store("memory://m/{model_id}", allow_slash_in_ids=True).model_url("org/m") == (
        "memory://m/org/m"
    )
    with pytest.raises(InvalidModelIdError):
        Store("memory://m/{model_id}", max_id_length=3).model_url("abcd")


# -- reads on every backend -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_size_and_read_range(backend: Backend) -> None:
    """size is the file length; read_range returns [start, end), shorter only past EOF."""
    data = _random(1000)
    backend.write("m1/w.bin", data)
    store = Store(backend.location)
    url = store.join(store.model_url("m1"), "w.bin")
    assert await store.size(url, model_id="m1") == 1000
    assert await store.read_range(url, 10, 300, model_id="m1") == data[10:300]
    assert await store.read_range(url, 900, 2000, model_id="m1") == data[900:]
    assert await store.read_range(url, 5, 5, model_id="m1") == b""
    assert store.bytes_read == 290 + 100
    await store.aclose()


@pytest.mark.asyncio
async def test_read_head_is_the_size_and_the_first_bytes(backend: Backend) -> None:
    """read_head returns what size and read_range(0, min(size, limit)) return, counts the bytes
    read, and fails as they do: a missing file is ModelNotFoundError, a directory StoreError."""
    data = _random(1000)
    backend.write("m1/w.bin", data)
    backend.mkdir("m1/sub")
    store = Store(backend.location)
    url = store.join(store.model_url("m1"), "w.bin")
    assert await store.read_head(url, 100, model_id="m1") == (1000, data[:100])
    assert await store.read_head(url, 5000, model_id="m1") == (1000, data)
    assert await store.read_head(url, 0, model_id="m1") == (1000, b"")
    assert store.bytes_read == 1100
    with pytest.raises(ModelNotFoundError):
        await store.read_head(store.join(store.model_url("m1"), "nope"), 8, model_id="m1")
    with pytest.raises(StoreError) as info:
        await store.read_head(store.join(store.model_url("m1"), "sub"), 8, model_id="m1")
    assert not isinstance(info.value, ModelNotFoundError)
    await store.aclose()


@pytest.mark.asyncio
async def test_read_head_calls_a_subclass_size_and_read_range(tmp_path: Path) -> None:
    """A Store subclass that intercepts size or read_range (a wrapper, a gate) sees read_head
    go through them rather than around them."""
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "w.bin").write_bytes(b"0123456789")
    seen: list[str] = []

    class Watching(Store):
        async def size(self, url: str, *, model_id: str) -> int:
            seen.append("size")
            return await super().size(url, model_id=model_id)

        async def read_range(self, url: str, start: int, end: int, *, model_id: str) -> bytes:
            seen.append(f"read_range {start} {end}")
            return await super().read_range(url, start, end, model_id=model_id)

    store = Watching(f"file://{tmp_path}/{{model_id}}")
    url = store.join(store.model_url("m1"), "w.bin")
    assert await store.read_head(url, 4, model_id="m1") == (10, b"0123")
    assert seen == ["size", "read_range 0 4"]


@pytest.mark.asyncio
async def test_memory_files_are_read_without_scanning_the_filesystem_or_a_thread(
    memory_root: str, monkeypatch: pytest.MonkeyPatch, thread_calls: list[str]
) -> None:
    """A memory:// file's size and small reads come from its buffer on the event loop: fsspec's
    MemoryFileSystem.info scans every file it holds (milliseconds per stat with 10,000 models),
    and a worker thread is a round trip for a copy of a few KiB."""
    data = _random(5000)
    mem = MemoryFileSystem()
    mem.pipe_file(f"/{memory_root}/m1/w.bin", data)
    for i in range(50):
        mem.pipe_file(f"/{memory_root}/other{i}/w.bin", b"x")
    store = Store(f"memory://{memory_root}/{{model_id}}")
    url = store.join(store.model_url("m1"), "w.bin")
    await store.size(url, model_id="m1")  # the filesystem instance is made (in a thread) once

    def no_info(*args: object, **kwargs: object) -> None:
        raise AssertionError("MemoryFileSystem.info was called")

    monkeypatch.setattr(MemoryFileSystem, "info", no_info)
    thread_calls.clear()
    assert await store.size(url, model_id="m1") == 5000
    assert await store.read_range(url, 10, 300, model_id="m1") == data[10:300]
    assert await store.read_head(url, 100, model_id="m1") == (5000, data[:100])
    dest = bytearray(1000)
    await store.read_into(url, 4000, memoryview(dest), model_id="m1")
    assert dest == data[4000:]
    with pytest.raises(StoreError, match="truncated"):
        await store.read_into(url, 4500, memoryview(bytearray(1000)), model_id="m1")
    assert thread_calls == []


@pytest.mark.asyncio
async def test_a_large_memory_read_still_copies_in_a_thread(
    memory_root: str, thread_calls: list[str]
) -> None:
    """A memory:// read over COPY_IN_THREAD bytes is copied in a worker thread: the event loop
    is never held by a copy of megabytes."""
    data = _random(3 << 20)
    MemoryFileSystem().pipe_file(f"/{memory_root}/m1/w.bin", data)
    store = Store(f"memory://{memory_root}/{{model_id}}")
    url = store.join(store.model_url("m1"), "w.bin")
    dest = bytearray(len(data))
    await store.read_into(url, 0, memoryview(dest), model_id="m1")
    assert dest == data
    assert await store.read_range(url, 0, len(data), model_id="m1") == data
    assert len(thread_calls) >= 2


@pytest.mark.asyncio
async def test_a_small_local_read_opens_and_reads_in_one_worker_call(
    tmp_path: Path, thread_calls: list[str]
) -> None:
    """A local read of one chunk or less opens, checks and reads the file in a single
    worker-thread call (it took two: one to open, one to read); a short file still fails
    before a byte is read."""
    data = _random(5000)
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "w.bin").write_bytes(data)
    store = Store(f"file://{tmp_path}/{{model_id}}")
    url = store.join(store.model_url("m1"), "w.bin")
    views = [bytearray(100), bytearray(900)]
    await store.read_scatter(url, 4000, [memoryview(v) for v in views], model_id="m1")
    assert bytes(views[0] + views[1]) == data[4000:]
    assert len(thread_calls) == 1
    dest = bytearray(1000)
    with pytest.raises(StoreError, match="truncated") as info:
        await store.read_into(url, 4500, memoryview(dest), model_id="m1")
    assert "got 500" in str(info.value)
    assert dest == bytearray(1000)


@pytest.mark.asyncio
async def test_read_into_in_small_chunks(backend: Backend) -> None:
    """read_into with many small chunks fills dest with exactly the file's bytes."""
    data = _random(300 * 1024 + 17)
    backend.write("m1/w.bin", data)
    store = Store(backend.location, read_chunk_size=4096, max_concurrent_reads=3)
    url = store.join(store.model_url("m1"), "w.bin")
    dest = bytearray(len(data))
    await store.read_into(url, 0, memoryview(dest), model_id="m1")
    assert dest == data
    assert store.bytes_read == len(data)
    await store.aclose()


@pytest.mark.asyncio
async def test_read_into_at_offset(backend: Backend) -> None:
    """read_into at a non-zero offset reads the bytes from there, into a window of a buffer."""
    data = _random(50_000)
    backend.write("m1/w.bin", data)
    store = Store(backend.location, read_chunk_size=4096)
    url = store.join(store.model_url("m1"), "w.bin")
    buf = bytearray(b"\xee" * 30_000)
    await store.read_into(url, 12_345, memoryview(buf)[100:20_100], model_id="m1")
    assert buf[100:20_100] == data[12_345:32_345]
    assert buf[:100] == b"\xee" * 100
    assert buf[20_100:] == b"\xee" * 9_900
    assert store.bytes_read == 20_000


@pytest.mark.asyncio
async def test_read_scatter_fills_views_in_file_order(backend: Backend) -> None:
    """read_scatter puts one contiguous range of the file into its views in order, whatever the
    number of views (more than one preadv takes) and wherever the chunks cut them."""
    data = _random(60_000, seed=3)
    backend.write("m1/w.bin", data)
    store = Store(backend.location, read_chunk_size=1000, max_concurrent_reads=3)
    url = store.join(store.model_url("m1"), "w.bin")
    rng = random.Random(5)
    sizes = [2500 if i % 500 == 7 else rng.choice((0, 1, 2, 3, 7, 16)) for i in range(3000)]
    total = sum(sizes)
    assert total <= len(data) - 11
    buf = bytearray(b"\xee" * (total + len(sizes)))  # a one-byte gap after each view
    views, at = [], 0
    for size in sizes:
        views.append(memoryview(buf)[at : at + size])
        at += size + 1
    await store.read_scatter(url, 11, views, model_id="m1")
    pos = 11
    for view, size in zip(views, sizes, strict=True):
        assert view == data[pos : pos + size]
        pos += size
    assert buf.count(b"\xee") >= len(sizes)  # the gaps are untouched
    assert store.bytes_read == total
    with pytest.raises(StoreError, match="truncated"):
        await store.read_scatter(url, len(data) - 5, [memoryview(bytearray(3))] * 2, model_id="m1")
    await store.aclose()


@pytest.mark.asyncio
async def test_local_scatter_read_is_linear_in_views(tmp_path: Path) -> None:
    """A local read_scatter into 65,536 views (a crafted header's worth, in one chunk) costs
    well under a second of CPU: the views are consumed in order, never re-sliced per call."""
    n = 65_536
    data = _random(3 * n, seed=11)
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "w.bin").write_bytes(data)
    store = Store(f"file://{tmp_path}/{{model_id}}/")
    url = store.join(store.model_url("m1"), "w.bin")
    buf = bytearray(3 * n)
    views = []
    for i in range(n // 2):  # a 1-byte view then a 2-byte one, as U8/F16 pairs lay out
        views += [memoryview(buf)[3 * i : 3 * i + 1], memoryview(buf)[3 * i + 1 : 3 * i + 3]]
    cpu = time.process_time()
    await store.read_scatter(url, 0, views, model_id="m1")
    cpu = time.process_time() - cpu
    assert bytes(buf[: 3 * (n // 2)]) == data[: 3 * (n // 2)]
    assert cpu < 2.0, f"{cpu:.2f} s of CPU for {len(views)} views"


@pytest.mark.asyncio
async def test_local_scatter_read_resumes_inside_a_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A preadv that returns short (ending inside a view, or between views) is continued from
    the exact byte it stopped at: the views end up bit-exact."""
    data = _random(5000, seed=12)
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "w.bin").write_bytes(data)
    store = Store(f"file://{tmp_path}/{{model_id}}/")
    url = store.join(store.model_url("m1"), "w.bin")
    real_preadv = os.preadv
    rng = random.Random(13)

    def short_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        limit = rng.choice((1, 2, 3, 5, 64))
        out, left = [], limit
        for b in buffers:
            if not left:
                break
            out.append(b[:left])
            left -= len(out[-1])
        return real_preadv(fd, out, offset)

    monkeypatch.setattr(os, "preadv", short_preadv)
    sizes = [random.Random(14).choice((1, 2, 3, 7, 40)) for _ in range(300)]
    buf = bytearray(sum(sizes))
    views, at = [], 0
    for size in sizes:
        views.append(memoryview(buf)[at : at + size])
        at += size
    await store.read_scatter(url, 17, views, model_id="m1")
    assert bytes(buf) == data[17 : 17 + len(buf)]


@pytest.mark.asyncio
async def test_local_reads_hold_at_most_max_concurrent_reads_descriptors(
    tmp_path: Path, local_descriptors: LocalDescriptors
) -> None:
    """However many local reads are asked for at once, a Store holds at most
    max_concurrent_reads files open for them."""
    data = _random(4096)
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "w.bin").write_bytes(data)
    store = Store(f"file://{tmp_path}/{{model_id}}/", max_concurrent_reads=3)
    url = store.join(store.model_url("m1"), "w.bin")
    dests = [bytearray(16) for _ in range(200)]
    async with anyio.create_task_group() as tg:
        for i, dest in enumerate(dests):
            tg.start_soon(
                functools.partial(store.read_into, url, i, memoryview(dest), model_id="m1")
            )
    assert all(dest == data[i : i + 16] for i, dest in enumerate(dests))
    assert 1 <= local_descriptors.peak <= 3


@pytest.mark.asyncio
async def test_read_into_truncated_file(backend: Backend) -> None:
    """A file that ends before dest is full raises StoreError saying truncated, expected vs got."""
    backend.write("m1/w.bin", _random(10_000))
    store = Store(backend.location, read_chunk_size=4096)
    url = store.join(store.model_url("m1"), "w.bin")
    with pytest.raises(StoreError, match="truncated") as info:
        await store.read_into(url, 2_000, memoryview(bytearray(9_000)), model_id="m1")
    assert "expected 9000" in str(info.value)
    assert "got 8000" in str(info.value)
    assert info.value.model_id == "m1"
    assert info.value.path == url


@pytest.mark.asyncio
async def test_missing_file_is_model_not_found(backend: Backend) -> None:
    """Every read of a missing file raises ModelNotFoundError (a KeyError) naming id and path."""
    store = Store(backend.location)
    url = store.join(store.model_url("ghost"), "w.bin")
    reads = [
        store.size(url, model_id="ghost"),
        store.read_range(url, 0, 10, model_id="ghost"),
        store.read_into(url, 0, memoryview(bytearray(10)), model_id="ghost"),
    ]
    for read in reads:
        with pytest.raises(ModelNotFoundError) as info:
            await read
        assert isinstance(info.value, KeyError)
        assert "'ghost'" in str(info.value)
        assert url in str(info.value)
        assert (info.value.model_id, info.value.path) == ("ghost", url)
        assert isinstance(info.value.__cause__, FileNotFoundError)


@pytest.mark.asyncio
async def test_size_of_directory_is_store_error(backend: Backend) -> None:
    """Asking the size of a directory raises StoreError naming the operation, id and path."""
    backend.mkdir("m1/sub")
    store = Store(backend.location)
    url = store.join(store.model_url("m1"), "sub")
    with pytest.raises(StoreError, match="cannot stat") as info:
        await store.size(url, model_id="m1")
    assert "'m1'" in str(info.value)
    assert url in str(info.value)
    assert isinstance(info.value.__cause__, IsADirectoryError)


# -- local files ----------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("op", ["read_range", "read_into"])
async def test_local_directory_read_is_store_error(tmp_path: Path, op: str) -> None:
    """Reading a local directory as a file raises StoreError, not ModelNotFoundError."""
    (tmp_path / "m1").mkdir()
    store = Store(str(tmp_path / "{model_id}"))
    url = store.model_url("m1")
    read: Awaitable[object]
    if op == "read_range":
        read = store.read_range(url, 0, 4, model_id="m1")
    else:
        read = store.read_into(url, 0, memoryview(bytearray(4)), model_id="m1")
    with pytest.raises(StoreError, match="cannot read") as info:
        await read
    assert not isinstance(info.value, ModelNotFoundError)
    assert isinstance(info.value.__cause__, IsADirectoryError)


@pytest.mark.asyncio
async def test_local_permission_error_is_store_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PermissionError from the OS becomes StoreError with the cause chained."""
    (tmp_path / "m1").write_bytes(b"abcd")

    def denied(*args: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "preadv", denied)
    store = Store(f"file://{tmp_path}/{{model_id}}")
    with pytest.raises(StoreError, match="PermissionError") as info:
        await store.read_into(store.model_url("m1"), 0, memoryview(bytearray(4)), model_id="m1")
    assert isinstance(info.value.__cause__, PermissionError)


@pytest.mark.asyncio
async def test_failing_chunk_gives_one_store_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error in one chunk of many surfaces as a single StoreError, not an ExceptionGroup."""
    (tmp_path / "m1").write_bytes(_random(64 * 1024))
    real_preadv = os.preadv

    def flaky(fd: int, buffers: list[memoryview], offset: int) -> int:
        if offset == 5 * 4096:
            raise OSError(errno.EIO, "Input/output error")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", flaky)
    store = Store(f"{tmp_path}/{{model_id}}", read_chunk_size=4096)
    with pytest.raises(StoreError, match="Input/output error") as info:
        await store.read_into(
            store.model_url("m1"), 0, memoryview(bytearray(64 * 1024)), model_id="m1"
        )
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.asyncio
async def test_read_into_checks_dest() -> None:
    """dest must be a writable 1-D byte memoryview and offset non-negative."""
    store = Store("/x/{model_id}")
    with pytest.raises(ValueError, match="writable"):
        await store.read_into("/x/m", 0, memoryview(b"read-only"), model_id="m")
    with pytest.raises(ValueError, match="unsigned-byte"):
        await store.read_into("/x/m", 0, memoryview(bytearray(8)).cast("I"), model_id="m")
    with pytest.raises(ValueError, match="offset"):
        await store.read_into("/x/m", -1, memoryview(bytearray(8)), model_id="m")
    with pytest.raises(ValueError, match="range"):
        await store.read_range("/x/m", 5, 4, model_id="m")


# -- error pass-through, cancellation, limits, sessions ------------------------------------------


@pytest.mark.asyncio
async def test_sync_filesystem_errors_translate(
    memory_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync filesystem's PermissionError -> StoreError; our own errors pass through untouched."""
    own = ModelFormatError("bad header", model_id="m1")
    raised: list[Exception] = [PermissionError("no"), own]

    def cat_file(self: MemoryFileSystem, path: str, start: int, end: int) -> bytes:
        raise raised.pop(0)

    monkeypatch.setattr(MemoryFileSystem, "cat_file", cat_file)
    store = Store(f"memory://{memory_root}/{{model_id}}")
    url = store.model_url("m1")
    with pytest.raises(StoreError, match=r"cannot read memory://.*'m1'.*PermissionError"):
        await store.read_range(url, 0, 1, model_id="m1")
    with pytest.raises(ModelFormatError) as info:
        await store.read_range(url, 0, 1, model_id="m1")
    assert info.value is own


@pytest.mark.asyncio
async def test_async_reads_are_bounded(memory_root: str) -> None:
    """Async chunked reads keep at most max_concurrent_reads requests in flight, and all land."""
    data = _random(64 * 1024)
    MemoryFileSystem().pipe_file(f"/{memory_root}/m1", data)
    gate = _GatedAsyncMemory.gate = _Gate()
    store = Store(
        f"mcgatedmem://{memory_root}/{{model_id}}", read_chunk_size=4096, max_concurrent_reads=3
    )
    url = store.model_url("m1")
    dest = bytearray(len(data))
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(store.read_into, url, 0, memoryview(dest), model_id="m1"))
        await anyio.wait_all_tasks_blocked()
        assert gate.in_flight == 3
        gate.release.set()
    assert dest == data
    assert gate.peak == 3
    assert store.bytes_read == len(data)


@pytest.mark.asyncio
async def test_cancelled_async_read_is_not_translated(memory_root: str) -> None:
    """A read cancelled while its request is in flight raises the cancellation, not StoreError."""
    MemoryFileSystem().pipe_file(f"/{memory_root}/m1", b"abc")
    _GatedAsyncMemory.gate = gate = _Gate()
    store = Store(f"mcgatedmem://{memory_root}/{{model_id}}")
    outcome: list[type[BaseException]] = []

    async def read() -> None:
        try:
            await store.read_range(store.model_url("m1"), 0, 3, model_id="m1")
        except BaseException as exc:
            outcome.append(type(exc))
            raise

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        await anyio.wait_all_tasks_blocked()
        assert gate.in_flight == 1
        tg.cancel_scope.cancel()
    assert outcome == [anyio.get_cancelled_exc_class()]
    assert store.bytes_read == 0


@pytest.mark.asyncio
async def test_aclose_closes_sessions_once(memory_root: str) -> None:
    """aclose closes async filesystems' sessions and is idempotent; the store stays usable."""
    MemoryFileSystem().pipe_file(f"/{memory_root}/m1", b"abc")
    store = Store(f"mcsessionmem://{memory_root}/{{model_id}}")
    url = store.model_url("m1")
    _SessionAsyncMemory.made.clear()
    assert await store.size(url, model_id="m1") == 3
    [fs] = _SessionAsyncMemory.made
    session = fs.session
    await store.aclose()
    await store.aclose()
    assert session.closed == 1
    assert fs._session is None
    assert await store.read_range(url, 1, 3, model_id="m1") == b"bc"
    await store.aclose()


@pytest.mark.parametrize("zero_copy", [False, True])
async def test_a_fifo_in_a_models_place_fails_its_load_and_never_holds_a_thread(
    tmp_path: Path, zero_copy: bool
) -> None:
    """A FIFO (no writer) where a model's weights file should be fails the load with a typed
    error at once, and the cache closes: a blocking open held its worker thread until a writer
    came, and close() waits for the cache's threads. (Bounded: after 10 s a timer thread opens
    the FIFO's other end, which frees a blocked open, and the test fails instead of hanging.)"""
    from modelcache import ModelCache, ModelCacheError

    (tmp_path / "m").mkdir()
    fifo = tmp_path / "m" / "model.safetensors"
    os.mkfifo(fifo)
    released = threading.Event()

    def release_a_blocked_open() -> None:
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody has it open for reading
            return
        released.set()
        os.close(writer)  # the reader then sees the end of the file

    timer = threading.Timer(10, release_a_blocked_open)
    timer.start()
    outcome: list[str] = []
    try:
        async with ModelCache(
            f"file://{tmp_path}/{{model_id}}", device_budget=1 << 20, zero_copy=zero_copy
        ) as cache:
            try:
                async with cache.use("m"):
                    outcome.append("served")
            except ModelCacheError as exc:
                outcome.append(type(exc).__name__)
    finally:
        timer.cancel()
    assert not released.is_set()
    assert outcome and outcome != ["served"], outcome
