"""modelcache._disk: the disk tier's files, budget, LRU, pins, restarts, leftovers and races."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import safetensors.torch
import torch
import xxhash

from modelcache import CupyBackend, ModelCache, ModelCacheError, StoreError
from modelcache._disk import DiskEntry, DiskTier
from modelcache._diskformat import (
    CHECKSUM_FIELD,
    MANIFEST_NAME,
    EntryDamagedError,
    entry_name,
    pwrite_all,
)
from modelcache._format import ModelInfo
from modelcache._loader import fill_buffer, read_config, read_model_info
from modelcache._store import Store
from modelcache._torch import TorchBackend

from .conftest import GatedStore, MemoryModels, model_bytes, settle
from .fake_cupy import FakeCupy
from .safetensors_files import put, tensor_bytes, write_model, write_sharded

pytestmark = pytest.mark.usefixtures("count_threads")

# -- helpers --------------------------------------------------------------------------------------


def fetch(store: Store, model_id: str) -> tuple[ModelInfo, memoryview]:
    """A model's info and its contiguous buffer, as the cache would hold them."""

    async def run() -> tuple[ModelInfo, memoryview]:
        info = await read_model_info(store, model_id)
        buffer = memoryview(bytearray(info.nbytes))
        await fill_buffer(store, info, buffer)
        return info, buffer

    return anyio.run(run)


def load_tensors(store: Store, model_id: str, *, zero_copy: bool = True) -> dict[str, bytes]:
    """Every tensor's bytes, loaded through the loader and the torch backend."""

    async def run() -> dict[str, bytes]:
        info = await read_model_info(store, model_id)
        weights = await TorchBackend("cpu", zero_copy=zero_copy).load(store, info)
        return {name: tensor_bytes(t) for name, t in weights.items()}

    return anyio.run(run)


