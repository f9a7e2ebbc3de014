"""Routing on Ray Serve: modelcache with the cache-affinity router, against modelcache with Ray's
default router and against Ray's own ``@serve.multiplexed``; same stream, same device bytes.

One local Ray cluster; each setup is deployed as 3 replicas with the same
``max_ongoing_requests`` and sent the same request stream (Zipf 1.0 over a few hundred models
of mixed sizes, from several concurrent clients through one ``DeploymentHandle``):

* affinity: `modelcache_ray.CachedModels` + `CacheAffinityRouter`;
* default: the same replicas with Ray's default router (power of two choices);
* multiplexed: ``@serve.multiplexed(max_num_models_per_replica=K)``, K the number of models of
  mean size that fit the byte budget each modelcache replica has (the loader reads the same
  safetensors file from the same store and builds the same module).

Loads cost what real ones do relative to a request. Model sizes are log-uniform in 1-32 MiB
(float32 MLPs, mean ~10 MiB: ~3 GB for 300 models, written to the data dir), and the store is
`paced_store`: local files read as over each replica's link to an object store, 200 MiB/s
shared by all of that replica's reads, plus 5 ms before each call's first byte (a stat, a
ranged read). A load then takes ~20 ms (1 MiB) to ~180 ms (32 MiB), the range of a real
server's loads from a store, while a request's handler takes ~0.2-4 ms. Read straight from the
page cache instead, a load costs under 2 ms for the multiplexed loader (safetensors mmaps the
file) and 5-20 ms for modelcache (which copies the bytes): no real server loads that fast, and
fewer loads would then buy almost nothing. The pacing is a sleep (a transfer costs its wait,
not CPU), the same link and store for every setup: modelcache's Store reads it as a remote
fsspec filesystem (several calls per load: stat, header, config, data ranges), the multiplexed
loader as two whole-file reads (config and weights) and ``safetensors.torch.load`` of the bytes.

The three setups are deployed at once and the stream is cut into rounds (``--rounds``, 6):
each round's chunk goes to every setup in turn, in a different order each round (every
permutation once over 6), so the setups share the shared machine's moments alike and each
still serves the whole stream in order, its caches carrying over.

Reported per setup: loads cluster-wide (every replica's loads, summed), the bytes they made
resident, hit ratio (requests served without a load), client-side p50/p99/mean latency and
throughput, the mean time a request spends inside the replica's ``__call__`` (cache lookup or
load, and handler: the rest of the client's mean is Ray's own path), the requests each replica
served, the models on more than one replica's device at the end (``*_copies``, modelcache
setups), the models' first requests (a load in every setup: their mean latency and their part of
the slowest 1%, ``*_first_requests``), and CPU ms per request by process role (driver, the setup's replicas, the other setups'
replicas, controller, proxy, the rest of Ray), from psutil: the machine is CPU-bound, so
throughput follows CPU per request. Goals (issue 15): affinity loads <= 0.5x default's and <=
0.7x multiplexed's (whole stream); affinity p99 <= multiplexed p99 and affinity throughput >=
multiplexed's (the median round; the rounds' spread beside it). ``--policy lru`` gives the
modelcache replicas byte-LRU eviction instead of the cache's cost-aware default.

``--trace DIR`` writes a line per request (the driver's: model, send time, latency; the
replica's: entry and exit times, whether the model was resident at entry) and per load and
eviction, to tell what the slowest requests are (hit or miss, model size, replica); off by
default, when nothing is logged.

Run: ``python benches/ray_routing.py [--quick] [--data-dir DIR] [--rounds N] [--policy cost|lru]
[--store-mib-s B] [--store-latency-ms L] [--hot-share F] [--balance-margin F]
[--max-concurrent-loads N] [--trace DIR]`` (in the Ray virtualenv, ``make bench-ray``;
``--hot-share 0``: the router without copies for hot models; ``--balance-margin -1``: cold
models always on their first home).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import shutil
import stat
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import psutil  # type: ignore[import-untyped]  # no stubs in the Ray virtualenv
import ray
import torch
from _common import base_parser, data_dir, emit_json, machine_line, percentiles_us, print_table
from fsspec.asyn import AsyncFileSystem
from modelcache_ray import CachedModels, Residency, affinity_router_config
from ray import serve
from safetensors.torch import load, save_file

from modelcache import CostAwarePolicy, EvictionPolicy, LoadCosts, LRUPolicy

REPLICAS = 3
MAX_ONGOING = 16
#: Model sizes, log-uniform between these (float32 MLPs, 64 -> hidden -> 10: 75 floats a unit).
MIN_BYTES, MAX_BYTES = 1 << 20, 32 << 20
#: The store link of each replica (see the module docstring).
STORE_MIB_S = 200.0
STORE_LATENCY_MS = 5.0
SETUPS = ("affinity", "default", "multiplexed")
GOALS = {"loads_vs_default": 0.5, "loads_vs_multiplexed": 0.7}
#: The modelcache replicas' eviction policy (``--policy``): the cache's default prices a
#: victim by its learned load time; LRU by bytes and recency alone.
POLICIES: dict[str, type[EvictionPolicy]] = {"cost": CostAwarePolicy, "lru": LRUPolicy}


class MLP(torch.nn.Module):
    """64 -> hidden -> 10."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, hidden)
        self.fc2 = torch.nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))  # type: ignore[no-any-return]


