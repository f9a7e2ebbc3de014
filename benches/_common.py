"""Shared helpers for the benchmark scripts in ``benches/``.

Each bench is a script (``python benches/NAME.py [--quick] [--data-dir DIR]``) that prints a
readable table and, as its last line, one JSON object of its figures. Nothing here asserts on
timings: benchmarks report.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from modelcache import ModelCache
    from tests.servers import SeaweedFS

#: The repository's root (for ``tests.servers``).
REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
MIB = 1 << 20

__all__ = [
    "GIB",
    "MIB",
    "REPO_ROOT",
    "KeptOpen",
    "Measured",
    "Method",
    "Percentiles",
    "Repeated",
    "base_parser",
    "data_dir",
    "drop",
    "emit_json",
    "free_memory",
    "gbps",
    "host_reload",
    "human_seconds",
    "machine_line",
    "on_device",
    "percentiles_us",
    "print_table",
    "print_times",
    "ready",
    "rounded",
    "run_all",
    "s3_upload",
    "seaweedfs",
    "size_label",
    "timed",
]


def base_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every bench takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="a small, fast version (< 30 s) for smoke tests"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="write the bench's data under this directory (default: a temp dir); "
        "what the bench writes is removed at the end",
    )
    return parser


@contextlib.contextmanager
def data_dir(parent: str | None, prefix: str) -> Iterator[str]:
    """A fresh directory (under ``parent`` or the system temp dir), removed on exit."""
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def free_memory() -> None:
    """Collect garbage so that the previous repetition's buffers are gone before the next one."""
    gc.collect()
    gc.collect()


@dataclass(frozen=True)
class Percentiles:
    """Latency figures of one scenario, in microseconds."""

    n: int
    p50_us: float
    p99_us: float
    mean_us: float
    max_us: float


def percentiles_us(samples_ns: Sequence[int] | np.ndarray[Any, Any]) -> Percentiles:
    """p50, p99, mean and max of per-call durations given in nanoseconds."""
    arr = np.asarray(samples_ns, dtype=np.float64) / 1e3
    if arr.size == 0:
        nan = math.nan
        return Percentiles(0, nan, nan, nan, nan)
    p50, p99 = np.percentile(arr, [50.0, 99.0])
    return Percentiles(int(arr.size), float(p50), float(p99), float(arr.mean()), float(arr.max()))


@dataclass(frozen=True)
class Repeated:
    """Wall times in seconds of several repetitions of one measurement."""

    seconds: tuple[float, ...]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def gbps(nbytes: int, seconds: float) -> float:
    """Throughput in GB/s (10**9 bytes per second)."""
    return nbytes / seconds / 1e9 if seconds > 0 else math.inf


def rounded(value: float, digits: int = 3) -> float | None:
    """A figure for the JSON line: rounded to ``digits`` significant digits; None if not finite."""
    if not math.isfinite(value):
        return None
    if value == 0:
        return 0.0
    return round(value, max(0, digits - 1 - math.floor(math.log10(abs(value)))))


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def line(values: Sequence[str]) -> str:
        parts = [v.ljust(widths[i]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(values)]
        return "  ".join(parts).rstrip()

    print()
    print(title)
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))


def _cell(value: object) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def machine_line() -> str:
    """One line describing where the bench ran."""
    return (
        f"python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, {platform.machine()}, "
        f"{platform.system()} {platform.release()}"
    )


