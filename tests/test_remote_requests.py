"""Requests per remote load (`_firstget`): on http(s) and s3 a header or a config.json is one
ranged GET that also gives the file's size and version tag, so a single-file model with its
config costs 3 requests (header, config, weights), not 5 (a HEAD before each of the first two).
Every guarantee of the two-request path holds: one version per load, a side file over the limit
refused from the response's headers without its body, a server that ignores Range, missing and
empty files. The servers are in ``tests/servers.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import pytest
import torch
from fsspec.asyn import AsyncFileSystem

from modelcache import ModelCache, ModelChangedError, ModelFormatError, Store, _loader, _sockets
from modelcache._versions import reading
from tests.safetensors_files import shard_name, write_model, write_sharded

if TYPE_CHECKING:  # imported by pytest as a plugin: importing it here first would skip rewriting
    from tests.servers import HttpServer, S3Prefix, SeaweedFS

pytest_plugins = ("tests.servers",)

MIB = 1 << 20
CONFIG = {"hidden": 7, "name": "tiny"}


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}


async def load_with_config(store: Store, model_id: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Load ``model_id`` through a fresh ModelCache with a builder that asks for its config."""
    cache = ModelCache(store, device_budget="16MiB")

    @cache.model
    class WithConfig:
        def __init__(self, config: Any, weights: dict[str, torch.Tensor]) -> None:
            self.config, self.weights = config, weights

        @classmethod
        def from_weights(cls, weights: Any, info: Any) -> WithConfig:
            return cls(info.config, {k: t.clone() for k, t in weights.items()})

    async with cache, cache.use(model_id, model=WithConfig) as built:
        return built.config, built.weights


def http_requests(server: HttpServer, *urls: str) -> Counter[str]:
    """Requests the server saw for ``urls``, by method."""
    return Counter({m: sum(server.count(m, u) for u in urls) for m in ("GET", "HEAD")})


