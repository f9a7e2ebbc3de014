"""modelcache._loader and the torch backend, end to end through a real Store (file:// and memory://)."""

from __future__ import annotations

import ctypes
import errno
import gc
import itertools
import json
import math
import mmap
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anyio
import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem
from safetensors.torch import load_file, save_file

import modelcache._direct as direct
import modelcache._faultin as faultin
import modelcache._loader as loader
import modelcache._torch as backend
from modelcache._exceptions import (
    InvalidModelIdError,
    ModelChangedError,
    ModelFormatError,
    ModelNotFoundError,
    StoreError,
)
from modelcache._faultin import WINDOW
from modelcache._format import DTYPE_SIZES, parse_header
from modelcache._loader import read_config, read_model_info
from modelcache._store import Store
from modelcache._torch import TorchBackend, Weights, torch_dtype

from .safetensors_files import (
    DTYPE_NAMES,
    Dest,
    misaligned_pairs,
    put,
    raw_file,
    tensor_bytes,
    write_model,
    write_raw,
    write_sharded,
)

# -- a local filesystem that counts what it serves ------------------------------------------------


class CountingFileSystem(LocalFileSystem):  # type: ignore[misc]
    """LocalFileSystem under the test-only "countfile" protocol, counting bytes it returns.

    The Store treats only file/local URLs as local, so "countfile" URLs go through the
    generic fsspec path: every byte the Store reads passes through here.
    """

    protocol = "countfile"
    bytes_served: ClassVar[int] = 0
    cat_calls: ClassVar[int] = 0
    opens: ClassVar[int] = 0

    @classmethod
    def reset(cls) -> None:
        cls.bytes_served = cls.cat_calls = cls.opens = 0

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kw: Any
    ) -> Any:
        type(self).cat_calls += 1
        return super().cat_file(path, start=start, end=end, **kw)

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kw: Any) -> Any:
        type(self).opens += 1
        return _CountingOpener(self._strip_protocol(path), mode, fs=self, **kw)


class _CountingOpener(LocalFileOpener):  # type: ignore[misc]
    def read(self, *args: Any, **kwargs: Any) -> Any:
        data = super().read(*args, **kwargs)
        CountingFileSystem.bytes_served += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        n: int = self.f.readinto(buffer)
        CountingFileSystem.bytes_served += n
        return n


fsspec.register_implementation(CountingFileSystem.protocol, CountingFileSystem, clobber=True)


@pytest.fixture
def counting(tmp_path: Path) -> Iterator[Store]:
    """A Store on tmp_path through the counting filesystem; counters start at zero."""
    CountingFileSystem.reset()
    yield Store(f"countfile://{tmp_path}/{{model_id}}")
    CountingFileSystem.reset()


# -- where models live ----------------------------------------------------------------------------


@dataclass
class Place:
    """A store root: ``directory(id)`` is where a model's files go, ``store`` reads them."""

    kind: str
    template: str
    root: Path | str

    def directory(self, model_id: str) -> Dest:
        if isinstance(self.root, Path):
            return self.root / model_id
        return f"{self.root}/{model_id}"

    def file(self, model_id: str, name: str = "model.safetensors") -> Dest:
        d = self.directory(model_id)
        return d / name if isinstance(d, Path) else f"{d}/{name}"

    def store(self) -> Store:
        return Store(self.template)


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh memory:// root, removed afterwards."""
    root = f"/mcl-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(params=["file", "memory"])
def place(request: pytest.FixtureRequest, tmp_path: Path, memory_root: str) -> Place:
    """Models on the local disk (file://) and in fsspec's memory filesystem (memory://)."""
    if request.param == "file":
        root = tmp_path / "store"
        root.mkdir()
        return Place("file", f"file://{root}/{{model_id}}", root)
    return Place("memory", f"memory://{memory_root}/{{model_id}}", f"memory://{memory_root}")


# -- helpers --------------------------------------------------------------------------------------

ALL_DTYPES = sorted(DTYPE_NAMES, key=lambda d: DTYPE_NAMES[d])
MODEL_ID = "m-1"


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaNs and odd payloads included; bools are 0/1)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=g).to(torch.bool).reshape(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def assert_same(weights: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bytes (bitwise, so NaNs compare)."""
    assert set(weights) == set(expected)
    for name, want in expected.items():
        got = weights[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert tensor_bytes(got) == tensor_bytes(want), name


def assert_one_buffer(weights: Weights) -> None:
    """Every non-empty tensor is a view of weights.buffer's storage, at an aligned address."""
    base = weights.buffer.untyped_storage().data_ptr()
    for name, t in weights.items():
        if t.numel() == 0:
            continue
        assert t.untyped_storage().data_ptr() == base, name
        assert t.data_ptr() % t.element_size() == 0, name


async def load(store: Store, model_id: str = MODEL_ID, *, zero_copy: bool = True) -> Weights:
    info = await read_model_info(store, model_id)
    weights = await TorchBackend("cpu", zero_copy=zero_copy).load(store, info)
    assert_one_buffer(weights)
    assert weights.nbytes == info.nbytes
    return weights


def disk_bytes(dest: Dest) -> bytes:
    if isinstance(dest, Path):
        return dest.read_bytes()
    data: bytes = fsspec.filesystem("memory").cat_file(fsspec.core.url_to_fs(dest)[1])
    return data


# -- bit-exactness --------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "copy"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=[DTYPE_NAMES[d] for d in ALL_DTYPES])
async def test_every_dtype_loads_bit_exact(
    place: Place, tmp_path: Path, dtype: torch.dtype, zero_copy: bool
) -> None:
    """A save_file model of each dtype loads with the same dtype, shape and bytes as load_file."""
    tensors = {
        "matrix": random_tensor(dtype, (3, 5), 1),
        "vector": random_tensor(dtype, (7,), 2),
        "scalar": random_tensor(dtype, (), 3),
        "empty": random_tensor(dtype, (0, 4), 4),
        "odd": random_tensor(torch.uint8, (3,), 5),
        "pad": random_tensor(torch.uint8, (1 << 20,), 6),  # zero-copy maps no smaller model
    }
    reference = tmp_path / "reference.safetensors"
    save_file(tensors, str(reference))
    content = reference.read_bytes()
    put(place.file(MODEL_ID), content)
    expected = load_file(str(reference))
    assert_same(expected, tensors)
    weights = await load(place.store(), zero_copy=zero_copy)
    assert_same(weights, expected)
    if zero_copy and place.kind == "file":
        assert weights.buffer.numel() == len(content)  # the mapping is the buffer


@pytest.mark.asyncio
@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "copy"])
async def test_misaligned_model_loads_bit_exact(place: Place, zero_copy: bool) -> None:
    """Tensors at offsets that are not multiples of their item size load whole and aligned."""
    tensors = {
        "u": random_tensor(torch.uint8, (3,), 1),
        "f": random_tensor(torch.float32, (2, 2), 2),
        "b": random_tensor(torch.bool, (1,), 3),
        "h": random_tensor(torch.float16, (3,), 4),
        "q": random_tensor(torch.int64, (1,), 5),
        "c": random_tensor(torch.complex64, (), 6),
        "z": random_tensor(torch.float64, (0,), 7),
        "d": random_tensor(torch.float64, (2,), 8),
        "bf": random_tensor(torch.bfloat16, (5,), 9),
    }
    write_model(place.directory(MODEL_ID), tensors, misalign=True)
    store = place.store()
    info = await read_model_info(store, MODEL_ID)
    assert not info.mappable
    assert any(t.offset != t.start for t in info.tensors.values())
    weights = await load(store, zero_copy=zero_copy)
    assert_same(weights, tensors)


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports this worktree's modelcache."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.asyncio
async def test_many_misaligned_tensors_share_one_read_per_shard(place: Place) -> None:
    """3,000 tensors that each need their own shift are read in one scattered read of the
    shard (one open, one request window), and load bit-exact."""
    tensors = misaligned_pairs(3000)
    write_model(place.directory(MODEL_ID), tensors, misalign=True)
    store = place.store()
    info = await read_model_info(store, MODEL_ID)
    assert len(info.segments) == 3001
    calls: list[int] = []
    real = store.read_scatter

    async def counted(url: str, offset: int, dests: Any, *, model_id: str) -> None:
        calls.append(len(dests))
        await real(url, offset, dests, model_id=model_id)

    store.read_scatter = counted  # type: ignore[method-assign]
    weights = await load(store, zero_copy=False)
    assert_same(weights, tensors)
    assert calls == [3001]


