"""The real KServe ModelServer over a modelcache, spoken to over HTTP (V1, V2, repository)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import mc_models
import pytest
import torch
from conftest import (
    BODY_TIMEOUT,
    BUDGET,
    MAX_BODY,
    TINY_BYTES,
    Server,
    expected,
    fresh_id,
    write_model,
)
from safetensors.torch import save_file

ROW = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]]
#: The `new_model` fixture: every test serves models of its own, so any order works.
NewModel = Callable[..., str]


def v2_body(rows: list[list[float]], request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [len(rows), 4],
                "data": [v for row in rows for v in row],
            }
        ]
    }
    if request_id is not None:
        body["id"] = request_id
    return body


async def post(
    session: aiohttp.ClientSession, url: str, **kwargs: Any
) -> tuple[int, dict[str, Any], str | None]:
    async with session.post(url, **kwargs) as response:
        return response.status, await response.json(), response.headers.get("modelcache-tier")


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with session.get(url) as response:
        return response.status, await response.json()


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The server's Prometheus series, ``name{labels}`` -> value."""
    async with session.get(f"{url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    series = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


def counter(series: dict[str, float], name: str) -> float:
    return series[f'modelcache_{name}{{cache="default"}}']


def close(got: list[list[float]], want: torch.Tensor) -> bool:
    return torch.allclose(torch.tensor(got), want, atol=1e-5)


async def test_v1_cold_then_warm(server: Server, new_model: NewModel) -> None:
    """A store model serves over V1 unregistered: the first request loads it, the next hits."""
    model_id = new_model()
    async with aiohttp.ClientSession() as s:
        before = counter(await metrics(s, server.url), "loads_total")
        url = f"{server.url}/v1/models/{model_id}:predict"
        status, body, tier = await post(s, url, json={"instances": ROW})
        assert (status, tier) == (200, "store")
        assert close(body["predictions"], expected(model_id, ROW))
        status, body, tier = await post(s, url, json={"instances": ROW})
        assert (status, tier) == (200, "device")
        assert close(body["predictions"], expected(model_id, ROW))
        assert counter(await metrics(s, server.url), "loads_total") == before + 1


async def test_v2_cold_then_warm_with_request_ids(server: Server, new_model: NewModel) -> None:
    """V2 infer: tensors in and out as output-0, the request id echoed or a new uuid made."""
    model_id = new_model()
    async with aiohttp.ClientSession() as s:
        url = f"{server.url}/v2/models/{model_id}/infer"
        status, body, tier = await post(s, url, json=v2_body(ROW, "req-7"))
        assert (status, tier, body["id"], body["model_name"]) == (200, "store", "req-7", model_id)
        (output,) = body["outputs"]
        assert (output["name"], output["datatype"], output["shape"]) == ("output-0", "FP32", [2, 3])
        assert close(output["data"], expected(model_id, ROW).reshape(-1))
        status, body, tier = await post(s, url, json=v2_body(ROW))
        assert (status, tier) == (200, "device")
        assert uuid.UUID(body["id"])


async def test_unknown_id_is_404_and_checked_once(server: Server) -> None:
    """An id not in the store answers 404 naming it, over V1 and V2; a flood of requests for it
    reads the store once (the cache remembers the failure for failure_ttl)."""
    ghost = fresh_id("ghost")
    async with aiohttp.ClientSession() as s:
        before = await metrics(s, server.url)
        for i in range(30):
            if i % 2:
                status, body, tier = await post(
                    s, f"{server.url}/v2/models/{ghost}/infer", json=v2_body(ROW)
                )
            else:
                status, body, tier = await post(
                    s, f"{server.url}/v1/models/{ghost}:predict", json={"instances": ROW}
                )
            assert (status, tier) == (404, "store")
            assert f"'{ghost}' not found" in body["error"]
        after = await metrics(s, server.url)
        assert counter(after, "load_failures_total") - counter(before, "load_failures_total") == 1
        assert counter(after, "fast_failures_total") - counter(before, "fast_failures_total") == 29


async def test_invalid_id_is_400(server: Server) -> None:
    """An id that could escape the store root is refused with 400 before any I/O."""
    async with aiohttp.ClientSession() as s:
        status, body, _ = await post(
            s, f"{server.url}/v1/models/..:predict", json={"instances": ROW}
        )
        assert status == 400
        assert "invalid model id" in body["error"]


@pytest.mark.parametrize(
    ("kind", "status", "cause"),
    [
        ("corrupt", 500, "safetensors"),
        ("badconfig", 500, "bogus"),
        ("huge", 507, "budget"),
    ],
)
async def test_failed_loads_name_their_cause(
    server: Server, new_model: NewModel, kind: str, status: int, cause: str
) -> None:
    """A model that cannot load answers an error naming the model and the cause (507 when it
    is larger than the whole device budget); the server goes on serving others."""
    model_id, other = new_model(kind, kind=kind), new_model()
    async with aiohttp.ClientSession() as s:
        for _ in range(2):  # the load, then the remembered failure
            got, body, tier = await post(
                s, f"{server.url}/v1/models/{model_id}:predict", json={"instances": ROW}
            )
            assert (got, tier) == (status, "store")
            assert model_id in body["error"], body
            assert cause in body["error"].lower(), body
        got, _, _ = await post(
            s, f"{server.url}/v1/models/{other}:predict", json={"instances": ROW}
        )
        assert got == 200


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/models/{}:predict", b"not json"),
        ("/v1/models/{}:predict", b'{"instancez": [[1, 2, 3, 4]]}'),
        ("/v1/models/{}:predict", b'{"instances": [[1, 2], [3]]}'),
        ("/v1/models/{}:predict", b'{"instances": [["a", "b", "c", "d"]]}'),
        ("/v2/models/{}/infer", b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], '
         b'"data": [1, 2, 3]}]}'),
        ("/v2/models/{}/infer", b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], '
         b'"data": ["a"]}]}'),
        ("/v2/models/{}/infer", b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], '
         b'"data": [1, 2, 3, 4]}, {"name": "y", "datatype": "FP32", "shape": [1], "data": [1]}]}'),
    ],
)  # fmt: skip
async def test_bad_payloads_are_400(
    server: Server, new_model: NewModel, path: str, payload: bytes
) -> None:
    """A payload that does not decode into the model's input answers 400 (422 is FastAPI's for a
    V2 body that breaks the protocol's schema), and the model keeps serving."""
    model_id = new_model()
    async with aiohttp.ClientSession() as s:
        headers = {"content-type": "application/json"}
        url = f"{server.url}{path.format(model_id)}"
        async with s.post(url, data=payload, headers=headers) as response:
            assert response.status in (400, 422), await response.text()
            assert (await response.json()).get("error") or response.status == 422
        status, _, _ = await post(
            s, f"{server.url}/v1/models/{model_id}:predict", json={"instances": ROW}
        )
        assert status == 200