class Models:
    """Small one-tensor models under a local store root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = Store(f"file://{root}/{{model_id}}")

    def add(self, model_id: str, nbytes: int = 1000, seed: int = 0) -> tuple[ModelInfo, memoryview]:
        put(self.root / model_id / "model.safetensors", model_bytes(nbytes, seed))
        return fetch(self.store, model_id)


@pytest.fixture
def models(tmp_path: Path) -> Models:
    return Models(tmp_path / "store")


@pytest.fixture
def disk_dir(tmp_path: Path) -> Path:
    return tmp_path / "disk"


def opened(directory: Path, budget: int | str) -> DiskTier:
    tier = DiskTier(directory, budget)
    tier.open()
    return tier


def disk_total(directory: Path) -> int:
    """Bytes of every file inside complete entries, measured on disk."""
    return sum(
        f.stat().st_size
        for entry in directory.iterdir()
        if not entry.name.startswith(".")
        for f in entry.rglob("*")
        if f.is_file()
    )


def leftovers(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith((".tmp-", ".del-")))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


# 3 entries of ~1350 bytes (1000-byte model + header + manifest) fit, 4 do not.
BUDGET = 4200


# -- round trip -----------------------------------------------------------------------------------


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tiny": torch.randint(0, 256, (3,), dtype=torch.uint8, generator=g),
        "f32": torch.randn(5, 7, generator=g),
        "f16": torch.randn(11, generator=g).half(),
        "i64": torch.randint(-(2**40), 2**40, (4,), dtype=torch.int64, generator=g),
    }


@pytest.mark.parametrize(
    "layout", ["single", "misaligned", "sharded", "sharded-misaligned", "one-shard-index", "file"]
)
def test_round_trip_is_byte_exact(tmp_path: Path, disk_dir: Path, layout: str) -> None:
    """An entry holds the original files byte for byte and loads the same tensors back."""
    root = tmp_path / "store"
    model_id = "m-1"
    template = f"file://{root}/{{model_id}}"
    originals: dict[str, Path] = {}
    if layout in ("single", "misaligned"):
        write_model(root / model_id, _tensors(0), misalign=layout == "misaligned")
        originals["model.safetensors"] = root / model_id / "model.safetensors"
    elif layout == "file":
        write_model(root, _tensors(0), misalign=True, name=f"{model_id}.safetensors")
        template = f"file://{root}/{{model_id}}.safetensors"
        originals["model.safetensors"] = root / f"{model_id}.safetensors"
    else:
        shards = [_tensors(1), {f"{k}2": v for k, v in _tensors(2).items()}]
        if layout == "one-shard-index":
            shards = shards[:1]
        weight_map = write_sharded(
            root / model_id,
            shards,
            misalign=layout == "sharded-misaligned",
            metadata={"total_size": 123, "format": "pt"},
        )
        originals.update({name: root / model_id / name for name in set(weight_map.values())})
    store = Store(template)
    info, buffer = fetch(store, model_id)
    if layout == "misaligned":
        assert len(info.segments) > 1  # the buffer layout differs from the file's
    info = dataclasses.replace(info, config={"hidden_size": 7, "names": ["a", "b"]})

    tier = opened(disk_dir, "1MiB")
    entry = tier.write(info, buffer, etag='"abc"')

    assert entry is not None
    assert (entry.model_id, entry.etag, entry.nbytes) == (model_id, '"abc"', info.nbytes)
    directory = Path(entry.directory)
    for name, original in originals.items():
        assert (directory / name).read_bytes() == original.read_bytes(), name
    if layout not in ("single", "misaligned", "file"):
        written = json.loads((directory / "model.safetensors.index.json").read_bytes())
        assert written["weight_map"] == weight_map
    assert entry.size == disk_total(disk_dir) == tier.stats().bytes
    assert tier.get(model_id) == entry
    assert load_tensors(tier.store, model_id) == load_tensors(store, model_id)
    assert load_tensors(tier.store, model_id, zero_copy=False) == load_tensors(store, model_id)
    read_info, read_view = fetch(tier.store, model_id)
    tier.check_loaded(entry, read_info, read_view)  # what was written passes its checksums
    tier.check_loaded(entry, read_info, None)
    assert tier.stats().damaged == 0
    again = anyio.run(read_model_info, tier.store, model_id)
    assert (again.nbytes, dict(again.metadata)) == (info.nbytes, dict(info.metadata))
    assert anyio.run(read_config, tier.store, model_id) == info.config
    assert tier.url(entry) == entry.url == f"file://{entry.directory}"
    assert leftovers(disk_dir) == []


def test_buffer_of_the_wrong_size_is_refused(models: Models, disk_dir: Path) -> None:
    """A buffer that does not match the info raises ValueError and writes nothing."""
    info, buffer = models.add("a")
    tier = opened(disk_dir, BUDGET)
    with pytest.raises(ValueError, match="needs"):
        tier.write(info, buffer[:-1])
    assert os.listdir(disk_dir) == [".lock"]


# -- budget and eviction --------------------------------------------------------------------------


def test_budget_never_exceeded_across_many_writes(models: Models, disk_dir: Path) -> None:
    """After every write, remove and get, the bytes on disk equal stats().bytes <= budget."""
    rng = random.Random(0)
    budget = 9000
    tier = opened(disk_dir, budget)
    infos = {f"m{i}": models.add(f"m{i}", rng.randrange(1, 4000), seed=i) for i in range(12)}
    for step in range(80):
        model_id = rng.choice(list(infos))
        action = rng.random()
        if action < 0.6:
            entry = tier.write(*infos[model_id], etag=str(step % 3) if action < 0.2 else None)
            assert entry is not None
        elif action < 0.7:
            tier.remove(model_id)
        else:
            tier.get(model_id)
        stats = tier.stats()
        assert disk_total(disk_dir) == stats.bytes <= budget, step
    assert tier.stats().evictions > 0
    assert leftovers(disk_dir) == []


def test_least_recently_used_is_evicted_first(models: Models, disk_dir: Path) -> None:
    """A write evicts the entry whose last write or get is oldest."""
    tier = opened(disk_dir, BUDGET)
    for model_id in "abc":
        assert tier.write(*models.add(model_id)) is not None
    assert tier.get("a") is not None
    assert tier.write(*models.add("d")) is not None
    assert "b" not in tier
    assert tier.get("b") is None
    assert tier.get("c") is not None
    assert tier.write(*models.add("e")) is not None
    assert sorted(m for m in "abcde" if m in tier) == ["c", "d", "e"]
    stats = tier.stats()
    assert (stats.evictions, stats.writes, stats.entries) == (2, 5, 3)
    assert (stats.hits, stats.misses) == (0, 0)  # a get serves nothing: loads count (`count`)
    assert not (disk_dir / entry_name("a")).exists()
    assert leftovers(disk_dir) == []


def test_entries_in_use_are_not_evicted(models: Models, disk_dir: Path) -> None:
    """An acquired entry is skipped by eviction; with every entry acquired a write returns None."""
    tier = opened(disk_dir, BUDGET)
    entries = {m: tier.write(*models.add(m)) for m in "abc"}
    a, b, c = (entries[m] for m in "abc")
    assert a is not None and b is not None and c is not None
    assert tier.acquire(a)  # a is least recently used, but being read
    d = tier.write(*models.add("d"))
    assert d is not None
    assert "a" in tier and "b" not in tier
    assert tier.acquire(c) and tier.acquire(d) and tier.acquire(d)
    assert tier.write(*models.add("e")) is None
    assert leftovers(disk_dir) == []
    tier.release(d)
    assert tier.write(*models.add("e")) is None  # d is still acquired once
    tier.release(a)
    assert tier.write(*models.add("e")) is not None
    assert "a" not in tier and "c" in tier and "d" in tier
    tier.release(c)
    tier.release(d)
    with pytest.raises(RuntimeError, match="not acquired"):
        tier.release(d)


def test_entry_read_by_another_process_is_not_evicted(models: Models, disk_dir: Path) -> None:
    """An entry another tier instance (another open file, as another process) holds is skipped."""
    writer = opened(disk_dir, BUDGET)
    a = writer.write(*models.add("a"))
    assert a is not None
    for m in "bc":
        assert writer.write(*models.add(m)) is not None
    reader = opened(disk_dir, BUDGET)
    assert reader.acquire(a)
    assert writer.write(*models.add("d")) is not None
    assert "a" in writer and "b" not in writer
    assert writer.stats().evictions == 1
    reader.release(a)


def test_model_over_budget_writes_nothing(models: Models, disk_dir: Path) -> None:
    """A model whose files exceed the whole budget returns None, evicts nothing, leaves nothing."""
    tier = opened(disk_dir, 3000)
    assert tier.write(*models.add("small")) is not None
    assert tier.write(*models.add("big", 3000)) is None
    assert "small" in tier
    assert sorted(os.listdir(disk_dir)) == [".lock", entry_name("small")]


def test_lower_budget_on_open_evicts_to_fit(models: Models, disk_dir: Path) -> None:
    """Reopening with a smaller budget evicts least-recently-used entries until it fits."""
    tier = opened(disk_dir, BUDGET)
    for m in "abc":
        tier.write(*models.add(m))
    tier.get("a")
    smaller = opened(disk_dir, 2800)
    assert sorted(m for m in "abc" if m in smaller) == ["a", "c"]
    assert disk_total(disk_dir) == smaller.stats().bytes <= 2800


# -- etags and removal ----------------------------------------------------------------------------


def test_etag_is_recorded_and_a_new_one_replaces_the_entry(models: Models, disk_dir: Path) -> None:
    """The same etag (or none) returns the existing entry; a different one rewrites it."""
    tier = opened(disk_dir, BUDGET)
    info, buffer = models.add("a")
    first = tier.write(info, buffer, etag="v1")
    assert first is not None and first.etag == "v1"
    assert tier.write(info, buffer, etag="v1") == first
    assert tier.write(info, buffer) == first
    second = tier.write(info, buffer, etag="v2")
    assert second is not None and second.etag == "v2" and second != first
    assert tier.get("a") == second
    assert tier.stats().writes == 2
    assert tier.acquire(second)
    assert tier.write(info, buffer, etag="v3") is None  # in use: cannot be replaced now
    tier.release(second)


def test_remove(models: Models, disk_dir: Path) -> None:
    """remove() deletes an unpinned entry, refuses a pinned one, and says False for none."""
    tier = opened(disk_dir, BUDGET)
    entry = tier.write(*models.add("a"))
    assert entry is not None
    assert tier.acquire(entry)
    assert not tier.remove("a")
    tier.release(entry)
    assert tier.remove("a")
    assert not tier.remove("a")
    assert tier.get("a") is None
    assert not tier.acquire(entry)  # a stale entry cannot be pinned
    assert os.listdir(disk_dir) == [".lock"]
    assert tier.stats().evictions == 0


def test_use_before_open_raises(models: Models, disk_dir: Path) -> None:
    """get, write and remove refuse to run before open(); open is idempotent."""
    tier = DiskTier(disk_dir, "4KiB")
    assert tier.budget == 4096
    with pytest.raises(RuntimeError, match="open"):
        tier.get("a")
    with pytest.raises(RuntimeError, match="open"):
        tier.write(*models.add("a"))
    tier.open()
    tier.open()
    assert tier.write(*models.add("a")) is not None
    tier.open()
    assert tier.stats().entries == 1


# -- restarts and sharing -------------------------------------------------------------------------


def test_restart_keeps_entries_and_their_lru_order(models: Models, disk_dir: Path) -> None:
    """A new tier on the same directory indexes every entry, ordered by last use."""
    tier = opened(disk_dir, BUDGET)
    written = {m: tier.write(*models.add(m), etag=m) for m in "abc"}
    tier.get("a")
    restarted = opened(disk_dir, BUDGET)
    assert restarted.stats().entries == 3
    assert restarted.stats().bytes == tier.stats().bytes
    assert all(restarted.get(m) == written[m] for m in "ca")  # now b is least recently used
    assert restarted.write(*models.add("d")) is not None
    assert sorted(m for m in "abcd" if m in restarted) == ["a", "c", "d"]


def test_get_finds_entries_written_by_another_process(models: Models, disk_dir: Path) -> None:
    """get() finds an entry another tier published after this one opened."""
    reader = opened(disk_dir, BUDGET)
    writer = opened(disk_dir, BUDGET)
    entry = writer.write(*models.add("a"))
    assert reader.get("a") == entry


def test_truncated_file_is_dropped_on_get(models: Models, disk_dir: Path) -> None:
    """An entry whose file is shorter than its manifest says is deleted, and get returns None."""
    tier = opened(disk_dir, BUDGET)
    entry = tier.write(*models.add("a"))
    assert entry is not None
    path = Path(entry.directory) / "model.safetensors"
    os.truncate(path, path.stat().st_size - 1)
    assert tier.get("a") is None
    assert not Path(entry.directory).exists()
    assert tier.stats().entries == 0


def test_broken_entries_are_dropped_on_open(models: Models, disk_dir: Path) -> None:
    """open() deletes entries with a truncated file or no manifest, and indexes the rest."""
    tier = opened(disk_dir, BUDGET)
    entries = [tier.write(*models.add(m)) for m in "abc"]
    a, b, c = entries
    assert a is not None and b is not None and c is not None
    os.truncate(Path(a.directory) / "model.safetensors", 10)
    os.unlink(Path(b.directory) / MANIFEST_NAME)
    restarted = opened(disk_dir, BUDGET)
    assert [m for m in "abc" if m in restarted] == ["c"]
    assert sorted(os.listdir(disk_dir)) == [".lock", entry_name("c")]


def test_temp_dirs_nobody_holds_are_removed_whatever_their_pid(disk_dir: Path) -> None:
    """open() removes every temp and trash dir whose flock nobody holds, even when its pid is
    alive (a SIGKILLed writer's pid after a restart: pid 1 in a container), and its bytes stop
    counting; a temp dir whose flock is held stays."""
    disk_dir.mkdir()
    dead = disk_dir / f".tmp-{dead_pid()}-0123abcd-100"
    ours = disk_dir / f".tmp-{os.getpid()}-0123abcd-{BUDGET}"
    init = disk_dir / f".tmp-1-0123abcd-{BUDGET}"
    trash = disk_dir / ".del-1-00"
    held = disk_dir / f".tmp-{os.getpid()}-4567abcd-100"
    for path in (dead, ours, init, trash, held):
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "model.safetensors").write_bytes(b"x" * 100)
    with _flock_held(held):
        tier = opened(disk_dir, BUDGET)
        assert leftovers(disk_dir) == [held.name]
        assert tier.stats().leftovers == 4
        assert tier.write(*Models(disk_dir.parent / "store").add("a")) is not None


@contextlib.contextmanager
def _flock_held(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s flock, as a live writer does."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_locked_temp_dir_of_an_unknown_pid_is_kept(disk_dir: Path) -> None:
    """A temp dir whose pid is not alive here but whose flock is held (another pid namespace) stays."""
    disk_dir.mkdir()
    temp = disk_dir / f".tmp-{dead_pid()}-0123abcd-100"
    temp.mkdir()
    fd = os.open(temp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        opened(disk_dir, BUDGET)
        assert leftovers(disk_dir) == [temp.name]
    finally:
        os.close(fd)
    opened(disk_dir, BUDGET)
    assert leftovers(disk_dir) == []


def test_writes_in_flight_reserve_their_bytes(models: Models, disk_dir: Path) -> None:
    """A live writer's temp dir counts against the budget until it is gone."""
    disk_dir.mkdir()
    temp = disk_dir / f".tmp-{os.getpid()}-0123abcd-{BUDGET - 1000}"
    temp.mkdir()
    info, buffer = models.add("a")
    with _flock_held(temp):
        tier = opened(disk_dir, BUDGET)
        assert tier.write(info, buffer) is None
    temp.rmdir()
    assert tier.write(info, buffer) is not None


def test_publish_race_keeps_the_first_entry(
    models: Models, disk_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When another writer publishes the same model first, ours is discarded and theirs used."""
    info, buffer = models.add("a")
    first = opened(disk_dir, 3 * BUDGET)
    second = opened(disk_dir, 3 * BUDGET)
    theirs: list[DiskEntry | None] = []
    write_files = second._write_files

    def interleaved(temp: str, *args: Any) -> Any:
        written = write_files(temp, *args)
        theirs.append(first.write(info, buffer, etag="first"))  # publishes while ours waits
        return written

    monkeypatch.setattr(second, "_write_files", interleaved)
    ours = second.write(info, buffer, etag="second")
    assert theirs[0] is not None
    assert ours == theirs[0]
    assert ours.etag == "first"
    assert second.stats().writes == 0
    assert leftovers(disk_dir) == []
    assert sorted(os.listdir(disk_dir)) == [".lock", entry_name("a")]


def _race_writer(
    disk_dir: str,
    store_root: str,
    barrier: multiprocessing.synchronize.Barrier,
    results: multiprocessing.queues.Queue[str | None],
) -> None:
    """Child process: write model "m" into the shared tier as soon as the other one is ready."""
    info, buffer = fetch(Store(f"file://{store_root}/{{model_id}}"), "m")
    tier = opened(Path(disk_dir), "256MiB")
    barrier.wait()
    entry = tier.write(info, buffer, etag="e")
    results.put(None if entry is None else entry.directory)


def test_two_processes_writing_the_same_model(models: Models, disk_dir: Path) -> None:
    """Two processes racing to write one model leave one complete, readable entry and no temp dir."""
    models.add("m", 24 << 20)
    original = (models.root / "m" / "model.safetensors").read_bytes()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results: multiprocessing.queues.Queue[str | None] = ctx.Queue()
    procs = [
        ctx.Process(target=_race_writer, args=(str(disk_dir), str(models.root), barrier, results))
        for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    directories = [results.get(timeout=90) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    results.close()
    results.join_thread()
    assert directories[0] is not None and directories == [directories[0]] * 2
    assert sorted(os.listdir(disk_dir)) == [".lock", entry_name("m")]
    tier = opened(disk_dir, "256MiB")
    entry = tier.get("m")
    assert entry is not None and entry.directory == directories[0]
    assert (Path(entry.directory) / "model.safetensors").read_bytes() == original
    assert load_tensors(tier.store, "m") == load_tensors(models.store, "m")


# -- names ----------------------------------------------------------------------------------------


def test_ids_map_to_safe_distinct_names(models: Models, disk_dir: Path) -> None:
    """Ids with '/' and very long ids get short names without separators, and load back."""
    ids = ["org/model", "org_model", "a/b/c", "x" * 1000, "A" + "/b" * 500, "m-1.v2+x=y@z"]
    names = [entry_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    for name in names:
        assert "/" not in name and not name.startswith(".")
        assert len(name.encode()) <= 255
    root = models.root
    put(root / "org" / "model" / "model.safetensors", model_bytes(500, seed=3))
    slash_store = Store(f"file://{root}/{{model_id}}", allow_slash_in_ids=True)
    info, buffer = fetch(slash_store, "org/model")
    tier = opened(disk_dir, BUDGET)
    entry = tier.write(info, buffer)
    assert entry is not None and Path(entry.directory).parent == disk_dir
    assert load_tensors(tier.store, "org/model") == load_tensors(slash_store, "org/model")
    long_id = "x" * 1000
    long_entry = tier.write(dataclasses.replace(info, model_id=long_id), buffer)
    assert long_entry is not None and long_entry.model_id == long_id
    restarted = opened(disk_dir, BUDGET)
    assert restarted.get(long_id) == long_entry
    assert load_tensors(restarted.store, long_id) == load_tensors(slash_store, "org/model")


def test_threads_writing_at_once_stay_in_budget(models: Models, disk_dir: Path) -> None:
    """Writes from many threads at once leave complete entries within the budget, no temp dirs."""
    rng = random.Random(1)
    budget = 9000
    infos = [models.add(f"m{i}", rng.randrange(1, 3000), seed=i) for i in range(16)]
    tier = opened(disk_dir, budget)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda item: tier.write(*item), infos * 3))
    assert any(r is not None for r in results)
    assert disk_total(disk_dir) == tier.stats().bytes <= budget
    assert leftovers(disk_dir) == []
    assert opened(disk_dir, budget).stats() == dataclasses.replace(
        tier.stats(), hits=0, misses=0, writes=0, evictions=0
    )


def test_entry_replaced_by_another_process_is_reread(models: Models, disk_dir: Path) -> None:
    """get() returns the entry now on disk when another process replaced it (new etag)."""
    reader = opened(disk_dir, BUDGET)
    writer = opened(disk_dir, BUDGET)
    info, buffer = models.add("a")
    first = writer.write(info, buffer, etag="v1")
    assert first is not None and reader.get("a") == first
    second = writer.write(info, buffer, etag="v2")
    assert second is not None and second != first
    assert reader.get("a") == second
    assert not reader.acquire(first)
    assert reader.acquire(second)
    reader.release(second)


# -- damage, odd names, links, leftovers ------------------------------------------------------


def test_malformed_names_in_the_directory_do_not_stop_open(models: Models, disk_dir: Path) -> None:
    """Names that are not well-formed entries (an overflowing pid, a file where a directory
    belongs, strangers) never stop open(): ours are removed, strangers ignored, entries kept."""
    tier = opened(disk_dir, BUDGET)
    assert tier.write(*models.add("a")) is not None
    (disk_dir / ".tmp-99999999999999999999-ab-1").mkdir()
    (disk_dir / ".tmp-garbage").write_bytes(b"x")
    (disk_dir / ".del-not-a-dir").write_bytes(b"x")
    (disk_dir / entry_name("file-not-dir")).write_bytes(b"x")
    (disk_dir / "notes.txt").write_bytes(b"mine")
    (disk_dir / "lost+found").mkdir()
    restarted = opened(disk_dir, BUDGET)
    assert sorted(os.listdir(disk_dir)) == sorted(
        [".lock", entry_name("a"), "notes.txt", "lost+found"]
    )
    assert restarted.get("a") is not None and restarted.stats().entries == 1


def test_symlinks_in_an_entry_are_not_followed(models: Models, disk_dir: Path) -> None:
    """An entry whose file, manifest or directory is a symlink is not served, and the link is
    deleted without touching what it points to."""
    tier = opened(disk_dir, 3 * BUDGET)
    entries = {m: tier.write(*models.add(m, seed=i)) for i, m in enumerate("abcd")}
    a, b, c, d = (entries[m] for m in "abcd")
    assert a is not None and b is not None and c is not None and d is not None
    # a: its weights file links to b's file (same size, other bytes).
    weights = Path(a.directory) / "model.safetensors"
    weights.unlink()
    weights.symlink_to(Path(b.directory) / "model.safetensors")
    # c: its whole directory is a link to a copy of d's entry made under c's name.
    elsewhere = disk_dir.parent / "elsewhere"
    os.rename(c.directory, elsewhere)
    os.symlink(elsewhere, c.directory)
    # d: its manifest is a link to a copy of itself.
    manifest = Path(d.directory) / MANIFEST_NAME
    copy = disk_dir.parent / "manifest-copy"
    copy.write_bytes(manifest.read_bytes())
    manifest.unlink()
    manifest.symlink_to(copy)
    for reader in (tier, opened(disk_dir, 3 * BUDGET)):
        assert reader.get("a") is None and reader.get("c") is None and reader.get("d") is None
    assert reader.get("b") == b
    assert (Path(b.directory) / "model.safetensors").is_file()
    assert (elsewhere / "model.safetensors").is_file() and copy.is_file()
    assert sorted(os.listdir(disk_dir)) == [".lock", entry_name("b")]


def test_links_planted_after_the_check_are_not_followed_by_reads(
    models: Models, disk_dir: Path
) -> None:
    """A file or entry directory replaced by a symlink after get() and acquire() checked it is
    not read through the link: the tier's store fails to open it (the cache then reads the
    store) instead of serving the bytes the link points to."""
    tier = opened(disk_dir, 3 * BUDGET)
    a, b = (tier.write(*models.add(m, seed=i)) for i, m in enumerate("ab"))
    assert a is not None and b is not None
    elsewhere = disk_dir.parent / "elsewhere"
    elsewhere.mkdir()
    planted = elsewhere / "model.safetensors"
    planted.write_bytes((Path(b.directory) / "model.safetensors").read_bytes())  # same size

    def swap_file() -> None:
        weights = Path(a.directory) / "model.safetensors"
        weights.unlink()
        weights.symlink_to(planted)

    def swap_directory() -> None:
        shutil.copy(Path(a.directory) / MANIFEST_NAME, elsewhere / MANIFEST_NAME)
        shutil.rmtree(a.directory)
        os.symlink(elsewhere, a.directory)

    for swap in (swap_file, swap_directory):
        entry = tier.get("a")
        assert entry is not None and tier.acquire(entry)
        swap()
        with pytest.raises(ModelCacheError):
            load_tensors(tier.store, "a", zero_copy=False)
        tier.release(entry)
        tier.remove("a")  # damaged now: deleted (a link, not what it points to)
        assert tier.write(*models.add("a", seed=0)) is not None
    assert planted.read_bytes() == (Path(b.directory) / "model.safetensors").read_bytes()


def test_an_unreadable_entry_is_dropped_not_raised(models: Models, disk_dir: Path) -> None:
    """An entry whose manifest cannot be read (a directory in its place; EIO goes the same way)
    is a miss that deletes it, on get() and on open()."""
    tier = opened(disk_dir, BUDGET)
    a, b = (tier.write(*models.add(m)) for m in "ab")
    assert a is not None and b is not None
    for entry in (a, b):
        os.unlink(Path(entry.directory) / MANIFEST_NAME)
        (Path(entry.directory) / MANIFEST_NAME).mkdir()
    assert tier.get("a") is None
    restarted = opened(disk_dir, BUDGET)
    assert restarted.stats().entries == 0
    assert os.listdir(disk_dir) == [".lock"]


def test_trash_left_by_a_crash_is_removed_by_a_running_tier(models: Models, disk_dir: Path) -> None:
    """A trash dir nobody is deleting (its deleter died) is removed and counted by the next
    write of a tier that is already open, not only at the next start."""
    tier = opened(disk_dir, BUDGET)
    leftover = disk_dir / ".del-12345-0123abcd"
    (leftover / "sub").mkdir(parents=True)
    (leftover / "sub" / "model.safetensors").write_bytes(b"x" * 100)
    assert tier.write(*models.add("a")) is not None
    assert leftovers(disk_dir) == []
    assert tier.stats().leftovers == 1


def test_enospc_evicts_least_recently_used_and_retries_once(
    models: Models, disk_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that meets ENOSPC evicts the least recently used entry (more if the filesystem
    still lacks room), tries once more and succeeds; the event is counted."""
    tier = opened(disk_dir, 10 * BUDGET)
    for m in "abc":
        assert tier.write(*models.add(m)) is not None
    tier.get("a")
    real = pwrite_all
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    def full_once(fd: int, data: memoryview, offset: int) -> None:
        if failures:
            raise failures.pop()
        real(fd, data, offset)

    monkeypatch.setattr("modelcache._diskformat.pwrite_all", full_once)
    assert tier.write(*models.add("d")) is not None
    assert sorted(m for m in "abcd" if m in tier) == ["a", "c", "d"]
    assert (tier.stats().full, tier.stats().evictions) == (1, 1)
    assert leftovers(disk_dir) == []


def test_enospc_twice_raises_and_leaves_nothing(
    models: Models, disk_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that meets ENOSPC again after making room raises OSError and leaves no temp dir."""
    tier = opened(disk_dir, 10 * BUDGET)
    assert tier.write(*models.add("a")) is not None

    def always_full(fd: int, data: memoryview, offset: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("modelcache._diskformat.pwrite_all", always_full)
    with pytest.raises(OSError, match="No space"):
        tier.write(*models.add("b"))
    assert leftovers(disk_dir) == []
    assert tier.stats().full == 1


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 32 KiB tmpfs (8 pages), where the machine lets us mount one (root); else skip."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mount)):
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_filesystem_evicts_to_make_room(models: Models, small_tmpfs: Path) -> None:
    """On a filesystem smaller than the budget, writes evict least-recently-used entries to fit
    the real free space instead of failing: the newest models are always cached."""
    tier = opened(small_tmpfs, "1MiB")
    for i in range(12):
        assert tier.write(*models.add(f"m{i}", seed=i)) is not None, i
        assert f"m{i}" in tier
    stats = tier.stats()
    assert stats.full > 0 and stats.evictions > 0
    assert stats.entries == len([n for n in os.listdir(small_tmpfs) if not n.startswith(".")])
    assert "m0" not in tier
    assert leftovers(small_tmpfs) == []


def test_a_full_filesystem_is_said_once_until_it_has_room_again(
    models: Models, small_tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Writes that must evict for the filesystem's free space say so: one warning for the
    episode (not one per write), then one line once the filesystem has room again."""
    tier = opened(small_tmpfs, "1MiB")
    with caplog.at_level(logging.INFO, logger="modelcache"):
        for i in range(12):
            assert tier.write(*models.add(f"m{i}", seed=i)) is not None
        said = [r for r in caplog.records if "filesystem is full" in r.getMessage()]
        assert tier.stats().full > 1
        assert [r.levelno for r in said] == [logging.WARNING]
        for i in range(12):
            tier.remove(f"m{i}")
        assert tier.write(*models.add("again")) is not None
    assert sum("has room again" in r.getMessage() for r in caplog.records) == 1


def test_a_filesystem_out_of_inodes_evicts_to_make_room(models: Models, tmp_path: Path) -> None:
    """A filesystem with bytes to spare but no inode left (the temp dir's mkdir fails with
    ENOSPC) evicts the least recently used entry and retries, like one out of bytes."""
    mount = tmp_path / "inodes"
    mount.mkdir()
    # The root, the lock file and 3 entries of 3 inodes (directory, model, manifest): full.
    if not _mount("-t", "tmpfs", "-o", "size=8m,nr_inodes=11", "tmpfs", str(mount)):
        pytest.skip("cannot mount a tmpfs here")
    try:
        tier = opened(mount, "4MiB")
        for i in range(6):
            assert tier.write(*models.add(f"m{i}", seed=i)) is not None, i
            assert f"m{i}" in tier
        stats = tier.stats()
        assert stats.full > 0 and stats.evictions > 0
        assert "m0" not in tier
        assert leftovers(mount) == []
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_read_only_directory_is_served_and_never_written(models: Models, tmp_path: Path) -> None:
    """A directory on a read-only mount opens read-only: its entries load, writes and removals
    do nothing, nothing raises."""
    source = tmp_path / "rw"
    tier = opened(source, BUDGET)
    written = tier.write(*models.add("a"))
    assert written is not None
    (source / ".tmp-1-0123abcd-100").mkdir()
    mount = tmp_path / "ro"
    mount.mkdir()
    if not _mount("--bind", str(source), str(mount)):
        pytest.skip("cannot bind-mount here")
    try:
        if not _mount("-o", "remount,ro,bind", str(mount)):
            pytest.skip("cannot remount read-only here")
        reader = opened(mount, BUDGET)
        assert reader.read_only and reader.stats().read_only
        entry = reader.get("a")
        assert entry is not None and reader.acquire(entry)
        assert load_tensors(reader.store, "a") == load_tensors(models.store, "a")
        reader.release(entry)
        assert reader.write(*models.add("b")) is None
        assert not reader.remove("a")
        assert sorted(os.listdir(mount)) == [".lock", ".tmp-1-0123abcd-100", entry_name("a")]
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_lock_file_that_is_a_link_is_never_followed(disk_dir: Path, tmp_path: Path) -> None:
    """A ``.lock`` that is a symlink is a typed error naming it; its target is neither created
    nor opened (O_CREAT through a link would make a file wherever it points)."""
    disk_dir.mkdir()
    target = tmp_path / "elsewhere"
    (disk_dir / ".lock").symlink_to(target)
    with pytest.raises(StoreError, match=r"\.lock"):
        opened(disk_dir, BUDGET)
    assert not target.exists()


def test_a_directory_that_cannot_be_made_is_a_typed_error(tmp_path: Path) -> None:
    """open() on a path that is a file (or cannot be created) raises StoreError naming it."""
    path = tmp_path / "a-file"
    path.write_bytes(b"x")
    with pytest.raises(StoreError, match="a-file"):
        opened(path, BUDGET)
    with pytest.raises(StoreError, match="a-file"):
        opened(path / "below", BUDGET)


# -- content checksums ----------------------------------------------------------------------------


def _flip(path: Path, offset: int) -> None:
    """Flip the lowest bit of one byte of ``path`` in place (its size unchanged)."""
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 1]))