def test_misaligned_header_cannot_exhaust_file_descriptors(tmp_path: Path) -> None:
    """A model whose header makes thousands of segments loads bit-exact in a process allowed
    only a few dozen more open files than it has (it once opened one per segment: EMFILE)."""
    write_model(tmp_path / MODEL_ID, misaligned_pairs(3000), misalign=True)
    result = run_python(
        f"""
        import asyncio, os, resource
        from modelcache._loader import read_model_info
        from modelcache._store import Store
        from modelcache._torch import TorchBackend
        from tests.safetensors_files import misaligned_pairs, tensor_bytes

        async def main():
            store = Store("file://{tmp_path}/{{model_id}}")
            info = await read_model_info(store, {MODEL_ID!r})
            assert len(info.segments) == 3001, len(info.segments)
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 24, hard)
            )
            weights = await TorchBackend("cpu", zero_copy=False).load(store, info)
            want = misaligned_pairs(3000)
            assert all(tensor_bytes(weights[n]) == tensor_bytes(t) for n, t in want.items())
            print("ok")

        asyncio.run(main())
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


@pytest.mark.asyncio
async def test_headers_of_all_shards_count_toward_the_header_limit(
    place: Place, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model's headers total at most MAX_HEADER_SIZE bytes, all shards together: shards
    within it one by one are refused as a model, before the over-limit header is read."""
    shards = [{f"s{i}.w": random_tensor(torch.float32, (4,), i)} for i in range(3)]
    write_sharded(place.directory(MODEL_ID), shards)
    store = place.store()
    sizes = [s.data_start - 8 for s in (await read_model_info(store, MODEL_ID)).shards]
    monkeypatch.setattr(loader, "MAX_HEADER_SIZE", sum(sizes) - 1)
    with pytest.raises(ModelFormatError, match="headers total more than"):
        await read_model_info(store, MODEL_ID)
    monkeypatch.setattr(loader, "MAX_HEADER_SIZE", sum(sizes))
    assert len((await read_model_info(store, MODEL_ID)).tensors) == 3


@pytest.mark.asyncio
async def test_a_header_of_many_tensors_does_not_stall_the_event_loop(tmp_path: Path) -> None:
    """Parsing a header of 30,000 tensors, laying the model out and making its views run off
    the event loop: a task that wakes every millisecond is never held for a large part of
    the load (it was held for most of it). The objects of earlier tests are frozen out of the
    collector's passes: a full pass over them (transformers and peft imported: ~500,000) held
    the loop for 0.3 s on a loaded machine, whatever the load does."""
    gc.collect()
    gc.freeze()
    try:
        await _probe_a_load_of_many_tensors(tmp_path)
    finally:
        gc.unfreeze()


async def _probe_a_load_of_many_tensors(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.tensor([i % 256], dtype=torch.uint8) for i in range(30_000)}
    write_model(tmp_path / MODEL_ID, tensors)
    store = Store(f"file://{tmp_path}/{{model_id}}")
    gaps: list[float] = []
    done = anyio.Event()

    async def probe() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await anyio.sleep(0.001)  # a heartbeat, not an ordering
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(probe)
        await anyio.sleep(0.01)  # the probe is beating
        started = time.perf_counter()
        weights = await load(store, zero_copy=False)
        elapsed = time.perf_counter() - started
        done.set()
    assert_same(weights, tensors)
    assert max(gaps) < elapsed / 3, (max(gaps), elapsed)


def test_store_file_changes_cannot_crash_or_change_a_default_cache(tmp_path: Path) -> None:
    """Under the default settings, a loaded model's store file truncated, or rewritten in place
    at the same size, neither kills the process (it once died of SIGBUS) nor changes the weights
    it serves."""
    for model_id in ("cut", "rewritten"):
        write_model(tmp_path / model_id, {"w": random_tensor(torch.int32, (64, 1024), 7)})
    result = run_python(
        f"""
        import anyio, os
        from modelcache import ModelCache

        async def main():
            async with ModelCache("file://{tmp_path}/{{model_id}}", device_budget="64MiB") as c:
                for model_id in ("cut", "rewritten"):
                    async with c.use(model_id) as weights:
                        want = weights["w"].clone()
                    path = os.path.join({str(tmp_path)!r}, model_id, "model.safetensors")
                    if model_id == "cut":
                        os.truncate(path, 0)
                    else:
                        size = os.path.getsize(path)
                        with open(path, "r+b") as f:  # the same size, other weights
                            f.seek(size - (1 << 18))
                            f.write(bytes(1 << 18))
                    async with c.use(model_id) as weights:
                        assert weights["w"].equal(want), model_id
            print("ok")

        anyio.run(main)
        """
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert result.stdout.strip() == "ok"


@pytest.mark.asyncio
@pytest.mark.parametrize("misalign", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "copy"])
async def test_sharded_model_loads_bit_exact(place: Place, zero_copy: bool, misalign: bool) -> None:
    """A 3-shard model loads into one buffer with every tensor's bytes intact."""
    shards = [
        {"a": random_tensor(torch.float32, (4, 3), 1), "s": random_tensor(torch.int8, (), 2)},
        {
            "u": random_tensor(torch.uint8, (5,), 3),
            "b": random_tensor(torch.bfloat16, (2, 2), 4),
            "z": random_tensor(torch.float32, (0,), 5),
        },
        {"c": random_tensor(torch.float64, (3,), 6), "v": random_tensor(torch.int16, (1,), 7)},
    ]
    write_sharded(
        place.directory(MODEL_ID), shards, misalign=misalign, metadata={"total_size": 123}
    )
    store = place.store()
    info = await read_model_info(store, MODEL_ID)
    assert len(info.shards) == 3
    assert not info.mappable
    assert dict(info.metadata) == {"total_size": "123"}
    weights = await load(store, zero_copy=zero_copy)
    assert_same(weights, {k: v for s in shards for k, v in s.items()})


@pytest.mark.asyncio
@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "copy"])
async def test_scalar_and_empty_tensors_load(place: Place, zero_copy: bool) -> None:
    """0-dim and zero-size tensors come back with their shapes; a model of only those loads."""
    tensors = {
        "s": random_tensor(torch.float32, (), 1),
        "e": random_tensor(torch.float32, (0,), 2),
        "e3": random_tensor(torch.int64, (2, 0, 3), 3),
    }
    write_model(place.directory(MODEL_ID), tensors)
    weights = await load(place.store(), zero_copy=zero_copy)
    assert_same(weights, tensors)
    assert weights["s"].dim() == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("shift", [0, 8, 24])
async def test_tensor_views_are_the_buffers_bytes_at_the_layouts_offsets_wherever_it_starts(
    tmp_path: Path, shift: int
) -> None:
    """`tensor_views` of a buffer that starts ``shift`` bytes into its storage (an arena
    block, a mapping's data section) views the bytes at ``base`` + each tensor's offset in
    that buffer, not in its storage (one typed view per dtype, an ``as_strided`` per tensor:
    its offsets count from the storage's start): every dtype, 0-dim and empty tensors; they
    are views (a write to the buffer shows in them), not copies."""
    place = Place("file", f"file://{tmp_path}/{{model_id}}", tmp_path)
    tensors = {
        f"t{i}": random_tensor(getattr(torch, attr), shape, i)
        for i, (attr, shape) in enumerate(
            [
                ("float32", (3, 5)),
                ("int8", (7,)),
                ("float16", (2, 2, 3)),
                ("int64", ()),
                ("bfloat16", (0, 4)),
                ("uint8", (5,)),
                ("float64", (4, 1)),
            ]
        )
    }
    write_model(place.directory(MODEL_ID), tensors)
    info = await read_model_info(place.store(), MODEL_ID)
    base = 16
    backing = torch.zeros(shift + base + info.nbytes + 64, dtype=torch.uint8)
    buffer = backing[shift : shift + base + info.nbytes]
    for name, t in info.tensors.items():
        raw = tensors[name].reshape(-1).view(torch.uint8)
        buffer[base + t.offset : base + t.offset + t.nbytes] = raw
    views = backend.tensor_views(buffer, info, base)
    assert_same(views, tensors)
    for name, t in info.tensors.items():
        if t.nbytes:
            assert views[name].data_ptr() == buffer.data_ptr() + base + t.offset, name
            assert views[name].is_contiguous(), name
    buffer[base + info.tensors["t1"].offset] = 0x7F
    assert int(views["t1"][0]) == 0x7F


@pytest.mark.asyncio
async def test_tensor_views_of_a_buffer_off_its_dtypes_alignment_are_refused(
    tmp_path: Path,
) -> None:
    """A tensor that would start off its item size in the buffer's storage (the buffer or the
    base misaligned) gets no view rounded down to the item before (wrong bytes): torch
    refuses the view, as one dtype view per tensor did."""
    place = Place("file", f"file://{tmp_path}/{{model_id}}", tmp_path)
    write_model(place.directory(MODEL_ID), {"w": random_tensor(torch.float32, (8,))})
    info = await read_model_info(place.store(), MODEL_ID)
    backing = torch.zeros(info.nbytes + 8, dtype=torch.uint8)
    with pytest.raises(RuntimeError):
        backend.tensor_views(backing[1 : 1 + info.nbytes], info)
    with pytest.raises(RuntimeError):  # the buffer aligned, the base not
        backend.tensor_views(backing[: 1 + info.nbytes], info, 1)


@pytest.mark.asyncio
@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "copy"])
async def test_model_without_tensors_loads_empty(place: Place, zero_copy: bool) -> None:
    """A file whose header holds no tensor loads as an empty mapping."""
    write_raw(place.file(MODEL_ID), {"__metadata__": {"k": "v"}}, b"")
    weights = await load(place.store(), zero_copy=zero_copy)
    assert len(weights) == 0
    assert dict(weights.info.metadata) == {"k": "v"}