async def test_repository_load_unload_and_readiness(server: Server, new_model: NewModel) -> None:
    """/load brings a model onto the device, /unload demotes it to host memory, and the
    readiness endpoints say so; unknown ids answer 404 to all three."""
    model_id, nobody = new_model(), fresh_id("nobody")
    async with aiohttp.ClientSession() as s:
        ready = f"{server.url}/v2/models/{model_id}/ready"
        status, body = await get(s, ready)
        assert status == 503
        assert "tier: store" in body["error"]
        status, body, _ = await post(s, f"{server.url}/v2/repository/models/{model_id}/load")
        assert (status, body) == (200, {"name": model_id, "load": True})
        assert await get(s, ready) == (200, {"name": model_id, "ready": True})
        assert await get(s, f"{server.url}/v1/models/{model_id}") == (
            200,
            {"name": model_id, "ready": True},
        )
        status, body = await get(s, f"{server.url}/v2/models")
        assert status == 200
        assert model_id in body["models"]
        status, _, tier = await post(
            s, f"{server.url}/v1/models/{model_id}:predict", json={"instances": ROW}
        )
        assert (status, tier) == (200, "device")

        status, body, _ = await post(s, f"{server.url}/v2/repository/models/{model_id}/unload")
        assert (status, body) == (200, {"name": model_id, "unload": True})
        status, body = await get(s, ready)
        assert status == 503
        assert "tier: host" in body["error"]
        status, _, tier = await post(
            s, f"{server.url}/v1/models/{model_id}:predict", json={"instances": ROW}
        )
        assert (status, tier) == (200, "host")

        for url in (
            f"/v2/repository/models/{nobody}/load",
            f"/v2/repository/models/{nobody}/unload",
        ):
            status, body, _ = await post(s, f"{server.url}{url}")
            assert status == 404
            assert f"'{nobody}' not found" in body["error"]
        for url in (f"/v2/models/{nobody}/ready", f"/v1/models/{nobody}", f"/v2/models/{nobody}"):
            status, body = await get(s, f"{server.url}{url}")
            assert status == 404
            assert f"'{nobody}' not found" in body["error"]