def count_s3_calls(store: Store, calls: Counter[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Count every S3 operation ``store``'s client makes (botocore's before-call event) and
    the presigned GETs of weights that socket threads make (`_sockets`)."""
    fetch = _sockets._fetch

    def counted(*args: Any) -> int:
        calls["presigned GET"] += 1
        return fetch(*args)

    monkeypatch.setattr(_sockets, "_fetch", counted)

    async def install(url: str) -> None:
        fs, _ = await store._remote(url)
        await fs.set_session()

        def seen(model: Any, **_: Any) -> None:
            calls[model.name] += 1

        fs.s3.meta.events.register("before-call.s3", seen)

    return install


# -- http ------------------------------------------------------------------------------------------


async def test_an_http_load_with_config_makes_three_requests(http_server: HttpServer) -> None:
    """Header, config and weights: one GET each, no HEAD (it was 2 HEADs + 3 GETs)."""
    root, url = http_server.fresh_dir()
    want = tensors(1)
    write_model(root / "m", want)
    (root / "m" / "config.json").write_text(json.dumps(CONFIG))
    config, got = await load_with_config(Store(f"{url}/{{model_id}}/"), "m")
    assert config == CONFIG
    assert all(torch.equal(got[k], want[k]) for k in want)
    seen = http_requests(http_server, f"{url}/m/model.safetensors", f"{url}/m/config.json")
    assert seen == Counter({"GET": 3, "HEAD": 0})


async def test_an_http_load_without_config_makes_three_requests(http_server: HttpServer) -> None:
    """A missing config.json is one GET answered 404 (config None), not a HEAD and a GET."""
    root, url = http_server.fresh_dir()
    write_model(root / "m", tensors(2))
    config, _ = await load_with_config(Store(f"{url}/{{model_id}}/"), "m")
    assert config is None
    seen = http_requests(http_server, f"{url}/m/model.safetensors", f"{url}/m/config.json")
    assert seen == Counter({"GET": 3, "HEAD": 0})


async def test_an_http_sharded_load_makes_one_request_per_file_read(
    http_server: HttpServer,
) -> None:
    """A sharded model: the single file's 404, the index, each shard's header, the config and
    each shard's data: one GET each, no HEAD (it was 12 requests for 2 shards, now 7)."""
    root, url = http_server.fresh_dir()
    shards = [{"a": torch.randn(32, 32)}, {"b": torch.randn(16)}]
    write_sharded(root / "m", shards)
    (root / "m" / "config.json").write_text(json.dumps(CONFIG))
    config, got = await load_with_config(Store(f"{url}/{{model_id}}/"), "m")
    assert config == CONFIG
    assert torch.equal(got["a"], shards[0]["a"]) and torch.equal(got["b"], shards[1]["b"])
    names = ["model.safetensors", "model.safetensors.index.json", "config.json"]
    names += [shard_name(i, 2) for i in range(2)]
    seen = http_requests(http_server, *(f"{url}/m/{n}" for n in names))
    assert seen == Counter({"GET": 7, "HEAD": 0})


async def test_the_loaders_side_file_read_is_one_request(http_server: HttpServer) -> None:
    """`_loader.read_config` (the refresh's and an index's read) is one GET too."""
    root, url = http_server.fresh_dir()
    write_model(root / "m", tensors(3))
    (root / "m" / "config.json").write_text(json.dumps(CONFIG))
    store = Store(f"{url}/{{model_id}}/")
    try:
        assert await _loader.read_config(store, "m") == CONFIG
    finally:
        await store.aclose()
    assert http_requests(http_server, f"{url}/m/config.json") == Counter({"GET": 1, "HEAD": 0})


async def test_an_http_header_read_records_the_tag_a_stat_gives(http_server: HttpServer) -> None:
    """The version tag taken from the GET's headers is the one a HEAD gives for the same file,
    so a later revalidation (`file_tag`) never takes an unchanged model for a new version."""
    root, url = http_server.fresh_dir()
    write_model(root / "m", tensors(4))
    file_url = f"{url}/m/model.safetensors"
    store = Store(f"{url}/{{model_id}}/")
    try:
        with reading() as tags:
            size, _ = await store.read_head(file_url, 64, model_id="m")
        assert size == (root / "m" / "model.safetensors").stat().st_size
        assert tags[file_url] == await store.file_tag(file_url, model_id="m")
        assert tags[file_url].startswith('"')  # a strong ETag: later reads carry If-Match
    finally:
        await store.aclose()


async def test_an_http_file_changed_after_its_header_fails_the_weights_read(
    http_server: HttpServer,
) -> None:
    """The weights' reads are pinned to the ETag of the header's GET: a file replaced between
    them raises ModelChangedError, never a model of two versions."""
    root, url = http_server.fresh_dir()
    path = root / "m" / "model.safetensors"
    write_model(root / "m", tensors(5))
    file_url = f"{url}/m/model.safetensors"
    store = Store(f"{url}/{{model_id}}/")
    try:
        with reading():
            size, _ = await store.read_head(file_url, 64, model_id="m")
            write_model(root / "m", tensors(6))  # same size, new bytes and mtime: a new ETag
            assert path.stat().st_size == size
            with pytest.raises(ModelChangedError, match="changed in the store"):
                await store.read_into(file_url, 0, memoryview(bytearray(size)), model_id="m")
    finally:
        await store.aclose()


@pytest.mark.parametrize("read", ["loader", "sidefiles"])
async def test_an_http_side_file_over_the_limit_is_refused_unread(
    http_server: HttpServer, monkeypatch: pytest.MonkeyPatch, read: str
) -> None:
    """A config.json over the side-file limit is refused from the GET's total: its body is not
    read, even from a server that ignores Range and sends the whole file."""
    monkeypatch.setattr(_loader, "_MAX_SIDE_FILE", 64 << 10)
    monkeypatch.setattr("modelcache._sidefiles.MAX_SIDE_FILE", 64 << 10)
    root, url = http_server.fresh_dir()
    write_model(root / "m", tensors(7))
    big = 64 * MIB
    (root / "m" / "config.json").write_bytes(b" " * big)
    http_server.ignore_ranges = True
    store = Store(f"{url}/{{model_id}}/")
    try:
        with pytest.raises(ModelFormatError, match=r"config\.json is 67108864 bytes"):
            if read == "loader":
                await _loader.read_config(store, "m")
            else:
                await load_with_config(store, "m")
    finally:
        await store.aclose()
    assert http_requests(http_server, f"{url}/m/config.json") == Counter({"GET": 1, "HEAD": 0})
    # What the socket buffers took before the connection closed, never the file.
    assert http_server.bytes_sent < big // 2, http_server.bytes_sent


async def test_an_http_server_ignoring_range_serves_header_and_config(
    http_server: HttpServer,
) -> None:
    """A server that answers every GET with the whole file (200): the header's size is its
    Content-Length, the config is read whole, the model loads bit-exact, in 3 requests."""
    root, url = http_server.fresh_dir()
    want = tensors(8)
    write_model(root / "m", want)
    (root / "m" / "config.json").write_text(json.dumps(CONFIG))
    http_server.ignore_ranges = True
    config, got = await load_with_config(Store(f"{url}/{{model_id}}/"), "m")
    assert config == CONFIG
    assert all(torch.equal(got[k], want[k]) for k in want)
    seen = http_requests(http_server, f"{url}/m/model.safetensors", f"{url}/m/config.json")
    assert seen == Counter({"GET": 3, "HEAD": 0})


async def test_an_empty_http_file_has_size_zero(http_server: HttpServer) -> None:
    """A GET of bytes=0-... of an empty file (a 416) reads as size 0: an empty config.json is
    invalid JSON (ModelFormatError), an empty weights file's header is (0, b'')."""
    root, url = http_server.fresh_dir()
    (root / "m").mkdir()
    (root / "m" / "empty.bin").write_bytes(b"")
    (root / "m" / "config.json").write_bytes(b"")
    store = Store(f"{url}/{{model_id}}/")
    try:
        assert await store.read_head(f"{url}/m/empty.bin", 64, model_id="m") == (0, b"")
        with pytest.raises(ModelFormatError, match="not valid JSON"):
            await _loader.read_config(store, "m")
    finally:
        await store.aclose()
    # The two-request path (a subclass): size 0, then no request for an empty range.
    sizing = SizingStore(f"{url}/{{model_id}}/")
    try:
        assert await sizing.read_head(f"{url}/m/empty.bin", 64, model_id="m") == (0, b"")
    finally:
        await sizing.aclose()


class SizingStore(Store):
    """Counts its own size calls: a subclass that overrides `size` must see them made."""

    sized = 0

    async def size(self, url: str, *, model_id: str) -> int:
        self.sized += 1
        return await super().size(url, model_id=model_id)


async def test_a_store_subclass_overriding_size_still_gets_it_called(
    http_server: HttpServer,
) -> None:
    """A Store subclass that overrides size (a wrapper, a test's gate) is called for the header
    and the config, as before the one-GET path existed."""
    root, url = http_server.fresh_dir()
    write_model(root / "m", tensors(9))
    (root / "m" / "config.json").write_text(json.dumps(CONFIG))
    store = SizingStore(f"{url}/{{model_id}}/")
    config, _ = await load_with_config(store, "m")
    assert config == CONFIG
    assert store.sized == 2


# -- s3 --------------------------------------------------------------------------------------------


async def test_an_s3_load_with_config_makes_three_requests(
    seaweedfs: SeaweedFS, s3_prefix: S3Prefix, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On S3: header, config and weights are one request each, no HeadObject: GetObject for
    the header and the config, a presigned GET for the weights."""
    want = tensors(10)
    s3_prefix.put("m/model.safetensors", write_model(tmp_path, want))
    s3_prefix.put("m/config.json", json.dumps(CONFIG).encode())
    store = Store(f"{s3_prefix.url}/{{model_id}}/", storage_options=seaweedfs.s3_options)
    calls: Counter[str] = Counter()
    await count_s3_calls(store, calls, monkeypatch)(f"{s3_prefix.url}/m/model.safetensors")
    config, got = await load_with_config(store, "m")
    assert config == CONFIG
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert calls == Counter({"GetObject": 2, "presigned GET": 1})


async def test_an_s3_load_without_config_makes_three_requests(
    seaweedfs: SeaweedFS, s3_prefix: S3Prefix, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing config.json on S3 is one GetObject answered NoSuchKey: config None; the weights
    one presigned GET."""
    s3_prefix.put("m/model.safetensors", write_model(tmp_path, tensors(11)))
    store = Store(f"{s3_prefix.url}/{{model_id}}/", storage_options=seaweedfs.s3_options)
    calls: Counter[str] = Counter()
    await count_s3_calls(store, calls, monkeypatch)(f"{s3_prefix.url}/m/model.safetensors")
    config, _ = await load_with_config(store, "m")
    assert config is None
    assert calls == Counter({"GetObject": 2, "presigned GET": 1})


async def test_an_s3_header_read_records_the_tag_a_stat_gives(
    seaweedfs: SeaweedFS, s3_prefix: S3Prefix, tmp_path: Path
) -> None:
    """The tag taken from GetObject is the one HeadObject gives (`file_tag`): the object's ETag."""
    s3_prefix.put("m/model.safetensors", write_model(tmp_path, tensors(12)))
    file_url = f"{s3_prefix.url}/m/model.safetensors"
    store = Store(f"{s3_prefix.url}/{{model_id}}/", storage_options=seaweedfs.s3_options)
    try:
        with reading() as tags:
            await store.read_head(file_url, 64, model_id="m")
        assert tags[file_url] == await store.file_tag(file_url, model_id="m")
        assert tags[file_url] == await store.etag(file_url, model_id="m")
    finally:
        await store.aclose()


async def test_an_s3_object_changed_after_its_header_fails_the_weights_read(
    seaweedfs: SeaweedFS, s3_prefix: S3Prefix, tmp_path: Path
) -> None:
    """The weights' reads carry the ETag of the header's GetObject: an object replaced between
    them raises ModelChangedError."""
    s3_prefix.put("m/model.safetensors", write_model(tmp_path / "a", tensors(13)))
    file_url = f"{s3_prefix.url}/m/model.safetensors"
    store = Store(f"{s3_prefix.url}/{{model_id}}/", storage_options=seaweedfs.s3_options)
    try:
        with reading():
            size, _ = await store.read_head(file_url, 64, model_id="m")
            s3_prefix.put("m/model.safetensors", write_model(tmp_path / "b", tensors(14)))
            with pytest.raises(ModelChangedError, match="changed in the store"):
                await store.read_into(file_url, 0, memoryview(bytearray(size)), model_id="m")
    finally:
        await store.aclose()


async def test_an_s3_side_file_over_the_limit_is_refused_unread(
    seaweedfs: SeaweedFS, s3_prefix: S3Prefix, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On S3 a config.json over the limit is refused from GetObject's ContentRange total, with
    none of its body counted as read."""
    monkeypatch.setattr(_loader, "_MAX_SIDE_FILE", 64 << 10)
    s3_prefix.put("m/config.json", b" " * (4 * MIB))
    store = Store(f"{s3_prefix.url}/{{model_id}}/", storage_options=seaweedfs.s3_options)
    try:
        with pytest.raises(ModelFormatError, match=rf"config\.json is {4 * MIB} bytes"):
            await _loader.read_config(store, "m")
        assert store.bytes_read == 0
    finally:
        await store.aclose()


async def test_empty_and_missing_s3_objects(seaweedfs: SeaweedFS, s3_prefix: S3Prefix) -> None:
    """An empty object reads as size 0 (an empty config.json is invalid JSON); a missing
    config.json is None, as on the two-request path."""
    s3_prefix.put("m/empty.bin", b"")
    store = Store(f"{s3_prefix.url}/{{model_id}}/", storage_options=seaweedfs.s3_options)
    try:
        assert await store.read_head(f"{s3_prefix.url}/m/empty.bin", 64, model_id="m") == (0, b"")
        assert await _loader.read_config(store, "m") is None
        s3_prefix.put("m/config.json", b"")
        with pytest.raises(ModelFormatError, match="not valid JSON"):
            await _loader.read_config(store, "m")
    finally:
        await store.aclose()


async def test_an_http_server_with_weak_etags_serves_loads(http_server: HttpServer) -> None:
    """A weak ETag is never sent back as If-Match (a server compares If-Match strongly: a weak
    tag never matches, 412): a model from a server that sends weak ETags loads, bit-exact."""
    root, url = http_server.fresh_dir()
    http_server.weak_etags = True
    want = tensors(7)
    write_model(root / "m", want)
    (root / "m" / "config.json").write_text(json.dumps(CONFIG))
    config, got = await load_with_config(Store(f"{url}/{{model_id}}/"), "m")
    assert config == CONFIG
    assert all(torch.equal(got[k], want[k]) for k in want)


async def test_an_http_file_with_a_weak_etag_changed_after_its_header_fails_the_weights_read(
    http_server: HttpServer,
) -> None:
    """A weak ETag is not sent as If-Match, but the weights' responses must still carry it: a
    file replaced after its header read raises ModelChangedError."""
    root, url = http_server.fresh_dir()
    http_server.weak_etags = True
    path = root / "m" / "model.safetensors"
    write_model(root / "m", tensors(5))
    file_url = f"{url}/m/model.safetensors"
    store = Store(f"{url}/{{model_id}}/")
    try:
        with reading() as tags:
            size, _ = await store.read_head(file_url, 64, model_id="m")
            assert tags[file_url].startswith('W/"')
            write_model(root / "m", tensors(6))  # same size, new bytes and mtime: a new ETag
            assert path.stat().st_size == size
            with pytest.raises(ModelChangedError, match="changed in the store"):
                await store.read_into(file_url, 0, memoryview(bytearray(size)), model_id="m")
    finally:
        await store.aclose()


# -- other async filesystems ----------------------------------------------------------------------


class _Overlap:
    """Per file: whether a size call and a read from byte 0 were in flight together."""

    def __init__(self) -> None:
        self.started: dict[tuple[str, str], asyncio.Event] = {}
        self.overlapped: dict[str, bool] = {}

    def event(self, kind: str, path: str) -> asyncio.Event:
        return self.started.setdefault((kind, path), asyncio.Event())

    async def meet(self, kind: str, other: str, path: str) -> None:
        self.event(kind, path).set()
        try:
            await asyncio.wait_for(self.event(other, path).wait(), 1.0)
            self.overlapped.setdefault(path, True)
        except TimeoutError:
            self.overlapped[path] = False


OVERLAP = _Overlap()


class _OverlapFileSystem(AsyncFileSystem):  # type: ignore[misc]
    """Local files as an async filesystem (as gcsfs or adlfs are: no `first_get`) that records
    whether each file's size and first bytes were asked for at once."""

    protocol = "overlapfs"
    root_marker = "/"

    async def _info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        st = os.stat(path)
        await OVERLAP.meet("size", "head", path)
        return {"name": path, "size": st.st_size, "type": "file", "mtime": st.st_mtime}

    async def _cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        path = self._strip_protocol(path)
        if not start:
            await OVERLAP.meet("head", "size", path)

        def read() -> bytes:
            with open(path, "rb") as f:
                f.seek(start or 0)
                return f.read() if end is None else f.read(max(0, end - (start or 0)))

        return await asyncio.to_thread(read)


fsspec.register_implementation("overlapfs", _OverlapFileSystem, clobber=True)


async def test_another_async_filesystem_gets_size_and_first_bytes_asked_at_once(
    tmp_path: Path,
) -> None:
    """On an async filesystem without the one-GET path, a header's and a config's size and
    first bytes are asked for together: one round trip each, not two in turn."""
    want = tensors(13)
    write_model(tmp_path / "m", want)
    (tmp_path / "m" / "config.json").write_text(json.dumps(CONFIG))
    OVERLAP.overlapped.clear()
    config, got = await load_with_config(Store(f"overlapfs://{tmp_path}/{{model_id}}/"), "m")
    assert config == CONFIG
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert OVERLAP.overlapped == {
        str(tmp_path / "m" / "model.safetensors"): True,
        str(tmp_path / "m" / "config.json"): True,
    }
