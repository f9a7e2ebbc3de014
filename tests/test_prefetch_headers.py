"""A device prefetch reads its loads' headers together before the loads start (issue 16 item 2,
`_prefill`): the same results, errors, versions and stats as each load reading its own, and
every irregular case falls back to the load's own header read."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from safetensors.torch import load, save, save_file

import modelcache._cache as cache_module
import modelcache._lower as lower
import modelcache._store as store_module
from modelcache import ModelCache, ModelInfo
from modelcache._cache import ModelCache as _ModelCache
from modelcache._loader import read_model_info

from .conftest import check_invariants, hold_every_read_slot, model_bytes


class Reads:
    """Counts the loads that read their own headers (`read_model_info`), by model id."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ids: list[str] = []
        real = read_model_info

        async def counting(store: Any, model_id: str, url: str | None = None) -> ModelInfo:
            self.ids.append(model_id)
            return await real(store, model_id, url)

        monkeypatch.setattr(lower, "read_model_info", counting)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    return Reads(monkeypatch)


def _write(root: Path, model_id: str, data: bytes, name: str = "model.safetensors") -> None:
    (root / model_id).mkdir(exist_ok=True)
    (root / model_id / name).write_bytes(data)


def _weights(data: bytes) -> torch.Tensor:
    return load(data)["w"]


def _cache(root: Path, **kwargs: Any) -> ModelCache:
    return ModelCache(
        f"file://{root}/{{model_id}}",
        device_budget="64MiB",
        revalidate_after=None,
        failure_ttl=0,
        **kwargs,
    )


def _info(cache: ModelCache, model_id: str) -> ModelInfo | None:
    c: _ModelCache = cache
    return c._known_info(model_id)


def _counts(cache: ModelCache) -> tuple[int, ...]:
    s = cache.stats()
    return (s.loads, s.models, s.bytes_resident, s.load_failures, s.loading, s.waiters, s.leased)


async def _outcome(cache: ModelCache, ids: list[str], *, prefetch: bool) -> list[Any]:
    """Per id: its error (type and message) or its info and weights; then the cache's counts."""
    errors: dict[str, BaseException] = {}
    if prefetch:
        try:
            await cache.prefetch(ids)
        except Exception as exc:
            errors[str(getattr(exc, "model_id", ""))] = exc
    out: list[Any] = []
    for model_id in ids:
        if model_id in errors:
            out.append((type(errors[model_id]), str(errors[model_id])))
            continue
        try:
            async with cache.use(model_id) as weights:
                out.append((_info(cache, model_id), {k: v.clone() for k, v in weights.items()}))
        except Exception as exc:
            out.append((type(exc), str(exc)))
    return [*out, _counts(cache), cache.store.bytes_read]


def _fields(info: ModelInfo | None) -> tuple[Any, ...] | None:
    """An info's fields (`ModelInfo` compares by identity)."""
    if info is None:
        return None
    return tuple(getattr(info, field.name) for field in dataclasses.fields(info))


def _same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], dict):
            assert _fields(x[0]) == _fields(y[0])  # the info, its version included
            assert x[1].keys() == y[1].keys()
            assert all(torch.equal(x[1][k], y[1][k]) for k in x[1])
        else:
            assert x == y


async def test_a_prefetch_reads_its_loads_headers_in_one_worker_call_with_the_same_results(
    tmp_path: Path, reads: Reads
) -> None:
    """A prefetch of local one-file models reads all their headers in one worker-thread call and
    no load reads its own; infos (versions), weights, stats and bytes read are use()'s."""
    ids = [f"m{i}" for i in range(20)]
    for i, model_id in enumerate(ids):
        _write(tmp_path, model_id, model_bytes(10 + i, seed=i))
    async with _cache(tmp_path) as batched:
        small = batched.store._small
        before = small.batches
        await batched.prefetch(ids)
        assert small.batches - before == 1
        assert reads.ids == []
        check_invariants(batched)
        got = await _outcome(batched, ids, prefetch=False)  # hits now
    async with _cache(tmp_path) as per_load:
        for model_id in ids:
            async with per_load.use(model_id):
                pass
        want = await _outcome(per_load, ids, prefetch=False)
    assert sorted(reads.ids) == sorted(ids)  # the use()s' loads read their own
    _same(got, want)


