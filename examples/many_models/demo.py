"""Many models through one KServe server: 500 real torch models, a device budget a few % of them.

Run it with ``make demo`` (or ``python examples/many_models/demo.py [--models N --requests N]``).

1. Writes (once) a store of 500 classifiers, MLPs and small CNNs of 1-40 MiB with deterministic
   weights, under ``.demo-store/`` (a re-run only checks it).
2. Starts the modelcache KServe adapter (``python -m modelcache_kserve``, what you would deploy)
   on 127.0.0.1 with a device budget of ~6% of the store and a host budget of ~20%.
3. Sends a Zipf-distributed stream of V1 ``:predict`` requests over HTTP, 8 in flight, and checks
   every answer against the model computed here directly from the same files (plain torch and
   safetensors), plus a few requests for a model that does not exist (404).
4. Prints a summary (hit ratio from each response's ``modelcache-tier`` header; loads, evictions
   and bytes per tier from the server's ``/metrics``; latency of hits and misses) and writes a plot
   of latency over time to ``demo-results/latency.png``.

Exits 1 if any answer is wrong or any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import torch
from models import ModelSpec, ensure_store, input_shape, load_reference, specs
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
#: Input batches per architecture; each request sends one of them (2 instances).
INPUT_POOL = 8
BATCH = 2
#: Tolerances of the comparison with the directly computed model (thread counts differ).
RTOL, ATOL = 1e-4, 1e-5
MISSING_ID = "no-such-model"
T = TypeVar("T")


@dataclass
class Result:
    """One request: when it started (s since the stream began), its latency, the answer's tier."""

    model_id: str
    start: float
    seconds: float
    tier: str
    status: int
    correct: bool
    error: str = ""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--models", type=int, default=500, help="models in the store (default 500)")
    p.add_argument("--requests", type=int, default=3000, help="requests to send (default 3000)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of popularity")
    p.add_argument("--seed", type=int, default=0, help="seed of the request stream and inputs")
    p.add_argument("--store", type=Path, default=REPO / ".demo-store", help="store directory")
    p.add_argument("--results", type=Path, default=REPO / "demo-results", help="plot and log dir")
    p.add_argument(
        "--device-budget",
        help="device budget (default: 6%% of the store, at least twice its largest model)",
    )
    p.add_argument("--host-budget", help="host budget (default: 20%% of the store)")
    p.add_argument("--max-concurrent-loads", type=int, default=4)
    p.add_argument("--ready-timeout", type=float, default=90.0, help="seconds to wait for start")
    return p.parse_args(argv)


def progress(items: Iterable[T], total: int, desc: str, unit: str = "model") -> Iterator[T]:
    yield from tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=0.3)


def mib(nbytes: float) -> str:
    return f"{nbytes / (1 << 30):.2f} GiB" if nbytes >= 1 << 30 else f"{nbytes / (1 << 20):.0f} MiB"


# -- the request stream and the reference answers --------------------------------------------


def request_stream(ids: Sequence[str], n: int, alpha: float, seed: int) -> list[tuple[str, int]]:
    """``n`` (model id, input index) pairs: ids Zipf-distributed over a shuffled popularity order."""
    rng = random.Random(seed)
    ranked = list(ids)
    rng.shuffle(ranked)  # the most popular models are not the first ids
    weights = [1.0 / (rank + 1) ** alpha for rank in range(len(ranked))]
    chosen = rng.choices(ranked, weights, k=n)
    return [(model_id, rng.randrange(INPUT_POOL)) for model_id in chosen]


def input_pool(seed: int) -> dict[str, list[torch.Tensor]]:
    """INPUT_POOL batches of BATCH instances per architecture, deterministic."""
    gen = torch.Generator().manual_seed(seed)
    return {
        arch: [torch.randn(BATCH, *input_shape(arch), generator=gen) for _ in range(INPUT_POOL)]
        for arch in ("mlp", "cnn")
    }


