"""Stores of real safetensors models, and real KServe servers over them in subprocesses.

Each server is ``python -m modelcache_kserve`` (the container command) bound to 127.0.0.1 on a
port the kernel picks, in its own process: kserve's FastAPI app is a module global (one server per
process) and kserve parses ``sys.argv`` at import. A server is ready when it prints its ready line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mc_models import Tiny
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parents[2] / "examples" / "kserve_predictor"
#: Bytes of one Tiny(4, 3): 12 float32 weights and 3 biases.
TINY_BYTES = 60
START_TIMEOUT = 60.0


def tiny(model_id: str) -> Tiny:
    """The reference model written under ``model_id``: weights seeded by the id."""
    torch.manual_seed(sum(map(ord, model_id)))
    return Tiny(4, 3).eval()


def write_model(root: Path, model_id: str, **config: Any) -> Tiny:
    """Write ``tiny(model_id)`` (or a Tiny of ``config``) as ``root/model_id/``; return it."""
    if config:
        torch.manual_seed(0)
        model = Tiny(**config).eval()
    else:
        model = tiny(model_id)
        config = {"width": 4, "classes": 3}
    folder = root / model_id
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return model


def expected(model_id: str, instances: list[list[float]]) -> torch.Tensor:
    with torch.inference_mode():
        y: torch.Tensor = tiny(model_id)(torch.tensor(instances, dtype=torch.float32))
    return y


class Server:
    """A ``python -m modelcache_kserve`` process; ``url`` once ready."""

    def __init__(
        self, log: Path, args: list[str], *, env: dict[str, str] | None = None, cwd: Path = HERE
    ) -> None:
        self.log = log
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "modelcache_kserve", "--host", "127.0.0.1",
                 "--http-port", "0", *args],
                cwd=cwd, env=full_env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.url = self._wait_ready()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(r"ready on (http://127\.0\.0\.1:\d+)", self.log.read_text())
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.05)  # polling the log for the ready line, with a deadline
        self.stop()
        raise RuntimeError(f"the server did not start:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> int:
        """SIGTERM, as Kubernetes stops a pod; the exit status (0: it shut down cleanly)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


#: The main server's device (and host) budget: 25 Tiny models.
BUDGET = 25 * TINY_BYTES


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    for model_id in ["m0", "m1", "m2", "m3", "m4"]:
        write_model(root, model_id)
    (root / "corrupt").mkdir()
    (root / "corrupt" / "model.safetensors").write_bytes(b"\xff" * 64)
    write_model(root, "badconfig")
    (root / "badconfig" / "config.json").write_text(json.dumps({"bogus": 1}))
    write_model(root, "huge", width=100, classes=10)  # 4,040 bytes > BUDGET
    return root


@pytest.fixture(scope="session")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The main server: every model of ``store`` (Tiny), 25 models' bytes on the device."""
    log = tmp_path_factory.mktemp("logs") / "server.log"
    srv = Server(
        log,
        [
            "--store", f"file://{store}/{{model_id}}/",
            "--model-class", "mc_models:Tiny",
            "--device-budget", str(BUDGET),
            "--host-budget", str(BUDGET),
            "--max-concurrent-loads", "4",
        ],
    )  # fmt: skip
    yield srv
    assert srv.stop() == 0, log.read_text()[-4000:]