def test_manifest_records_each_files_checksum_as_written(tmp_path: Path, disk_dir: Path) -> None:
    """The manifest lists the XXH3-64 of every file of the entry, as it is on disk."""
    root = tmp_path / "store"
    write_sharded(root / "m", [_tensors(1), {"x": torch.arange(9.0)}], metadata={"format": "pt"})
    info, buffer = fetch(Store(f"file://{root}/{{model_id}}"), "m")
    info = dataclasses.replace(info, config={"hidden_size": 7})
    entry = opened(disk_dir, "1MiB").write(info, buffer)
    assert entry is not None
    manifest = json.loads((Path(entry.directory) / MANIFEST_NAME).read_bytes())
    assert len(manifest[CHECKSUM_FIELD]) == len(manifest["files"]) == 4  # 2 shards, index, config
    for (name, _), digest in zip(manifest["files"], manifest[CHECKSUM_FIELD], strict=True):
        assert xxhash.xxh3_64((Path(entry.directory) / name).read_bytes()).hexdigest() == digest
    assert entry.checksums == tuple(manifest[CHECKSUM_FIELD])


@pytest.mark.parametrize("host_visible", [True, False])
@pytest.mark.parametrize("damage", ["weights", "header", "index"])
def test_bytes_a_load_read_are_checked_against_the_checksums(
    tmp_path: Path, disk_dir: Path, damage: str, host_visible: bool
) -> None:
    """A byte changed in an entry's weights, a header (still valid) or its index (still valid):
    what a load read no longer matches the checksums and `check_loaded` raises
    EntryDamagedError (counted), for a buffer in host memory and for the files read again."""
    root = tmp_path / "store"
    if damage == "index":
        write_sharded(root / "m", [_tensors(1), _tensors(2)], metadata={"format": "pt"})
    else:
        put(root / "m" / "model.safetensors", model_bytes(1000, seed=3))
    tier = opened(disk_dir, "1MiB")
    entry = tier.write(*fetch(Store(f"file://{root}/{{model_id}}"), "m"))
    assert entry is not None
    directory = Path(entry.directory)
    if damage == "weights":
        target = directory / "model.safetensors"
        _flip(target, target.stat().st_size - 1)
    else:
        target = directory / (
            "model.safetensors" if damage == "header" else "model.safetensors.index.json"
        )
        old, new = (b'"U8"', b'"I8"') if damage == "header" else (b'"pt"', b'"pu"')
        data = target.read_bytes()
        assert data.count(old) == 1
        target.write_bytes(data.replace(old, new))  # same size, still a valid model
    info, view = fetch(tier.store, "m")  # parses: only the checksums can tell
    with pytest.raises(EntryDamagedError, match="damaged") as caught:
        tier.check_loaded(entry, info, view if host_visible else None)
    assert isinstance(caught.value, StoreError)
    assert caught.value.model_id == "m"
    assert tier.stats().damaged == 1


