"""The router's pure parts: the residency payload, rendezvous order and the ranks (no Ray)."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from pathlib import Path
from typing import Any, cast

import fsspec
import pytest
from conftest import TINY_BYTES, write_model
from modelcache_ray import MAX_IDS, CachedModels, Residency, http_status
from modelcache_ray._ranking import rank_replicas
from modelcache_ray._residency import (
    STATS_VERSION,
    decode_ids,
    encode_ids,
    encode_report,
    id_hash,
    rendezvous_order,
)

from modelcache import (
    CacheClosedError,
    DeviceOutOfMemoryError,
    InvalidModelIdError,
    ModelCacheError,
    ModelLoadError,
    ModelNotFoundError,
    StoreError,
)

REPLICAS = ["r0", "r1", "r2", "r3"]


def ranks(
    model_id: str,
    residency: dict[str, Residency],
    *,
    queues: dict[str, int] | None = None,
    spread: int | None = None,
    waited_s: float = 0.0,
) -> list[list[str]]:
    return rank_replicas(
        id_hash(model_id),
        REPLICAS,
        key=lambda r: r,
        residency=residency,
        queue_len=lambda r: (queues or {}).get(r),
        spread_queue_len=spread,
        waited_s=waited_s,
        patience_s=5.0,
    )


def on(*model_ids: str) -> frozenset[int]:
    return frozenset(id_hash(m) for m in model_ids)


def test_payload_round_trips_the_ids_hashes() -> None:
    """decode_ids(encode_ids(ids)) is the set of the ids' hashes."""
    ids = [f"tenant-{i}" for i in range(1000)]
    assert decode_ids(encode_ids(ids)) == on(*ids)


def test_payload_is_capped_at_max_ids() -> None:
    """A replica holding more than MAX_IDS models reports MAX_IDS hashes: 8 bytes each."""
    blob = encode_ids(f"m{i}" for i in range(MAX_IDS + 5000))
    assert len(blob) == 8 * MAX_IDS


def test_payload_cap_keeps_holders_before_lower_tier_ids() -> None:
    """At the cap, device and loading ids are reported before host/disk ones, each id once: a
    replica with many cold copies still tells routers which loads they may join."""
    lower = [f"cold-{i}" for i in range(10)]
    report = encode_report(["d", "x"], ["l", "x"], ["x", *lower], limit=5)
    assert decode_ids(report["device"]) == on("d", "x")
    assert decode_ids(report["loading"]) == on("l")
    assert decode_ids(report["lower"]) == on("cold-0", "cold-1")
    assert sum(len(blob) for blob in report.values()) == 8 * 5


def test_hashing_client_ids_retains_no_bytes() -> None:
    """Hashing long ids (a router hashes each request's id as a client sent it; a replica
    reports ids waiting to be validated) keeps nothing: memory stays bounded in bytes."""
    gc.collect()
    tracemalloc.start()
    try:
        # Each id built, hashed and dropped: 32 MiB of ids in all, none kept by the test.
        for i in range(2000):
            id_hash(f"{i:06d}" + "x" * 8186)
        encode_ids(f"{i:06d}" + "y" * 8186 for i in range(2000))
        gc.collect()
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert retained < 1 << 20


def test_payloads_of_another_version_or_malformed_read_as_empty() -> None:
    """A router ignores reports it cannot read rather than routing by garbage."""
    good = {"v": STATS_VERSION, "device": encode_ids(["a"]), "lower": b"", "loading": b""}
    assert id_hash("a") in Residency.from_stats(good).device
    assert Residency.from_stats({**good, "v": STATS_VERSION + 1}) == Residency()
    assert Residency.from_stats({**good, "device": b"\x00" * 7}).device == frozenset()
    assert Residency.from_stats({"v": STATS_VERSION}) == Residency()
    assert Residency.from_stats(None) == Residency()
    assert Residency.from_stats(cast(Any, [good])) == Residency()  # a user's override's list