def reference_outputs(
    store: Path,
    wanted: dict[str, set[int]],
    by_id: dict[str, ModelSpec],
    inputs: dict[str, list[torch.Tensor]],
) -> dict[tuple[str, int], torch.Tensor]:
    """The outputs of each wanted (model, input batch), computed directly from the files."""
    expected: dict[tuple[str, int], torch.Tensor] = {}
    for model_id, batches in progress(wanted.items(), len(wanted), "reference outputs"):
        model = load_reference(store, model_id)
        pool = inputs[by_id[model_id].arch]
        ks = sorted(batches)
        with torch.inference_mode():
            out = model(torch.cat([pool[k] for k in ks]))
        expected.update(
            {(model_id, k): t.clone() for k, t in zip(ks, out.split(BATCH), strict=True)}
        )
        del model
    return expected


def check(predictions: Any, expected: torch.Tensor) -> str:
    """'' if ``predictions`` match ``expected``, else what is wrong."""
    try:
        got = torch.tensor(predictions, dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        return f"predictions are not a tensor: {exc}"
    if got.shape != expected.shape:
        return f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    if not torch.allclose(got, expected, rtol=RTOL, atol=ATOL):
        diff = (got - expected).abs().max().item()
        return f"values differ by up to {diff:.3g}"
    # The predicted class must match too, where the top two are not a near-tie.
    top2 = expected.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 10 * (ATOL + RTOL * top2[:, 0].abs())
    if not torch.equal(got.argmax(1)[clear], expected.argmax(1)[clear]):
        return "argmax differs"
    return ""


# -- the server ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    store: Path, port: int, device_budget: int, host_budget: int, loads: int, log: Path
) -> subprocess.Popen[bytes]:
    """``python -m modelcache_kserve`` in a subprocess, its output to ``log``."""
    env = dict(os.environ)
    paths = [str(HERE)]  # models.py: --model-class models:Classifier
    if (
        importlib.util.find_spec("modelcache_kserve") is None
        and (REPO / "adapters/kserve").is_dir()
    ):
        paths.append(str(REPO / "adapters" / "kserve"))  # the adapter, not installed
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    # Requests are small: one intra-op thread each (see the README's note on small machines).
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [
        sys.executable,
        "-m",
        "modelcache_kserve",
        "--store",
        f"file://{store}/{{model_id}}/",
        "--model-class",
        "models:Classifier",
        "--device",
        "cpu",
        "--device-budget",
        str(device_budget),
        "--host-budget",
        str(host_budget),
        "--max-concurrent-loads",
        str(loads),
        "--host",
        "127.0.0.1",
        "--http-port",
        str(port),
    ]
    with log.open("wb") as out:
        return subprocess.Popen(
            command, env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT
        )


async def wait_ready(base: str, server: subprocess.Popen[bytes], within: float) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with status {server.returncode}")
            try:
                async with session.get(f"{base}/v2/health/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready after {within:.0f} s")
            await asyncio.sleep(0.2)


def stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# -- driving the stream ----------------------------------------------------------------------


async def drive(
    base: str,
    stream: Sequence[tuple[str, int]],
    arch: dict[str, str],
    inputs: dict[str, list[torch.Tensor]],
    expected: dict[tuple[str, int], torch.Tensor],
    concurrency: int,
) -> tuple[list[Result], list[str], str]:
    """Send the stream, ``concurrency`` requests in flight; return the results, the problems
    with requests for a missing model, and the server's /metrics text."""
    bodies = {a: [{"instances": x.tolist()} for x in pool] for a, pool in inputs.items()}
    results: list[Result] = []
    todo = iter(stream)
    bar = tqdm(total=len(stream), desc="requests", unit="req", file=sys.stderr, mininterval=0.3)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as session:
        began = time.perf_counter()

        async def worker() -> None:
            for model_id, k in todo:
                start = time.perf_counter()
                tier, status, error = "?", 0, ""
                try:
                    async with session.post(
                        f"/v1/models/{model_id}:predict", json=bodies[arch[model_id]][k]
                    ) as response:
                        status = response.status
                        tier = response.headers.get("modelcache-tier", "?")
                        payload = await response.json(content_type=None)
                    seconds = time.perf_counter() - start
                    if status != 200:
                        error = f"HTTP {status}: {str(payload)[:200]}"
                    elif tier == "?":
                        error = "no modelcache-tier header"
                    else:
                        error = check(payload.get("predictions"), expected[model_id, k])
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    seconds = time.perf_counter() - start
                    error = f"{type(exc).__name__}: {exc}"
                results.append(
                    Result(model_id, start - began, seconds, tier, status, not error, error)
                )
                bar.update()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        bar.close()

        missing: list[str] = []
        for i in range(3):
            async with session.post(
                f"/v1/models/{MISSING_ID}-{i}:predict", json=bodies["mlp"][0]
            ) as response:
                await response.read()
                if response.status != 404:
                    missing.append(f"{MISSING_ID}-{i}: HTTP {response.status}, expected 404")
        async with session.get("/metrics") as response:
            metrics = await response.text()
    return results, missing, metrics


