"""The public surface: exactly these names, and the runnable example works."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import modelcache

ROOT = Path(__file__).resolve().parent.parent


def test_public_names() -> None:
    """modelcache exports exactly its documented names, each defined."""
    assert sorted(modelcache.__all__) == [
        "CacheClosedError",
        "CacheObserver",
        "CacheStats",
        "CostAwarePolicy",
        "CupyBackend",
        "DeviceBackend",
        "DeviceOutOfMemoryError",
        "EvictionPolicy",
        "FrequencyHistory",
        "InvalidModelIdError",
        "LRUPolicy",
        "LoadCosts",
        "ModelBuildError",
        "ModelCache",
        "ModelCacheError",
        "ModelChangedError",
        "ModelFormatError",
        "ModelInfo",
        "ModelLoadError",
        "ModelNotFoundError",
        "ModelTooLargeError",
        "Store",
        "StoreError",
        "TensorInfo",
        "TierStats",
        "Weights",
        "parse_bytes",
    ]
    for name in modelcache.__all__:
        assert getattr(modelcache, name).__module__.startswith("modelcache")


def test_model_cache_methods() -> None:
    """ModelCache's public methods and properties are exactly the documented ones."""
    assert sorted(n for n in vars(modelcache.ModelCache) if not n.startswith("_")) == [
        "add_observer",
        "describe",
        "device",
        "estimate_load_seconds",
        "evict",
        "is_bound",
        "load_costs",
        "model",
        "prefetch",
        "refresh",
        "remove_observer",
        "resident",
        "stats",
        "store",
        "tier_of",
        "use",
        "version_of",
        "wait_idle",
    ]
    assert "background" in {f.name for f in dataclasses.fields(modelcache.CacheStats)}


def test_importing_modelcache_never_imports_cupy() -> None:
    """import modelcache (and touching CupyBackend, without making one) leaves CuPy unimported."""
    code = (
        "import sys, modelcache; modelcache.CupyBackend; modelcache.DeviceBackend; "
        "assert 'cupy' not in sys.modules, 'cupy imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


def test_every_error_is_a_modelcache_error_and_a_builtin() -> None:
    """Each leaf error subclasses ModelCacheError and the builtin a caller would catch."""
    pairs = {
        modelcache.InvalidModelIdError: ValueError,
        modelcache.ModelNotFoundError: KeyError,
        modelcache.StoreError: OSError,
        modelcache.ModelFormatError: ValueError,
        modelcache.ModelTooLargeError: ValueError,
        modelcache.ModelLoadError: RuntimeError,
        modelcache.ModelBuildError: modelcache.ModelLoadError,
        modelcache.ModelChangedError: modelcache.StoreError,
        modelcache.CacheClosedError: RuntimeError,
        modelcache.DeviceOutOfMemoryError: MemoryError,
    }
    for cls, builtin in pairs.items():
        assert issubclass(cls, modelcache.ModelCacheError)
        assert issubclass(cls, builtin)
    err = modelcache.ModelNotFoundError("model 'x' not found", model_id="x", path="p")
    assert str(err) == "model 'x' not found"
    assert (err.model_id, err.path) == ("x", "p")


def test_parse_bytes() -> None:
    """Sizes parse in decimal and binary units; nonsense is refused."""
    assert modelcache.parse_bytes("2GiB") == 2 << 30
    assert modelcache.parse_bytes("1.5 GB") == 1_500_000_000
    assert modelcache.parse_bytes(4096) == 4096
    for bad in ("lots", "-1", "1 XB", ""):
        try:
            modelcache.parse_bytes(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was accepted")


def test_quickstart_example_runs_and_checks_its_answers(tmp_path: Path) -> None:
    """examples/quickstart.py serves its stream with every answer right (exit 0)."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "quickstart.py"),
            "--store",
            str(tmp_path),
            "--requests",
            "300",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every answer matched" in result.stdout