def test_decoding_a_report_at_the_cap_allocates_only_its_bytes() -> None:
    """A router decodes each replica's report every period on its event loop: at the cap that
    is one copy of the 800 KB payload (an array searched by bisection), not 100,000 ints in a
    set; lookups answer as a set's would."""
    ids = [f"tenant-{i}" for i in range(MAX_IDS)]
    stats = {"v": STATS_VERSION, "device": b"", "lower": encode_ids(ids), "loading": b""}
    gc.collect()
    tracemalloc.start()
    try:
        report = Residency.from_stats(stats)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 8 * MAX_IDS
    assert len(report.lower) == MAX_IDS
    assert all(id_hash(m) in report.lower for m in ids[:: MAX_IDS // 100])
    assert id_hash("not-there") not in report.lower


def test_rendezvous_moves_only_the_leaving_replicas_share() -> None:
    """Removing a replica rehomes exactly the ids it was home to; every other id stays."""
    ids = [f"m{i}" for i in range(2000)]
    before = {m: rendezvous_order(id_hash(m), REPLICAS)[0] for m in ids}
    after = {m: rendezvous_order(id_hash(m), REPLICAS[:-1])[0] for m in ids}
    moved = {m for m in ids if before[m] != after[m]}
    assert moved == {m for m in ids if before[m] == "r3"}
    assert 300 < len(moved) < 700  # about a quarter: the homes are spread


def test_a_cold_model_goes_only_to_its_home() -> None:
    """With no replica holding it, a request ranks one replica: the rendezvous home."""
    home = rendezvous_order(id_hash("m"), REPLICAS)[0]
    assert ranks("m", {}) == [[home]]


def test_device_holders_come_first_then_warm_then_the_next_home() -> None:
    """Ranks: device or loading holders, then host/disk holders, then one more replica."""
    order = rendezvous_order(id_hash("m"), REPLICAS)
    residency = {
        order[3]: Residency(device=on("m")),
        order[2]: Residency(loading=on("m")),
        order[1]: Residency(lower=on("m")),
    }
    assert ranks("m", residency) == [[order[2], order[3]], [order[1]], [order[0]]]


def test_busy_holders_rank_after_the_spread_target() -> None:
    """Holders queued at spread_queue_len or more rank behind the next home: a hot model
    spreads to one more replica before its holders are full."""
    order = rendezvous_order(id_hash("m"), REPLICAS)
    residency = {order[0]: Residency(device=on("m"))}
    assert ranks("m", residency, queues={order[0]: 3}, spread=4) == [[order[0]], [order[1]]]
    assert ranks("m", residency, queues={order[0]: 4}, spread=4) == [[order[1]], [order[0]]]


def test_no_spreading_to_a_replica_as_busy_as_the_holders() -> None:
    """Busy holders stay first when the next home is queued as deep: a copy there would add a
    load and relieve nobody."""
    order = rendezvous_order(id_hash("m"), REPLICAS)
    residency = {order[0]: Residency(device=on("m"))}
    queues = {order[0]: 5, order[1]: 5}
    assert ranks("m", residency, queues=queues, spread=4) == [[order[0]], [order[1]]]
    queues[order[1]] = 4
    assert ranks("m", residency, queues=queues, spread=4) == [[order[1]], [order[0]]]


def test_the_rest_join_only_after_patience() -> None:
    """A request that has waited patience_s may go to any replica (a hung home loses none)."""
    order = rendezvous_order(id_hash("m"), REPLICAS)
    assert ranks("m", {}, waited_s=4.9) == [[order[0]]]
    assert ranks("m", {}, waited_s=5.0) == [[order[0]], order[1:]]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ModelNotFoundError("no such model", model_id="x"), 404),
        (InvalidModelIdError("bad id"), 400),
        (DeviceOutOfMemoryError("full"), 503),
        (CacheClosedError("the cache is closed"), 503),
        (ModelLoadError("broken"), 500),
    ],
)
def test_errors_answer_their_http_status(error: ModelCacheError, status: int) -> None:
    """An id not in the store is 404 over HTTP, as the issue asks; the rest by kind."""
    assert http_status(error) == status


class Weightless(CachedModels):
    """A deployment class with no model class: its cache hands out Weights."""