@pytest.mark.asyncio
@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "copy"])
async def test_single_file_template(tmp_path: Path, zero_copy: bool) -> None:
    """A template naming a .safetensors file reads that one file as the model."""
    tensors = {"w": random_tensor(torch.float16, (4, 4))}
    save_file(tensors, str(tmp_path / "m-1.safetensors"))
    store = Store(f"file://{tmp_path}/{{model_id}}.safetensors")
    weights = await load(store, zero_copy=zero_copy)
    assert_same(weights, tensors)
    assert await read_config(store, MODEL_ID) is None


@pytest.mark.asyncio
@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "copy"])
async def test_zero_copy_with_unpadded_header(tmp_path: Path, zero_copy: bool) -> None:
    """A file whose data_start is 4 mod 8 loads exactly, mapped or copied."""
    # Its tensors are aligned in the file but not relative to the data section, so the layout
    # shifts them; the mapped (zero-copy) views must still find each tensor's own bytes.
    tensors = {
        "u": random_tensor(torch.uint8, (4,), 1),
        "q": random_tensor(torch.int64, (1,), 2),
        "f": random_tensor(torch.float32, (1,), 3),
    }
    header: dict[str, Any] = {}
    offset = 0
    for name, t in tensors.items():
        n = len(tensor_bytes(t))
        header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    encoded = json.dumps(header).encode()
    size = len(encoded) + (4 - len(encoded)) % 8  # 8 + size = 4 (mod 8)
    data = b"".join(tensor_bytes(t) for t in tensors.values())
    put(tmp_path / MODEL_ID / "model.safetensors", raw_file(encoded, data, align=1, size=size))
    store = Store(f"file://{tmp_path}/{{model_id}}")
    weights = await load(store, zero_copy=zero_copy)
    assert_same(weights, tensors)


# -- one buffer, and the zero-copy mapping --------------------------------------------------------


@pytest.mark.asyncio
async def test_zero_copy_maps_the_file_copy_on_write(tmp_path: Path) -> None:
    """Zero-copy maps the whole file; writing a loaded tensor never reaches the file."""
    tensors = {
        "w": random_tensor(torch.float32, (512, 512), 1),
        "b": random_tensor(torch.int8, (9,)),
    }
    path = tmp_path / MODEL_ID / "model.safetensors"
    path.parent.mkdir()
    save_file(tensors, str(path))
    content = path.read_bytes()
    store = Store(f"file://{tmp_path}/{{model_id}}")
    info = await read_model_info(store, MODEL_ID)
    assert info.mappable
    weights = await load(store, zero_copy=True)
    assert weights.buffer.numel() == len(content)
    assert bytes(weights.buffer.numpy()) == content
    weights["w"].fill_(1.5)
    weights["b"].zero_()
    assert bool((weights["w"] == 1.5).all())
    assert path.read_bytes() == content
    again = await load(store, zero_copy=True)
    assert_same(again, tensors)


def _mappings() -> str:
    """This process's mappings (/proc/self/maps)."""
    return Path("/proc/self/maps").read_text()


@pytest.mark.asyncio
async def test_zero_copy_maps_no_model_under_a_mebibyte(tmp_path: Path) -> None:
    """zero_copy: a model under 1 MiB is copied into the heap, its file not mapped (each
    mapping counts against the kernel's limit per process, ~65,000, past which every mmap of
    the process fails); one of 1 MiB is mapped."""
    small = {"w": random_tensor(torch.float32, ((1 << 18) - 1,))}
    large = {"w": random_tensor(torch.float32, (1 << 18,))}
    write_model(tmp_path / "small", small)
    write_model(tmp_path / "large", large)
    store = Store(f"file://{tmp_path}/{{model_id}}")
    backend_ = TorchBackend("cpu", zero_copy=True)
    loaded = {}
    for model_id in ("small", "large"):
        loaded[model_id] = await backend_.load(store, await read_model_info(store, model_id))
    maps = _mappings()
    assert str(tmp_path / "small") not in maps and str(tmp_path / "large") in maps
    assert loaded["small"].buffer.numel() == loaded["small"].info.nbytes
    assert_same(loaded["small"], small)
    assert_same(loaded["large"], large)


@pytest.mark.asyncio
async def test_copy_path_buffer_is_exact_size(place: Place) -> None:
    """Without zero-copy the buffer is exactly info.nbytes, the figure budgets are charged."""
    tensors = {"w": random_tensor(torch.float32, (8, 8)), "u": random_tensor(torch.uint8, (3,))}
    write_model(place.directory(MODEL_ID), tensors)
    weights = await load(place.store(), zero_copy=False)
    assert weights.buffer.numel() == weights.info.nbytes == 8 * 8 * 4 + 3


# -- header reads are cheap -----------------------------------------------------------------------

GIB = 1 << 30