def test_an_entry_without_checksums_is_dropped_and_fetched_again(
    models: Models, disk_dir: Path
) -> None:
    """An entry whose manifest predates checksums is removed when the tier opens (never served
    unchecked); the model is then written again, with checksums."""
    info, buffer = models.add("a")
    entry = opened(disk_dir, BUDGET).write(info, buffer)
    assert entry is not None
    manifest_path = Path(entry.directory) / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_bytes())
    del manifest[CHECKSUM_FIELD]
    manifest_path.write_bytes(json.dumps(manifest).encode())
    tier = opened(disk_dir, BUDGET)
    assert "a" not in tier
    assert tier.get("a") is None
    assert os.listdir(disk_dir) == [".lock"]
    again = tier.write(info, buffer)
    assert again is not None and len(again.checksums) == 1


def _weight_bytes(weights: Any) -> bytes:
    w = weights["w"]
    return bytes(w.get().tobytes()) if hasattr(w, "get") else tensor_bytes(w)


async def test_disk_hits_count_only_copies_served(disk_dir: Path) -> None:
    """Disk hits (and promotions, the same count) are loads served from a disk copy: a copy
    dropped as stale or as damaged is a miss, and a look for stale copies is not a hit."""
    models = MemoryModels()
    try:
        await _count_disk_hits(models, disk_dir)
    finally:
        models.cleanup()


