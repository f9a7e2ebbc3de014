"""KServe adapter overhead: warm V1 requests through ``modelcache_kserve`` against a plain
``kserve.Model`` holding the same model in memory; goal: the adapter adds <= 5% to p50.

Two servers run side by side in subprocesses, both on 127.0.0.1 with the same settings (one
uvicorn worker, no gRPC, ``OMP_NUM_THREADS=1``):

* plain: this script with ``--serve-plain``: a ``kserve.Model`` subclass that builds the model in
  ``load()`` and, per request, does what the adapter's default hooks do
  (``torch.tensor(instances)`` -> ``model(x)`` under ``inference_mode`` -> ``{"predictions": ...}``);
* adapter: ``python -m modelcache_kserve`` serving the same model from a local store, warm (its
  first request loads it; every measured response must say ``modelcache-tier: device``).

The model is a small MLP (64 -> 256 -> 256 -> 10, ~0.3 MiB) so that the request path, not the
matmuls, is measured. The client (aiohttp, one keep-alive connection per server) sends one
instance per request. Rounds alternate between the servers (and which goes first) so that a
noisy machine weighs on both alike: sequential requests give p50/p99/mean latency and
throughput; then a concurrency level (8 in flight) gives throughput.

Run: ``python benches/kserve_overhead.py [--quick] [--data-dir DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import (
    REPO_ROOT,
    Percentiles,
    base_parser,
    data_dir,
    emit_json,
    machine_line,
    percentiles_us,
    print_table,
    rounded,
)

sys.path.insert(0, str(REPO_ROOT / "examples" / "many_models"))
# The demo's helpers for running `python -m modelcache_kserve` in a subprocess.
from demo import free_port, stop_server, wait_ready

GOAL_OVERHEAD = 0.05
MODEL_ID = "bench-mlp"
HOST = "127.0.0.1"
CONCURRENCY = 8
SERVERS = ("plain", "adapter")


class BenchMLP(torch.nn.Module):
    """The benchmark's model; the adapter builds it from ``config.json`` (``width``)."""

    def __init__(self, width: int = 256, inputs: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(inputs, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def write_model(root: Path) -> Path:
    from safetensors.torch import save_file

    folder = root / MODEL_ID
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    save_file(BenchMLP().state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"width": 256}))
    return folder


def load_model(folder: Path) -> BenchMLP:
    from safetensors.torch import load_file

    model = BenchMLP(**json.loads((folder / "config.json").read_text()))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()


# -- the plain server (this script with --serve-plain) ---------------------------------------


def serve_plain(port: int, folder: Path) -> None:
    """A plain ``kserve.Model`` holding the model in memory, on 127.0.0.1:port."""
    sys.argv = sys.argv[:1]  # kserve parses sys.argv when imported
    import kserve  # type: ignore[import-untyped,unused-ignore]
    from kserve.protocol.rest import server as rest  # type: ignore[import-untyped,unused-ignore]

    original = rest.RESTServer.__init__

    def loopback(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.config.host = HOST  # kserve 0.21 hard-codes 0.0.0.0

    rest.RESTServer.__init__ = loopback

    class Plain(kserve.Model):  # type: ignore[misc]  # kserve ships no type information
        def load(self) -> bool:
            self.model = load_model(folder)
            self.ready = True
            return True

        async def predict(
            self,
            payload: Any,
            headers: dict[str, str] | None = None,
            response_headers: dict[str, str] | None = None,
        ) -> dict[str, Any]:
            x = torch.tensor(payload["instances"], dtype=torch.float32)
            with torch.inference_mode():
                y = self.model(x)
            return {"predictions": y.tolist()}

    model = Plain(MODEL_ID)
    model.load()
    # The settings CacheModelServer uses (modelcache_kserve/_server.py).
    kserve.ModelServer(
        http_port=port,
        workers=1,
        enable_grpc=False,
        enable_docs_url=False,
        enable_latency_logging=False,
        event_loop="asyncio",
        timeout_keep_alive=65,
    ).start([model])


# -- the client -------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1/models/{MODEL_ID}:predict"


def start_servers(store: Path, workdir: Path) -> dict[str, Server]:
    env = dict(os.environ)
    paths = [str(Path(__file__).resolve().parent)]  # --model-class kserve_overhead:BenchMLP
    if importlib.util.find_spec("modelcache_kserve") is None:
        paths.append(str(REPO_ROOT / "adapters" / "kserve"))
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    commands: dict[str, Callable[[int], list[str]]] = {
        "plain": lambda port: [
            sys.executable,
            __file__,
            "--serve-plain",
            str(port),
            str(store / MODEL_ID),
        ],
        "adapter": lambda port: [
            sys.executable,
            "-m",
            "modelcache_kserve",
            "--store",
            f"file://{store}/{{model_id}}/",
            "--model-class",
            "kserve_overhead:BenchMLP",
            "--device",
            "cpu",
            "--device-budget",
            "64MiB",
            "--host",
            HOST,
            "--http-port",
            str(port),
        ],
    }
    servers: dict[str, Server] = {}
    for name, command in commands.items():
        port = free_port()
        log = workdir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command(port), env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT
            )
        servers[name] = Server(name, port, process, log)
    return servers