def answer(model: MLP, x: list[list[float]]) -> list[list[float]]:
    with torch.inference_mode():
        out: list[list[float]] = model(torch.tensor(x)).tolist()
    return out


def paced_store(mib_s: float, latency_ms: float) -> type[AsyncFileSystem]:
    """Register (in this process) and return ``paced://``: local files, read as over one link
    to an object store.

    Every call waits ``latency_ms`` for its first byte, then the bytes it returns take their
    turn on the process's link (``mib_s``, shared by concurrent reads: a replica's loads
    together get its bandwidth, whatever their number). A class made where it is used (each
    replica calls this before its first read): fsspec's filesystem classes hold locks, which
    Ray cannot ship by value with a deployment defined in this script."""
    bytes_per_s = mib_s * 2**20
    latency_s = latency_ms / 1e3

    class PacedFileSystem(AsyncFileSystem):  # type: ignore[misc]
        protocol = "paced"
        root_marker = "/"
        #: When the link is next free (the event loop's clock); one link per process.
        link_free_at: ClassVar[float] = 0.0

        @classmethod
        async def _wait(cls, nbytes: int) -> None:
            now = asyncio.get_running_loop().time()
            start = max(now + latency_s, cls.link_free_at)
            cls.link_free_at = start + nbytes / bytes_per_s
            await asyncio.sleep(cls.link_free_at - now)

        async def _info(self, path: str, **kwargs: Any) -> dict[str, Any]:
            await self._wait(0)
            st = os.stat(self._strip_protocol(path))  # local: microseconds, on the loop
            kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
            return {"name": path, "size": st.st_size, "type": kind, "mtime": st.st_mtime}

        async def _cat_file(
            self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
        ) -> bytes:
            def read() -> bytes:
                with open(self._strip_protocol(path), "rb") as f:
                    f.seek(start or 0)
                    return f.read() if end is None else f.read(max(0, end - (start or 0)))

            data = await asyncio.to_thread(read)
            await self._wait(len(data))
            return data

        async def _find(self, path: str, **kwargs: Any) -> list[str]:
            await self._wait(0)
            root = self._strip_protocol(path)
            return sorted(
                os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names
            )

    fsspec.register_implementation("paced", PacedFileSystem, clobber=True)
    return PacedFileSystem


class Served:
    """Time spent inside a replica's ``__call__``, summed (for the bench's breakdown)."""

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, start_ns: int) -> None:
        self.count += 1
        self.ns += time.perf_counter_ns() - start_ns


class BytesLoaded:
    """A cache observer summing the bytes its loads made resident (``bytes_loaded``)."""

    def __init__(self) -> None:
        self.nbytes = 0

    def load_finished(self, model_id: str, source: str, nbytes: int, seconds: float) -> None:
        self.nbytes += nbytes

    def load_failed(self, model_id: str, error: BaseException) -> None:
        return None

    def waited(self, model_id: str, seconds: float) -> None:
        return None

    def evicted(self, model_id: str, tier: str, nbytes: int, age_seconds: float) -> None:
        return None


