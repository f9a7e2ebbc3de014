"""Local reads of files not in the page cache: O_DIRECT through bounce buffers (`_direct`)."""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import modelcache._direct as direct
import modelcache._store as store_module
from modelcache import ModelCache
from modelcache._exceptions import ModelChangedError
from modelcache._hugepages import huge_pages_advised
from modelcache._store import Store
from modelcache._torch import TorchBackend
from modelcache._versions import reading

from .conftest import LocalDescriptors
from .safetensors_files import model_file
from .test_hugepages import vm_flags


def _random(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


def _write_cold(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and evict its pages; skip where the filesystem keeps them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # clean pages: DONTNEED can drop them
    _evict(path)


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if direct.resident_fraction(fd, 0, os.fstat(fd).st_size) > 0.1:
            pytest.skip("this filesystem keeps the file in memory (tmpfs?): nothing is cold")
    finally:
        os.close(fd)


def _resident(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        return direct.resident_fraction(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _views(buf: bytearray, sizes: list[int]) -> list[memoryview]:
    views, at = [], 0
    for size in sizes:
        views.append(memoryview(buf)[at : at + size])
        at += size
    return views


@pytest.mark.asyncio
async def test_cold_local_read_is_exact_and_leaves_the_page_cache_alone(tmp_path: Path) -> None:
    """A multi-chunk read of a file not in the page cache, from an unaligned offset to the
    file's unaligned end, scattered into views of odd sizes, gets every byte right and is read
    with O_DIRECT (the file's pages stay out of the page cache)."""
    data = _random(6 * 1024 * 1024 + 777)
    path = tmp_path / "m1" / "w.bin"
    _write_cold(path, data)
    store = Store(
        f"file://{tmp_path}/{{model_id}}/", read_chunk_size=(1 << 20) + 3, direct_reads=True
    )
    url = store.join(store.model_url("m1"), "w.bin")
    offset = 12_345
    rng = random.Random(3)
    sizes = [rng.choice((1, 5, 4096, 70_001)) for _ in range(120)]
    sizes.append(len(data) - offset - sum(sizes))
    buf = bytearray(len(data) - offset)
    await store.read_scatter(url, offset, _views(buf, sizes), model_id="m1")
    assert bytes(buf) == data[offset:]
    assert _resident(path) < direct.DIRECT_BELOW


@pytest.mark.asyncio
async def test_direct_pieces_straddling_alignment_are_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Direct pieces smaller than a chunk, none of them aligned at either end, still fill
    every byte of the destination once."""
    monkeypatch.setattr(direct, "PIECE", 3 * direct.ALIGN + 5)
    data = _random(3 * 1024 * 1024 + 11, seed=8)
    path = tmp_path / "m1" / "w.bin"
    _write_cold(path, data)
    store = Store(f"file://{tmp_path}/{{model_id}}/", read_chunk_size=200_001, direct_reads=True)
    url = store.join(store.model_url("m1"), "w.bin")
    buf = bytearray(len(data) - 4099)
    await store.read_into(url, 4097, memoryview(buf)[: len(buf) - 2], model_id="m1")
    assert bytes(buf[:-2]) == data[4097:-4]
    assert _resident(path) < direct.DIRECT_BELOW


def test_open_run_reads_a_cached_range_through_the_page_cache(tmp_path: Path) -> None:
    """A range that is in the page cache is read buffered (no O_DIRECT); the same range
    evicted is read direct."""
    data = _random(2 * 1024 * 1024, seed=9)
    path = tmp_path / "w.bin"
    _write_cold(path, data)
    for cold in (True, False):
        opened: list[int] = []
        try:
            size, is_direct = direct.open_run(
                store_module._open_regular,
                str(path),
                opened,
                store_module._open_plain,
                0,
                len(data),
            )
            assert (size, is_direct) == (len(data), cold)
            assert direct._is_direct(opened[0]) is cold
        finally:
            for fd in opened:
                os.close(fd)
        path.read_bytes()  # now it is cached


@pytest.mark.asyncio
async def test_direct_read_detects_a_file_changed_while_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file rewritten in place during a direct read fails the load with ModelChangedError
    (its version tag after the read differs from the one before)."""
    data = _random(4 * 1024 * 1024, seed=10)
    path = tmp_path / "m1" / "w.bin"
    _write_cold(path, data)
    store = Store(
        f"file://{tmp_path}/{{model_id}}/",
        read_chunk_size=1 << 20,
        max_concurrent_reads=1,
        direct_reads=True,
    )
    url = store.join(store.model_url("m1"), "w.bin")
    real = direct._read_aligned
    calls = 0

    def rewrite_on_first_read(fd: int, buf: memoryview, start: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            with open(path, "r+b") as f:  # in place: same inode, new size and mtime
                f.seek(0, os.SEEK_END)
                f.write(b"more")
        return real(fd, buf, start)

    monkeypatch.setattr(direct, "_read_aligned", rewrite_on_first_read)
    with reading(), pytest.raises(ModelChangedError, match="changed in the store"):
        await store.read_into(url, 0, memoryview(bytearray(len(data))), model_id="m1")
    assert calls >= 1


@pytest.mark.asyncio
async def test_direct_reads_hold_at_most_max_concurrent_reads_descriptors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_descriptors: LocalDescriptors
) -> None:
    """Many concurrent direct reads of cold files hold at most max_concurrent_reads
    descriptors (the residency check and the bounce buffers add none)."""
    files = []
    for i in range(6):
        data = _random(1024 * 1024 + i, seed=20 + i)
        _write_cold(tmp_path / f"m{i}" / "w.bin", data)
        files.append(data)
    store = Store(
        f"file://{tmp_path}/{{model_id}}/",
        read_chunk_size=100_000,
        max_concurrent_reads=2,
        direct_reads=True,
    )
    went_direct = 0

    real_direct = direct.pread_run_direct

    def counting_direct(*args: object) -> int:
        nonlocal went_direct
        went_direct += 1
        return real_direct(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(direct, "pread_run_direct", counting_direct)
    dests = [bytearray(len(data) - 3) for data in files]
    async with anyio.create_task_group() as tg:
        for i, dest in enumerate(dests):
            url = store.join(store.model_url(f"m{i}"), "w.bin")
            tg.start_soon(
                functools.partial(store.read_into, url, 3, memoryview(dest), model_id=f"m{i}")
            )
    assert all(dest == data[3:] for dest, data in zip(dests, files, strict=True))
    assert 1 <= local_descriptors.peak <= 2
    assert went_direct > 0


@pytest.mark.asyncio
async def test_cold_reads_go_through_the_page_cache_by_default(tmp_path: Path) -> None:
    """A Store reads a cold file buffered unless direct_reads=True: every byte right, and the file's
    pages are in the page cache afterwards."""
    data = _random(3 * 1024 * 1024 + 5, seed=30)
    path = tmp_path / "m1" / "w.bin"
    _write_cold(path, data)
    store = Store(f"file://{tmp_path}/{{model_id}}/", read_chunk_size=1 << 20)
    url = store.join(store.model_url("m1"), "w.bin")
    buf = bytearray(len(data) - 9)
    await store.read_into(url, 9, memoryview(buf), model_id="m1")
    assert bytes(buf) == data[9:]
    assert _resident(path) > direct.DIRECT_BELOW


def _recording_pread(
    monkeypatch: pytest.MonkeyPatch, first_wave: int
) -> tuple[list[tuple[int, int]], threading.Event, threading.Event]:
    """Wrap the buffered chunk read: record each call's ``(lo, hi)``; the first ``first_wave``
    calls meet at a barrier (so all of them were issued before any returns), then the rest wait
    for ``release``. Returns the calls, ``started`` (set once the first wave is in) and
    ``release``."""
    calls: list[tuple[int, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(first_wave, timeout=30)
    started, release = threading.Event(), threading.Event()
    real = store_module._pread_run

    def recording(fd: int, run: store_module._Scatter, lo: int, hi: int, offset: int) -> int:
        with lock:
            calls.append((lo, hi))
            index = len(calls)
        if index <= first_wave:
            if barrier.wait() == 0:
                started.set()
        else:
            assert release.wait(timeout=30), "the test never released the read"
        return real(fd, run, lo, hi, offset)

    monkeypatch.setattr(store_module, "_pread_run", recording)
    return calls, started, release


@pytest.mark.asyncio
async def test_cold_buffered_read_walks_one_stripe_per_worker_in_file_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local read of many chunks is split into max_concurrent_reads contiguous stripes, each
    read chunk after chunk in file order (readahead follows each stripe); every byte right."""
    chunk = 64 * 1024
    data = _random(11 * chunk + 5, seed=40)
    _write_cold(tmp_path / "m1" / "w.bin", data)
    store = Store(f"file://{tmp_path}/{{model_id}}/", read_chunk_size=chunk, max_concurrent_reads=3)
    url = store.join(store.model_url("m1"), "w.bin")
    calls, _started, release = _recording_pread(monkeypatch, first_wave=3)
    release.set()
    buf = bytearray(len(data) - 7)  # 11 chunks from offset 7: the last one short
    await store.read_into(url, 7, memoryview(buf), model_id="m1")
    assert bytes(buf) == data[7:]
    # 11 chunks over 3 workers: chunks [0, 3), [3, 7), [7, 11), each worker's first in the
    # first wave.
    stripes = [range(0, 3), range(3, 7), range(7, 11)]
    assert sorted(lo // chunk for lo, _ in calls[:3]) == [0, 3, 7]
    for stripe in stripes:
        mine = [lo // chunk for lo, _ in calls if lo // chunk in stripe]
        assert mine == list(stripe)
    assert sorted(calls) == [(i * chunk, min((i + 1) * chunk, len(buf))) for i in range(11)]


@pytest.mark.asyncio
async def test_cancelled_striped_read_starts_no_further_chunk_and_closes_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_descriptors: LocalDescriptors
) -> None:
    """A striped local read cancelled while its first chunks are in flight starts no other
    chunk and closes its descriptor."""
    chunk = 64 * 1024
    data = _random(8 * chunk, seed=41)
    _write_cold(tmp_path / "m1" / "w.bin", data)
    store = Store(f"file://{tmp_path}/{{model_id}}/", read_chunk_size=chunk, max_concurrent_reads=2)
    url = store.join(store.model_url("m1"), "w.bin")
    calls, started, release = _recording_pread(monkeypatch, first_wave=2)
    release_next = threading.Event()
    real = store_module._pread_run

    def held(fd: int, run: store_module._Scatter, lo: int, hi: int, offset: int) -> int:
        n = real(fd, run, lo, hi, offset)
        if (lo, hi) in calls[:2]:
            assert release_next.wait(timeout=30)  # the first wave returns after the cancel
        return n

    monkeypatch.setattr(store_module, "_pread_run", held)
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            functools.partial(
                store.read_into, url, 0, memoryview(bytearray(len(data))), model_id="m1"
            )
        )
        await anyio.to_thread.run_sync(started.wait)
        tg.cancel_scope.cancel()
        release_next.set()
    assert sorted(lo // chunk for lo, _ in calls) == [0, 4]  # each stripe's first chunk only
    assert local_descriptors.now == 0
    release.set()


@pytest.mark.asyncio
async def test_cold_buffered_read_detects_a_file_changed_while_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file rewritten in place during a striped buffered read fails the load with
    ModelChangedError (its version tag after the read differs from the one before)."""
    chunk = 64 * 1024
    data = _random(6 * chunk, seed=42)
    path = tmp_path / "m1" / "w.bin"
    _write_cold(path, data)
    store = Store(f"file://{tmp_path}/{{model_id}}/", read_chunk_size=chunk, max_concurrent_reads=2)
    url = store.join(store.model_url("m1"), "w.bin")
    real = store_module._pread_run
    rewritten = threading.Event()

    def rewrite_on_first_read(
        fd: int, run: store_module._Scatter, lo: int, hi: int, offset: int
    ) -> int:
        if not rewritten.is_set():
            rewritten.set()
            with open(path, "r+b") as f:  # in place: same inode, new size and mtime
                f.seek(0, os.SEEK_END)
                f.write(b"more")
        return real(fd, run, lo, hi, offset)

    monkeypatch.setattr(store_module, "_pread_run", rewrite_on_first_read)
    with reading(), pytest.raises(ModelChangedError, match="changed in the store"):
        await store.read_into(url, 0, memoryview(bytearray(len(data))), model_id="m1")
    assert rewritten.is_set()


@pytest.mark.asyncio
async def test_concurrent_striped_reads_hold_at_most_max_concurrent_reads_descriptors(
    tmp_path: Path, local_descriptors: LocalDescriptors
) -> None:
    """Many concurrent buffered reads of cold multi-chunk files hold at most
    max_concurrent_reads descriptors (a read's stripes share its one descriptor); every byte
    right."""
    files = []
    for i in range(5):
        data = _random(700_000 + i, seed=50 + i)
        _write_cold(tmp_path / f"m{i}" / "w.bin", data)
        files.append(data)
    store = Store(
        f"file://{tmp_path}/{{model_id}}/", read_chunk_size=100_000, max_concurrent_reads=2
    )
    dests = [bytearray(len(data) - 3) for data in files]
    async with anyio.create_task_group() as tg:
        for i, dest in enumerate(dests):
            url = store.join(store.model_url(f"m{i}"), "w.bin")
            tg.start_soon(
                functools.partial(store.read_into, url, 3, memoryview(dest), model_id=f"m{i}")
            )
    assert all(dest == data[3:] for dest, data in zip(dests, files, strict=True))
    assert 1 <= local_descriptors.peak <= 2


class _CountingMincore:
    """The C library as `_direct` calls it, counting the pages mincore is asked about."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.pages = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)

    def mincore(self, address: int, length: int, vector: object) -> int:
        self.pages += -(-length // 4096)
        return self.real.mincore(address, length, vector)  # type: ignore[attr-defined, no-any-return]


def test_resident_fraction_looks_at_a_bounded_sample_of_a_large_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How much of a 64 MiB file is cached is told from a few hundred pages (mincore costs
    ~80 ns a page: asked whole, 1 GiB took 20 ms of every zero-copy load), and told right: a
    file whose first half was read reads as about half resident."""
    path = tmp_path / "big"
    _write_cold(path, os.urandom(64 << 20))
    with open(path, "rb") as f:
        f.read(32 << 20)
    exact = _exact_resident(path)
    assert 0.4 <= exact <= 0.9  # the first half, and what readahead added
    counting = _CountingMincore(direct._libc)  # type: ignore[attr-defined]
    monkeypatch.setattr(direct, "_libc", counting)
    fraction = _resident(path)
    assert counting.pages <= 2 * direct._SAMPLES
    assert abs(fraction - exact) <= 0.02


def _exact_resident(path: Path) -> float:
    """Every page of ``path`` asked about at once (as `resident_fraction` once did)."""
    libc: Any = direct._libc  # type: ignore[attr-defined]
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pages = -(-size // mmap.PAGESIZE)
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        try:
            vector = (ctypes.c_ubyte * pages)()
            assert libc.mincore(address, size, vector) == 0
            return sum(b & 1 for b in bytes(vector)) / pages
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


def _congruent(size: int, offset: int) -> tuple[mmap.mmap, memoryview]:
    """A page-aligned mapping and a view of ``size`` bytes of it congruent with file byte
    ``offset`` (`direct.aligned_lead`), as the torch backend's buffers are."""
    lead = direct.aligned_lead(offset, 0)
    mapping = mmap.mmap(-1, lead + size)
    return mapping, memoryview(mapping)[lead : lead + size]


def _counting_bounces(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the bytes each bounce-buffered read asks for."""
    bounced: list[int] = []
    real = direct._pread_bounced

    def counting(fd: int, run: store_module._Scatter, lo: int, hi: int, offset: int) -> int:
        bounced.append(hi - lo)
        return real(fd, run, lo, hi, offset)

    monkeypatch.setattr(direct, "_pread_bounced", counting)
    return bounced


@pytest.mark.asyncio
@pytest.mark.parametrize("shift", [0, 1])
async def test_a_congruent_destination_is_read_straight_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shift: int
) -> None:
    """A direct read into a destination congruent with the file (its address and the file
    offset equal modulo the alignment) moves only the partial blocks at each chunk's ends
    through the bounce buffer: the rest lands straight in it. One byte off (``shift=1``),
    every byte goes through the bounce buffer, as before. Both exact, chunks and end unaligned."""
    data = _random(6 * 1024 * 1024 + 777, seed=50)
    path = tmp_path / "m1" / "w.bin"
    _write_cold(path, data)
    chunk = (1 << 20) + 3
    store = Store(f"file://{tmp_path}/{{model_id}}/", read_chunk_size=chunk, direct_reads=True)
    url = store.join(store.model_url("m1"), "w.bin")
    offset = 12_345
    size = len(data) - offset
    mapping, view = _congruent(size + 1, offset)
    dest = view[shift : shift + size]
    bounced = _counting_bounces(monkeypatch)
    await store.read_into(url, offset, dest, model_id="m1")
    assert bytes(dest) == data[offset:]
    chunks = -(-size // chunk)
    if shift:
        assert sum(bounced) == size
    else:
        assert 0 < sum(bounced) <= 2 * direct.ALIGN * chunks
        assert len(bounced) <= 2 * chunks
    assert _resident(path) < direct.DIRECT_BELOW
    dest.release()
    view.release()
    mapping.close()


def _open_direct(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        pytest.skip("this filesystem refuses O_DIRECT")


@pytest.mark.parametrize("file_end", [6_000, 8_192, 16_384, 20_000, 44_500, 45_000, 50_000])
def test_a_straight_read_stops_exactly_at_the_end_of_the_file(
    tmp_path: Path, file_end: int
) -> None:
    """A straight read of a range the file ends inside (in the first partial block, on a block
    boundary or inside the aligned middle, in the last partial block, or past the range) returns
    the bytes up to the end, each right, and writes nothing outside the destination (inside it,
    past the end, a device may have moved the rest of the file's last block)."""
    offset, length = 5_000, 40_000  # blocks: [4096, 8192) partial, ..., [40960, 45000) partial
    data = _random(file_end, seed=51)
    path = tmp_path / "w.bin"
    _write_cold(path, data)
    lead = direct.aligned_lead(offset, 0)
    mapping = mmap.mmap(-1, lead + length + direct.ALIGN)
    mapping.write(b"\xee" * len(mapping))
    view = memoryview(mapping)[lead : lead + length]
    fd = _open_direct(path)
    try:
        got = direct.pread_run_direct(fd, store_module._Scatter([view]), 0, length, offset)
    finally:
        os.close(fd)
    assert got == max(0, min(length, file_end - offset))
    assert bytes(view[:got]) == data[offset : offset + got]
    assert mapping[:lead] + mapping[lead + length :] == b"\xee" * (len(mapping) - length)
    view.release()
    mapping.close()


def test_a_straight_read_the_device_refuses_goes_on_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A straight direct read refused with EINVAL (an alignment this device does not take)
    turns the descriptor back to buffered and reads the rest of the range: every byte right."""
    offset, length = 5_000, 300_000
    data = _random(offset + length + 10, seed=52)
    path = tmp_path / "w.bin"
    _write_cold(path, data)
    mapping, view = _congruent(length, offset)
    real = direct._read_aligned
    refused: list[int] = []

    def refuse_the_straight_read(fd: int, buf: memoryview, start: int) -> int:
        if len(buf) > direct.ALIGN and not refused and direct._is_direct(fd):
            refused.append(len(buf))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buf, start)

    monkeypatch.setattr(direct, "_read_aligned", refuse_the_straight_read)
    fd = _open_direct(path)
    try:
        got = direct.pread_run_direct(fd, store_module._Scatter([view]), 0, length, offset)
        assert not direct._is_direct(fd)
    finally:
        os.close(fd)
    assert refused and got == length
    assert bytes(view) == data[offset : offset + length]
    view.release()
    mapping.close()


@pytest.mark.asyncio
async def test_a_cold_model_loads_straight_into_a_buffer_congruent_with_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``direct_reads=True`` a large model's host buffer starts where its file's data is
    congruent (the data section starts mid-block in the file, so the buffer starts mid-page),
    its weights are exact, and only partial blocks went through the bounce buffer, on the first
    load (fresh memory) and the next (the pool's reused buffer). A default Store's buffers stay
    page-aligned. The direct reads' buffers ask for huge pages (`_direct`); a warm file's (read
    buffered) and the others only where `huge_pages_advised`."""
    tensors = {
        "a": torch.arange(3 * 1024 * 1024 // 4, dtype=torch.float32),
        "b": torch.arange(777, dtype=torch.int16),
    }
    content = model_file(tensors)
    _write_cold(tmp_path / "m1" / "model.safetensors", content)
    data_start = 8 + int.from_bytes(content[:8], "little")
    assert data_start % direct.ALIGN, "the test needs a data section that starts mid-block"
    template = f"file://{tmp_path}/{{model_id}}/model.safetensors"
    chunk = 1 << 20  # a read of more than one chunk: the direct reads' case
    bounced = _counting_bounces(monkeypatch)
    for store, start in (
        (Store(template, read_chunk_size=chunk, direct_reads=True), data_start),
        (Store(template, read_chunk_size=chunk), 0),
    ):
        async with ModelCache(store, device_budget="64MiB") as cache:
            for cold in (True, True, False):
                if cold:
                    _evict(tmp_path / "m1" / "model.safetensors")
                else:
                    (tmp_path / "m1" / "model.safetensors").read_bytes()  # now in the cache
                bounced.clear()
                async with cache.use("m1") as weights:
                    assert weights.buffer.data_ptr() % direct.ALIGN == start % direct.ALIGN
                    # Huge pages for a cold file's direct reads; for copies out of the page
                    # cache only where advised (`_hugepages`).
                    huge = "hg" in vm_flags(weights.buffer.data_ptr())
                    assert huge == (bool(start and cold) or huge_pages_advised())
                    for name, want in tensors.items():
                        assert torch.equal(weights[name], want), name
                del weights
                cache.evict("m1")
                if start and cold:
                    assert 0 < sum(bounced) < 2 * direct.ALIGN * -(-len(content) // chunk)
                else:
                    assert not bounced  # buffered reads


@pytest.mark.asyncio
@pytest.mark.parametrize("pooled", [True, False])
async def test_a_data_section_off_an_item_boundary_keeps_every_tensor_aligned(
    tmp_path: Path, pooled: bool
) -> None:
    """A model whose data section starts off an 8-byte boundary (a header not padded) loads
    with ``direct_reads=True`` as with buffered reads: every tensor at a multiple of its item
    size, from the pool's buffer and from one of its own (a backend without a pool), exact. A
    buffer congruent with that file would put them all off it (and one sliced from its
    mapping could not be viewed as F64 at all)."""
    tensors = {
        "d": torch.arange(300_000, dtype=torch.float64),
        "f": torch.arange(7, dtype=torch.float32),
    }
    content = model_file(tensors, align=1)
    assert (8 + int.from_bytes(content[:8], "little")) % 8, "the test needs an unpadded header"
    _write_cold(tmp_path / "m1" / "model.safetensors", content)
    store = Store(
        f"file://{tmp_path}/{{model_id}}/model.safetensors",
        read_chunk_size=1 << 20,
        direct_reads=True,
    )
    backend = TorchBackend("cpu")
    if not pooled:
        backend.pool = None
    cache = ModelCache(store, device_budget="64MiB", backend=backend)
    async with cache, cache.use("m1") as weights:
        for name, want in tensors.items():
            assert weights[name].data_ptr() % want.element_size() == 0, name
            assert torch.equal(weights[name], want), name


@pytest.mark.parametrize("shift", [0, 1])
def test_two_chunks_refused_at_once_both_go_on_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shift: int
) -> None:
    """Two chunks' direct reads refused with EINVAL before either thread turns the descriptor
    back to buffered both go on buffered: the slower one finds it buffered already, which is
    no reason to fail the read. Straight in (``shift=0``) and through the bounce buffer."""
    offset, length = 5_000, 600_000
    data = _random(offset + length + 10, seed=53)
    path = tmp_path / "w.bin"
    _write_cold(path, data)
    mapping, view = _congruent(length + 1, offset)
    dest = view[shift : shift + length]
    run = store_module._Scatter([dest])
    real = direct._read_aligned
    both = threading.Barrier(2)
    refused = threading.local()

    def refuse_once_per_thread(fd: int, buf: memoryview, start: int) -> int:
        if direct._is_direct(fd) and not getattr(refused, "done", False):
            refused.done = True
            # Both refused before either turns the descriptor back; the second tells its
            # refusal once the first has.
            if both.wait(timeout=10) == 0:
                while direct._is_direct(fd):
                    time.sleep(0.001)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buf, start)

    monkeypatch.setattr(direct, "_read_aligned", refuse_once_per_thread)
    fd = _open_direct(path)
    got: dict[int, int | BaseException] = {}

    def chunk(lo: int, hi: int) -> None:
        try:
            got[lo] = direct.pread_run_direct(fd, run, lo, hi, offset)
        except BaseException as exc:  # reported below
            got[lo] = exc

    half = 300_001
    threads = [threading.Thread(target=chunk, args=b) for b in ((0, half), (half, length))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not direct._is_direct(fd)
    finally:
        os.close(fd)
    assert got == {0: half, half: length - half}
    assert bytes(dest) == data[offset : offset + length]
    dest.release()
    view.release()
    mapping.close()


@pytest.mark.asyncio
async def test_direct_chunks_start_at_aligned_file_offsets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A direct read from an unaligned offset is cut into chunks that start at aligned file
    offsets (the first chunk is longer by the bytes up to the first one), so a congruent
    destination's chunks are read straight in whole: two partial blocks in all go through the
    bounce buffer, not two a chunk (each a small read queued behind the large ones)."""
    data = _random(5 * 1024 * 1024 + 999, seed=53)
    path = tmp_path / "m1" / "w.bin"
    _write_cold(path, data)
    chunk = 1 << 20
    store = Store(f"file://{tmp_path}/{{model_id}}/", read_chunk_size=chunk, direct_reads=True)
    url = store.join(store.model_url("m1"), "w.bin")
    offset = 5_888
    size = len(data) - offset
    calls: list[tuple[int, int]] = []
    real = direct.pread_run_direct

    def recording(fd: int, run: store_module._Scatter, lo: int, hi: int, at: int) -> int:
        calls.append((lo, hi))
        return real(fd, run, lo, hi, at)

    monkeypatch.setattr(direct, "pread_run_direct", recording)
    bounced = _counting_bounces(monkeypatch)
    mapping, view = _congruent(size, offset)
    await store.read_into(url, offset, view, model_id="m1")
    assert bytes(view) == data[offset:]
    calls.sort()
    skew = -offset % direct.ALIGN
    assert calls[0] == (0, skew + chunk)
    assert all((offset + lo) % direct.ALIGN == 0 for lo, _ in calls[1:])
    assert [hi for _, hi in calls[:-1]] == [lo for lo, _ in calls[1:]] and calls[-1][1] == size
    assert len(bounced) == 2  # the run's first and last partial blocks
    view.release()
    mapping.close()