def emit_json(figures: dict[str, Any]) -> None:
    """Print the figures as one JSON object: the bench's last line."""
    sys.stdout.flush()
    print(json.dumps(figures, sort_keys=False, allow_nan=False))
    sys.stdout.flush()


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` took."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def human_seconds(seconds: float) -> str:
    """A duration for a table cell, in the unit that suits it: µs, ms or s."""
    if not math.isfinite(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


@contextlib.contextmanager
def seaweedfs(directory: Path) -> Iterator[SeaweedFS | None]:
    """A running SeaweedFS S3 server (``weed mini`` on 127.0.0.1, from ``tests/servers.py``)
    keeping its data under ``directory``; None where the ``weed`` binary is not installed.

    Stopped on exit without waiting for a clean stop (its data is thrown away).
    """
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tests.servers import SeaweedFS, weed_binary

    binary = weed_binary()
    if binary is None:
        yield None
        return
    server = SeaweedFS(binary, directory)
    server.start()
    try:
        yield server
    finally:
        server.stop(timeout=2)


def s3_upload(server: SeaweedFS, path: Path | str, key: str) -> float:
    """Upload the file at ``path`` to ``key`` in the server's bucket (64 MiB parts, 4 at a time);
    returns the seconds it took."""
    start = time.perf_counter()
    server.upload_file(path, key, part=64 << 20, threads=4)
    return time.perf_counter() - start


class Timed(Protocol):
    """A benchmarked method: its label, its repeated times and its warm-up seconds."""

    @property
    def label(self) -> str: ...

    @property
    def times(self) -> Repeated: ...

    @property
    def warmup(self) -> float: ...


def print_times(title: str, methods: Sequence[Timed], nbytes: int) -> None:
    """Each method's best and median time and GB/s for ``nbytes``, and its warm-up."""
    print_table(
        f"{title}: times in ms",
        ["method", "best ms", "median ms", "best GB/s", "median GB/s", "warm-up ms"],
        [
            [
                m.label,
                m.times.best * 1e3,
                m.times.median * 1e3,
                gbps(nbytes, m.times.best),
                gbps(nbytes, m.times.median),
                m.warmup * 1e3,
            ]
            for m in methods
        ],
    )


def size_label(total: int) -> str:
    """``64mib`` or ``1gib``: a model size as the JSON keys name it."""
    return f"{total // GIB}gib" if total >= GIB and total % GIB == 0 else f"{total // MIB}mib"


# -- timing a model in a cache ---------------------------------------------------------------------


def on_device(cache: ModelCache, model_id: str) -> bool:
    return model_id in cache.resident("device")


async def ready(
    cache: ModelCache,
    model_id: str,
    check: Callable[[Mapping[str, Any]], None],
    *,
    synchronize: Callable[[], None] | None = None,
) -> float:
    """Seconds until ``async with cache.use(model_id)`` is entered (with ``synchronize``, from
    and to an idle device); ``check`` then vets the weights, untimed."""
    if synchronize is not None:
        synchronize()
    start = time.perf_counter()
    async with cache.use(model_id) as weights:
        if synchronize is not None:
            synchronize()
        seconds = time.perf_counter() - start
        check(weights)
    del weights
    return seconds


async def host_reload(
    cache: ModelCache,
    model_id: str,
    ready: Callable[[], Awaitable[float]],
    *,
    moved: Callable[[], Awaitable[None]] | None = None,
) -> float:
    """Evict the model to the host tier and time ``ready()`` reloading it from there.

    ``moved`` waits until the eviction's copy to the host tier has ended, where that runs in the
    background (a GPU); without it the model must be in the host tier when `evict` returns.
    """
    if not on_device(cache, model_id):
        await ready()
    if not cache.evict(model_id):
        raise RuntimeError(f"evict() refused: {cache.stats()}")
    if moved is not None:
        await moved()
    if model_id not in cache.resident("host"):
        raise RuntimeError(f"evict() did not move the model to the host tier: {cache.stats()}")
    hits = cache.stats().tiers["host"].hits
    seconds = await ready()
    if cache.stats().tiers["host"].hits != hits + 1:
        raise RuntimeError("the reload was not served by the host tier")
    return seconds


async def drop(cache: ModelCache, model_id: str, ready: Callable[[], Awaitable[float]]) -> None:
    """Make the model resident (``ready()``), then evict it from device and host memory both (a
    cache without a host tier): its next use reads a lower tier or the store."""
    if not on_device(cache, model_id):
        await ready()
    if not cache.evict(model_id) or on_device(cache, model_id) or cache.resident("host"):
        raise RuntimeError(f"evict() did not drop the model: {cache.stats()}")


# -- methods, run round-robin ----------------------------------------------------------------------

#: What one run of a method measured: its seconds, or its seconds and those of a step after it
#: (touching the weights; NaN where the method has none).
Measured = float | tuple[float, float]


class KeptOpen:
    """A run whose cache stays open across a bench's repetitions (the steady state of a busy
    cache): `run_all` gives it ``stack``, where it opens the cache on its first run, and closes
    the stack once every round has ended."""

    stack: AsyncExitStack | None = None


@dataclass
class Method:
    """One way of doing what a bench times: ``run()`` (sync or async) does it once."""

    key: str
    label: str
    run: Callable[[], Measured | Awaitable[Measured]]
    seconds: list[float] = field(default_factory=list)
    #: The seconds of the step after, where ``run`` measures one.
    after: list[float] = field(default_factory=list)
    warmup: float = math.nan
    #: Why it stopped, where `run_all` reports errors instead of raising them.
    error: str | None = None

    @property
    def times(self) -> Repeated:
        return Repeated(tuple(self.seconds))

    @property
    def after_times(self) -> Repeated:
        return Repeated(tuple(self.after))


async def run_all(methods: Sequence[Method], repeats: int, *, report_errors: bool = False) -> None:
    """One untimed warm-up run of each method, then ``repeats`` rounds of every method in turn
    (round-robin: drift and noise hit every method alike), collecting garbage after each run.

    With ``report_errors`` a method that raises is stopped with its error in ``error`` (a peer
    that fails is reported, not fatal); otherwise the error ends the bench.
    """
    async with AsyncExitStack() as stack:
        for m in methods:
            if isinstance(m.run, KeptOpen):
                m.run.stack = stack
        for round_ in range(repeats + 1):
            for m in methods:
                if m.error is not None:
                    continue
                try:
                    measured = m.run()
                    if inspect.isawaitable(measured):
                        measured = await measured
                except Exception as exc:
                    if not report_errors:
                        raise
                    m.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
                    continue
                finally:
                    free_memory()
                seconds, after = measured if isinstance(measured, tuple) else (measured, math.nan)
                if round_ == 0:
                    m.warmup = seconds
                    continue
                m.seconds.append(seconds)
                if not math.isnan(after):
                    m.after.append(after)