class Trace:
    """``--trace``: one JSON line per request a replica serves (model, entry and exit times on
    the wall clock, whether the model was resident at entry), per load and per eviction, in a
    file per replica process; the driver writes its own per request. Off (no file, nothing
    logged) unless ``--trace`` names a folder. Lines are flushed when the bench reads the
    replica's stats (after every chunk), the only method of ours Ray's replica answers."""

    def __init__(self, folder: str | None, app: str) -> None:
        self.file = None
        #: The replica's cache (modelcache setups): a load's line carries what the cache's
        #: learned costs price that model at, right after learning from the load (``est``),
        #: beside what the load took (``s``), to compare the two.
        self.costs: LoadCosts | None = None
        if folder is not None:
            self.file = open(  # noqa: SIM115  # open for the replica's life
                os.path.join(folder, f"{app}-{os.getpid()}.jsonl"), "a", encoding="utf-8"
            )

    def log(self, **fields: Any) -> None:
        if self.file is not None:
            self.file.write(json.dumps(fields) + "\n")

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    # The cache observer's methods (modelcache setups).
    def load_finished(self, model_id: str, source: str, nbytes: int, seconds: float) -> None:
        fields: dict[str, Any] = {}
        if self.costs is not None:
            fields["est"] = round(self.costs.seconds(source, nbytes), 4)
            fields["mib_s"] = round(self.costs.bandwidth(source) / 2**20, 1)
        self.log(e="load", m=model_id, t1=time.time_ns(), s=seconds, src=source, **fields)

    def load_failed(self, model_id: str, error: BaseException) -> None:
        self.log(e="fail", m=model_id, t1=time.time_ns())

    def waited(self, model_id: str, seconds: float) -> None:
        return None

    def evicted(self, model_id: str, tier: str, nbytes: int, age_seconds: float) -> None:
        self.log(e="evict", m=model_id, t1=time.time_ns(), tier=tier, age=age_seconds)


class CachedMLP(CachedModels):
    model_class = MLP

    def __init__(
        self,
        store: str,
        store_link: tuple[float, float],
        policy: str,
        trace: tuple[str | None, str] = (None, ""),
        **options: Any,
    ) -> None:
        paced_store(*store_link)
        self.served = Served()
        self.loaded = BytesLoaded()
        self.trace = Trace(*trace)
        # By name: a policy object would be shipped to every replica, its history shared.
        super().__init__(store, policy=POLICIES[policy](), **options)
        self.cache.add_observer(self.loaded)
        if self.trace.file is not None:
            self.trace.costs = self.cache.load_costs
            self.cache.add_observer(self.trace)

    async def handle(self, model: MLP, request: Any) -> Any:
        return answer(model, request)

    async def __call__(self, request: Any) -> Any:
        start = time.perf_counter_ns()
        if self.trace.file is not None:
            model_id = serve.get_multiplexed_model_id()
            resident = model_id in self.cache.resident("device")
            t0 = time.time_ns()
        try:
            return await super().__call__(request)
        finally:
            self.served.add(start)
            if self.trace.file is not None:
                self.trace.log(e="req", m=model_id, t0=t0, t1=time.time_ns(), res=resident)

    async def record_routing_stats(self) -> dict[str, Any]:
        # The bench reads its figures here too: Ray's replica actor answers no other method
        # of ours on one given replica.
        stats = await super().record_routing_stats()
        self.trace.flush()
        return {
            **stats,
            "bytes_loaded": self.loaded.nbytes,
            "served": self.served.count,
            "served_ns": self.served.ns,
        }


def multiplexed_class(max_models: int) -> type:
    """Ray's own way: a count-bounded LRU of models per replica, loaded by ``get_model``
    (serve.multiplexed takes its bound when it decorates, hence a class per bound)."""

    class MultiplexedMLP:
        def __init__(
            self,
            root: str,
            store_link: tuple[float, float],
            trace: tuple[str | None, str] = (None, ""),
        ) -> None:
            self.fs = paced_store(*store_link)(asynchronous=True)
            self.trace = Trace(*trace)
            self.root = root
            self.loads = 0
            self.bytes_loaded = 0
            self.served = Served()

        @serve.multiplexed(max_num_models_per_replica=max_models)  # type: ignore[untyped-decorator]
        async def get_model(self, model_id: str) -> MLP:
            self.loads += 1
            t0 = time.time_ns()
            folder = f"{self.root}/{model_id}"
            config = json.loads(await self.fs._cat_file(f"{folder}/config.json"))
            weights = await self.fs._cat_file(f"{folder}/model.safetensors")
            model = await asyncio.to_thread(self._build, config, weights)
            self.bytes_loaded += sum(p.numel() * p.element_size() for p in model.parameters())
            self.trace.log(e="load", m=model_id, t1=time.time_ns(), s=(time.time_ns() - t0) / 1e9)
            return model

        @staticmethod
        def _build(config: dict[str, Any], weights: bytes) -> MLP:
            with torch.device("meta"):
                model = MLP(**config)
            model.load_state_dict(load(weights), assign=True)
            return model.eval()

        async def __call__(self, request: Any) -> Any:
            start = time.perf_counter_ns()
            model_id = serve.get_multiplexed_model_id()
            if self.trace.file is not None:
                # Ray's LRU of this replica's models (made on the first get_model).
                lru = getattr(self, "__serve_multiplex_wrapper", None)
                resident = lru is not None and model_id in lru.models
                t0 = time.time_ns()
            try:
                model = await self.get_model(model_id)
                return answer(model, request)
            finally:
                self.served.add(start)
                if self.trace.file is not None:
                    self.trace.log(e="req", m=model_id, t0=t0, t1=time.time_ns(), res=resident)

        async def record_routing_stats(self) -> dict[str, Any]:
            self.trace.flush()
            return {
                "loads": self.loads,
                "hits": None,
                "bytes_loaded": self.bytes_loaded,
                "served": self.served.count,
                "served_ns": self.served.ns,
            }

    return MultiplexedMLP


