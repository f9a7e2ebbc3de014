"""Quick start: serve 40 classifiers from a local store through a cache that holds a few.

Run it with ``make example`` (or ``python examples/quickstart.py [--store DIR]``). It writes a
store of small torch models (once), serves a skewed stream of requests for them from 8
concurrent clients, checks every answer against the model computed directly, and prints the
cache's stats.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import anyio
import torch
from safetensors.torch import save_file

from modelcache import ModelCache

N_MODELS = 40


class Classifier(torch.nn.Module):
    """A small MLP; its width comes from the model's config.json."""

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(32, width), torch.nn.ReLU(), torch.nn.Linear(width, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def reference(model_id: str) -> Classifier:
    """The model as written to the store: deterministic weights from its id."""
    index = int(model_id.removeprefix("clf-"))
    torch.manual_seed(index)
    return Classifier(width=64 * (1 + index % 8)).eval()


def write_store(root: Path) -> None:
    """Write N_MODELS models as <root>/<id>/model.safetensors + config.json."""
    for i in range(N_MODELS):
        model_id = f"clf-{i}"
        folder = root / model_id
        if (folder / "model.safetensors").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        model = reference(model_id)
        save_file(model.state_dict(), folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"width": model.net[0].out_features}))


async def serve(root: Path, requests: int = 2000, clients: int = 8) -> int:
    """Serve a Zipf-like request stream; return the number of wrong answers."""
    cache = ModelCache(f"file://{root}/{{model_id}}/", device="cpu", device_budget="1MiB")
    cache.model(Classifier)
    rng = random.Random(0)
    weights = [1 / (rank + 1) for rank in range(N_MODELS)]
    stream = rng.choices([f"clf-{i}" for i in range(N_MODELS)], weights, k=requests)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    expected = {}
    for model_id in set(stream):
        with torch.no_grad():
            expected[model_id] = reference(model_id)(x)
    wrong = 0

    async def client(worker: int) -> None:
        nonlocal wrong
        for model_id in stream[worker::clients]:
            async with cache.use(model_id) as model:
                with torch.no_grad():
                    y = model(x)
            wrong += not torch.equal(y, expected[model_id])

    started = time.perf_counter()
    async with cache, anyio.create_task_group() as tg:
        for worker in range(clients):
            tg.start_soon(client, worker)
    seconds = time.perf_counter() - started
    stats = cache.stats()
    print(f"{requests} requests over {N_MODELS} models in {seconds:.2f} s")
    print(f"cache: {stats}")
    print(f"hit ratio {stats.hit_ratio:.1%}, {stats.load_seconds:.3f} s spent loading")
    print("every answer matched" if not wrong else f"{wrong} WRONG ANSWERS")
    return wrong


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", type=Path, help="store directory (default: a temporary one)")
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    # Requests here are tiny matmuls: torch's intra-op thread pool only spins against the
    # cache's I/O threads on a small machine (10x slower on 2 cores). One thread per op.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = (args.store or Path(tmp)).resolve()
        write_store(root)
        return 1 if anyio.run(serve, root, args.requests) else 0


if __name__ == "__main__":
    raise SystemExit(main())
