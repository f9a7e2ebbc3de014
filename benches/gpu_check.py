"""The GPU check in one command: the ``cuda``-marked tests, then ``gpu_load.py --quick``.

Prints both runs' output, then ONE JSON line: the tests' counts and, from the bench, the pinned
H2D ceiling, our host-tier -> device load, safetensors' own CUDA path, the staging overlap
estimate, the CuPy path, and whether the device memory the cache reports matches
``torch.cuda.memory_allocated``. Exits 1 if a test failed or the bench did not finish.

Where torch sees no CUDA device it says so, prints ``{"cuda": false}`` and exits 0.

Run from the repository root with any interpreter that has the project's test dependencies
(``make gpu-check`` does; ``make gpu-check PY=python3`` uses that interpreter as it is):
``python benches/gpu_check.py [--tests-only | --bench-only]``. The repository root is put on
``PYTHONPATH`` for both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: The test files with `cuda`-marked tests (others need services or extras a GPU box may lack).
CUDA_TEST_FILES = (
    "tests/test_cuda.py",
    "tests/test_staging.py",
    "tests/test_backend.py",
    "tests/test_arena.py",
    "tests/test_cache.py",
    "tests/test_failures.py",
)
#: Seconds each part may take before it counts as failed (issue 16: all within 8 minutes).
TESTS_TIMEOUT = 240
BENCH_TIMEOUT = 300


def has_gpu() -> tuple[bool, str]:
    """Whether torch sees a CUDA device (what the checks need; nvidia-smi may be off PATH)."""
    smi = "" if shutil.which("nvidia-smi") else ", nvidia-smi not found"
    try:
        import torch
    except ImportError:
        return False, f"torch is not installed{smi}"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device{smi}"
    return True, torch.cuda.get_device_name(0)


def environment() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def run(command: list[str], timeout: int) -> tuple[int, str, float]:
    """Run ``command`` in the repository root, echoing its output; (status, output, seconds)."""
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
        status, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout
        output = out.decode(errors="replace") if isinstance(out, bytes) else (out or "")
        status, output = 124, output + f"\n(timed out after {timeout} s)"
    print(output, flush=True)
    return status, output, time.perf_counter() - started


def test_counts(output: str) -> dict[str, int]:
    """pytest's closing counts ("3 passed, 1 failed, 2 skipped")."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    counts: dict[str, int] = {}
    if lines:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", lines[-1]):
            counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    return counts


def bench_figures(output: str) -> dict[str, Any]:
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            try:
                figures: dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            return figures
    return {}


def summary(figures: dict[str, Any]) -> dict[str, Any]:
    """The bench's headline figures for the 1 GiB model."""
    keys = {
        "ceiling_gbps": "ceiling_gbps_1gib",
        "host_to_device_gbps": "host_tier_gbps_1gib",
        "host_vs_ceiling": "host_vs_ceiling_ratio_1gib",
        "file_to_device_gbps": "file_gbps_1gib",
        "safetensors_cuda_gbps": "safetensors_cuda_gbps_1gib",
        "host_vs_safetensors_cuda": "host_vs_safetensors_cuda_ratio_1gib",
        "staging_overlap": "staging_overlap_1gib",
        "cupy_file_to_device_gbps": "cupy_file_gbps_1gib",
        "memory_accounting_match": "memory_match",
    }
    return {ours: figures.get(theirs) for ours, theirs in keys.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--tests-only", action="store_true")
    part.add_argument("--bench-only", action="store_true")
    args = parser.parse_args()
    gpu, what = has_gpu()
    if not gpu:
        print(f"gpu-check: no NVIDIA GPU here ({what}): nothing to check")
        print(json.dumps({"cuda": False}))
        return 0
    print(f"gpu-check: {what}", flush=True)
    result: dict[str, Any] = {"cuda": True, "device_name": what}
    ok = True
    if not args.bench_only:
        command = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-rA"]
        status, output, seconds = run([*command, *CUDA_TEST_FILES], TESTS_TIMEOUT)
        counts = test_counts(output)
        result["tests"] = counts
        result["tests_seconds"] = round(seconds, 1)
        ok = ok and status == 0 and counts.get("failed", 0) == 0 and counts.get("passed", 0) > 0
    if not args.tests_only:
        bench = [sys.executable, str(ROOT / "benches" / "gpu_load.py"), "--quick"]
        status, output, seconds = run(bench, BENCH_TIMEOUT)
        figures = bench_figures(output)
        result.update(summary(figures))
        result["bench_seconds"] = round(seconds, 1)
        ok = ok and status == 0 and bool(figures.get("cuda"))
    result["ok"] = ok
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