#: Where a process's CPU time is counted, by what its title says (Ray names its workers'
#: processes ``ray::ServeReplica:APP:...``, ``ray::ServeController``, ``ray::ProxyActor``).
ROLES = ("driver", "replicas", "idle_replicas", "controller", "proxy", "ray_system")


class CpuMeter:
    """CPU seconds (user + system, every thread) of this driver and every process Ray started
    under it (raylet, GCS, controller, proxy, replicas), by role: the machine is CPU-bound
    during the bench, so a setup's throughput follows the CPU its requests cost."""

    def __init__(self) -> None:
        self.root = psutil.Process()

    def sample(self) -> dict[int, tuple[str, float]]:
        out: dict[int, tuple[str, float]] = {}
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                title = " ".join(proc.cmdline())
            except psutil.Error:  # gone since the listing
                continue
            out[proc.pid] = (title, times.user + times.system)
        return out

    def delta(
        self, before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], app: str
    ) -> dict[str, float]:
        """CPU seconds each role spent between two samples while ``app`` was driven."""
        out = dict.fromkeys(ROLES, 0.0)
        for pid, (title, cpu) in after.items():
            spent = cpu - before.get(pid, (title, 0.0))[1]
            if pid == self.root.pid:
                role = "driver"
            elif f"ServeReplica:{app}:" in title:
                role = "replicas"
            elif "ServeReplica:" in title:
                role = "idle_replicas"
            elif "ServeController" in title:
                role = "controller"
            elif "ProxyActor" in title:
                role = "proxy"
            else:
                role = "ray_system"
            out[role] += spent
        return out


@dataclass
class Chunk:
    """One setup's share of one round: a contiguous slice of the stream."""

    loads: int
    hits: int | None
    bytes_loaded: int
    latencies_ns: list[int]
    #: Whether each request (in the order of ``latencies_ns``) was its model's first in the
    #: stream: a load in every setup (compulsory), whatever its router.
    first: list[bool]
    seconds: float
    served: int
    served_ns: int
    #: Requests each replica served in this chunk, by replica (a stable order per setup).
    per_replica: list[int]
    cpu_s: dict[str, float]


