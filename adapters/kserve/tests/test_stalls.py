"""A store that stops answering: every wait the server makes on it is bounded, and shutdown
does not wait for it.

The servers here read an http store (`StallingStore`) whose reads for ``stall-*`` ids never
answer. New flags are given as ``MODELCACHE_*`` variables, which a server without them ignores.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import Server, StallingStore, fresh_id, write_model

ROW = [[1.0, 2.0, 3.0, 4.0]]
CHECK_TIMEOUT = 0.5
LOAD_TIMEOUT = 2.0


def _args(store: StallingStore) -> list[str]:
    return [
        "--store", f"{store.url}/{{model_id}}/",
        "--model-class", "mc_models:Tiny",
        "--device-budget", "10KiB",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def stalled_server(
    stalling_store: StallingStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("stall-logs") / "server.log"
    env = {
        "MODELCACHE_CHECK_TIMEOUT": str(CHECK_TIMEOUT),
        "MODELCACHE_LOAD_TIMEOUT": str(LOAD_TIMEOUT),
        "MODELCACHE_GRACE_PERIOD": "10",
    }
    srv = Server(log, _args(stalling_store), env=env)
    yield srv
    srv.stop()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/{}/ready"),
        ("GET", "/v1/models/{}"),
        ("GET", "/v2/models/{}"),
        ("POST", "/v2/repository/models/{}/unload"),
    ],
)
async def test_checks_on_a_stalled_store_answer_503_within_check_timeout(
    stalled_server: Server, stalling_store: StallingStore, method: str, path: str
) -> None:
    """Readiness, metadata, V1 status and /unload answer 503 naming the store after
    --check-timeout when the store does not answer, instead of waiting as long as it stalls."""
    stalled, answering = fresh_id("stall"), fresh_id("h")
    write_model(stalling_store.root, answering)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        started = time.monotonic()
        async with s.request(method, f"{stalled_server.url}{path.format(stalled)}") as r:
            assert (r.status, r.headers.get("modelcache-tier")) == (503, "store")
            assert f"did not answer within {CHECK_TIMEOUT:g} s" in (await r.json())["error"]
        assert time.monotonic() - started < 10 * CHECK_TIMEOUT
        async with s.get(f"{stalled_server.url}/v2/models/{answering}/ready") as r:  # answers
            assert r.status == 503
            assert "tier: store" in (await r.json())["error"]


async def test_load_on_a_stalled_store_answers_503_within_load_timeout(
    stalled_server: Server,
) -> None:
    """POST /load waits at most --load-timeout for the model (then 503; the load goes on), as
    a request does."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        started = time.monotonic()
        url = f"{stalled_server.url}/v2/repository/models/{fresh_id('stall')}/load"
        async with s.post(url) as r:
            assert (r.status, r.headers.get("modelcache-tier")) == (503, "store")
            assert f"not ready within {LOAD_TIMEOUT:g} s" in (await r.json())["error"]
        assert time.monotonic() - started < 5 * LOAD_TIMEOUT


def test_sigterm_answers_requests_waiting_on_a_stuck_load_503_at_once(
    stalling_store: StallingStore, tmp_path: Path
) -> None:
    """On SIGTERM a request waiting for a load the store holds up answers 503 'shutting down'
    at once (not after the grace period, not 500), and the server exits cleanly."""
    env = {"MODELCACHE_LOAD_TIMEOUT": "0", "MODELCACHE_GRACE_PERIOD": "20"}
    stalled_id = fresh_id("stall")
    srv = Server(tmp_path / "server.log", _args(stalling_store), env=env)
    try:

        async def scenario() -> tuple[int, str, str | None, float]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
                stalled = stalling_store.stalled
                request = asyncio.ensure_future(
                    s.post(f"{srv.url}/v1/models/{stalled_id}:predict", json={"instances": ROW})
                )
                # The server is stuck on the store: its read has arrived and waits.
                await asyncio.to_thread(stalling_store.wait_stalled, stalled + 1)
                srv.process.send_signal(signal.SIGTERM)
                started = time.monotonic()
                async with await request as r:
                    body = await r.json()
                    return (
                        r.status,
                        body["error"],
                        r.headers.get("modelcache-tier"),
                        (time.monotonic() - started),
                    )

        status, error, tier, seconds = asyncio.run(scenario())
        assert (status, tier) == (503, "store"), error
        assert "shutting down" in error
        assert seconds < 5, seconds  # the grace period is 20 s
        assert srv.process.wait(timeout=20) == 0, srv.log.read_text()[-4000:]
    finally:
        srv.stop()