def sparse_model(path: Path) -> int:
    """A model with a 1 GiB data section, written as header + truncate (no data on disk)."""
    header = {
        "embed": {"dtype": "F32", "shape": [1 << 20, 128], "data_offsets": [0, GIB // 2]},
        "head": {"dtype": "BF16", "shape": [1 << 20, 256], "data_offsets": [GIB // 2, GIB]},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(raw_file(header, b""))
        size = f.tell() + GIB
        f.truncate(size)
    return size


@pytest.mark.asyncio
async def test_header_of_1gib_model_costs_a_few_kib(tmp_path: Path) -> None:
    """read_model_info on a 1 GiB model reads under 32 KiB (file:// through Store counts)."""
    sparse_model(tmp_path / MODEL_ID / "model.safetensors")
    store = Store(f"file://{tmp_path}/{{model_id}}")
    info = await read_model_info(store, MODEL_ID)
    assert info.nbytes == GIB
    assert info.mappable
    assert 0 < store.bytes_read < 32 << 10


@pytest.mark.asyncio
async def test_header_of_1gib_model_counted_by_filesystem(tmp_path: Path, counting: Store) -> None:
    """Through an independent byte-counting filesystem, reading a 1 GiB model's info is < 32 KiB."""
    sparse_model(tmp_path / MODEL_ID / "model.safetensors")
    info = await read_model_info(counting, MODEL_ID)
    assert info.nbytes == GIB
    assert CountingFileSystem.cat_calls >= 1  # the store really went through it
    assert 0 < CountingFileSystem.bytes_served < 32 << 10
    assert counting.bytes_read == CountingFileSystem.bytes_served


@pytest.mark.asyncio
async def test_long_header_is_read_in_two_reads(tmp_path: Path, counting: Store) -> None:
    """A header of thousands of tensors (far over 8 KiB) is read exactly, in two reads."""
    tensors = {f"layers.{i}.weight": random_tensor(torch.uint8, (i % 5,), i) for i in range(3000)}
    content = write_model(tmp_path / MODEL_ID, tensors)
    header_end = 8 + int.from_bytes(content[:8], "little")
    assert header_end > 8 << 10
    info = await read_model_info(counting, MODEL_ID)
    assert len(info.tensors) == 3000
    assert CountingFileSystem.cat_calls == 2
    assert CountingFileSystem.bytes_served == counting.bytes_read == header_end
    weights = await load(counting, zero_copy=False)
    assert_same(weights, tensors)


@pytest.mark.asyncio
@pytest.mark.parametrize(("header_end", "reads"), [(8 << 10, 1), ((8 << 10) + 1, 2), (100, 1)])
async def test_header_read_count_at_the_8kib_boundary(
    tmp_path: Path, counting: Store, header_end: int, reads: int
) -> None:
    """A header ending within the first 8 KiB takes one read; one byte more takes two."""
    tensors = {"w": random_tensor(torch.float32, (300,))}
    data = tensor_bytes(tensors["w"])
    header = {"w": {"dtype": "F32", "shape": [300], "data_offsets": [0, len(data)]}}
    put(tmp_path / MODEL_ID / "model.safetensors", raw_file(header, data, size=header_end - 8))
    info = await read_model_info(counting, MODEL_ID)
    assert info.shards[0].data_start == header_end
    assert CountingFileSystem.cat_calls == reads
    weights = await load(counting, zero_copy=False)
    assert_same(weights, tensors)


# -- bad inputs end to end ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_missing_model_is_not_found(place: Place) -> None:
    """A model with neither file nor index is ModelNotFoundError (a KeyError) naming id and path."""
    store = place.store()
    with pytest.raises(ModelNotFoundError) as info:
        await read_model_info(store, "absent-7")
    assert isinstance(info.value, KeyError)
    assert "absent-7" in str(info.value)
    assert str(place.directory("absent-7")).split("://")[-1] in str(info.value)
    assert info.value.model_id == "absent-7"


def _truncate_tail(content: bytes) -> bytes:
    return content[:-1]


BAD_FILES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("seven-bytes", b"\x02\0\0\0\0\0\0"),
    ("header-past-end", raw_file({}, b"", header_len=1000)),
    ("absurd-header", raw_file({}, b"", header_len=1 << 40)),
    ("not-json", raw_file(b"{oops", b"")),
    (
        "truncated-data",
        raw_file({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(12)),
    ),
    (
        "trailing-data",
        raw_file({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(5)),
    ),
    ("unknown-dtype", raw_file({"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"x")),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("content"), [pytest.param(c, id=i) for i, c in BAD_FILES])
async def test_bad_file_is_format_error(place: Place, content: bytes) -> None:
    """Invalid or truncated files are ModelFormatError naming the model id and the file."""
    put(place.file(MODEL_ID), content)
    with pytest.raises(ModelFormatError) as info:
        await read_model_info(place.store(), MODEL_ID)
    assert MODEL_ID in str(info.value)
    assert "model.safetensors" in str(info.value)


@pytest.mark.asyncio
async def test_data_truncated_after_save_is_format_error(place: Place, tmp_path: Path) -> None:
    """A real save_file model missing its last byte is refused as truncated."""
    save_file({"w": random_tensor(torch.float32, (10,))}, str(tmp_path / "ref.safetensors"))
    put(place.file(MODEL_ID), (tmp_path / "ref.safetensors").read_bytes()[:-1])
    with pytest.raises(ModelFormatError, match="truncated"):
        await read_model_info(place.store(), MODEL_ID)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "shard", ["../escape.safetensors", "/etc/passwd", "a/../../escape.safetensors", "s3://b/x"]
)
async def test_index_shard_outside_model_is_format_error(place: Place, shard: str) -> None:
    """An index naming a shard outside the model's directory is refused before reading it."""
    write_sharded(place.directory(MODEL_ID), [{"w": random_tensor(torch.float32, (2,))}])
    # a valid file where "../escape.safetensors" points, so only the name check can stop it
    write_model(place.root, {"w": random_tensor(torch.float32, (2,))}, name="escape.safetensors")
    put(
        place.file(MODEL_ID, "model.safetensors.index.json"),
        json.dumps({"weight_map": {"w": shard}}).encode(),
    )
    store = place.store()
    with pytest.raises(ModelFormatError) as info:
        await read_model_info(store, MODEL_ID)
    assert MODEL_ID in str(info.value)
    assert store.bytes_read < 200  # the index only


@pytest.mark.asyncio
async def test_index_naming_missing_shard_is_format_error(place: Place) -> None:
    """An index naming a shard file that does not exist is ModelFormatError naming that shard."""
    shards = [{"a": random_tensor(torch.float32, (2,))}, {"b": random_tensor(torch.float32, (2,))}]
    weight_map = write_sharded(place.directory(MODEL_ID), shards)
    put(
        place.file(MODEL_ID, "model.safetensors.index.json"),
        json.dumps({"weight_map": {**weight_map, "c": "ghost.safetensors"}}).encode(),
    )
    with pytest.raises(ModelFormatError) as info:
        await read_model_info(place.store(), MODEL_ID)
    assert not isinstance(info.value, KeyError)
    assert "ghost.safetensors" in str(info.value)
    assert MODEL_ID in str(info.value)


@pytest.mark.asyncio
async def test_invalid_shard_is_one_format_error(place: Place) -> None:
    """A sharded model with one corrupt shard raises ModelFormatError itself, not an ExceptionGroup."""
    shards = [{"a": random_tensor(torch.float32, (2,))}, {"b": random_tensor(torch.float32, (2,))}]
    names = list(write_sharded(place.directory(MODEL_ID), shards).values())
    put(place.file(MODEL_ID, names[1]), raw_file(b"{oops", b""))
    with pytest.raises(ModelFormatError) as info:
        await read_model_info(place.store(), MODEL_ID)
    assert names[1] in str(info.value)


@pytest.mark.asyncio
async def test_file_truncated_after_info_is_one_store_error(place: Place) -> None:
    """A file that shrinks between read_model_info and load gives StoreError, not an ExceptionGroup."""
    tensors = {"w": random_tensor(torch.float32, (16,))}
    content = write_model(place.directory(MODEL_ID), tensors)
    store = place.store()
    info = await read_model_info(store, MODEL_ID)
    put(place.file(MODEL_ID), content[:-8])
    with pytest.raises(StoreError) as caught:
        await TorchBackend("cpu", zero_copy=False).load(store, info)
    assert MODEL_ID in str(caught.value)


@pytest.mark.asyncio
async def test_index_inconsistent_with_shards_is_format_error(place: Place) -> None:
    """An index placing a tensor in the wrong shard is ModelFormatError."""
    shards = [{"a": random_tensor(torch.float32, (2,))}, {"b": random_tensor(torch.float32, (2,))}]
    names = list(write_sharded(place.directory(MODEL_ID), shards).values())
    put(
        place.file(MODEL_ID, "model.safetensors.index.json"),
        json.dumps({"weight_map": {"a": names[1], "b": names[0]}}).encode(),
    )
    with pytest.raises(ModelFormatError):
        await read_model_info(place.store(), MODEL_ID)


@pytest.mark.asyncio
@pytest.mark.parametrize("model_id", ["../x", "..", "a/b", "", "s3://x", "/etc", "a\x00b"])
async def test_invalid_id_is_refused_before_io(counting: Store, model_id: str) -> None:
    """An unsafe id is InvalidModelIdError before any byte is read or any file opened."""
    with pytest.raises(InvalidModelIdError):
        await read_model_info(counting, model_id)
    with pytest.raises(InvalidModelIdError):
        await read_config(counting, model_id)
    assert counting.bytes_read == 0
    assert CountingFileSystem.opens == CountingFileSystem.bytes_served == 0


# -- read_config ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_config_present_is_a_dict(place: Place) -> None:
    """config.json next to the weights comes back as a dict."""
    config = {"hidden_size": 8, "architectures": ["X"], "nested": {"a": None}}
    put(place.file(MODEL_ID, "config.json"), json.dumps(config).encode())
    assert await read_config(place.store(), MODEL_ID) == config


@pytest.mark.asyncio
async def test_config_missing_is_none(place: Place) -> None:
    """A model without config.json (or no model at all) has config None."""
    write_model(place.directory(MODEL_ID), {"w": random_tensor(torch.uint8, (1,))})
    store = place.store()
    assert await read_config(store, MODEL_ID) is None
    assert await read_config(store, "absent") is None


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"{oops", id="invalid"),
        pytest.param(b"", id="empty"),
        pytest.param(b"[1, 2]", id="list"),
        pytest.param(b"\xff\xfe", id="non-utf8"),
        pytest.param(b"[" * 100_000, id="deeply-nested"),
    ],
)
async def test_config_invalid_is_format_error(place: Place, data: bytes) -> None:
    """An unreadable or non-object config.json is ModelFormatError naming id and file."""
    put(place.file(MODEL_ID, "config.json"), data)
    with pytest.raises(ModelFormatError) as info:
        await read_config(place.store(), MODEL_ID)
    assert MODEL_ID in str(info.value)
    assert "config.json" in str(info.value)


def test_every_format_dtype_has_a_torch_dtype_here() -> None:
    """The bit-exactness matrix covers every DTYPE_SIZES entry this torch supports."""
    for name in DTYPE_SIZES:
        try:
            dtype = torch_dtype(name)
        except ModelFormatError:
            continue  # this torch lacks it
        assert DTYPE_NAMES.get(dtype) == name
    for dtype, name in DTYPE_NAMES.items():
        assert torch.empty((), dtype=dtype).element_size() == DTYPE_SIZES[name]


# -- fresh buffers from remote stores are faulted in beside the reads ----------------------------


def test_prefault_advises_the_whole_buffer_in_steps_until_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """_prefault populates every step of the buffer in order, and nothing once stopped."""

    calls: list[tuple[int, int, int]] = []

    def madvise(address: int, nbytes: int, advice: int) -> int:
        calls.append((address, nbytes, advice))
        return 0

    monkeypatch.setattr(backend, "_madvise", madvise)
    monkeypatch.setattr(backend, "_PREFAULT_STEP", 100)
    backend._prefault(1000, 250, threading.Event())
    write = backend._MADV_POPULATE_WRITE
    assert calls == [(1000, 100, write), (1100, 100, write), (1200, 50, write)]
    calls.clear()
    stopped = threading.Event()
    stopped.set()
    backend._prefault(1000, 250, stopped)
    assert calls == []


@pytest.mark.asyncio
async def test_memory_store_load_of_a_large_model_prefaults_and_is_exact(
    memory_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multi-MiB load from a non-local store runs the prefault beside the reads, bit-exact."""

    seen: list[int] = []
    real = backend._prefault

    def prefault(address: int, nbytes: int, stop: threading.Event) -> None:
        seen.append(nbytes)
        real(address, nbytes, stop)

    monkeypatch.setattr(backend, "_prefault", prefault)
    place = Place("memory", f"memory://{memory_root}/{{model_id}}", f"memory://{memory_root}")
    tensors = {"w": random_tensor(torch.float32, (1 << 20,)), "b": random_tensor(torch.int8, (7,))}
    write_model(place.directory(MODEL_ID), tensors)
    weights = await load(place.store(), zero_copy=False)
    assert seen == [weights.info.nbytes]
    assert_same(weights, tensors)


@pytest.mark.asyncio
async def test_a_failed_remote_read_stops_the_prefault_and_raises_typed(
    memory_root: str,
) -> None:
    """A read that fails mid-load raises its StoreError (not a group) once the prefault ends."""
    place = Place("memory", f"memory://{memory_root}/{{model_id}}", f"memory://{memory_root}")
    content = write_model(
        place.directory(MODEL_ID), {"w": random_tensor(torch.float32, (1 << 20,))}
    )
    store = place.store()
    info = await read_model_info(store, MODEL_ID)
    put(place.file(MODEL_ID), content[: len(content) // 2])
    with pytest.raises(StoreError):
        await TorchBackend("cpu", zero_copy=False).load(store, info)


# -- local files not in the page cache; mapped files faulted in from several threads --------------


PAGE = os.sysconf("SC_PAGE_SIZE")


def _evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache; skip where the filesystem keeps them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages: DONTNEED can drop them
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if direct.resident_fraction(fd, 0, os.fstat(fd).st_size) > 0.1:
            pytest.skip("this filesystem keeps the file in memory (tmpfs?): nothing is cold")
    finally:
        os.close(fd)


def _present_pages(address: int, nbytes: int) -> int:
    """How many pages of ``[address, address + nbytes)`` this process has mapped now (bit 63
    of each page's /proc/self/pagemap entry)."""
    first, count = address // PAGE, -(-(address % PAGE + nbytes) // PAGE)
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(first * 8)
            entries = f.read(count * 8)
    except OSError:
        pytest.skip("no /proc/self/pagemap here")
    words = memoryview(entries).cast("Q")
    return sum(1 for word in words if word >> 63)


@pytest.mark.asyncio
async def test_a_cold_local_load_prefaults_beside_the_reads_and_a_cached_one_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy of a local file mostly not in the page cache faults the fresh buffer in from
    another thread while the reads wait on the disk; a cached file's copy does not (there the
    thread would compete with the copies); both bit-exact."""
    seen: list[int] = []
    real = backend._prefault

    def prefault(address: int, nbytes: int, stop: threading.Event) -> None:
        seen.append(nbytes)
        real(address, nbytes, stop)

    monkeypatch.setattr(backend, "_prefault", prefault)
    place = Place("file", f"file://{tmp_path}/{{model_id}}", tmp_path)
    tensors = {"w": random_tensor(torch.float32, (1 << 20,)), "b": random_tensor(torch.int8, (7,))}
    write_model(place.directory(MODEL_ID), tensors)
    _evict(tmp_path / MODEL_ID / "model.safetensors")
    cold = await load(place.store(), zero_copy=False)
    assert seen == [cold.info.nbytes]
    assert_same(cold, tensors)
    warm = await load(place.store(), zero_copy=False)  # the cold read left the file cached
    assert seen == [cold.info.nbytes]
    assert_same(warm, tensors)


@pytest.mark.asyncio
async def test_store_is_cold_says_whether_a_local_range_waits_on_the_disk(
    tmp_path: Path, memory_root: str
) -> None:
    """Store.is_cold: True for a local range evicted from the page cache, False once read,
    False for an empty range and for files that are not local."""
    data = random_tensor(torch.uint8, (1 << 20,)).numpy().tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    _evict(path)
    store = Store(f"file://{tmp_path}/{{model_id}}")
    url = f"file://{path}"
    assert await store.is_cold(url, 4096, len(data) - 4096, model_id="m")
    assert not await store.is_cold(url, 0, 0, model_id="m")
    assert path.read_bytes() == data
    assert not await store.is_cold(url, 4096, len(data) - 4096, model_id="m")
    put(f"memory://{memory_root}/f.bin", data)
    assert not await store.is_cold(f"memory://{memory_root}/f.bin", 0, len(data), model_id="m")


def _record_populate(monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[int, int]], list[int]]:
    """The ranges `_populate_range` is called on, and the fadvise advice given, from now on."""
    ranges: list[tuple[int, int]] = []
    real_range = backend._populate_range

    def populate_range(buffer: torch.Tensor, start: int, stop: int) -> None:
        ranges.append((start, stop))
        real_range(buffer, start, stop)

    advice: list[int] = []
    real_fadvise = os.posix_fadvise

    def fadvise(fd: int, offset: int, length: int, what: int) -> None:
        advice.append(what)
        real_fadvise(fd, offset, length, what)

    monkeypatch.setattr(backend, "_populate_range", populate_range)
    monkeypatch.setattr(backend, "_POPULATE_PARTS", 3)
    monkeypatch.setattr(backend, "_POPULATE_ALIGN", 64 << 10)
    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    return ranges, advice


def _assert_covers(ranges: list[tuple[int, int]], size: int) -> None:
    """Three disjoint ranges, end to end over ``[0, size)``."""
    ordered = sorted(ranges)
    assert ordered == sorted(set(ranges)) and len(ranges) == 3
    assert ordered[0][0] == 0 and ordered[-1][1] == size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ordered))


@pytest.mark.asyncio
async def test_a_mapped_model_in_the_page_cache_is_mapped_whole_in_the_mapping_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thread_calls: list[str]
) -> None:
    """zero_copy, file all in the page cache in 2 MiB folios from some offset on (as
    `_faults_map_huge` finds): every page of the mapping is in the process's page tables when
    the load returns, in the worker call that maps the file (no more threads): those before the
    offset by the kernel's reads of one byte per 64 KiB (`_populate_head`: no MADV_POPULATE_READ
    walk of every entry there), then the rest, by MADV_POPULATE_READ (no read); writes still
    never reach the file (copy-on-write); bit-exact."""
    ranges, advice = _record_populate(monkeypatch)
    head = 1 << 20
    monkeypatch.setattr(backend, "_faults_map_huge", lambda buffer: head)
    populated: list[tuple[int, int]] = []
    real_madvise = backend._madvise
    assert real_madvise is not None

    def madvise(address: int, length: int, advice: int) -> int:
        if advice == backend._MADV_POPULATE_READ:
            populated.append((address, length))
        return real_madvise(address, length, advice)

    monkeypatch.setattr(backend, "_madvise", madvise)
    place = Place("file", f"file://{tmp_path}/{{model_id}}", tmp_path)
    tensors = {"w": random_tensor(torch.float32, (3 << 18,)), "b": random_tensor(torch.int8, (9,))}
    write_model(place.directory(MODEL_ID), tensors)
    path = tmp_path / MODEL_ID / "model.safetensors"
    content = path.read_bytes()  # all of it in the page cache
    store = place.store()
    info = await read_model_info(store, MODEL_ID)
    thread_calls.clear()
    weights = await TorchBackend("cpu", zero_copy=True).load(store, info)
    buffer = weights.buffer
    assert _present_pages(buffer.data_ptr(), buffer.numel()) == -(-buffer.numel() // PAGE)
    assert thread_calls == ["_map_file"] and ranges == [] and advice == []
    address = buffer.data_ptr()
    assert populated == [(address + head, buffer.numel() - head)]
    assert_same(weights, tensors)
    weights["w"].fill_(1.5)
    assert bool((weights["w"] == 1.5).all())
    assert path.read_bytes() == content


@pytest.mark.asyncio
async def test_a_mapped_head_whose_reads_left_pages_unmapped_is_populated_page_by_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the kernel's fault-around did not map the whole first 64 KiB window the head's
    reads faulted (a smaller ``fault_around_bytes``), the head is mapped by `_populate_range`
    too: every page of the mapping is mapped when the load returns."""
    ranges, _ = _record_populate(monkeypatch)
    head = 1 << 20
    monkeypatch.setattr(backend, "_faults_map_huge", lambda buffer: head)
    monkeypatch.setattr(backend, "_range_mapped", lambda pagemap, *, address, nbytes: False)
    store, tensors, _ = _cached_model(tmp_path)
    weights = await load(store, zero_copy=True)
    assert ranges == [(0, head)]
    _assert_mapped_whole(weights, tensors)


@pytest.mark.asyncio
async def test_a_mapped_head_evicted_in_part_after_the_residency_check_is_still_mapped_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of the small-folio head that left the page cache between the residency check and
    the head's reads (memory pressure) are not mapped by fault-around, which maps cached pages
    only, even where the first 64 KiB window is whole: the load still returns with every page
    of the mapping mapped (the head's pages all checked, not its first window's)."""
    ranges, _ = _record_populate(monkeypatch)
    head = 1 << 20
    store, tensors, path = _cached_model(tmp_path)  # the load takes the resident path

    def evict_head(buffer: torch.Tensor) -> int:
        # The head leaves the page cache; its first window and the first page of every later
        # window come back (no readahead): each of the head's reads finds its page cached.
        _evict(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            os.pread(fd, WINDOW, 0)
            for offset in range(WINDOW, head, WINDOW):
                os.pread(fd, 1, offset)
            assert direct.resident_fraction(fd, 0, head) < 0.5
        finally:
            os.close(fd)
        return head

    monkeypatch.setattr(backend, "_faults_map_huge", evict_head)
    weights = await load(store, zero_copy=True)
    assert ranges == [(0, head)]
    _assert_mapped_whole(weights, tensors)


def _cached_model(tmp_path: Path) -> tuple[Store, dict[str, torch.Tensor], Path]:
    """A 3 MiB model written under ``tmp_path`` and read whole into the page cache: its store,
    the tensors it was written from, and its file."""
    place = Place("file", f"file://{tmp_path}/{{model_id}}", tmp_path)
    tensors = {"w": random_tensor(torch.float32, (3 << 18,)), "b": random_tensor(torch.int8, (9,))}
    write_model(place.directory(MODEL_ID), tensors)
    path = tmp_path / MODEL_ID / "model.safetensors"
    path.read_bytes()
    return place.store(), tensors, path


def _assert_mapped_whole(weights: Weights, tensors: dict[str, torch.Tensor]) -> None:
    """Every page of the weights' buffer mapped, and the weights those of ``tensors``."""
    buffer = weights.buffer
    assert _present_pages(buffer.data_ptr(), buffer.numel()) == -(-buffer.numel() // PAGE)
    assert_same(weights, tensors)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("unmapped", [None, 0, 17, 63])
def test_a_range_is_mapped_only_where_every_page_of_every_chunk_is(
    monkeypatch: pytest.MonkeyPatch, unmapped: int | None, scan: bool
) -> None:
    """`_range_mapped` answers False for one page not mapped anywhere in the range, the first,
    a middle or the last: by one PAGEMAP_SCAN (Linux 6.7), and by the range's
    /proc/self/pagemap entries read a chunk at a time on a kernel without it."""
    monkeypatch.setattr(backend, "_PAGEMAP_CHUNK", 16)
    if not scan:
        monkeypatch.setattr(backend, "all_present", lambda pagemap, address, nbytes: None)
    pages = mmap.mmap(-1, 64 * PAGE)
    pages.write(b"\1" * (64 * PAGE))  # every page mapped
    address = ctypes.addressof(ctypes.c_char.from_buffer(pages))
    if unmapped is not None:
        assert backend._madvise is not None
        assert backend._madvise(address + unmapped * PAGE, PAGE, 4) == 0  # MADV_DONTNEED
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        if scan and faultin.all_present(fd, address, PAGE) is None:
            pytest.skip("no PAGEMAP_SCAN here (Linux 6.7)")
        mapped = backend._range_mapped(fd, address=address, nbytes=64 * PAGE - 1)
    finally:
        os.close(fd)
    assert mapped == (unmapped is None)


async def _load_evicted_zero_copy(tmp_path: Path) -> tuple[Weights, dict[str, torch.Tensor]]:
    """A 3 MiB model written under ``tmp_path``, evicted from the page cache, then loaded
    zero-copy: its weights, and the tensors it was written from."""
    place = Place("file", f"file://{tmp_path}/{{model_id}}", tmp_path)
    tensors = {"w": random_tensor(torch.float32, (3 << 18,)), "b": random_tensor(torch.int8, (9,))}
    write_model(place.directory(MODEL_ID), tensors)
    _evict(tmp_path / MODEL_ID / "model.safetensors")
    return await load(place.store(), zero_copy=True), tensors


@pytest.mark.asyncio
async def test_a_mapped_model_not_in_the_page_cache_is_read_ahead_and_faulted_in_by_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zero_copy, file evicted, a kernel that refuses MADV_HUGEPAGE: it is asked to be read
    ahead whole (WILLNEED), several threads fault its pages in over disjoint ranges that cover
    it (their faults wait on the disk together), and every page is mapped when the load
    returns; bit-exact."""
    ranges, advice = _record_populate(monkeypatch)
    real_madvise = backend._madvise
    assert real_madvise is not None

    def madvise(address: int, length: int, advice: int) -> int:
        if advice == backend._MADV_HUGEPAGE:
            ctypes.set_errno(errno.EINVAL)
            return -1
        return real_madvise(address, length, advice)

    monkeypatch.setattr(backend, "_madvise", madvise)
    weights, tensors = await _load_evicted_zero_copy(tmp_path)
    buffer = weights.buffer
    assert _present_pages(buffer.data_ptr(), buffer.numel()) == -(-buffer.numel() // PAGE)
    _assert_covers(ranges, buffer.numel())
    assert os.POSIX_FADV_WILLNEED in advice
    assert_same(weights, tensors)


@pytest.mark.asyncio
async def test_a_mapped_model_not_in_the_page_cache_is_advised_huge_pages_before_its_faults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zero_copy, file evicted: its whole mapping is advised MADV_HUGEPAGE before any page of
    it is faulted in (what is read goes into 2 MiB folios from the first, so later warm loads
    find no small-folio head), and no WILLNEED is asked (its window is read in small folios);
    every page is mapped when the load returns; bit-exact."""
    ranges, advice = _record_populate(monkeypatch)
    assert backend._MADV_HUGEPAGE is not None
    calls: list[tuple[int, int, int]] = []
    real_madvise = backend._madvise
    assert real_madvise is not None

    def madvise(address: int, length: int, advice: int) -> int:
        calls.append((address, length, advice))
        return real_madvise(address, length, advice)

    monkeypatch.setattr(backend, "_madvise", madvise)
    weights, tensors = await _load_evicted_zero_copy(tmp_path)
    buffer = weights.buffer
    assert calls[0] == (buffer.data_ptr(), buffer.numel(), backend._MADV_HUGEPAGE)
    assert all(c[2] != backend._MADV_HUGEPAGE for c in calls[1:])
    assert os.POSIX_FADV_WILLNEED not in advice
    assert _present_pages(buffer.data_ptr(), buffer.numel()) == -(-buffer.numel() // PAGE)
    _assert_covers(ranges, buffer.numel())
    assert_same(weights, tensors)


@pytest.mark.asyncio
async def test_a_mapped_model_is_faulted_in_by_threads_where_the_kernel_lacks_populate_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel that refuses MADV_POPULATE_READ (EINVAL, before Linux 5.14): a cached file's
    pages are faulted in by the threads' reads instead (each thread asked it first), every
    page mapped; bit-exact."""
    ranges, _ = _record_populate(monkeypatch)
    refused: list[int] = []
    real_madvise = backend._madvise
    assert real_madvise is not None

    def madvise(address: int, length: int, advice: int) -> int:
        if advice == backend._MADV_POPULATE_READ:
            refused.append(length)
            ctypes.set_errno(errno.EINVAL)
            return -1
        return real_madvise(address, length, advice)

    monkeypatch.setattr(backend, "_madvise", madvise)
    monkeypatch.setattr(backend, "_faults_map_huge", lambda buffer: 0)
    place = Place("file", f"file://{tmp_path}/{{model_id}}", tmp_path)
    tensors = {"w": random_tensor(torch.float32, (3 << 18,)), "b": random_tensor(torch.int8, (9,))}
    write_model(place.directory(MODEL_ID), tensors)
    (tmp_path / MODEL_ID / "model.safetensors").read_bytes()  # all of it in the page cache
    weights = await load(place.store(), zero_copy=True)
    buffer = weights.buffer
    assert refused[0] == buffer.numel()
    assert sorted(refused[1:]) == sorted(stop - start for start, stop in ranges)
    assert _present_pages(buffer.data_ptr(), buffer.numel()) == -(-buffer.numel() // PAGE)
    _assert_covers(ranges, buffer.numel())
    assert_same(weights, tensors)


@pytest.mark.asyncio
async def test_a_mapped_file_that_shrinks_under_its_mapping_fails_the_load_not_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file in the page cache cut short between its size check and MADV_POPULATE_READ: the
    load raises ModelFormatError (EFAULT), where a read of a page past the file's end would
    kill the process with SIGBUS."""
    place = Place("file", f"file://{tmp_path}/{{model_id}}", tmp_path)
    tensors = {"w": random_tensor(torch.float32, (3 << 18,)), "b": random_tensor(torch.int8, (9,))}
    write_model(place.directory(MODEL_ID), tensors)
    path = tmp_path / MODEL_ID / "model.safetensors"
    path.read_bytes()  # all of it in the page cache
    monkeypatch.setattr(backend, "_faults_map_huge", lambda buffer: 0)
    store = place.store()
    info = await read_model_info(store, MODEL_ID)
    real_from_file = torch.UntypedStorage.from_file

    def from_file_then_cut(filename: str, shared: bool, nbytes: int) -> object:
        storage = real_from_file(filename, shared, nbytes)
        os.truncate(filename, nbytes // 2)
        return storage

    monkeypatch.setattr(torch.UntypedStorage, "from_file", from_file_then_cut)
    with pytest.raises(ModelFormatError, match="changed size while loading"):
        await TorchBackend("cpu", zero_copy=True).load(store, info)


@pytest.mark.parametrize("where", ["threads", "head"])
def test_a_mapped_file_cut_short_while_its_pages_are_mapped_fails_the_load_not_the_process(
    tmp_path: Path, where: str
) -> None:
    """A file cut short while its pages are faulted in, by the threads (a file not all in the
    page cache) or in the small-folio head of a cached one (the kernel's reads, `read_faults`,
    answer False): the load raises ModelFormatError (EFAULT) and the process lives, where a
    byte read of a page past the file's end killed it with SIGBUS."""
    result = run_python(
        f"""
        import asyncio, os
        import torch
        import modelcache._torch as backend
        from modelcache._loader import read_model_info
        from modelcache._store import Store
        from safetensors.torch import save_file

        root = {str(tmp_path)!r}
        os.makedirs(root + "/m")
        path = root + "/m/model.safetensors"
        save_file({{"w": torch.ones(4 << 20)}}, path)  # 16 MiB, all in the page cache
        probe = None if {where!r} == "threads" else 8 << 20
        backend._faults_map_huge = lambda buffer: probe
        real = backend._populate_range
        real_reads = backend.read_faults

        def cut_then_populate(buffer, start, stop):
            os.truncate(path, 4096)
            real(buffer, start, stop)

        def cut_then_read(address, nbytes):
            os.truncate(path, 4096)
            read = real_reads(address, nbytes)
            print("head read", read)
            return read

        backend._populate_range = cut_then_populate
        backend.read_faults = cut_then_read

        async def main():
            store = Store(f"file://{{root}}/{{{{model_id}}}}")
            info = await read_model_info(store, "m")
            try:
                await backend.TorchBackend("cpu", zero_copy=True).load(store, info)
            except Exception as exc:
                print(type(exc).__name__, exc)

        asyncio.run(main())
        """
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "ModelFormatError" in result.stdout and "changed size while loading" in result.stdout
    assert ("head read False" in result.stdout) == (where == "head")


def _replace_with_same_size(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Rename a file with the same layout and other bytes over ``path``."""
    write_model(path.parent, {name: t + 1 for name, t in tensors.items()}, name="new.safetensors")
    new = path.with_name("new.safetensors")
    assert new.stat().st_size == path.stat().st_size
    os.replace(new, path)


@pytest.mark.asyncio
async def test_a_file_replaced_after_its_header_was_read_is_never_mapped_under_that_header(
    tmp_path: Path,
) -> None:
    """zero_copy: a file renamed over the model's after its header was read (same size, other
    bytes) is ModelChangedError (the cache's load begins again from the new headers), not the
    new bytes served as the version the header was read at."""
    tensors = {"w": random_tensor(torch.float32, (3 << 18,)), "b": random_tensor(torch.int8, (9,))}
    place = Place("file", f"file://{tmp_path}/{{model_id}}", tmp_path)
    write_model(place.directory(MODEL_ID), tensors)
    store = place.store()
    info = await read_model_info(store, MODEL_ID)
    _replace_with_same_size(tmp_path / MODEL_ID / "model.safetensors", tensors)
    with pytest.raises(ModelChangedError, match="changed in the store"):
        await TorchBackend("cpu", zero_copy=True).load(store, info)


@pytest.mark.parametrize("change", ["cut", "removed"])
@pytest.mark.asyncio
async def test_a_mapped_file_is_the_one_whose_size_was_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """zero_copy maps the file its descriptor checked: cut short between that check and the
    mapping, the load raises ModelFormatError (not torch's RuntimeError); removed meanwhile,
    the checked file is mapped all the same, bit-exact (not a RuntimeError for a missing
    path)."""
    tensors = {"w": random_tensor(torch.float32, (3 << 18,)), "b": random_tensor(torch.int8, (9,))}
    place = Place("file", f"file://{tmp_path}/{{model_id}}", tmp_path)
    write_model(place.directory(MODEL_ID), tensors)
    path = tmp_path / MODEL_ID / "model.safetensors"
    store = place.store()
    info = await read_model_info(store, MODEL_ID)
    real_from_file = torch.UntypedStorage.from_file

    def change_then_map(filename: str, shared: bool, nbytes: int) -> object:
        if change == "cut":
            os.truncate(path, nbytes // 2)
        else:
            path.unlink()
        return real_from_file(filename, shared, nbytes)

    monkeypatch.setattr(torch.UntypedStorage, "from_file", change_then_map)
    backend_ = TorchBackend("cpu", zero_copy=True)
    if change == "cut":
        with pytest.raises(ModelFormatError, match="changed size while loading"):
            await backend_.load(store, info)
    else:
        assert_same(await backend_.load(store, info), tensors)


@pytest.mark.parametrize("cachestat", [True, False], ids=["cachestat", "mincore"])
def test_the_cached_fraction_of_a_file_is_none_once_evicted_and_all_once_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cachestat: bool
) -> None:
    """`_cached_fraction` (cachestat, or sampled mincore where the kernel lacks it): 0.0 for
    a file evicted from the page cache, 1.0 once it is read whole."""
    if not cachestat:
        monkeypatch.setattr(backend, "_syscall", None)
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom((8 << 20) + 123))
    _evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        assert backend._cached_fraction(fd, size) == 0.0
        path.read_bytes()
        assert backend._cached_fraction(fd, size) == 1.0
    finally:
        os.close(fd)


def test_a_file_whose_own_inode_cachestat_finds_empty_is_asked_of_its_mapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cachestat counting no page of a file (overlayfs: its pages are the lower file's) is
    asked again of a mapping (mincore): a file read whole reads 1.0, not cold."""
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom((8 << 20) + 123))
    path.read_bytes()
    monkeypatch.setattr(backend, "_syscall", lambda *args: 0)  # answers, counting nothing
    fd = os.open(path, os.O_RDONLY)
    try:
        assert backend._cached_fraction(fd, os.fstat(fd).st_size) == 1.0
    finally:
        os.close(fd)


def test_a_file_read_whole_through_overlayfs_reads_as_cached(tmp_path: Path) -> None:
    """A file read whole through an overlayfs mount (a container's image layers) reads 1.0
    (`_cached_fraction`), as the same file read directly does."""
    dirs = {name: tmp_path / name for name in ("lower", "upper", "work", "merged")}
    for directory in dirs.values():
        directory.mkdir()
    (dirs["lower"] / "f.bin").write_bytes(os.urandom(8 << 20))
    options = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    mount = ["mount", "-t", "overlay", "overlay", "-o", options, str(dirs["merged"])]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True, check=False).returncode:
        pytest.skip("cannot mount overlayfs here")
    try:
        path = dirs["merged"] / "f.bin"
        path.read_bytes()
        fd = os.open(path, os.O_RDONLY)
        try:
            assert backend._cached_fraction(fd, os.fstat(fd).st_size) == 1.0
        finally:
            os.close(fd)
    finally:
        subprocess.run(["umount", str(dirs["merged"])], check=True)


def _pmd_mapped_kib(address: int) -> int:
    """FilePmdMapped of this process's mapping at ``address`` (/proc/self/smaps), in KiB."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        pytest.skip("no /proc/self/smaps here")
    inside = False
    for line in text.splitlines():
        first = line.split(" ", 1)[0]
        if "-" in first and ":" not in first:
            lo, hi = (int(x, 16) for x in first.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("FilePmdMapped:"):
            return int(line.split()[1])
    return 0


def _map_whole(path: Path) -> torch.Tensor:
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    return torch.empty(0, dtype=torch.uint8).set_(storage)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_a_cached_file_in_small_folios_is_faulted_in_by_the_threads_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file all in the page cache but in 4 KiB folios (read with POSIX_FADV_RANDOM: no
    readahead): `_faults_map_huge` says no, so its pages are faulted in by the threads over
    disjoint ranges that cover it, every page mapped; bit-exact."""
    ranges, _ = _record_populate(monkeypatch)
    place = Place("file", f"file://{tmp_path}/{{model_id}}", tmp_path)
    tensors = {"w": random_tensor(torch.float32, (4 << 20,)), "b": random_tensor(torch.int8, (9,))}
    write_model(place.directory(MODEL_ID), tensors)
    path = tmp_path / MODEL_ID / "model.safetensors"
    _evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        while os.read(fd, PAGE):
            pass
    finally:
        os.close(fd)
    assert backend._faults_map_huge(_map_whole(path)) is None
    weights = await load(place.store(), zero_copy=True)
    buffer = weights.buffer
    assert _present_pages(buffer.data_ptr(), buffer.numel()) == -(-buffer.numel() // PAGE)
    _assert_covers(ranges, buffer.numel())
    assert_same(weights, tensors)


def test_the_huge_fault_probe_says_yes_only_where_the_kernel_maps_2_mib_entries(
    tmp_path: Path,
) -> None:
    """`_faults_map_huge` says yes for a file read sequentially (whose page cache may hold
    2 MiB folios, after the tens of MiB read while the readahead window grew) only where the
    kernel then maps most of it with 2 MiB entries (smaps' FilePmdMapped)."""
    size = 128 << 20
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(size))
    _evict(path)
    path.read_bytes()
    buffer = _map_whole(path)
    says = backend._faults_map_huge(buffer) is not None
    assert backend._madvise is not None
    assert backend._madvise(buffer.data_ptr(), size, backend._MADV_POPULATE_READ) == 0
    huge = _pmd_mapped_kib(buffer.data_ptr()) << 10
    assert not says or huge >= size // 2, (says, huge)


def _untouched_huge_aligned(size: int) -> torch.Tensor:
    """``size`` bytes starting on a 2 MiB boundary, never touched (no page of it mapped)."""
    backing = torch.empty(size + backend._HUGE, dtype=torch.uint8)
    skip = -backing.data_ptr() % backend._HUGE
    return backing[skip : skip + size]


def _fake_page_tables(
    monkeypatch: pytest.MonkeyPatch, buffer: torch.Tensor, present_from: Callable[[], int | None]
) -> tuple[list[int], list[int]]:
    """Show `_torch` page tables of ``buffer`` through a pagemap that reads present at offsets
    from ``present_from()`` on (None: nowhere), and take its MADV_POPULATE_READ calls: returns
    the offsets it asked to fault, and the descriptors of the pagemaps it opened."""
    address = buffer.data_ptr()
    faulted: list[int] = []
    pagemaps: list[int] = []
    real_open, real_pread = os.open, os.pread

    def populate_read(at: int, nbytes: int) -> bool:
        faulted.append(at - address)
        return True

    def open_(path: str, flags: int, *args: Any) -> int:
        fd = real_open(path, flags, *args)
        if path == "/proc/self/pagemap":
            pagemaps.append(fd)
        return fd

    def pread(fd: int, n: int, offset: int) -> bytes:
        if fd not in pagemaps:
            return real_pread(fd, n, offset)
        at, edge = offset // 8 * PAGE - address, present_from()
        present = edge is not None and at >= edge
        return (b"\0" * 7 + (b"\x80" if present else b"\0")) * (n // 8)

    monkeypatch.setattr(backend, "_populate_read", populate_read)
    monkeypatch.setattr(backend, "all_present", lambda pagemap, address, nbytes: None)  # no scan
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "pread", pread)
    return faulted, pagemaps


@pytest.mark.parametrize("boundary_mib", [0, 2, 6, 40, 62, 64])
def test_the_huge_fault_probe_finds_where_the_small_folios_end_to_within_2_mib(
    monkeypatch: pytest.MonkeyPatch, boundary_mib: int
) -> None:
    """`_faults_map_huge` returns the first 2 MiB region from which faults map 2 MiB entries,
    not the next power of two above it: the head before it is read a byte a page, so every
    MiB of overshoot is paid in reads (a sequential read's small folios end at ~40 MiB, the
    doubling alone said 64). The page tables are told by a pagemap that reads present from
    ``boundary_mib`` on."""
    buffer = _untouched_huge_aligned(1 << 30)
    faulted, pagemaps = _fake_page_tables(monkeypatch, buffer, lambda: boundary_mib << 20)
    assert backend._faults_map_huge(buffer) == boundary_mib << 20
    assert pagemaps
    assert len(faulted) <= backend._PROBES + 12  # ~15 us a probe: a few, never a scan


def test_the_huge_fault_probe_is_asked_again_only_where_a_files_last_answer_no_longer_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`_huge_from` keeps `_faults_map_huge`'s answer per file (device, inode, size, mtime):
    the next mapping of that file checks the answer's own place in two probes (2 MiB mapped
    whole there, not in the region before) instead of the full probe; where it no longer
    holds the full probe runs again and its answer replaces the hint, and a file no longer
    mapped 2 MiB at a time keeps none. Page tables told by a pagemap that reads present from
    ``boundary`` on (None: nowhere)."""
    size = 256 << 20
    buffer = _untouched_huge_aligned(size)
    boundary: list[int | None] = [12 << 20]
    faulted, _ = _fake_page_tables(monkeypatch, buffer, lambda: boundary[0])
    full: list[int | None] = []
    real_probe = backend._faults_map_huge

    def probe(buffer: torch.Tensor) -> int | None:
        found = real_probe(buffer)
        full.append(found)
        return found

    monkeypatch.setattr(backend, "_HUGE_HINTS", {})
    monkeypatch.setattr(backend, "_faults_map_huge", probe)
    key, other = (1, 2, size, 3), (1, 4, size, 3)
    assert backend._huge_from(buffer, key) == 12 << 20 and full == [12 << 20]
    faulted.clear()
    assert backend._huge_from(buffer, key) == 12 << 20 and full == [12 << 20]
    assert sorted(faulted) == [10 << 20, 12 << 20]  # the hint's place and the region before
    assert backend._huge_from(buffer, other) == 12 << 20 and len(full) == 2  # another file
    boundary[0] = 4 << 20  # evicted and read again otherwise: the hint misses
    assert backend._huge_from(buffer, key) == 4 << 20 and full[-1] == 4 << 20
    assert backend._huge_from(buffer, key) == 4 << 20 and len(full) == 3
    boundary[0] = None  # small folios everywhere: no hint kept
    assert backend._huge_from(buffer, key) is None and full[-1] is None
    assert key not in backend._HUGE_HINTS


def test_the_huge_fault_hint_table_stays_bounded_while_other_threads_insert(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`_huge_from` keeps at most `_HINTS_KEPT` hints, and making room never fails where
    another worker thread's load inserts its own file's hint at any step of it (at each call
    into C, where the interpreter may switch threads: here, an insertion in this thread)."""
    buffer = torch.empty(0, dtype=torch.uint8)
    table: dict[tuple[int, ...], int] = {(0, i, 0, 0): 0 for i in range(backend._HINTS_KEPT)}
    monkeypatch.setattr(backend, "_HUGE_HINTS", table)
    monkeypatch.setattr(backend, "_faults_map_huge", lambda buffer: 0)
    inserted = itertools.count()

    def other_thread_inserts(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and frame.f_code is backend._huge_from.__code__:
            table[(1, next(inserted), 0, 0)] = 0

    sys.setprofile(other_thread_inserts)
    try:
        for i in range(3 * backend._HINTS_KEPT):
            assert backend._huge_from(buffer, (2, i, 0, 0)) == 0
    finally:
        sys.setprofile(None)
    assert next(inserted) > 0 and len(table) <= backend._HINTS_KEPT + 4


@pytest.mark.asyncio
async def test_a_huge_fault_hint_that_is_wrong_costs_speed_never_an_unmapped_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zero_copy, file all in the page cache, with a hint (`_HUGE_HINTS`) whose place checks
    out but whose file is in small folios past it: every page of the mapping is still mapped
    when the load returns (the rest by MADV_POPULATE_READ, which maps small folios too), the
    full probe is not run, and the weights are bit-exact and copy-on-write."""
    place = Place("file", f"file://{tmp_path}/{{model_id}}", tmp_path)
    tensors = {"w": random_tensor(torch.float32, (3 << 19,)), "b": random_tensor(torch.int8, (9,))}
    write_model(place.directory(MODEL_ID), tensors)
    path = tmp_path / MODEL_ID / "model.safetensors"
    content = path.read_bytes()  # all of it in the page cache
    probed: list[torch.Tensor] = []
    monkeypatch.setattr(backend, "_HUGE_HINTS", {backend._file_key(path.stat()): 2 << 20})
    monkeypatch.setattr(backend, "_hint_holds", lambda buffer, huge_from: True)
    monkeypatch.setattr(backend, "_faults_map_huge", probed.append)
    weights = await load(place.store(), zero_copy=True)
    buffer = weights.buffer
    assert _present_pages(buffer.data_ptr(), buffer.numel()) == -(-buffer.numel() // PAGE)
    assert probed == []
    assert_same(weights, tensors)
    weights["w"].fill_(2.5)
    assert path.read_bytes() == content


# -- worker-thread calls per load (the thread_calls fixture: conftest) -------------------------------


@pytest.mark.asyncio
async def test_a_small_models_header_costs_one_worker_call_locally_and_none_in_memory(
    place: Place, thread_calls: list[str]
) -> None:
    """Describing a single-file model reads its size and header in one worker-thread call from
    file:// and without a thread from memory:// (each call is a round trip that bounded the
    rate of filling a cache with small models)."""
    write_model(place.directory(MODEL_ID), {"w": torch.arange(10, dtype=torch.float32)})
    store = place.store()
    await read_model_info(store, MODEL_ID)  # memory://: its filesystem is made (in a thread) once
    thread_calls.clear()
    info = await read_model_info(store, MODEL_ID)
    assert info.nbytes == 40
    assert len(thread_calls) == (1 if place.kind == "file" else 0), thread_calls


@pytest.mark.asyncio
async def test_a_small_models_weights_cost_one_worker_call_locally_and_none_in_memory(
    place: Place, thread_calls: list[str]
) -> None:
    """Reading a small model's weights opens and reads its file in one worker-thread call from
    file:// (not one to open and one to read), and copies them without a thread from
    memory://; the bytes are the file's."""
    tensors = {"w": torch.arange(10, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int64)}
    write_model(place.directory(MODEL_ID), tensors)
    store = place.store()
    info = await read_model_info(store, MODEL_ID)
    thread_calls.clear()
    weights = await TorchBackend("cpu", zero_copy=False).load(store, info)
    assert_same(weights, tensors)
    assert len(thread_calls) == (1 if place.kind == "file" else 0), thread_calls


@pytest.mark.asyncio
async def test_a_header_read_again_unchanged_is_not_parsed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model described again from the same header bytes at the same file size reuses the
    first parse (`_PARSED`); other header bytes, or another size, are parsed anew and describe
    the file as it is now."""
    parsed: list[str] = []

    def counted_parse(header: bytes, size: int, **kw: Any) -> Any:
        parsed.append(kw["url"])
        return parse_header(header, size, **kw)

    monkeypatch.setattr(loader, "parse_header", counted_parse)
    monkeypatch.setattr(loader, "_PARSED", {})
    place = Place("file", f"file://{tmp_path}/{{model_id}}", tmp_path)
    store = place.store()
    write_model(place.directory(MODEL_ID), {"a": torch.zeros(4), "b": torch.ones(4)})
    first = await read_model_info(store, MODEL_ID)
    again = await read_model_info(store, MODEL_ID)
    assert len(parsed) == 1 and list(again.tensors) == list(first.tensors) == ["a", "b"]
    # Same size, other names: the bytes differ, so it is parsed again.
    write_model(place.directory(MODEL_ID), {"x": torch.zeros(4), "y": torch.ones(4)})
    renamed = await read_model_info(store, MODEL_ID)
    assert len(parsed) == 2 and list(renamed.tensors) == ["x", "y"]
    # The same header over a file grown at its end: parsed again, and refused.
    path = tmp_path / MODEL_ID / "model.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    with pytest.raises(ModelFormatError, match="trailing bytes"):
        await read_model_info(store, MODEL_ID)
    assert len(parsed) == 3