async def test_replica_cache_opens_in_its_loop_and_closes_on_shutdown(tmp_path: Path) -> None:
    """The cache a replica owns is open once __init__ has run on the loop, and closed when the
    awaitable Ray's shutdown gets from __del__ finishes; a later __del__ (a garbage collection)
    returns nothing to await."""
    replica = Weightless(f"file://{tmp_path}/{{model_id}}/", device_budget="1MiB")
    await replica.ready()
    await replica.cache.prefetch([])  # raises CacheClosedError unless the cache is open
    replica.check_health()
    closing = replica.__del__()
    assert closing is not None
    await closing
    with pytest.raises(CacheClosedError):
        await replica.cache.prefetch([])
    assert replica.__del__() is None


async def test_a_request_cancelled_while_the_cache_opens_leaves_it_opening(
    tmp_path: Path,
) -> None:
    """A request whose client leaves while the replica's cache is still opening is cancelled
    alone: the cache opens, later requests and the routing stats find it open."""
    replica = Weightless(
        f"file://{tmp_path}/{{model_id}}/",
        device_budget="1MiB",
        disk_dir=tmp_path / "disk",  # opening scans it in a thread: the open suspends
        disk_budget="1MiB",
    )
    first = asyncio.create_task(replica.ready())
    await asyncio.sleep(0)  # the owner starts opening, then the request waits on it
    assert not replica._opened.done()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await replica.ready()
    replica.check_health()
    assert await replica.record_routing_stats() != {}
    closing = replica.__del__()
    assert closing is not None
    await closing


async def test_replica_whose_cache_cannot_open_is_unhealthy(tmp_path: Path) -> None:
    """A cache that fails to open (its disk directory is a file) fails requests with the
    cache's error and Ray's health check, so Ray replaces the replica."""
    (tmp_path / "disk").write_text("not a directory")
    replica = Weightless(
        f"file://{tmp_path}/{{model_id}}/",
        device_budget="1MiB",
        disk_dir=tmp_path / "disk",
        disk_budget="1MiB",
    )
    with pytest.raises(StoreError):
        await replica.ready()
    with pytest.raises(RuntimeError, match="not open"):
        replica.check_health()


async def test_routing_stats_report_disk_tier_ids_as_lower(tmp_path: Path) -> None:
    """A model only on a replica's disk tier is reported as a lower-tier holder: routers send
    its requests there (a local copy) rather than to a replica that would download it."""
    store = fsspec.filesystem("memory")
    for model_id in ("a", "b"):
        write_model(tmp_path, model_id)
        store.put(str(tmp_path / model_id), f"/ray-disk/{model_id}", recursive=True)
    replica = Weightless(
        "memory:///ray-disk/{model_id}/",
        device_budget=TINY_BYTES,
        disk_dir=tmp_path / "disk",
        # Room for both models' entries (~470 B each with manifest and config): with room for
        # one, which is kept depends on whether a's write ended before b's began.
        disk_budget=20 * TINY_BYTES,
    )
    await replica.ready()
    try:
        async with replica.cache.use("a"):
            pass
        async with replica.cache.use("b"):  # evicts a from the device (no host tier)
            pass
        await replica.cache.wait_idle()
        assert replica.cache.tier_of("a") == "disk"
        report = Residency.from_stats(await replica.record_routing_stats())
        assert report.device == on("b")
        assert id_hash("a") in report.lower
    finally:
        store.rm("/ray-disk", recursive=True)
        closing = replica.__del__()
        assert closing is not None
        await closing


async def test_routing_stats_report_the_cache_residency(tmp_path: Path) -> None:
    """record_routing_stats reports the ids on the device (as hashes a router decodes), the
    free device bytes and the cache's load count."""
    for model_id in ("a", "b"):
        write_model(tmp_path, model_id)
    replica = Weightless(f"file://{tmp_path}/{{model_id}}/", device_budget=10 * TINY_BYTES)
    await replica.ready()
    assert await replica.record_routing_stats() != {}
    await replica.cache.prefetch(["a", "b"])
    stats = await replica.record_routing_stats()
    report = Residency.from_stats(stats)
    assert report.device == on("a", "b")
    assert report.lower == report.loading == frozenset()
    assert stats["free"]["device"] == 8 * TINY_BYTES
    assert stats["loads"] == 2
    closing = replica.__del__()
    assert closing is not None
    await closing