def stop_servers(servers: dict[str, Server]) -> None:
    for server in servers.values():
        stop_server(server.process)


@dataclass(frozen=True)
class Config:
    warmup: int
    rounds: int
    per_round: int
    concurrent_rounds: int
    concurrent_requests: int


@dataclass
class Figures:
    samples_ns: list[int]
    seq_seconds: float
    seq_requests: int
    conc_seconds: float
    conc_requests: int
    tiers: set[str]


async def measure(servers: dict[str, Server], cfg: Config) -> dict[str, Figures]:
    import aiohttp

    body = json.dumps({"instances": torch.randn(1, 64).tolist()}).encode()
    headers = {"content-type": "application/json"}
    figures = {name: Figures([], 0.0, 0, 0.0, 0, set()) for name in servers}
    sessions = {
        name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY))
        for name in servers
    }
    try:
        for server in servers.values():
            try:
                await wait_ready(f"http://{HOST}:{server.port}", server.process, 120)
            except RuntimeError as exc:
                tail = server.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the {server.name} server: {exc}\n{tail}") from exc

        async def one(name: str) -> tuple[int, str, Any]:
            t0 = time.perf_counter_ns()
            async with sessions[name].post(servers[name].url, data=body, headers=headers) as r:
                payload = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{name}: HTTP {r.status}: {payload[:300]!r}")
                tier = r.headers.get("modelcache-tier", "-")
            return time.perf_counter_ns() - t0, tier, payload

        # Warm-up, and the two servers must give the same answer.
        answers = {}
        for name in servers:
            for _ in range(cfg.warmup):
                _, _, payload = await one(name)
            answers[name] = torch.tensor(json.loads(payload)["predictions"])
        if not torch.allclose(answers["plain"], answers["adapter"], rtol=1e-5, atol=1e-6):
            raise RuntimeError("the two servers answered differently")

        names = list(servers)
        for k in range(cfg.rounds):  # sequential: alternate servers and their order
            for name in names if k % 2 == 0 else names[::-1]:
                fig = figures[name]
                t0 = time.perf_counter()
                for _ in range(cfg.per_round):
                    ns, tier, _ = await one(name)
                    fig.samples_ns.append(ns)
                    fig.tiers.add(tier)
                fig.seq_seconds += time.perf_counter() - t0
                fig.seq_requests += cfg.per_round

        for k in range(cfg.concurrent_rounds):  # CONCURRENCY in flight
            for name in names if k % 2 == 0 else names[::-1]:
                fig = figures[name]
                todo = iter(range(cfg.concurrent_requests))

                async def worker(
                    name: str = name, fig: Figures = fig, todo: Iterator[int] = todo
                ) -> None:
                    for _ in todo:
                        _, tier, _ = await one(name)
                        fig.tiers.add(tier)

                t0 = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
                fig.conc_seconds += time.perf_counter() - t0
                fig.conc_requests += cfg.concurrent_requests
    finally:
        for session in sessions.values():
            await session.close()
    return figures


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-plain":
        serve_plain(int(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "kserve overhead")
    args: argparse.Namespace = parser.parse_args()
    quick: bool = args.quick
    cfg = Config(
        warmup=100 if quick else 300,
        rounds=4 if quick else 20,
        per_round=100 if quick else 250,
        concurrent_rounds=2 if quick else 4,
        concurrent_requests=400 if quick else 1000,
    )
    print(f"kserve_overhead{' (quick)' if quick else ''}: {machine_line()}")
    print(
        f"model: {MODEL_ID} (MLP 64-256-256-10); V1 :predict, 1 instance per request; "
        f"{cfg.rounds} alternating rounds of {cfg.per_round} sequential requests per server, "
        f"then {cfg.concurrent_rounds} of {cfg.concurrent_requests} with {CONCURRENCY} in flight"
    )
    with data_dir(args.data_dir, "modelcache-kserve-") as directory:
        root = Path(directory)
        store = root / "store"
        write_model(store)
        servers = start_servers(store, root)
        try:
            figures = asyncio.run(measure(servers, cfg))
        finally:
            stop_servers(servers)

    lat: dict[str, Percentiles] = {n: percentiles_us(f.samples_ns) for n, f in figures.items()}
    seq_rps = {n: f.seq_requests / f.seq_seconds for n, f in figures.items()}
    conc_rps = {n: f.conc_requests / f.conc_seconds for n, f in figures.items()}
    print_table(
        "Warm V1 requests (latency in ms)",
        ["server", "requests", "p50", "p99", "mean", "req/s (1)", f"req/s ({CONCURRENCY})"],
        [
            [
                n,
                lat[n].n,
                lat[n].p50_us / 1e3,
                lat[n].p99_us / 1e3,
                lat[n].mean_us / 1e3,
                seq_rps[n],
                conc_rps[n],
            ]
            for n in SERVERS
        ],
    )
    p50_ratio = lat["adapter"].p50_us / lat["plain"].p50_us
    p99_ratio = lat["adapter"].p99_us / lat["plain"].p99_us
    conc_ratio = conc_rps["adapter"] / conc_rps["plain"]
    all_hits = figures["adapter"].tiers == {"device"}
    meets = p50_ratio - 1 <= GOAL_OVERHEAD
    print_table(
        f"Adapter / plain (goal: p50 overhead <= {GOAL_OVERHEAD:.0%})",
        ["figure", "ratio", "overhead"],
        [
            ["p50 latency", p50_ratio, f"{p50_ratio - 1:+.1%}"],
            ["p99 latency", p99_ratio, f"{p99_ratio - 1:+.1%}"],
            [f"throughput ({CONCURRENCY} in flight)", conc_ratio, f"{1 - conc_ratio:+.1%}"],
        ],
    )
    print(
        f"\nadapter p50 overhead {p50_ratio - 1:+.1%}: {'meets' if meets else 'misses'} the goal; "
        f"every adapter response a device hit: {'yes' if all_hits else 'NO'}"
    )
    print()
    out: dict[str, Any] = {}
    for n in SERVERS:
        out[f"{n}_p50_ms"] = rounded(lat[n].p50_us / 1e3)
        out[f"{n}_p99_ms"] = rounded(lat[n].p99_us / 1e3)
        out[f"{n}_mean_ms"] = rounded(lat[n].mean_us / 1e3)
        out[f"{n}_rps_sequential"] = rounded(seq_rps[n])
        out[f"{n}_rps_{CONCURRENCY}_in_flight"] = rounded(conc_rps[n])
    out["adapter_p50_overhead_ratio"] = rounded(p50_ratio)
    out["adapter_p99_overhead_ratio"] = rounded(p99_ratio)
    out["adapter_throughput_ratio"] = rounded(conc_ratio)
    out["goal_p50_overhead"] = GOAL_OVERHEAD
    out["meets_goal"] = meets
    out["adapter_all_hits"] = all_hits
    out["requests_per_server"] = lat["plain"].n
    out["quick"] = quick
    emit_json(out)


if __name__ == "__main__":
    main()
