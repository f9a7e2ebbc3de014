"""The many-model demo end to end, reduced: 20 models, 200 requests, through the real adapter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("modelcache_kserve")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

DEMO = Path(__file__).resolve().parent / "demo.py"


@pytest.mark.timeout(180)
def test_demo_small(tmp_path: Path) -> None:
    """The demo writes its store, serves every request correctly, reports and plots; a re-run
    reuses the store."""
    command = [
        sys.executable,
        str(DEMO),
        "--models",
        "20",
        "--requests",
        "200",
        "--store",
        str(tmp_path / "store"),
        "--results",
        str(tmp_path / "results"),
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=170, check=False)
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    assert "wrote 20 models" in out
    assert "all correct" in out
    assert "3 requests: 404 each" in out
    for line in ("hit ratio", "loads", "evictions", "latency hits", "latency misses"):
        assert line in out, out
    assert (tmp_path / "store" / "manifest.json").is_file()
    assert (tmp_path / "results" / "latency.png").stat().st_size > 10_000

    again = subprocess.run(
        [*command, "--requests", "50"], capture_output=True, text=True, timeout=170, check=False
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "(checked in" in again.stdout


def test_store_is_deterministic(tmp_path: Path) -> None:
    """Two stores written from the same seed hold the same bytes; sizes span the range."""
    sys.path.insert(0, str(DEMO.parent))
    try:
        import models
    finally:
        sys.path.remove(str(DEMO.parent))
    specs = models.specs(6)
    for root in (tmp_path / "a", tmp_path / "b"):
        assert models.ensure_store(root, specs, workers=1) == 6
        assert models.ensure_store(root, specs) == 0
    for spec in specs:
        a = (tmp_path / "a" / spec.model_id / "model.safetensors").read_bytes()
        assert a == (tmp_path / "b" / spec.model_id / "model.safetensors").read_bytes()
        assert 1 << 20 <= spec.nbytes <= 40 << 20
    broken = tmp_path / "a" / specs[0].model_id / "model.safetensors"
    broken.write_bytes(b"")
    assert models.ensure_store(tmp_path / "a", specs) == 1
