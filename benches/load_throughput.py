"""Load throughput: a cold load of a 1 GiB model into a ready `Weights`, against baselines.

The model: 64 tensors of mixed dtypes (f32, bf16, f16, i64, u8 and f8 when torch has it) with
seeded random content, written once with ``safetensors.torch.save_file`` (and once with
``torch.save`` for the torch.load baseline). Page cache warm: every file is read once before
anything is timed, and the page cache is never dropped.

Ours: a fresh `ModelCache` per repetition; timed from ``async with cache.use(id) as w`` to the
block being entered ("ready"), then separately the time to touch every byte of ``w``:

1. file:// with ``zero_copy=True`` (the file mapped, pages populated eagerly),
2. file:// with ``zero_copy=False`` (concurrent preadv into a page-aligned buffer),
3. memory:// (the same bytes in fsspec's MemoryFileSystem);

and 2. and 3. again in the steady state ("steady"): one cache kept open, the model evicted after
each load, so each load reads the store again into a buffer whose pages a dead model left (the
`BufferPool`), as in a busy cache; compared with a read into a pre-faulted buffer.

Baselines, in the same run:

a. ``safetensors.torch.load_file(path)`` plus touching every byte (its tensors map the file lazily),
b. ``torch.load(path, weights_only=True, mmap=False)`` of the same tensors saved with torch.save,
c. the raw floor: a fresh anonymous ``mmap.mmap(-1, n)`` (MAP_SHARED) and ONE ``readinto`` of the
   payload bytes from the page-cached file; for information, the same read into a pre-faulted
   buffer, and into a fresh MAP_PRIVATE mapping advised MADV_HUGEPAGE (far fewer page faults).

"Touch" is ``t.view(torch.uint8).max()`` over every tensor; the "touch floor" is the same on tensors
already in memory (what touching costs in compute alone). Methods run round-robin, each
``--repeats`` times after one untimed warm-up; best and median are reported, GB/s from the best.
Ratios are throughput ratios (baseline seconds / our seconds): above 1.0 we are faster.

Run: ``python benches/load_throughput.py [--quick] [--data-dir DIR] [--repeats N]``.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import fsspec
import numpy as np
import torch
from _common import (
    GIB,
    KeptOpen,
    Method,
    Repeated,
    base_parser,
    data_dir,
    emit_json,
    free_memory,
    gbps,
    machine_line,
    print_table,
    rounded,
    run_all,
)
from safetensors.torch import load_file, save_file

from modelcache import ModelCache

N_TENSORS = 64
GOAL_FILE_VS_SAFETENSORS = 1.0
GOAL_MEMORY_VS_RAW_FLOOR = 0.8
#: Steady-state loads (buffer pages reused) against one read into a pre-faulted buffer.
GOAL_STEADY_VS_PREFAULTED = 0.9
MODEL_ID = "model"


def dtypes() -> list[torch.dtype]:
    found = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]
    f8 = getattr(torch, "float8_e4m3fn", None)
    if isinstance(f8, torch.dtype):
        found.append(f8)
    return found


def make_tensors(total: int) -> dict[str, torch.Tensor]:
    """N_TENSORS tensors of ``total`` bytes in all, mixed dtypes, seeded random bytes."""
    gen = torch.Generator().manual_seed(20240611)
    kinds = dtypes()
    each = total // N_TENSORS
    tensors: dict[str, torch.Tensor] = {}
    for i in range(N_TENSORS):
        dtype = kinds[i % len(kinds)]
        raw = torch.randint(0, 256, (each,), dtype=torch.uint8, generator=gen)
        cols = 1024
        tensors[f"layers.{i:02d}.{str(dtype).removeprefix('torch.')}"] = raw.view(dtype).view(
            -1, cols
        )
    return tensors


def touch(tensors: Mapping[str, torch.Tensor]) -> None:
    """Read every byte of every tensor."""
    for t in tensors.values():
        t.reshape(-1).view(torch.uint8).max()


@dataclass
class Files:
    safetensors: str
    torch_pt: str
    payload_offset: int  # where the tensor bytes start in the safetensors file
    payload: int  # bytes of tensor data
    memory_root: str  # memory:// location template


def write_files(directory: str, total: int) -> Files:
    model_dir = os.path.join(directory, MODEL_ID)
    os.makedirs(model_dir)
    st_path = os.path.join(model_dir, "model.safetensors")
    pt_path = os.path.join(directory, "model.pt")
    tensors = make_tensors(total)
    save_file(tensors, st_path)
    torch.save(tensors, pt_path)
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    del tensors
    free_memory()
    with open(st_path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        data = f.read()  # also warms the page cache
    memory_root = f"/modelcache-bench-{uuid.uuid4().hex}"
    fsspec.filesystem("memory").pipe_file(
        f"{memory_root}/{MODEL_ID}/model.safetensors", struct.pack("<Q", header_len) + data
    )
    del data
    with open(pt_path, "rb") as f:
        while f.read(64 << 20):  # warm the page cache
            pass
    return Files(st_path, pt_path, 8 + header_len, payload, f"memory://{memory_root}/{{model_id}}/")


# -- the measurements: each returns (seconds to ready, seconds to touch after, or nan) ---------


Measured = tuple[float, float]  # seconds to ready, seconds to touch after (or nan)


def _timed_readinto(
    files: Files, buf: mmap.mmap, *, time_allocation: Callable[[], None] | None
) -> Measured:
    """One readinto of the payload into ``buf``; ``time_allocation`` (if given) runs inside the timing."""
    with open(files.safetensors, "rb", buffering=0) as f:
        f.seek(files.payload_offset)
        start = time.perf_counter()
        if time_allocation is not None:
            time_allocation()
        got = f.readinto(buf)
        seconds = time.perf_counter() - start
    if got != files.payload:
        raise RuntimeError(f"short read: {got} of {files.payload} bytes")
    buf.close()
    return seconds, float("nan")


def raw_floor(files: Files) -> Measured:
    """A fresh page-aligned buffer and one readinto: what any load must at least do."""
    start = time.perf_counter()
    buf = mmap.mmap(-1, files.payload)
    allocated = time.perf_counter() - start
    seconds, _ = _timed_readinto(files, buf, time_allocation=None)
    return seconds + allocated, float("nan")


def raw_floor_hugepage(files: Files) -> Measured:
    """The raw floor into a private anonymous mapping with transparent huge pages (information)."""
    buf = mmap.mmap(-1, files.payload, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return _timed_readinto(files, buf, time_allocation=lambda: buf.madvise(mmap.MADV_HUGEPAGE))


def raw_floor_prefaulted(files: Files) -> Measured:
    buf = mmap.mmap(-1, files.payload)
    np.frombuffer(buf, dtype=np.uint8).fill(1)  # fault every page in
    return _timed_readinto(files, buf, time_allocation=None)


def safetensors_baseline(files: Files) -> Measured:
    start = time.perf_counter()
    tensors = load_file(files.safetensors)
    touch(tensors)
    seconds = time.perf_counter() - start
    # The same touch again, on pages now in memory: the compute floor of touching.
    again = time.perf_counter()
    touch(tensors)
    return seconds, time.perf_counter() - again


def torch_load_baseline(files: Files) -> Measured:
    start = time.perf_counter()
    tensors = torch.load(files.torch_pt, weights_only=True, mmap=False)
    seconds = time.perf_counter() - start
    if len(tensors) != N_TENSORS:
        raise RuntimeError("torch.load returned the wrong tensors")
    return seconds, float("nan")


@dataclass
class OurLoad(KeptOpen):
    """A cold load: from a fresh `ModelCache` (fresh process memory too), or with ``steady``
    from one cache kept open across repetitions, the model evicted after each (the store is read
    again each time; the freed buffer's pages are reused: the steady state of a busy cache)."""

    location: str
    zero_copy: bool
    steady: bool = False
    mappable: list[bool] = field(default_factory=list)
    _open: ModelCache | None = None

    def _cache(self) -> ModelCache:
        return ModelCache(
            self.location,
            device="cpu",
            device_budget="2GiB",
            max_concurrent_loads=4,
            zero_copy=self.zero_copy,
        )

    async def __call__(self) -> Measured:
        if not self.steady:
            async with self._cache() as cache:
                return await self._load(cache)
        if self._open is None:
            assert self.stack is not None, "run_all opens steady caches"
            self._open = await self.stack.enter_async_context(self._cache())
        measured = await self._load(self._open)
        self._open.evict(MODEL_ID)
        return measured

    async def _load(self, cache: ModelCache) -> Measured:
        start = time.perf_counter()
        async with cache.use(MODEL_ID) as weights:
            ready = time.perf_counter() - start
            t0 = time.perf_counter()
            touch(weights)
            touched = time.perf_counter() - t0
            self.mappable.append(bool(weights.info.mappable))
        del weights
        return ready, touched


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "load throughput")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per method")
    parser.add_argument("--size-mib", type=int, default=None, help="model size in MiB")
    args = parser.parse_args()
    quick: bool = args.quick
    total = (args.size_mib << 20) if args.size_mib else (64 << 20 if quick else GIB)
    repeats: int = args.repeats or (2 if quick else 5)
    print(f"load_throughput{' (quick)' if quick else ''}: {machine_line()}")

    with data_dir(args.data_dir, "modelcache-load-") as directory:
        files = write_files(directory, total)
        n = files.payload
        kinds = ", ".join(str(d).removeprefix("torch.") for d in dtypes())
        print(
            f"model: {N_TENSORS} tensors ({kinds}), {n / GIB:.3f} GiB payload; page cache warm; "
            f"{repeats} timed repetitions after 1 warm-up, round-robin"
        )
        zero_copy = OurLoad(f"file://{directory}/{{model_id}}/", zero_copy=True)
        copy = OurLoad(f"file://{directory}/{{model_id}}/", zero_copy=False)
        memory = OurLoad(files.memory_root, zero_copy=True)
        copy_steady = OurLoad(f"file://{directory}/{{model_id}}/", zero_copy=False, steady=True)
        memory_steady = OurLoad(files.memory_root, zero_copy=True, steady=True)
        methods = [
            Method("raw_floor", "raw floor: fresh mmap + 1 readinto", lambda: raw_floor(files)),
            Method(
                "raw_floor_prefaulted",
                "(info) readinto, pre-faulted buffer",
                lambda: raw_floor_prefaulted(files),
            ),
            Method(
                "raw_floor_hugepage",
                "(info) readinto, fresh private+THP mmap",
                lambda: raw_floor_hugepage(files),
            ),
            Method(
                "safetensors",
                "safetensors load_file + touch",
                lambda: safetensors_baseline(files),
            ),
            Method("torch_load", "torch.load (mmap=False)", lambda: torch_load_baseline(files)),
            Method("file_zero_copy", "ours file:// zero_copy=True", zero_copy),
            Method("file_copy", "ours file:// zero_copy=False", copy),
            Method("memory", "ours memory://", memory),
            Method("file_copy_steady", "ours file:// zero_copy=False, steady", copy_steady),
            Method("memory_steady", "ours memory://, steady", memory_steady),
        ]
        try:
            anyio.run(run_all, methods, repeats)
        finally:
            fs = fsspec.filesystem("memory")
            root = files.memory_root
            if fs.exists(root):
                fs.rm(root, recursive=True)

    by = {m.key: m for m in methods}
    rows: list[list[object]] = []
    for m in methods:
        t = m.times
        rows.append(
            [
                m.label,
                t.best * 1e3,
                t.median * 1e3,
                gbps(n, t.best),
                gbps(n, t.median),
                m.warmup * 1e3,
            ]
        )
    print_table(
        f"Cold load to ready ({n / GIB:.3f} GiB, page cache warm): times in ms",
        ["method", "best ms", "median ms", "best GB/s", "median GB/s", "warm-up ms"],
        rows,
    )

    touch_floor = by["safetensors"].after_times
    touch_rows: list[list[object]] = [
        [
            "touch floor (tensors already in memory)",
            touch_floor.best * 1e3,
            touch_floor.median * 1e3,
        ]
    ]
    for key in ("file_zero_copy", "file_copy", "memory", "file_copy_steady", "memory_steady"):
        tt = by[key].after_times
        touch_rows.append([f"touch after {by[key].label}", tt.best * 1e3, tt.median * 1e3])
    zc_plus = Repeated(
        tuple(
            a + b
            for a, b in zip(by["file_zero_copy"].seconds, by["file_zero_copy"].after, strict=True)
        )
    )
    touch_rows.append(
        ["ours file:// zero_copy=True: ready + touch", zc_plus.best * 1e3, zc_plus.median * 1e3]
    )
    print_table(
        "Touching every byte after the load: times in ms",
        ["what", "best ms", "median ms"],
        touch_rows,
    )

    def ratio(baseline: str, ours: str | Repeated) -> float:
        mine = ours if isinstance(ours, Repeated) else by[ours].times
        return by[baseline].times.best / mine.best

    figures: dict[str, Any] = {}
    ratio_rows: list[list[object]] = []
    for key, ours, baseline, goal in (
        (
            "file_zero_copy_vs_safetensors_ratio",
            "file_zero_copy",
            "safetensors",
            GOAL_FILE_VS_SAFETENSORS,
        ),
        (
            "file_zero_copy_touched_vs_safetensors_ratio",
            zc_plus,
            "safetensors",
            GOAL_FILE_VS_SAFETENSORS,
        ),
        ("file_copy_vs_safetensors_ratio", "file_copy", "safetensors", GOAL_FILE_VS_SAFETENSORS),
        ("file_zero_copy_vs_raw_floor_ratio", "file_zero_copy", "raw_floor", None),
        ("file_copy_vs_raw_floor_ratio", "file_copy", "raw_floor", None),
        ("memory_vs_raw_floor_ratio", "memory", "raw_floor", GOAL_MEMORY_VS_RAW_FLOOR),
        (
            "memory_steady_vs_prefaulted_ratio",
            "memory_steady",
            "raw_floor_prefaulted",
            GOAL_STEADY_VS_PREFAULTED,
        ),
        (
            "file_copy_steady_vs_prefaulted_ratio",
            "file_copy_steady",
            "raw_floor_prefaulted",
            GOAL_STEADY_VS_PREFAULTED,
        ),
        ("memory_vs_prefaulted_ratio", "memory", "raw_floor_prefaulted", None),
        ("file_copy_vs_prefaulted_ratio", "file_copy", "raw_floor_prefaulted", None),
        ("file_copy_vs_torch_load_ratio", "file_copy", "torch_load", None),
        ("memory_vs_safetensors_ratio", "memory", "safetensors", None),
    ):
        value = ratio(baseline, ours)
        figures[key] = rounded(value)
        verdict = "" if goal is None else ("meets" if value >= goal else "misses")
        ratio_rows.append([key, value, "" if goal is None else f">= {goal:.1f}x", verdict])
    print_table(
        "Throughput ratios, best of each (baseline s / ours s; above 1.0 = ours faster)",
        ["ratio", "value", "goal", ""],
        ratio_rows,
    )
    mappable = all(zero_copy.mappable)
    print(
        f"\nzero-copy path applicable (ModelInfo.mappable): {mappable}; the copy path runs for "
        "zero_copy=False and for memory://"
    )

    for m in methods:
        figures[f"{m.key}_best_ms"] = rounded(m.times.best * 1e3)
        figures[f"{m.key}_median_ms"] = rounded(m.times.median * 1e3)
        figures[f"{m.key}_gbps"] = rounded(gbps(n, m.times.best))
        figures[f"{m.key}_median_gbps"] = rounded(gbps(n, m.times.median))
    figures["touch_floor_ms"] = rounded(touch_floor.best * 1e3)
    for key in ("file_zero_copy", "file_copy", "memory", "file_copy_steady", "memory_steady"):
        figures[f"{key}_touch_after_ms"] = rounded(by[key].after_times.best * 1e3)
    figures["file_zero_copy_ready_plus_touch_ms"] = rounded(zc_plus.best * 1e3)
    figures["payload_bytes"] = n
    figures["zero_copy_mappable"] = mappable
    figures["page_cache"] = "warm"
    figures["repeats"] = repeats
    figures["quick"] = quick
    print()
    emit_json(figures)


if __name__ == "__main__":
    main()