@dataclass
class Result:
    """A setup's chunks, pooled."""

    chunks: list[Chunk]
    #: Models on the device of more than one replica at the end (None: not a modelcache setup).
    copies: int | None = None

    @property
    def requests(self) -> int:
        return sum(len(c.latencies_ns) for c in self.chunks)

    @property
    def loads(self) -> int:
        return sum(c.loads for c in self.chunks)

    @property
    def hits(self) -> int:
        if any(c.hits is None for c in self.chunks):
            return self.requests - self.loads  # multiplexed: a request without a load
        return sum(c.hits or 0 for c in self.chunks)

    @property
    def bytes_loaded(self) -> int:
        return sum(c.bytes_loaded for c in self.chunks)

    @property
    def latencies_ns(self) -> list[int]:
        return [t for c in self.chunks for t in c.latencies_ns]

    def first_requests(self) -> dict[str, float]:
        """The models' first requests (compulsory loads, the same in every setup): their mean
        latency and their part of the slowest 1% of requests (the p99's tail)."""
        timed = [(t, f) for c in self.chunks for t, f in zip(c.latencies_ns, c.first, strict=True)]
        firsts = [t for t, f in timed if f]
        tail = sorted(timed, reverse=True)[: max(1, len(timed) // 100)]
        return {
            "mean_ms": statistics.fmean(firsts) / 1e6 if firsts else 0.0,
            "share_of_slowest_1pct": sum(f for _, f in tail) / len(tail),
        }

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.chunks)

    @property
    def served_ns(self) -> float:
        """Mean time inside the replicas' ``__call__``."""
        return sum(c.served_ns for c in self.chunks) / max(1, sum(c.served for c in self.chunks))

    @property
    def per_replica(self) -> list[int]:
        """Requests each replica served, most first (how evenly the router spread them)."""
        totals = [sum(col) for col in zip(*(c.per_replica for c in self.chunks), strict=True)]
        return sorted(totals, reverse=True)

    def cpu_ms_per_request(self) -> dict[str, float]:
        out = {
            role: 1e3 * sum(c.cpu_s[role] for c in self.chunks) / max(1, self.requests)
            for role in ROLES
        }
        out["total"] = sum(out.values())
        return out


def write_store(root: Path, count: int, seed: int) -> tuple[list[str], dict[str, int]]:
    """``count`` MLPs under ``root``, sizes log-uniform in [MIN_BYTES, MAX_BYTES]; their ids and
    sizes in bytes."""
    rng = random.Random(seed)
    sizes: dict[str, int] = {}
    ids = [f"mlp-{i:04d}" for i in range(count)]
    for i, model_id in enumerate(ids):
        target = math.exp(rng.uniform(math.log(MIN_BYTES), math.log(MAX_BYTES)))
        hidden = max(1, round(target / (4 * 75)))
        torch.manual_seed(i)
        model = MLP(hidden)
        folder = root / model_id
        folder.mkdir(parents=True)
        save_file(model.state_dict(), folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"hidden": hidden}))
        sizes[model_id] = sum(p.numel() * p.element_size() for p in model.parameters())
    return ids, sizes


def zipf_stream(ids: list[str], count: int, seed: int) -> list[str]:
    """``count`` draws of ``ids`` with Zipf(1.0) weights, the ranks shuffled (so model size and
    popularity are independent)."""
    rng = random.Random(seed)
    ranked = ids[:]
    rng.shuffle(ranked)
    weights = [1 / (i + 1) for i in range(len(ranked))]
    return rng.choices(ranked, weights=weights, k=count)


def replica_stats(app: str) -> list[dict[str, Any]]:
    """Each replica's routing stats (with the bench's figures), in the order of their names."""
    names = sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#")
    )
    stats: list[dict[str, Any]] = ray.get(
        [ray.get_actor(n, namespace="serve").record_routing_stats.remote() for n in names]
    )
    return stats


async def drive(
    handle: Any, stream: list[str], clients: int
) -> tuple[list[tuple[int, int, int]], float]:
    """Send ``stream`` from ``clients`` concurrent clients (each takes the next request when
    its last one is answered); per-request (position in ``stream``, latency, wall-clock send
    time in ns) and the wall time."""
    x = [[0.5] * 64]
    latencies: list[tuple[int, int, int]] = []
    position = 0

    async def client() -> None:
        nonlocal position
        while position < len(stream):
            mine = position
            position += 1
            sent = time.time_ns()
            start = time.perf_counter_ns()
            await handle.options(multiplexed_model_id=stream[mine]).remote(x)
            latencies.append((mine, time.perf_counter_ns() - start, sent))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, time.perf_counter() - start


def deploy(
    name: str,
    root: Path,
    budget: int,
    max_models: int,
    router_options: dict[str, Any],
    store_link: tuple[float, float],
    policy: str,
    trace: str | None = None,
    cache_options: dict[str, Any] | None = None,
) -> Any:
    options: dict[str, Any] = {
        "num_replicas": REPLICAS,
        "max_ongoing_requests": MAX_ONGOING,
        "ray_actor_options": {"num_cpus": 0.1},
    }
    store = f"paced://{root}/{{model_id}}/"
    cache_options = cache_options or {}
    if name == "affinity":
        options["request_router_config"] = affinity_router_config(**router_options)
    if name in ("affinity", "default"):
        app = serve.deployment(**options)(CachedMLP).bind(
            store, store_link, policy, (trace, name), device_budget=budget, **cache_options
        )
    else:
        app = serve.deployment(**options)(multiplexed_class(max_models)).bind(
            f"paced://{root}", store_link, (trace, name)
        )
    return serve.run(app, name=name, route_prefix=f"/{name}")