async def test_concurrent_cold_requests_share_loads(server: Server, new_model: NewModel) -> None:
    """200 concurrent requests over 20 cold models: all answer correctly, exactly 20 loads."""
    ids = [new_model(f"cold{i}") for i in range(20)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        before = counter(await metrics(s, server.url), "loads_total")

        async def one(model_id: str) -> None:
            status, body, _ = await post(
                s, f"{server.url}/v1/models/{model_id}:predict", json={"instances": ROW}
            )
            assert status == 200, body
            assert close(body["predictions"], expected(model_id, ROW))

        await asyncio.gather(*(one(ids[i % 20]) for i in range(200)))
        after = await metrics(s, server.url)
        assert counter(after, "loads_total") - before == 20
        assert after['modelcache_reserved_bytes{cache="default",tier="device"}'] <= BUDGET


async def test_device_budget_is_respected(server: Server, new_model: NewModel) -> None:
    """Serving twice the device budget's worth of models evicts (to host memory) and never
    holds more bytes than the budget."""
    ids = [new_model(f"wide{i}") for i in range(2 * BUDGET // TINY_BYTES)]
    async with aiohttp.ClientSession() as s:
        before = await metrics(s, server.url)
        for model_id in ids:
            status, body, _ = await post(
                s, f"{server.url}/v1/models/{model_id}:predict", json={"instances": ROW}
            )
            assert status == 200
            assert close(body["predictions"], expected(model_id, ROW))
        after = await metrics(s, server.url)
    device = 'cache="default",tier="device"'
    assert after[f"modelcache_reserved_bytes{{{device}}}"] <= BUDGET
    assert after[f"modelcache_budget_bytes{{{device}}}"] == BUDGET
    assert (
        after[f"modelcache_evictions_total{{{device}}}"]
        > before[f"modelcache_evictions_total{{{device}}}"]
    )


async def test_metrics_show_cache_and_request_series(server: Server, new_model: NewModel) -> None:
    """/metrics carries the cache's modelcache_* series beside KServe's request histograms."""
    model_id = new_model()
    async with aiohttp.ClientSession() as s:
        status, _, _ = await post(
            s, f"{server.url}/v1/models/{model_id}:predict", json={"instances": ROW}
        )
        assert status == 200
        series = await metrics(s, server.url)
    names = {re.sub(r"\{.*", "", name) for name in series}
    for name in (
        "modelcache_loads_total",
        "modelcache_hits_total",
        "modelcache_budget_bytes",
        "modelcache_load_seconds_bucket",
        "request_predict_seconds_count",
    ):
        assert name in names, name
    assert series['request_predict_seconds_count{model_name="*"}'] >= 1
    assert not any('model="' in name for name in series)  # per-model series are opt-in


async def test_an_input_the_model_cannot_take_is_422_naming_the_cause(
    server: Server, new_model: NewModel
) -> None:
    """A request whose tensors do not fit the model (a width-2 row to a width-4 model) is the
    client's error: 422 naming the model's own message, over V1 and V2, never 500."""
    shape = new_model("shape")
    async with aiohttp.ClientSession() as s:
        status, body, tier = await post(
            s, f"{server.url}/v1/models/{shape}:predict", json={"instances": [[1.0, 2.0]]}
        )
        assert (status, tier) == (422, "store"), body
        assert f"'{shape}'" in body["error"]
        assert "mat1 and mat2 shapes cannot be multiplied" in body["error"]
        v2 = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
        status, body, tier = await post(s, f"{server.url}/v2/models/{shape}/infer", json=v2)
        assert (status, tier) == (422, "device"), body
        assert "mat1 and mat2" in body["error"]


def _binary_v2(raw: bytes, shape: list[int]) -> tuple[bytes, int]:
    """A V2 binary-extension body: the JSON header, then ``raw``; and the header's length."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": shape,
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    return header + raw, len(header)


@pytest.mark.parametrize(
    ("raw", "length", "cause"),
    [
        (b"\0" * 8, None, "cannot reshape"),  # 8 bytes for a [1, 4] FP32 input
        (b"\0" * 16, "abc", "invalid literal"),  # Inference-Header-Content-Length: abc
    ],
)
async def test_malformed_binary_requests_are_400_and_keep_the_connection(
    server: Server, new_model: NewModel, raw: bytes, length: str | None, cause: str
) -> None:
    """A malformed V2 binary-extension body is the client's: 400 with the reason and the tier
    header, and the keep-alive connection serves the next request (same client port)."""
    model_id = new_model("bin")
    body, header_length = _binary_v2(raw, [1, 4])
    headers = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": length or str(header_length),
    }
    ok, ok_length = _binary_v2(torch.tensor(ROW[:1]).numpy().tobytes(), [1, 4])
    ok_headers = {**headers, "inference-header-content-length": str(ok_length)}
    url = f"{server.url}/v2/models/{model_id}/infer"
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as client:
        first = await client.post(url, content=ok, headers=ok_headers)
        assert first.status_code == 200, first.text
        port = first.extensions["network_stream"].get_extra_info("client_addr")[1]
        bad = await client.post(url, content=body, headers=headers)
        assert bad.status_code == 400, bad.text
        assert cause in bad.json()["error"]
        assert bad.headers["modelcache-tier"] == "device"
        assert bad.headers.get("connection") != "close"
        again = await client.post(url, content=ok, headers=ok_headers)
        assert again.status_code == 200, again.text
        assert again.extensions["network_stream"].get_extra_info("client_addr")[1] == port


async def test_kserve_decode_errors_are_400_with_the_tier_header(
    server: Server, new_model: NewModel
) -> None:
    """What KServe's binary-extension decoder raises besides ValueError - InferenceError for a
    negative dimension, struct.error for a BYTES length past the end - is the client's
    malformed request: 400 with the tier header, not KServe's bare 500."""
    model_id = new_model("dec")
    negative, negative_length = _binary_v2(b"\0" * 16, [-1, 4])
    header = json.dumps(
        {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1],
                     "parameters": {"binary_data_size": 8}}]}
    ).encode()  # fmt: skip
    past_end = header + (10**9).to_bytes(4, "little") + b"abcd"
    url = f"{server.url}/v2/models/{model_id}/infer"
    async with aiohttp.ClientSession() as s:
        for body, length in ((negative, negative_length), (past_end, len(header))):
            headers = {
                "content-type": "application/octet-stream",
                "inference-header-content-length": str(length),
            }
            status, answer, tier = await post(s, url, data=body, headers=headers)
            assert (status, tier) == (400, "store"), answer
            assert answer["error"].startswith("malformed request"), answer


