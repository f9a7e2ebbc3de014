"""Stores of real safetensors models, and real KServe servers over them in subprocesses.

Each server is ``python -m modelcache_kserve`` (the container command) bound to 127.0.0.1 on a
port the kernel picks, in its own process: kserve's FastAPI app is a module global (one server per
process) and kserve parses ``sys.argv`` at import. A server is ready when it prints its ready line.

`StallingStore` is an http store whose reads stall, for the ids that start with ``stall-``, until
it stops: the store an outage or a hung backend looks like.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp import web
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


class StallingStore:
    """``root`` over http on 127.0.0.1, from its own thread and loop (the test's loop stays
    free): a request under an id that starts with ``stall-`` never answers until `stop`, and is
    counted in `stalled` first, so a test can wait until the server under test is stuck. Each
    test asks for ids of its own (``fresh_id("stall")``): whatever a server began for one id
    stays in its cache."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cond = threading.Condition()
        self._stalled = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._gate: asyncio.Event
        self._runner: web.AppRunner
        port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        self.url = f"http://127.0.0.1:{port}"

    async def _start(self) -> int:
        self._gate = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{model_id}/{name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return int(self._runner.addresses[0][1])

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        model_id = request.match_info["model_id"]
        if model_id.startswith("stall-"):
            with self._cond:
                self._stalled += 1
                self._cond.notify_all()
            await self._gate.wait()  # set by stop(): the store never answers before
        path = self.root / model_id / request.match_info["name"]
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    @property
    def stalled(self) -> int:
        """Requests that arrived for a stalled id."""
        with self._cond:
            return self._stalled

    def wait_stalled(self, n: int, timeout: float = 30.0) -> None:
        """Block (a worker thread, not the test's loop) until ``n`` requests have stalled."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._stalled >= n, timeout):
                raise TimeoutError(f"{self._stalled} requests stalled after {timeout} s, not {n}")

    def stop(self) -> None:
        async def stop() -> None:
            self._gate.set()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


@pytest.fixture(scope="session")
def stalling_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StallingStore]:
    store = StallingStore(tmp_path_factory.mktemp("http-store"))
    yield store
    store.stop()


#: The main server's device (and host) budget: 25 Tiny models.
BUDGET = 25 * TINY_BYTES
#: The main server's largest request body.
#: --body-timeout of the main server: a body stalled longer answers 408.
BODY_TIMEOUT = 2.0
MAX_BODY = 1 << 20


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The main server's store: each test writes its own models (`new_model`)."""
    return tmp_path_factory.mktemp("store")


def fresh_id(prefix: str) -> str:
    """A model id of the calling test's own. The tests share one server, whose cache keeps what
    each test loaded (and remembers each failure): a model one test warmed must never be one
    that another, in any order, expects cold."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write_kind(root: Path, model_id: str, kind: str) -> None:
    """Write a model of ``kind`` under ``model_id``: "tiny" (`write_model`), "corrupt" (no
    safetensors header), "badconfig" (a config Tiny refuses) or "huge" (4,040 bytes > BUDGET)."""
    if kind == "corrupt":
        (root / model_id).mkdir()
        (root / model_id / "model.safetensors").write_bytes(b"\xff" * 64)
    elif kind == "huge":
        write_model(root, model_id, width=100, classes=10)
    else:
        write_model(root, model_id)
        if kind == "badconfig":
            (root / model_id / "config.json").write_text(json.dumps({"bogus": 1}))


@pytest.fixture
def new_model(store: Path) -> Callable[..., str]:
    """``new_model(prefix="m", kind="tiny")``: a model written to the main server's store under
    a `fresh_id`; returns the id."""

    def make(prefix: str = "m", kind: str = "tiny") -> str:
        model_id = fresh_id(prefix)
        write_kind(store, model_id, kind)
        return model_id

    return make


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
        env={
            "MODELCACHE_MAX_REQUEST_SIZE": str(MAX_BODY),
            "MODELCACHE_BODY_TIMEOUT": str(BODY_TIMEOUT),
        },
    )  # fmt: skip
    yield srv
    assert srv.stop() == 0, log.read_text()[-4000:]