async def _count_disk_hits(models: MemoryModels, disk_dir: Path) -> None:
    for i, name in enumerate("abc"):
        models.add(name, 1000, seed=i)
    options: dict[str, Any] = {"device_budget": 1000, "disk_dir": disk_dir, "disk_budget": "1MiB"}
    async with ModelCache(models.template, **options) as cache:
        for name in "abc":  # one at a time on the device: each written to the disk tier
            async with cache.use(name):
                pass
        await settle()
    models.add("a", 1000, seed=7)  # the store has a new version: a's copy is stale
    target = disk_dir / entry_name("b") / "model.safetensors"
    _flip(target, target.stat().st_size - 1)  # b's copy is damaged
    async with ModelCache(models.template, **options) as cache:
        for name in "ab":
            async with cache.use(name):
                pass
        disk = cache.stats().tiers["disk"]
        assert (disk.hits, disk.promotions, disk.misses) == (0, 0, 2)
        async with cache.use("c"):  # served from its copy
            pass
        await cache.refresh("c")  # looks for stale copies of c: none
        disk = cache.stats().tiers["disk"]
        assert (disk.hits, disk.promotions, disk.misses) == (1, 1, 2)


@pytest.mark.parametrize("backend", ["cpu", "cupy", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("path", ["device", "host"])
async def test_a_flipped_bit_on_disk_never_reaches_a_model(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch, backend: str, path: str
) -> None:
    """A byte flipped in a disk copy's weights (sizes intact): the load that reads it, straight
    to the device or into the host tier, finds the checksums wrong, drops the copy and serves
    the store's bytes."""
    memory = MemoryModels()
    try:
        for i, name in enumerate("ab"):
            memory.add(name, 1000, seed=10 + i)
        options: dict[str, Any] = {}
        if backend == "cupy":
            monkeypatch.setitem(sys.modules, "cupy", FakeCupy(devices=1))
            options["backend"] = CupyBackend(0, staging_chunk_size=1000, staging_chunks=2)
        elif backend == "cuda":  # the device buffer is not in host memory: the files are checked
            options["device"] = "cuda"
        gated = GatedStore(memory.template)
        async with ModelCache(
            gated,
            device_budget=1000,
            host_budget=1000,
            disk_dir=disk_dir,
            disk_budget="1MiB",
            **options,
        ) as cache:
            original = tensor_bytes(safetensors.torch.load(model_bytes(1000, seed=10))["w"])
            for name in "ab":  # copied to the disk tier from the host tier; b pushes a out
                await cache.prefetch([name], tier="host")
                await settle()
            assert cache.tier_of("a") == "disk"
            target = disk_dir / entry_name("a") / "model.safetensors"
            _flip(target, target.stat().st_size - 1)
            if path == "host":
                await cache.prefetch(["a"], tier="host")
            async with cache.use("a") as w:
                assert _weight_bytes(w) == original
            assert gated.calls[("read_into", "a")] == 2  # the prefetch, then for the damaged copy
            disk = cache._host_disk.disk
            assert disk is not None and disk.stats().damaged == 1
            assert cache.stats().load_failures == 0
    finally:
        memory.cleanup()