async def test_every_error_on_a_model_route_carries_the_tier_header(
    server: Server, new_model: NewModel
) -> None:
    """Errors answered by FastAPI or KServe themselves (a V2 body that breaks the schema, a
    verb the server does not serve) carry modelcache-tier like the adapter's own."""
    hdr = new_model("hdr")
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{server.url}/v2/models/{hdr}/infer", json={"inputs": 3}) as r:
            assert (r.status, r.headers.get("modelcache-tier")) == (422, "store")
            assert "schema" in (await r.json())["error"]
        async with s.post(f"{server.url}/v1/models/{hdr}:explain", json={"instances": ROW}) as r:
            assert (r.status, r.headers.get("modelcache-tier")) == (501, "store")
        hdr1 = new_model("hdr")
        async with s.get(f"{server.url}/v2/models/{hdr1}/versions/7") as r:  # loads it: 404
            assert (r.status, r.headers.get("modelcache-tier")) == (404, "device")
        # FastAPI's own HTTPException: a body its JSON parser refuses (a 5,000-digit number).
        body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [%s]}]}'
        headers = {"content-type": "application/json"}
        data = body % (b"9" * 5000)
        async with s.post(f"{server.url}/v2/models/{hdr}/infer", data=data, headers=headers) as r:
            assert (r.status, r.headers.get("modelcache-tier")) == (400, "store")
            assert "error" in await r.json()
        async with s.put(f"{server.url}/v2/models/{hdr}/infer", json={}) as r:
            assert r.status == 405
            assert "error" in await r.json()  # {"error": ...}, as every error body