def round_orders(rounds: int) -> list[tuple[str, ...]]:
    """The order the setups are driven in, per round: every permutation in turn, so each
    setup goes first, second and last equally often over 6 rounds (a slow drift of the
    machine's load, or a setup's leftover background work, weighs on none in particular)."""
    perms = list(itertools.permutations(SETUPS))
    return [perms[i % len(perms)] for i in range(rounds)]


def trace_driver(
    folder: str, app: str, round_: int, offset: int, chunk: list[str], timed: list[Any]
) -> None:
    """``--trace``: the driver's line per request of one chunk (position in the stream, model,
    send time, latency)."""
    with open(os.path.join(folder, "driver.jsonl"), "a", encoding="utf-8") as f:
        for i, latency, sent in timed:
            line = {"app": app, "round": round_, "pos": offset + i, "m": chunk[i]}
            f.write(json.dumps({**line, "t0": sent, "lat": latency}) + "\n")


async def run_rounds(
    handles: dict[str, Any],
    stream: list[str],
    clients: int,
    rounds: int,
    trace: str | None = None,
) -> dict[str, Result]:
    """Drive the stream in ``rounds`` contiguous chunks; each chunk goes to every setup in
    turn (the round's order), so each setup sees the whole stream, in order, its caches
    carrying over from chunk to chunk, and the setups share the machine's moments alike."""
    meter = CpuMeter()
    results = {name: Result([]) for name in SETUPS}
    bounds = [len(stream) * i // rounds for i in range(rounds + 1)]
    seen: set[str] = set()
    first: list[bool] = []  # by position: the stream's first request for its model
    for model_id in stream:
        first.append(model_id not in seen)
        seen.add(model_id)
    last = {name: await asyncio.to_thread(replica_stats, name) for name in SETUPS}
    for index, order in enumerate(round_orders(rounds)):
        chunk = stream[bounds[index] : bounds[index + 1]]
        for name in order:
            before = meter.sample()
            timed, seconds = await drive(handles[name], chunk, clients)
            after = meter.sample()
            if trace is not None:
                trace_driver(trace, name, index, bounds[index], chunk, timed)
            stats = await asyncio.to_thread(replica_stats, name)
            prev = last[name]
            last[name] = stats

            def diff(key: str, now: list[dict[str, Any]], old: list[dict[str, Any]]) -> int:
                # .get: a replica whose cache was not open yet reported no cache figures.
                return int(sum(s.get(key, 0) for s in now) - sum(s.get(key, 0) for s in old))

            results[name].chunks.append(
                Chunk(
                    loads=diff("loads", stats, prev),
                    hits=None if name == "multiplexed" else diff("hits", stats, prev),
                    bytes_loaded=diff("bytes_loaded", stats, prev),
                    latencies_ns=[t for _, t, _ in timed],
                    first=[first[bounds[index] + i] for i, _, _ in timed],
                    seconds=seconds,
                    served=diff("served", stats, prev),
                    served_ns=diff("served_ns", stats, prev),
                    per_replica=[
                        s["served"] - p["served"] for s, p in zip(stats, prev, strict=True)
                    ],
                    cpu_s=meter.delta(before, after, name),
                )
            )
    for name in SETUPS:
        if name != "multiplexed":
            held = Counter(h for s in last[name] for h in Residency.from_stats(s).device)
            results[name].copies = sum(1 for n in held.values() if n > 1)
    return results


def ratios_of(a: Result, d: Result, m: Result) -> dict[str, float]:
    """The goals' ratios (affinity over the others) of pooled results or of one round's."""
    lat = {n: percentiles_us(r.latencies_ns) for n, r in (("a", a), ("m", m))}
    return {
        "loads_vs_default": a.loads / max(1, d.loads),
        "loads_vs_multiplexed": a.loads / max(1, m.loads),
        "p99_vs_multiplexed": lat["a"].p99_us / lat["m"].p99_us,
        "rps_vs_multiplexed": (a.requests / a.seconds) / (m.requests / m.seconds),
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "ray routing")
    parser.add_argument("--models", type=int, default=None)
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="chunks of the stream, each driven to every setup in turn (default 6; quick 3)",
    )
    parser.add_argument(
        "--spread-queue-len",
        type=int,
        default=None,
        help="the affinity router's spread_queue_len (default: the router's default)",
    )
    parser.add_argument(
        "--hot-share",
        type=float,
        default=None,
        help="the affinity router's hot_share (0: no copies for hotness; default: the "
        "router's, 0.25)",
    )
    parser.add_argument(
        "--balance-margin",
        type=float,
        default=None,
        help="the affinity router's balance_margin (< 0: cold models always load on their "
        "first home; default: the router's, 0.3 of a fair share)",
    )
    parser.add_argument(
        "--policy",
        choices=sorted(POLICIES),
        default="cost",
        help="the modelcache replicas' eviction policy (default: the cache's, cost)",
    )
    parser.add_argument(
        "--store-mib-s",
        type=float,
        default=STORE_MIB_S,
        help="each replica's store bandwidth, MiB/s",
    )
    parser.add_argument(
        "--store-latency-ms",
        type=float,
        default=STORE_LATENCY_MS,
        help="the store's time to first byte of each call, ms",
    )
    parser.add_argument(
        "--max-concurrent-loads",
        type=int,
        default=None,
        help="the modelcache replicas' max_concurrent_loads (default: the cache's)",
    )
    parser.add_argument(
        "--trace",
        default=None,
        help="write per-request lines (driver and replicas: model, times, resident or not; "
        "the replicas' loads and evictions) to this folder, for a look at the tail",
    )
    args: argparse.Namespace = parser.parse_args()
    quick: bool = args.quick
    count: int = args.models or (80 if quick else 300)
    requests: int = args.requests or (800 if quick else 4000)
    clients: int = args.clients
    rounds: int = args.rounds or (3 if quick else 6)
    if not 1 <= rounds <= requests:
        parser.error("--rounds must be between 1 and the number of requests")
    router_options: dict[str, Any] = {}
    if args.spread_queue_len is not None:
        router_options["spread_queue_len"] = args.spread_queue_len
    if args.hot_share is not None:
        if args.hot_share < 0:
            parser.error("--hot-share must be >= 0")
        router_options["hot_share"] = args.hot_share or None
    if args.balance_margin is not None:
        router_options["balance_margin"] = None if args.balance_margin < 0 else args.balance_margin
    if not (args.store_mib_s > 0 and args.store_latency_ms >= 0):
        parser.error("--store-mib-s must be > 0 and --store-latency-ms >= 0")
    store_link: tuple[float, float] = (args.store_mib_s, args.store_latency_ms)
    cache_options: dict[str, Any] = {}
    if args.max_concurrent_loads is not None:
        if args.max_concurrent_loads < 1:
            parser.error("--max-concurrent-loads must be >= 1")
        cache_options["max_concurrent_loads"] = args.max_concurrent_loads
    trace: str | None = None
    if args.trace is not None:
        trace = os.path.abspath(args.trace)
        os.makedirs(trace, exist_ok=True)
    print(f"ray_routing{' (quick)' if quick else ''}: {machine_line()}")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = time.perf_counter()
    with data_dir(args.data_dir, "modelcache-ray-") as directory:
        root = Path(directory) / "store"
        ids, sizes = write_store(root, count, seed=0)
        total = sum(sizes.values())
        mean = total / len(sizes)
        # Each replica's device budget: a sixth of the store, so the three hold half of it.
        budget = total // 6
        max_models = max(1, int(budget // mean))
        stream = zipf_stream(ids, requests, seed=1)
        if trace is not None:
            with open(os.path.join(trace, "sizes.json"), "w", encoding="utf-8") as f:
                json.dump(sizes, f)
        print(
            f"{count} models ({total / 2**20:.1f} MiB, mean {mean / 2**10:.0f} KiB), "
            f"{requests} requests Zipf 1.0 from {clients} clients in {rounds} rounds; "
            f"{REPLICAS} replicas, each {budget / 2**20:.1f} MiB of models (multiplexed: "
            f"{max_models} models); store link {store_link[0]:g} MiB/s, {store_link[1]:g} ms "
            "to first byte"
        )
        temp = tempfile.mkdtemp(prefix="mcray-", dir="/tmp")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _temp_dir=temp,
            log_to_driver=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
        )
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": 0})
            handles = {
                name: deploy(
                    name,
                    root,
                    budget,
                    max_models,
                    router_options,
                    store_link,
                    args.policy,
                    trace,
                    cache_options,
                )
                for name in SETUPS
            }
            results = asyncio.run(run_rounds(handles, stream, clients, rounds, trace))
        finally:
            serve.shutdown()  # type: ignore[no-untyped-call]
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
    run_s = time.perf_counter() - started

    rows = []
    out: dict[str, Any] = {}
    for name, r in results.items():
        lat = percentiles_us(r.latencies_ns)
        rps = r.requests / r.seconds
        cpu = r.cpu_ms_per_request()
        rows.append(
            [
                name,
                r.loads,
                r.bytes_loaded / 2**30,
                r.hits / r.requests,
                lat.p50_us / 1e3,
                lat.p99_us / 1e3,
                rps,
                lat.mean_us / 1e3,
                r.served_ns / 1e6,
                cpu["total"],
                cpu["replicas"],
            ]
        )
        out[f"{name}_loads"] = r.loads
        out[f"{name}_bytes_loaded_mib"] = round(r.bytes_loaded / 2**20, 1)
        out[f"{name}_hit_ratio"] = round(r.hits / r.requests, 4)
        out[f"{name}_p50_ms"] = round(lat.p50_us / 1e3, 2)
        out[f"{name}_p99_ms"] = round(lat.p99_us / 1e3, 2)
        out[f"{name}_rps"] = round(rps, 1)
        out[f"{name}_mean_ms"] = round(lat.mean_us / 1e3, 2)
        out[f"{name}_in_replica_ms"] = round(r.served_ns / 1e6, 2)
        out[f"{name}_per_replica"] = r.per_replica
        out[f"{name}_first_requests"] = {k: round(v, 3) for k, v in r.first_requests().items()}
        if r.copies is not None:
            out[f"{name}_copies"] = r.copies
        out[f"{name}_cpu_ms_per_req"] = {k: round(v, 2) for k, v in cpu.items()}
    print_table(
        "Same stream, same device bytes (latency in ms, at the client; CPU ms per request)",
        [
            "setup",
            "loads",
            "GiB loaded",
            "hit ratio",
            "p50",
            "p99",
            "req/s",
            "mean",
            "in replica",
            "CPU",
            "CPU replicas",
        ],
        rows,
    )
    a, d, m = (results[n] for n in SETUPS)
    pooled = ratios_of(a, d, m)
    per_round = [
        ratios_of(*(Result([results[n].chunks[i]]) for n in SETUPS)) for i in range(rounds)
    ]
    median = {k: statistics.median(r[k] for r in per_round) for k in pooled}
    spread = {k: (min(r[k] for r in per_round), max(r[k] for r in per_round)) for k in pooled}
    # Loads are judged on the whole stream (a round's loads depend on what the round before
    # left resident); latency and throughput on the median round, robust to a noisy one.
    judged = {**median, "loads_vs_default": pooled["loads_vs_default"]}
    judged["loads_vs_multiplexed"] = pooled["loads_vs_multiplexed"]
    meets = {
        "loads_vs_default": judged["loads_vs_default"] <= GOALS["loads_vs_default"],
        "loads_vs_multiplexed": judged["loads_vs_multiplexed"] <= GOALS["loads_vs_multiplexed"],
        "p99_vs_multiplexed": judged["p99_vs_multiplexed"] <= 1.0,
        "rps_vs_multiplexed": judged["rps_vs_multiplexed"] >= 1.0,
    }
    print_table(
        f"Affinity / others over {rounds} interleaved rounds (goals: loads <= 0.5x default, "
        "<= 0.7x multiplexed, whole stream; p99 <= and throughput >= multiplexed, median round)",
        ["figure", "whole stream", "median round", "min round", "max round", "goal met"],
        [[k, pooled[k], median[k], *spread[k], "yes" if meets[k] else "NO"] for k in pooled],
    )
    print()
    emit_json(
        {
            **{k: round(v, 3) for k, v in judged.items()},
            "meets_goals": all(meets.values()),
            "whole_stream": {k: round(v, 3) for k, v in pooled.items()},
            "median_round": {k: round(v, 3) for k, v in median.items()},
            "spread": {k: [round(lo, 3), round(hi, 3)] for k, (lo, hi) in spread.items()},
            **out,
            "models": count,
            "requests": requests,
            "clients": clients,
            "rounds": rounds,
            "store_mib_s": store_link[0],
            "store_latency_ms": store_link[1],
            "policy": args.policy,
            "hot_share": router_options.get("hot_share", "default"),
            "balance_margin": router_options.get("balance_margin", "default"),
            "max_concurrent_loads": cache_options.get("max_concurrent_loads", "default"),
            "run_s": round(run_s, 1),
            "quick": quick,
        }
    )


if __name__ == "__main__":
    main()
