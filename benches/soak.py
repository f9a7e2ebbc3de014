"""Soak: a steady mixed stream with model churn for a long time; is anything growing?

One ModelCache (CPU device, host and disk tiers) in this process over a real SeaweedFS S3 store
(``weed mini``, from ``tests/servers.py``; memory:// where it is not installed) holds a fraction
of 40 models (benches/chaos.py's linear models: 0.25-2 MiB each and two of 12 MiB). Clients
``use()`` ids drawn from a Zipf law whose ranking rotates every ``--rotate-s`` seconds (the hot set
moves: loads, evictions, demotions, disk writes and disk reads never stop), run the model and check
each answer against the model computed here (and its weights' fingerprint, exactly); a prefetcher
warms the next hot ids into the host tier now and then.

Every ``--sample-s`` seconds: RSS, open file descriptors, threads, asyncio tasks, and the cache's
byte accounting, whose identities must hold at every sample: per tier ``bytes <= bytes_reserved
<= budget``, ``stats().bytes_resident`` = the device tier's bytes, and ``bytes_resident <=
bytes_reserved <= bytes_budget``; at the end, once idle, nothing reserved beyond residency and
nothing leased, loading or waiting, and ``hits + misses`` = the ``use()`` calls made.

Goals, after the warm-up (the first fifth of the run): RSS at most +5% over its value at the end
of the warm-up (the median of the first tenth of the samples after it) at every sample; fds,
threads and asyncio tasks flat (the median of the last tenth of the samples at most 2 above that
of the first tenth: loads and disk writes in flight make single samples jump); no wrong answers;
no broken identity. Writes ``soak.png`` (RSS and fds over time) next to the JSON line
(``--out-dir``, default the current directory).

Run: ``python benches/soak.py [--quick] [--minutes M] [--data-dir DIR] [--out-dir DIR]``
(default 20 minutes; ``--quick``: 1 minute).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch
from _common import (
    REPO_ROOT,
    base_parser,
    data_dir,
    emit_json,
    machine_line,
    print_table,
    rounded,
    seaweedfs,
)
from chaos import MIB, Model, Probe, make_models

from modelcache import ModelCache

RSS_GOAL = 0.05
HOST_BUDGET = 8 * MIB
FLAT_SLACK = 2
ZIPF_S = 1.0


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Sample:
    t: float
    rss: int
    fds: int
    threads: int
    tasks: int
    device: int
    host: int
    disk: int
    broken: list[str]


def identities(cache: ModelCache) -> list[str]:
    """The accounting identities that do not hold now (empty: all hold)."""
    s = cache.stats()
    broken = []
    if not s.bytes_resident <= s.bytes_reserved <= s.bytes_budget:
        broken.append(
            f"resident {s.bytes_resident} reserved {s.bytes_reserved} of {s.bytes_budget}"
        )
    if s.tiers["device"].bytes != s.bytes_resident:
        broken.append(f"device tier {s.tiers['device'].bytes} != resident {s.bytes_resident}")
    for name, t in s.tiers.items():
        if not t.bytes <= t.bytes_reserved <= t.budget:
            broken.append(f"{name}: bytes {t.bytes} reserved {t.bytes_reserved} of {t.budget}")
    return broken


@dataclass
class Soak:
    cache: ModelCache
    models: list[Model]
    rotate_s: float
    uses: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    samples: list[Sample] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def ranking(self) -> np.ndarray[Any, Any]:
        """Model indices, hottest first: rotated by one every rotate_s seconds."""
        shift = int((time.monotonic() - self.started) / self.rotate_s)
        return np.roll(np.arange(len(self.models)), -shift)

    async def client(self, seed: int, end: float) -> None:
        rng = np.random.default_rng(seed)
        ranks = np.arange(1, len(self.models) + 1, dtype=np.float64)
        weights = 1.0 / ranks**ZIPF_S
        weights /= weights.sum()
        while time.monotonic() < end:
            model = self.models[int(self.ranking()[rng.choice(len(self.models), p=weights)])]
            self.uses += 1
            try:
                async with self.cache.use(model.model_id, model=Probe) as probe:
                    row = probe(torch.tensor([model.x]))[0]
                ok = row[-4:].tolist() == model.mark and torch.allclose(
                    row[:-4], model.expected, rtol=1e-4, atol=1e-4
                )
                self.outcomes["ok" if ok else "wrong"] += 1
            except Exception as exc:
                self.outcomes[type(exc).__name__] += 1
            await asyncio.sleep(0.005)

    async def prefetcher(self, end: float) -> None:
        while time.monotonic() < end:
            await asyncio.sleep(self.rotate_s / 2)
            upcoming = [  # a model over the host budget cannot be prefetched there
                m.model_id
                for m in (self.models[int(i)] for i in self.ranking()[1:3])
                if m.nbytes <= HOST_BUDGET
            ]
            try:
                await self.cache.prefetch(upcoming, tier="host")
            except Exception as exc:
                self.outcomes[f"prefetch {type(exc).__name__}"] += 1

    async def sampler(self, end: float, every: float) -> None:
        while True:
            gc.collect()
            s = self.cache.stats()
            self.samples.append(
                Sample(
                    time.monotonic() - self.started,
                    rss_bytes(),
                    fds(),
                    threading.active_count(),
                    len(asyncio.all_tasks()),
                    s.tiers["device"].bytes,
                    s.tiers["host"].bytes,
                    s.tiers["disk"].bytes if "disk" in s.tiers else 0,
                    identities(self.cache),
                )
            )
            if time.monotonic() >= end:
                return
            await asyncio.sleep(every)


async def soak(
    template: str,
    options: dict[str, Any] | None,
    models: list[Model],
    disk_dir: Path,
    seconds: float,
    sample_s: float,
    rotate_s: float,
    clients: int,
) -> tuple[Soak, list[str]]:
    cache = ModelCache(
        template,
        storage_options=options,
        device="cpu",
        device_budget=14 * MIB,
        host_budget=HOST_BUDGET,
        disk_dir=disk_dir,
        disk_budget=24 * MIB,
    )
    async with cache:
        cache.model(Probe)
        run = Soak(cache, models, rotate_s)
        end = run.started + seconds
        await asyncio.gather(
            *(run.client(i, end) for i in range(clients)),
            run.prefetcher(end),
            run.sampler(end, sample_s),
        )
        # No event says "idle" (background demotions, disk writes): poll, as a user would.
        with anyio.move_on_after(30):
            while (s := cache.stats()).loading or s.bytes_reserved != s.bytes_resident:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        s = cache.stats()
        final = identities(cache)
        if s.bytes_reserved != s.bytes_resident:
            final.append(f"idle: reserved {s.bytes_reserved} != resident {s.bytes_resident}")
        if s.loading or s.waiters or s.leased:
            final.append(f"idle: loading {s.loading} waiters {s.waiters} leased {s.leased}")
        if s.hits + s.misses != run.uses:
            final.append(f"hits {s.hits} + misses {s.misses} != uses {run.uses}")
    return run, final


def plot(samples: list[Sample], path: Path, warmup: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t / 60 for s in samples]
    fig, left = plt.subplots(figsize=(8, 4))
    left.plot(t, [s.rss / MIB for s in samples], color="tab:blue", label="RSS (MiB)")
    left.set_xlabel("minutes")
    left.set_ylabel("RSS (MiB)", color="tab:blue")
    left.axvline(warmup / 60, color="grey", linestyle=":", label="end of warm-up")
    right = left.twinx()
    right.plot(t, [s.fds for s in samples], color="tab:orange", label="open fds")
    right.set_ylabel("open file descriptors", color="tab:orange")
    left.set_title("soak: RSS and open fds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "soak")
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--sample-s", type=float, default=None)
    parser.add_argument("--rotate-s", type=float, default=None)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out-dir", default=".")
    args = parser.parse_args()
    quick: bool = args.quick
    seconds = 60 * (args.minutes or (1.0 if quick else 20.0))
    sample_s = args.sample_s or (2.0 if quick else 5.0)
    rotate_s = args.rotate_s or (5.0 if quick else 15.0)
    torch.set_num_threads(1)
    print(f"soak{' (quick)' if quick else ''}: {machine_line()}", flush=True)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    with data_dir(args.data_dir, "modelcache-soak-") as directory:
        root = Path(directory)
        models = make_models(root / "models", 40, 2)
        with seaweedfs(root / "seaweedfs") as weed:
            if weed is not None:
                weed.put_dir(root / "models", "soak")
                template = f"s3://{weed.bucket}/soak/{{model_id}}/"
                options: dict[str, Any] | None = weed.s3_options
                where = f"S3 (SeaweedFS {weed.endpoint})"
            else:
                template = f"file://{root / 'models'}/{{model_id}}/"
                options, where = None, "a local directory (no weed: no disk tier traffic)"
            total = sum(m.nbytes for m in models)
            print(
                f"{len(models)} models, {total / MIB:.0f} MiB from {where}; budgets: device "
                f"14 MiB, host 8 MiB, disk 24 MiB; {args.clients} clients, hot set rotating "
                f"every {rotate_s:.0f} s; {seconds / 60:.1f} min, a sample every {sample_s:.0f} s",
                flush=True,
            )
            run, final = anyio.run(
                soak,
                template,
                options,
                models,
                root / "disk",
                seconds,
                sample_s,
                rotate_s,
                args.clients,
            )
    samples = run.samples
    warmup = seconds / 5
    after = [s for s in samples if s.t >= warmup]
    base = after[: max(1, len(after) // 10)]
    rss_base = float(np.median([s.rss for s in base]))
    rss_max = max(s.rss for s in after)
    growth = rss_max / rss_base - 1

    tail = after[-max(1, len(after) // 10) :]

    def flat(key: str) -> tuple[float, float, int, bool]:
        """(median at the warm-up's end, median at the run's end, maximum, flat?): the ends
        compared, as loads and writes in flight make single samples jump."""
        start = float(np.median([getattr(s, key) for s in base]))
        end = float(np.median([getattr(s, key) for s in tail]))
        peak = max(getattr(s, key) for s in after)
        return start, end, peak, end <= start + FLAT_SLACK

    broken = sorted({b for s in samples for b in s.broken} | set(final))
    rows: list[list[object]] = []
    figures: dict[str, Any] = {}
    for key in ("fds", "threads", "tasks"):
        start, end, peak, ok = flat(key)
        rows.append([key, start, end, peak, "flat" if ok else "GROWS"])
        figures[f"{key}_after_warmup"] = start
        figures[f"{key}_at_end"] = end
        figures[f"{key}_max"] = peak
        figures[f"{key}_flat"] = ok
    rss_end = float(np.median([s.rss for s in tail]))
    rows.insert(
        0,
        [
            "RSS MiB",
            rss_base / MIB,
            rss_end / MIB,
            rss_max / MIB,
            f"max {growth * 100:+.1f}% ({'meets' if growth <= RSS_GOAL else 'misses'} +5%)",
        ],
    )
    print_table(
        "After the warm-up: medians of its first and last tenth of samples, and the maximum",
        ["", "start", "end", "max", ""],
        rows,
    )
    s = run.cache.stats()
    print(
        f"\n{run.uses:,} uses: {dict(run.outcomes)}; loads {s.loads:,}, evictions "
        f"{s.evictions:,}; tiers: "
        + ", ".join(f"{n} hits {t.hits:,}" for n, t in s.tiers.items())
        + f"; identities broken: {broken or 'none'}"
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "soak.png"
    plot(samples, png, warmup)
    print(f"plot: {png}")
    figures.update(
        {
            "minutes": rounded(seconds / 60),
            "uses": run.uses,
            "outcomes": dict(run.outcomes),
            "wrong": run.outcomes["wrong"],
            "loads": s.loads,
            "evictions": s.evictions,
            "rss_mib_after_warmup": rounded(rss_base / MIB),
            "rss_mib_at_end": rounded(rss_end / MIB),
            "rss_mib_max": rounded(rss_max / MIB),
            "rss_growth_pct": rounded(growth * 100),
            "rss_meets_goal": growth <= RSS_GOAL,
            "identities_broken": broken,
            "samples": len(samples),
            "png": str(png),
            "quick": quick,
        }
    )
    print()
    emit_json(figures)


if __name__ == "__main__":
    main()
