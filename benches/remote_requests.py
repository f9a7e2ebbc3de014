"""Requests per remote load, and what they cost where each has a first-byte latency.

A small single-file model (``--size-mib``, one tensor) with a config.json, loaded cold
(``async with cache.use(id, model=...)`` with a builder that asks for the config: a fresh
`ModelCache`, so a fresh Store and session, each repetition) from

- the aiohttp file server of ``tests/servers.py``, answering every request after
  ``--latency-ms`` (the first-byte latency of an object store: 10-50 ms), and
- SeaweedFS over S3 (127.0.0.1, no added latency), its requests counted with botocore's
  ``before-call`` event.

Reported: requests per load by method (HEAD, GET; S3 operations), and the median and best load
time over http with the latency, against ``requests x latency``: with requests made one after
another a load costs about that much on such a store, whatever the bytes.

Run: ``python benches/remote_requests.py [--quick] [--repeats N] [--latency-ms MS]``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import torch
from _common import base_parser, data_dir, emit_json, machine_line
from aiohttp import web
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.servers
from modelcache import ModelCache, Store
from tests.servers import HttpServer, SeaweedFS, weed_binary

CONFIG = {"hidden": 64, "name": "tiny"}


class SlowServer(HttpServer):
    """The test file server, answering each request after ``latency`` seconds."""

    latency = 0.0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(self.latency)
        return await super()._handle(request)


async def load_once(store: Store) -> float:
    cache = ModelCache(store, device_budget="256MiB")

    @cache.model
    class WithConfig:
        @classmethod
        def from_weights(cls, weights: Any, info: Any) -> Any:
            return info.config

    async with cache:
        start = time.perf_counter()
        async with cache.use("m", model=WithConfig) as config:
            seconds = time.perf_counter() - start
            if config != CONFIG:
                raise RuntimeError(f"wrong config {config!r}")
    return seconds


def write(directory: Path, size_mib: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(size_mib << 18)}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(CONFIG))


async def over_http(root: Path, repeats: int, latency: float, size_mib: int) -> dict[str, Any]:
    server = SlowServer(root / "http")
    (root / "http").mkdir()
    server.start()
    try:
        server.latency = latency
        directory, url = server.fresh_dir()
        write(directory / "m", size_mib)
        files = [f"{url}/m/model.safetensors", f"{url}/m/config.json"]
        await load_once(Store(f"{url}/{{model_id}}/"))  # warm-up
        server.reset()
        times = [await load_once(Store(f"{url}/{{model_id}}/")) for _ in range(repeats)]
        seen = Counter({m: sum(server.count(m, f) for f in files) for m in ("HEAD", "GET")})
    finally:
        server.stop()
    per_load = {m: n / repeats for m, n in seen.items()}
    return {
        "http_requests_per_load": sum(per_load.values()),
        "http_head_per_load": per_load["HEAD"],
        "http_get_per_load": per_load["GET"],
        "http_latency_ms": latency * 1000,
        "http_load_best_ms": round(min(times) * 1000, 1),
        "http_load_median_ms": round(statistics.median(times) * 1000, 1),
    }


async def over_s3(root: Path, repeats: int, size_mib: int) -> dict[str, Any]:
    binary = weed_binary()
    if binary is None:
        return {}
    weed = SeaweedFS(binary, root / "seaweedfs")
    weed.start()
    try:
        write(root / "s3" / "m", size_mib)
        weed.put_dir(root / "s3" / "m", "bench/m")
        template = f"s3://{weed.bucket}/bench/{{model_id}}/"
        calls: Counter[str] = Counter()
        times = []
        for i in range(repeats + 1):
            store = Store(template, storage_options=weed.s3_options)
            fs, _ = await store._remote(f"s3://{weed.bucket}/bench/m/config.json")
            await fs.set_session()
            if i:  # the first is a warm-up

                def seen(model: Any, **_: Any) -> None:
                    calls[model.name] += 1

                fs.s3.meta.events.register("before-call.s3", seen)
            seconds = await load_once(store)
            if i:
                times.append(seconds)
    finally:
        weed.stop()
    return {
        "s3_requests_per_load": sum(calls.values()) / repeats,
        **{f"s3_{op}_per_load": n / repeats for op, n in sorted(calls.items())},
        "s3_load_best_ms": round(min(times) * 1000, 1),
        "s3_load_median_ms": round(statistics.median(times) * 1000, 1),
    }


async def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--size-mib", type=int, default=1)
    args = parser.parse_args()
    repeats = args.repeats or (5 if args.quick else 20)
    print(f"remote_requests{' (quick)' if args.quick else ''}: {machine_line()}")
    with data_dir(args.data_dir, "modelcache-remote-requests-") as path:
        root = Path(path)
        figures = await over_http(root, repeats, args.latency_ms / 1000, args.size_mib)
        figures.update(await over_s3(root, repeats, args.size_mib))
    figures["repeats"] = repeats
    figures["quick"] = args.quick
    emit_json(figures)


if __name__ == "__main__":
    anyio.run(main)