def _sharded(root: Path, model_id: str) -> None:
    (root / model_id).mkdir()
    save_file({"a": torch.ones(3)}, str(root / model_id / "s1.safetensors"))
    save_file({"b": torch.zeros(2)}, str(root / model_id / "s2.safetensors"))
    index = {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (root / model_id / "model.safetensors.index.json").write_text(json.dumps(index))


def _long_header(root: Path, model_id: str) -> None:
    tensors = {f"tensor_with_a_long_name_{i:04d}": torch.zeros(1) for i in range(300)}
    _write(root, model_id, save(tensors))


IRREGULAR: dict[str, Callable[[Path, str], None]] = {
    "sharded": _sharded,
    "long header": _long_header,
    "missing": lambda root, model_id: None,
    "not safetensors": lambda root, model_id: _write(root, model_id, b"\x10" + b"x" * 100),
    "a directory": lambda root, model_id: (root / model_id / "model.safetensors").mkdir(
        parents=True
    ),
}


@pytest.mark.parametrize("case", sorted(IRREGULAR))
async def test_an_irregular_model_falls_back_to_its_loads_own_header_read(
    tmp_path: Path, reads: Reads, case: str
) -> None:
    """A model the batched read cannot describe (sharded, a header past the first read, missing,
    not safetensors, not a file) is read by its own load: the same info or error, and stats, as
    use() gives, and the regular ids beside it are still read in the batch."""
    IRREGULAR[case](tmp_path, "odd")
    ids = ["r0", "odd", "r1"]
    for i, model_id in enumerate(("r0", "r1")):
        _write(tmp_path, model_id, model_bytes(8, seed=i))
    async with _cache(tmp_path) as batched:
        got = await _outcome(batched, ids, prefetch=True)
        check_invariants(batched)
    assert reads.ids.count("odd") >= 1 and "r0" not in reads.ids and "r1" not in reads.ids
    async with _cache(tmp_path) as per_load:
        want = await _outcome(per_load, ids, prefetch=False)
    # The batch read the regular ids' heads once more than use() did, and the odd one's first
    # bytes when it had a file: bytes_read is the store's true count, so it is not compared.
    _same(got[:-1], want[:-1])


async def test_a_file_changed_during_the_batched_read_is_read_again_by_its_load(
    tmp_path: Path, reads: Reads, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file whose version tag differs before and after the batched read is not described from
    it: its load reads its headers itself, and gets the version of what it read."""
    _write(tmp_path, "a", model_bytes(16))
    real = store_module._read_head_local
    calls: list[str] = []

    def changing(path: str, limit: int, opener: Any) -> tuple[int, bytes, str, str]:
        size, data, before, after = real(path, limit, opener)
        calls.append(path)
        return size, data, before, after + ("-changed" if len(calls) == 1 else "")

    monkeypatch.setattr(store_module, "_read_head_local", changing)
    async with _cache(tmp_path) as batched:
        await batched.prefetch(["a"])
        got = _info(batched, "a")
    assert reads.ids == ["a"] and len(calls) == 2
    async with _cache(tmp_path) as per_load:
        async with per_load.use("a"):
            pass
        assert _fields(_info(per_load, "a")) == _fields(got)


async def test_a_model_on_the_host_tier_is_prefetched_from_there_without_a_header_read(
    tmp_path: Path, reads: Reads
) -> None:
    """An id whose weights are in host memory is not read by the batch: its load takes them from
    the host tier, as use()'s does."""
    _write(tmp_path, "a", model_bytes(16))
    _write(tmp_path, "b", model_bytes(16, seed=1))
    async with _cache(tmp_path, host_budget="1MiB") as cache:
        async with cache.use("a"):
            pass
        assert cache.evict("a")
        await cache.wait_idle()
        assert cache.tier_of("a") == "host"
        asked: list[list[str]] = []
        real = cache.store.read_heads

        async def spy(urls: Any, limit: int) -> Any:
            asked.append([str(url) for url in urls])
            return await real(urls, limit)

        cache.store.read_heads = spy  # type: ignore[method-assign]
        await cache.prefetch(["a", "b"])
        assert asked == [[f"file://{tmp_path}/b/model.safetensors"]]
        assert sorted(cache.resident()) == ["a", "b"]
        check_invariants(cache)
    assert reads.ids == ["a"]  # its first load only


async def test_a_prefetched_model_that_needs_side_files_reads_them_after_the_batch(
    tmp_path: Path, reads: Reads
) -> None:
    """A bound class that needs config.json and side files gets them read by its load after the
    batched header read, and builds what use() builds."""
    for model_id in ("a", "b"):
        _write(tmp_path, model_id, model_bytes(8))
        (tmp_path / model_id / "config.json").write_text(json.dumps({"id": model_id}))
        (tmp_path / model_id / "tokenizer.json").write_text("{}")

    def bind(cache: ModelCache) -> type:
        @cache.model
        class Tok:
            side_files = ("tokenizer.json",)

            @classmethod
            def from_weights(cls, weights: Any, info: ModelInfo) -> Any:
                return (info.config, sorted(info.files))

        return Tok

    async with _cache(tmp_path) as batched:
        bound = bind(batched)
        await batched.prefetch(["a", "b"])
        got = []
        for model_id in ("a", "b"):
            async with bound.use(model_id) as built:  # type: ignore[attr-defined]
                got.append(built)
    assert reads.ids == []
    async with _cache(tmp_path) as per_load:
        bound = bind(per_load)
        want = []
        for model_id in ("a", "b"):
            async with bound.use(model_id) as built:  # type: ignore[attr-defined]
                want.append(built)
    assert got == want == [({"id": "a"}, ["tokenizer.json"]), ({"id": "b"}, ["tokenizer.json"])]


async def test_a_prefetch_cancelled_while_it_reads_headers_leaves_nothing(
    tmp_path: Path,
) -> None:
    """No entry or reservation exists while the batched header read waits, only its own task:
    a prefetch cancelled then leaves nothing behind once it ends, its results dropped."""
    for model_id in ("a", "b"):
        _write(tmp_path, model_id, model_bytes(8))
    async with _cache(tmp_path) as cache:
        give_back = await hold_every_read_slot(cache.store)  # the header batch cannot start
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(cache.prefetch, ["a", "b"])
                await anyio.wait_all_tasks_blocked()
                stats = cache.stats()
                assert (stats.loading, stats.models, stats.background) == (0, 0, 1)
                scope.cancel()
        give_back()
        await cache.wait_idle()
        stats = cache.stats()
        assert (stats.loading, stats.waiters, stats.bytes_reserved, stats.models) == (0, 0, 0, 0)
        small = cache.store._small
        assert (len(small._queue), small._drivers) == (0, 0)
        check_invariants(cache)
        await cache.prefetch(["a", "b"])  # and a prefetch after it reads them as usual
        assert sorted(cache.resident()) == ["a", "b"]


async def test_a_prefetch_reads_a_groups_headers_only_when_its_loads_can_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group's headers are read once the window has room for its loads, not while earlier
    loads finish: a model replaced by one of another size meanwhile loads at its new version,
    as use() would, not a ModelChangedError from headers read before it was replaced."""
    monkeypatch.setattr(cache_module, "PREFETCH_WINDOW", 2)  # groups of one id, two in flight
    for i, nbytes in enumerate((10, 11, 12)):
        _write(tmp_path, f"m{i}", model_bytes(nbytes, seed=i))
    real_wait = _ModelCache._prefetch_wait

    async def wait(self: _ModelCache, entry: Any, *args: Any) -> None:
        if entry.model_id == "m0":  # m2 waits for room: a new version arrives meanwhile
            _write(tmp_path, "m2", model_bytes(40, seed=9))
        await real_wait(self, entry, *args)

    monkeypatch.setattr(_ModelCache, "_prefetch_wait", wait)
    async with _cache(tmp_path) as cache:
        await cache.prefetch(["m0", "m1", "m2"])
        async with cache.use("m2") as weights:
            assert torch.equal(weights["w"], _weights(model_bytes(40, seed=9)))
        assert cache.stats().loads == 3
        assert cache.stats().load_failures == 0
        check_invariants(cache)


async def test_a_prefetch_cancelled_while_a_file_of_its_group_blocks_returns_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefetch cancelled while its group's header read blocks on one file (a FIFO with no
    writer, a stalled mount) returns at once, as use()'s caller does; the read's task ends
    with the read, and nothing is left."""
    for model_id in ("slow", "a", "b"):
        _write(tmp_path, model_id, model_bytes(8))
    entered, release = threading.Event(), threading.Event()
    real = store_module._read_head_local

    def blocking(path: str, *args: Any) -> Any:
        if "/slow/" in path:
            entered.set()
            release.wait()
        return real(path, *args)

    monkeypatch.setattr(store_module, "_read_head_local", blocking)
    async with _cache(tmp_path) as cache:
        ended = False
        try:
            async with anyio.create_task_group() as tg:

                async def prefetch() -> None:
                    nonlocal ended
                    with anyio.CancelScope() as scope:
                        prefetching.append(scope)
                        await cache.prefetch(["slow", "a", "b"])
                    ended = True

                prefetching: list[anyio.CancelScope] = []
                tg.start_soon(prefetch)
                await anyio.to_thread.run_sync(entered.wait)
                prefetching[0].cancel()
                await anyio.wait_all_tasks_blocked()
                returned = ended
                release.set()
        finally:
            release.set()
        assert returned  # it had waited for the blocked read, cancelled
        await cache.wait_idle()
        stats = cache.stats()
        assert (stats.loading, stats.waiters, stats.bytes_reserved, stats.background) == (0,) * 4
        check_invariants(cache)