async def test_a_body_over_the_size_limit_is_413(server: Server, new_model: NewModel) -> None:
    """A body larger than --max-request-size answers 413 with the tier header, whether its
    Content-Length says so or it streams in chunks, over V1 and V2; the server goes on."""
    big = b"[" + b"1.0," * (MAX_BODY // 4) + b"1.0]"  # the size of a body, not a valid one
    too_big, other = fresh_id("big"), new_model()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 1 << 16):
            yield big[i : i + (1 << 16)]

    async with aiohttp.ClientSession() as s:
        for path in (f"/v1/models/{too_big}:predict", f"/v2/models/{too_big}/infer"):
            for data in (io.BytesIO(big), chunks()):
                headers = {"content-type": "application/json"}
                async with s.post(f"{server.url}{path}", data=data, headers=headers) as r:
                    assert (r.status, r.headers.get("modelcache-tier")) == (413, "store")
                    assert str(MAX_BODY) in (await r.json())["error"]
        status, _, _ = await post(
            s, f"{server.url}/v1/models/{other}:predict", json={"instances": ROW}
        )
        assert status == 200


async def test_a_body_stalled_past_the_body_timeout_is_408_and_frees_the_connection(
    server: Server, new_model: NewModel
) -> None:
    """A client that stops sending mid-body gets 408 with the tier header once --body-timeout
    has passed since the app began reading, and the connection is closed (its body never came):
    a stalled body holds neither memory nor a connection for longer; the server goes on."""
    stalled, other = new_model(), new_model()
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST /v1/models/{stalled}:predict HTTP/1.1\r\nhost: x\r\n".encode()
            + b"content-type: application/json\r\ncontent-length: 100000\r\n\r\n"
            + b'{"instances": [[1.0, '
        )
        await writer.drain()
        loop = asyncio.get_running_loop()
        started = loop.time()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BODY_TIMEOUT + 10)
        waited = loop.time() - started
        assert head.startswith(b"HTTP/1.1 408"), head
        assert b"modelcache-tier: " in head.lower()  # the model's tier (store: never loaded)
        assert BODY_TIMEOUT - 0.5 <= waited < BODY_TIMEOUT + 5, waited
        await asyncio.wait_for(reader.read(), 10)  # the rest of the answer, then EOF
    finally:
        writer.close()
    async with aiohttp.ClientSession() as s:
        status, _, _ = await post(
            s, f"{server.url}/v1/models/{other}:predict", json={"instances": ROW}
        )
        assert status == 200


