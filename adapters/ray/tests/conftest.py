"""One local Ray cluster for the whole session, and stores of real safetensors models.

Ray starts once (~10 s on 2 cores), in a temporary directory of its own, with no dashboard and
no auth tokens, sized for a small machine (the replicas ask for 0.1 CPU each). Each test deploys
its own application and deletes it after.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mc_models import Tiny
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parents[2] / "examples" / "ray_serve"
#: The replicas and the HTTP proxy import the tests' deployments (mc_models), the example's, and
#: this checkout's modelcache and modelcache_ray: an editable install elsewhere (the main
#: checkout's, run from a worktree) would give them other code than the test's own router.
PYTHONPATH = os.pathsep.join([str(HERE), str(EXAMPLE), str(HERE.parent), str(HERE.parents[2])])
#: Bytes of one Tiny(4, 3): 12 float32 weights and 3 biases.
TINY_BYTES = 60


def tiny(model_id: str) -> Tiny:
    """The reference model written under ``model_id``: weights seeded by the id."""
    torch.manual_seed(sum(map(ord, model_id)))
    return Tiny(4, 3).eval()


def write_model(root: Path, model_id: str) -> None:
    """Write ``tiny(model_id)`` as ``root/model_id/``."""
    folder = root / model_id
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tiny(model_id).state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"width": 4, "classes": 3}))


def expected(model_id: str, instances: list[list[float]]) -> list[list[float]]:
    with torch.inference_mode():
        out: list[list[float]] = tiny(model_id)(torch.tensor(instances)).tolist()
    return out


def store_of(root: Path) -> str:
    return f"file://{root}/{{model_id}}/"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[int]:
    """A local Ray cluster with Serve's HTTP proxy on 127.0.0.1; yields the proxy's port."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray
    from ray import serve

    # Short: Ray's unix sockets live under it, and their paths have a length limit.
    temp = tempfile.mkdtemp(prefix="mcray-", dir="/tmp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH}},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A file store of Tiny models m0..m39."""
    for i in range(40):
        write_model(tmp_path, f"m{i}")
    return tmp_path


@pytest.fixture
def deploy(ray_cluster: int, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``deploy(app) -> handle``: runs an application under this test's name; deleted after."""
    from ray import serve

    name = request.node.name.replace("[", "-").replace("]", "")
    used: list[str] = []

    def run(app: Any) -> Any:
        used.append(name)
        return serve.run(app, name=name, route_prefix=f"/{name}")

    yield run
    for app_name in used:
        serve.delete(app_name)