# -- the summary -----------------------------------------------------------------------------


class Metrics:
    """The server's ``modelcache_*`` samples (names from ``modelcache/metrics.py``)."""

    def __init__(self, text: str) -> None:
        self.samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            if family.name.startswith("modelcache_")
            for sample in family.samples
        ]

    def __call__(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` with ``labels``; KeyError if there are none."""
        values = [
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        ]
        if not values:
            raise KeyError(f"the server's /metrics has no {name}{labels or ''}")
        return sum(values)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.1f} ms"


def plot(results: Sequence[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5), dpi=110)
    groups = (
        ("device", "hit (on the device)", "tab:blue", ".", 6),
        ("host", "load from host RAM", "tab:orange", "^", 14),
        ("disk", "load from disk", "tab:purple", "s", 14),
        ("store", "load from the store", "tab:red", "x", 18),
    )
    for tier, label, colour, marker, size in groups:
        chosen = [r for r in results if r.tier == tier]
        if chosen:
            ax.scatter(
                [r.start for r in chosen],
                [r.seconds * 1e3 for r in chosen],
                s=size,
                c=colour,
                marker=marker,
                alpha=0.5 if tier == "device" else 0.8,
                linewidths=1,
                label=f"{label}: {len(chosen):,}",
            )
    ax.set_yscale("log")
    ax.set_xlabel("time since the first request (s)")
    ax.set_ylabel("request latency (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4, markerscale=1.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def summarize(
    results: Sequence[Result],
    metrics: Metrics,
    total_bytes: int,
    n_models: int,
    seconds: float,
    concurrency: int,
) -> list[tuple[str, str]]:
    tiers = Counter(r.tier for r in results)
    hits = [r.seconds for r in results if r.tier == "device"]
    misses = [r.seconds for r in results if r.tier != "device"]
    n = len(results)
    wrong = sum(not r.correct for r in results)
    sources = {
        s: int(metrics("modelcache_load_seconds_count", source=s)) for s in ("host", "store")
    }
    load_ms = {
        s: metrics("modelcache_load_seconds_sum", source=s) / max(1, n) * 1e3
        for s, n in sources.items()
    }

    def tier_bytes(tier: str) -> str:
        held = metrics("modelcache_resident_bytes", tier=tier)
        budget = metrics("modelcache_budget_bytes", tier=tier)
        models = int(metrics("modelcache_models", tier=tier))
        return f"{tier} {mib(held)} of {mib(budget)} ({models} models)"

    return [
        ("requests", f"{n:,} ({concurrency} in flight) in {seconds:.1f} s: {n / seconds:,.0f}/s"),
        (
            "answers",
            "all correct (checked against the models computed directly)"
            if not wrong
            else f"{wrong:,} WRONG or failed",
        ),
        (
            "hit ratio",
            f"{len(hits) / n:.1%} from modelcache-tier: "
            + ", ".join(f"{t} {c:,}" for t, c in tiers.most_common()),
        ),
        (
            "loads",
            f"{int(metrics('modelcache_loads_total')):,} "
            f"(from host RAM {sources['host']:,}, {load_ms['host']:.1f} ms each on average; "
            f"from the store {sources['store']:,}, {load_ms['store']:.1f} ms each)",
        ),
        (
            "evictions",
            f"device {int(metrics('modelcache_evictions_total', tier='device')):,}, "
            f"host {int(metrics('modelcache_evictions_total', tier='host')):,}",
        ),
        ("latency hits", f"p50 {ms(percentile(hits, 50))}, p99 {ms(percentile(hits, 99))}"),
        ("latency misses", f"p50 {ms(percentile(misses, 50))}, p99 {ms(percentile(misses, 99))}"),
        ("bytes per tier", f"{tier_bytes('device')}; {tier_bytes('host')}"),
        ("store", f"{mib(total_bytes)} in {n_models} models"),
    ]


# -- main ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    torch.set_num_threads(1)  # small requests; the server shares the machine's cores
    store: Path = args.store.resolve()
    results_dir: Path = args.results.resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    models = specs(args.models, seed=0)
    total = sum(s.nbytes for s in models)
    largest = max(s.nbytes for s in models)
    device_budget = int(args.device_budget or max(0.06 * total, 2 * largest))
    host_budget = int(args.host_budget or 0.2 * total)

    t = time.perf_counter()
    written = ensure_store(store, models, progress=lambda it, n: progress(it, n, "writing store"))
    store_s = time.perf_counter() - t
    verb = f"wrote {written} models" if written else "checked"
    print(f"store     {store}: {len(models)} models, {mib(total)} ({verb} in {store_s:.1f} s)")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = results_dir / "server.log"
    t = time.perf_counter()
    server = start_server(store, port, device_budget, host_budget, args.max_concurrent_loads, log)
    try:
        print(
            f"server    python -m modelcache_kserve on {base}: device budget {mib(device_budget)}"
            f" ({device_budget / total:.0%} of the store), host budget {mib(host_budget)};"
            f" log {log}"
        )
        # While the server starts: the request stream and its answers, from the files directly.
        stream = request_stream([s.model_id for s in models], args.requests, args.zipf, args.seed)
        inputs = input_pool(args.seed)
        by_id = {s.model_id: s for s in models}
        wanted: dict[str, set[int]] = {}
        for model_id, k in stream:
            wanted.setdefault(model_id, set()).add(k)
        expected = reference_outputs(store, wanted, by_id, inputs)
        asyncio.run(wait_ready(base, server, args.ready_timeout))
        print(f"ready     in {time.perf_counter() - t:.1f} s (references computed meanwhile)")
        arch = {s.model_id: s.arch for s in models}
        t = time.perf_counter()
        results, missing, metrics_text = asyncio.run(
            drive(base, stream, arch, inputs, expected, args.concurrency)
        )
        stream_s = time.perf_counter() - t
    except BaseException:
        stop_server(server)
        print(f"--- the server's log ({log}), last lines:", file=sys.stderr)
        print("\n".join(log.read_text(errors="replace").splitlines()[-30:]), file=sys.stderr)
        raise
    stop_server(server)

    failures = [r for r in results if not r.correct]
    for r in failures[:10]:
        print(f"WRONG     {r.model_id} (tier {r.tier}): {r.error}", file=sys.stderr)
    for problem in missing:
        print(f"WRONG     {problem}", file=sys.stderr)
    try:
        lines = summarize(
            results, Metrics(metrics_text), total, len(models), stream_s, args.concurrency
        )
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 1
    hits = sum(r.tier == "device" for r in results)
    png = results_dir / "latency.png"
    plot(
        results,
        png,
        f"{len(results):,} requests over {len(models)} models (Zipf {args.zipf:g}), "
        f"device budget {mib(device_budget)}: {hits / len(results):.0%} hits",
    )
    lines += [
        ("missing id", "3 requests: 404 each" if not missing else f"{len(missing)} NOT 404"),
        ("plot", str(png)),
        ("wall time", f"{time.perf_counter() - began:.1f} s (store {store_s:.1f} s)"),
    ]
    print()
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")
    ok = not failures and not missing
    print("\nOK: every answer matched" if ok else "\nFAILED: see the WRONG lines above")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
