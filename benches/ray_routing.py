"""Routing on Ray Serve: modelcache with the cache-affinity router, against modelcache with Ray's
default router and against Ray's own ``@serve.multiplexed``; same stream, same device bytes.

One local Ray cluster; each setup is deployed in turn as 3 replicas with the same
``max_ongoing_requests``, then sent the same request stream (Zipf 1.0 over a few hundred models
of mixed sizes, from several concurrent clients through one ``DeploymentHandle``):

* affinity: `modelcache_ray.CachedModels` + `CacheAffinityRouter`;
* default: the same replicas with Ray's default router (power of two choices);
* multiplexed: ``@serve.multiplexed(max_num_models_per_replica=K)``, K the number of models of
  mean size that fit the byte budget each modelcache replica has (the loader reads the same
  safetensors file and builds the same module).

Reported per setup: loads cluster-wide (every replica's loads, summed), hit ratio (requests
served without a load), client-side p50/p99 latency and throughput. Goals (issue 15): affinity
loads <= 0.5x default's and <= 0.7x multiplexed's; affinity p99 <= multiplexed p99; affinity
throughput >= multiplexed's. One run: on a shared 2-core machine the figures are noisy.

Run: ``python benches/ray_routing.py [--quick] [--data-dir DIR]`` (in the Ray virtualenv,
``make bench-ray``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from _common import base_parser, data_dir, emit_json, machine_line, percentiles_us, print_table
from modelcache_ray import CachedModels, affinity_router_config
from ray import serve
from safetensors.torch import load_file, save_file

REPLICAS = 3
MAX_ONGOING = 16
#: Hidden widths of the models (float32, 64 inputs, 10 outputs): ~70 KiB, ~260 KiB, ~1 MiB.
WIDTHS = (256, 1024, 4096)
SETUPS = ("affinity", "default", "multiplexed")
GOALS = {"loads_vs_default": 0.5, "loads_vs_multiplexed": 0.7}


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


class CachedMLP(CachedModels):
    model_class = MLP

    async def handle(self, model: MLP, request: Any) -> Any:
        return answer(model, request)


def multiplexed_class(max_models: int) -> type:
    """Ray's own way: a count-bounded LRU of models per replica, loaded by ``get_model``
    (serve.multiplexed takes its bound when it decorates, hence a class per bound)."""

    class MultiplexedMLP:
        def __init__(self, root: str) -> None:
            self.root = Path(root)
            self.loads = 0

        @serve.multiplexed(max_num_models_per_replica=max_models)  # type: ignore[untyped-decorator]
        async def get_model(self, model_id: str) -> MLP:
            self.loads += 1
            return await asyncio.to_thread(self._read, model_id)

        def _read(self, model_id: str) -> MLP:
            folder = self.root / model_id
            config = json.loads((folder / "config.json").read_text())
            with torch.device("meta"):
                model = MLP(**config)
            model.load_state_dict(load_file(folder / "model.safetensors"), assign=True)
            return model.eval()

        async def __call__(self, request: Any) -> Any:
            model = await self.get_model(serve.get_multiplexed_model_id())
            return answer(model, request)

        async def record_routing_stats(self) -> dict[str, Any]:
            return {"loads": self.loads}

    return MultiplexedMLP


@dataclass
class Result:
    loads: int
    hits: int | None
    latencies_ns: list[int]
    seconds: float


def write_store(root: Path, count: int, seed: int) -> tuple[list[str], dict[str, int]]:
    """``count`` MLPs of mixed widths under ``root``; their ids and sizes in bytes."""
    rng = random.Random(seed)
    sizes: dict[str, int] = {}
    ids = [f"mlp-{i:04d}" for i in range(count)]
    for i, model_id in enumerate(ids):
        hidden = rng.choice(WIDTHS)
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
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#")
    ]
    stats: list[dict[str, Any]] = ray.get(
        [ray.get_actor(n, namespace="serve").record_routing_stats.remote() for n in names]
    )
    return stats


async def drive(handle: Any, stream: list[str], clients: int) -> tuple[list[int], float]:
    """Send ``stream`` from ``clients`` concurrent clients (each takes the next request when
    its last one is answered); per-request latencies and the wall time."""
    x = [[0.5] * 64]
    latencies: list[int] = []
    position = 0

    async def client() -> None:
        nonlocal position
        while position < len(stream):
            model_id = stream[position]
            position += 1
            start = time.perf_counter_ns()
            await handle.options(multiplexed_model_id=model_id).remote(x)
            latencies.append(time.perf_counter_ns() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, time.perf_counter() - start


def run_setup(
    name: str,
    root: Path,
    budget: int,
    max_models: int,
    stream: list[str],
    clients: int,
    router_options: dict[str, Any],
) -> Result:
    options: dict[str, Any] = {
        "num_replicas": REPLICAS,
        "max_ongoing_requests": MAX_ONGOING,
        "ray_actor_options": {"num_cpus": 0.1},
    }
    store = f"file://{root}/{{model_id}}/"
    if name == "affinity":
        options["request_router_config"] = affinity_router_config(**router_options)
        app = serve.deployment(**options)(CachedMLP).bind(store, device_budget=budget)
    elif name == "default":
        app = serve.deployment(**options)(CachedMLP).bind(store, device_budget=budget)
    else:
        app = serve.deployment(**options)(multiplexed_class(max_models)).bind(str(root))
    handle = serve.run(app, name=name, route_prefix=f"/{name}")
    try:
        latencies, seconds = asyncio.run(drive(handle, stream, clients))
        stats = replica_stats(name)
    finally:
        serve.delete(name)
    loads = sum(s["loads"] for s in stats)
    hits = sum(s["hits"] for s in stats) if name != "multiplexed" else None
    return Result(loads, hits, latencies, seconds)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "ray routing")
    parser.add_argument("--models", type=int, default=None)
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--spread-queue-len",
        type=int,
        default=None,
        help="the affinity router's spread_queue_len (default: the router's default)",
    )
    args: argparse.Namespace = parser.parse_args()
    quick: bool = args.quick
    count: int = args.models or (80 if quick else 300)
    requests: int = args.requests or (800 if quick else 4000)
    clients: int = args.clients
    router_options: dict[str, Any] = {}
    if args.spread_queue_len is not None:
        router_options["spread_queue_len"] = args.spread_queue_len
    print(f"ray_routing{' (quick)' if quick else ''}: {machine_line()}")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with data_dir(args.data_dir, "modelcache-ray-") as directory:
        root = Path(directory) / "store"
        ids, sizes = write_store(root, count, seed=0)
        total = sum(sizes.values())
        mean = total / len(sizes)
        # Each replica's device budget: a sixth of the store, so the three hold half of it.
        budget = total // 6
        max_models = max(1, int(budget // mean))
        stream = zipf_stream(ids, requests, seed=1)
        print(
            f"{count} models ({total / 2**20:.1f} MiB, mean {mean / 2**10:.0f} KiB), "
            f"{requests} requests Zipf 1.0 from {clients} clients; {REPLICAS} replicas, "
            f"each {budget / 2**20:.1f} MiB of models (multiplexed: {max_models} models)"
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
            results = {
                name: run_setup(name, root, budget, max_models, stream, clients, router_options)
                for name in SETUPS
            }
        finally:
            serve.shutdown()  # type: ignore[no-untyped-call]
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)

    rows = []
    out: dict[str, Any] = {}
    for name, r in results.items():
        lat = percentiles_us(r.latencies_ns)
        hits = r.hits if r.hits is not None else requests - r.loads
        rps = len(r.latencies_ns) / r.seconds
        rows.append([name, r.loads, hits / requests, lat.p50_us / 1e3, lat.p99_us / 1e3, rps])
        out[f"{name}_loads"] = r.loads
        out[f"{name}_hit_ratio"] = round(hits / requests, 4)
        out[f"{name}_p50_ms"] = round(lat.p50_us / 1e3, 2)
        out[f"{name}_p99_ms"] = round(lat.p99_us / 1e3, 2)
        out[f"{name}_rps"] = round(rps, 1)
    print_table(
        "Same stream, same device bytes (latency in ms, at the client)",
        ["setup", "loads", "hit ratio", "p50", "p99", "req/s"],
        rows,
    )
    a, d, m = (results[n] for n in SETUPS)
    ratios = {
        "loads_vs_default": a.loads / max(1, d.loads),
        "loads_vs_multiplexed": a.loads / max(1, m.loads),
        "p99_vs_multiplexed": out["affinity_p99_ms"] / out["multiplexed_p99_ms"],
        "rps_vs_multiplexed": out["affinity_rps"] / out["multiplexed_rps"],
    }
    meets = {
        "loads_vs_default": ratios["loads_vs_default"] <= GOALS["loads_vs_default"],
        "loads_vs_multiplexed": ratios["loads_vs_multiplexed"] <= GOALS["loads_vs_multiplexed"],
        "p99_vs_multiplexed": ratios["p99_vs_multiplexed"] <= 1.0,
        "rps_vs_multiplexed": ratios["rps_vs_multiplexed"] >= 1.0,
    }
    print_table(
        "Affinity / others (goals: loads <= 0.5x default, <= 0.7x multiplexed; p99 <= and "
        "throughput >= multiplexed)",
        ["figure", "ratio", "goal met"],
        [[k, v, "yes" if meets[k] else "NO"] for k, v in ratios.items()],
    )
    print()
    emit_json(
        {
            **{k: round(v, 3) for k, v in ratios.items()},
            "meets_goals": all(meets.values()),
            **out,
            "models": count,
            "requests": requests,
            "clients": clients,
            "quick": quick,
        }
    )


if __name__ == "__main__":
    main()