async def test_readiness_of_a_model_over_the_device_budget_says_507(
    server: Server, new_model: NewModel
) -> None:
    """Readiness of a model that can never fit the device answers what every request for it
    answers: 507 naming the budget, not 503 'the first request loads it'."""
    huge = new_model("huge", kind="huge")
    async with aiohttp.ClientSession() as s:
        for url in (f"/v2/models/{huge}/ready", f"/v1/models/{huge}"):
            async with s.get(f"{server.url}{url}") as r:
                assert (r.status, r.headers.get("modelcache-tier")) == (507, "store")
                assert "budget" in (await r.json())["error"]


async def test_a_model_overwritten_under_a_stream_of_requests_is_swapped_by_load(
    server: Server, store: Path
) -> None:
    """While a model is replaced in the store and /load refreshes it, every answer is the old
    model's or the new one's, from the device (never an error, a wait for a load, or anything
    else); after /load, all are new."""
    swap = fresh_id("swap")
    old = write_model(store, swap)
    torch.manual_seed(1234)
    new = mc_models.Tiny(4, 3).eval()
    with torch.inference_mode():
        x = torch.tensor(ROW, dtype=torch.float32)
        want_old, want_new = old(x), new(x)
    url = f"{server.url}/v1/models/{swap}:predict"
    answers: list[str] = []
    async with aiohttp.ClientSession() as s:
        status, body, _ = await post(s, url, json={"instances": ROW})
        assert status == 200
        assert close(body["predictions"], want_old)
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                status, body, tier = await post(s, url, json={"instances": ROW})
                assert (status, tier) == (200, "device"), body  # never waits for the new load
                got = body["predictions"]
                answers.append(
                    "old" if close(got, want_old) else "new" if close(got, want_new) else "bad"
                )

        async def publish() -> None:
            folder = store / swap
            save_file(new.state_dict(), folder / "model.safetensors.new")
            os.replace(folder / "model.safetensors.new", folder / "model.safetensors")
            status, body, _ = await post(s, f"{server.url}/v2/repository/models/{swap}/load")
            assert (status, body) == (200, {"name": swap, "load": True})
            stop.set()

        await asyncio.gather(client(), client(), publish())
        assert "bad" not in answers
        for _ in range(5):
            status, body, tier = await post(s, url, json={"instances": ROW})
            assert (status, tier) == (200, "device")
            assert close(body["predictions"], want_new)


async def test_v2_versioned_paths_serve_the_held_version_and_refuse_others(
    server: Server, store: Path
) -> None:
    """/v2/models/{id}/versions/{v}/... serves the version the cache holds (as the plain path)
    and answers 404 naming it for any other version (KServe answered 501)."""
    m5 = fresh_id("m")
    write_model(store, m5)
    async with aiohttp.ClientSession() as s:
        status, body = await get(s, f"{server.url}/v2/models/{m5}/versions/nope/ready")
        assert status == 404
        found = re.search(r"it serves version '([0-9a-f]{16})'", body["error"])
        assert found is not None, body
        version = found.group(1)
        base = f"{server.url}/v2/models/{m5}/versions/{version}"
        assert await get(s, f"{base}/ready") == (200, {"name": m5, "ready": True})
        status, body, tier = await post(s, f"{base}/infer", json=v2_body(ROW, "r1"))
        assert (status, tier, body["model_name"]) == (200, "device", m5)
        assert close(body["outputs"][0]["data"], expected(m5, ROW).reshape(-1))
        status, body, _ = await post(s, f"{server.url}/v2/models/{m5}/versions/x/infer", json={})
        assert status == 404
        assert version in body["error"]
