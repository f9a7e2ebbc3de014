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
from modelcache_ray._ranking import Placements, TrafficShares, holders_wanted, rank_replicas
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
HOT_SHARE = 0.25
#: Shares of the recent requests, with 4 replicas and HOT_SHARE: a hot model wants 2 holders
#: (0.1 * 4 / 0.25 = 1.6), a lukewarm one 1 (0.06 * 4 / 0.25 = 0.96).
HOT, LUKEWARM = 0.1, 0.06


def ranks(
    model_id: str,
    residency: dict[str, Residency],
    *,
    queues: dict[str, int] | None = None,
    spread: int | None = None,
    waited_s: float = 0.0,
    share: float = 0.0,
    replicas: list[str] = REPLICAS,
) -> list[list[str]]:
    return rank_replicas(
        id_hash(model_id),
        replicas,
        key=lambda r: r,
        residency=residency,
        queue_len=lambda r: (queues or {}).get(r),
        spread_queue_len=spread,
        waited_s=waited_s,
        patience_s=5.0,
        share=share,
        hot_share=HOT_SHARE,
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


def test_a_hot_model_gets_a_second_holder_without_queueing() -> None:
    """A model with more than hot_share of a replica's fair share of the requests, on the
    device of one idle holder, ranks one more replica beside it (Ray balances the two by queue
    length): its next home, or the replica keeping a lower-tier copy."""
    order = rendezvous_order(id_hash("m"), REPLICAS)
    assert holders_wanted(HOT, len(REPLICAS), HOT_SHARE) == 2
    on_home = {order[0]: Residency(device=on("m"))}
    assert ranks("m", on_home, share=HOT) == [[order[0], order[1]], [order[2]]]
    warm = {**on_home, order[3]: Residency(lower=on("m"))}
    assert ranks("m", warm, share=HOT) == [[order[0], order[3]], [order[1]]]
    # Two copies on the device: that is all it wants, nothing more is added.
    both = {**on_home, order[1]: Residency(device=on("m"))}
    assert ranks("m", both, share=HOT) == [[order[0], order[1]], [order[2]]]
    # Hotter still: a third holder, once the second is on a device.
    assert ranks("m", both, share=0.3) == [[order[0], order[1], order[2]], [order[3]]]


def test_a_lukewarm_model_never_gets_a_second_holder() -> None:
    """Below the hot share a model stays on its one holder however queued it is (short of
    spread_queue_len or full): spreading lukewarm models is what multiplies loads."""
    order = rendezvous_order(id_hash("m"), REPLICAS)
    assert holders_wanted(LUKEWARM, len(REPLICAS), HOT_SHARE) == 1
    on_home = {order[0]: Residency(device=on("m"))}
    for queued in (0, 5, 15):
        queues = {order[0]: queued, order[1]: 0}
        assert ranks("m", on_home, queues=queues, share=LUKEWARM) == [[order[0]], [order[1]]]


def test_a_hot_model_gets_no_copy_while_its_load_is_in_flight() -> None:
    """A hot model that is only loading (or not held at all) ranks no extra holder: the
    requests join the one load, and a cold model's concurrent first requests load it once."""
    order = rendezvous_order(id_hash("m"), REPLICAS)
    assert ranks("m", {}, share=1.0) == [[order[0]]]
    loading = {order[0]: Residency(loading=on("m"))}
    assert ranks("m", loading, share=1.0) == [[order[0]], [order[1]]]
    second = {order[0]: Residency(device=on("m")), order[1]: Residency(loading=on("m"))}
    assert ranks("m", second, share=1.0) == [[order[0], order[1]], [order[2]]]


def test_hot_copies_move_only_the_leaving_replicas_share() -> None:
    """With every hot model on its home's device, removing a replica changes the first rank
    (holder and extra copy) of exactly the models whose first rank held that replica."""
    ids = [f"m{i}" for i in range(500)]
    homes = {m: rendezvous_order(id_hash(m), REPLICAS)[0] for m in ids}
    residency = {r: Residency(device=on(*(m for m in ids if homes[m] == r))) for r in REPLICAS}
    before = {m: set(ranks(m, residency, share=HOT)[0]) for m in ids}
    after = {m: set(ranks(m, residency, share=HOT, replicas=REPLICAS[:-1])[0]) for m in ids}
    assert all(len(first) == 2 for first in before.values())
    moved = {m for m in ids if before[m] != after[m]}
    assert moved == {m for m in ids if "r3" in before[m]}
    assert 150 < len(moved) < 350  # about half: home or next home, 2 in 4


def test_a_cold_model_loads_on_its_second_home_when_its_first_took_more_loads() -> None:
    """A model no replica holds goes to its second home once its first took more than
    balance_margin more of the router's recent cold loads; a fresh router, and one whose
    placements are balanced, put it on its first home (concurrent first requests load once)."""
    order = rendezvous_order(id_hash("m"), REPLICAS)

    def placed(placements: Placements, model_id: str = "m") -> list[list[str]]:
        return rank_replicas(
            id_hash(model_id),
            REPLICAS,
            key=lambda r: r,
            residency={},
            queue_len=lambda r: None,
            placements=placements,
            now=0.0,
        )

    fresh = Placements(margin=0.1, half_life=10)
    assert placed(fresh) == [[order[0]]]
    skewed = Placements(margin=0.1, half_life=10)
    for i in range(10):
        skewed.choose(id_hash(f"x{i}"), [order[0], order[1]], now=0.0)
    assert skewed.share(order[0]) == pytest.approx(1.0)
    assert placed(skewed) == [[order[1]]]
    balanced = Placements(margin=0.1, half_life=10)
    for i in range(10):
        balanced.choose(id_hash(f"x{i}"), [order[i % 2], order[1 - i % 2]], now=0.0)
    assert placed(balanced) == [[order[0]]]
    # Held somewhere (on a device, loading or in a lower tier): ranked as before.
    for held in (Residency(device=on("m")), Residency(loading=on("m")), Residency(lower=on("m"))):
        ranked = rank_replicas(
            id_hash("m"),
            REPLICAS,
            key=lambda r: r,
            residency={order[2]: held},
            queue_len=lambda r: None,
            placements=skewed,
        )
        assert ranked[0] == [order[2]]
        assert ranked[-1] == [order[0]]


def test_a_cold_models_requests_stay_where_it_was_placed_until_ttl() -> None:
    """A cold model's later requests go where its first was placed for ttl_s, however the
    shares move meanwhile (one load, not one per home); after ttl_s it is placed afresh."""
    placements = Placements(margin=0.1, half_life=10, ttl_s=5.0)
    for i in range(10):
        placements.choose(id_hash(f"x{i}"), ["a", "b"], now=0.0)
    assert placements.choose(id_hash("m"), ["a", "b"], now=1.0) == "b"
    for i in range(40):
        placements.choose(id_hash(f"y{i}"), ["b"], now=1.0)  # b the only free home
    assert placements.share("b") > placements.share("a") + 0.1
    assert placements.choose(id_hash("m"), ["a", "b"], now=5.9) == "b"
    assert placements.choose(id_hash("m"), ["a", "b"], now=6.0) == "a"
    # A placement whose replica is no longer free (now a holder, or gone) is not reused.
    assert placements.choose(id_hash("m"), ["b", "c"], now=6.1) == "c"


def test_placements_remember_a_bounded_number_of_models() -> None:
    """The placement memo keeps the fresh placements and at most as many stale ones, however
    many cold models the clients name."""
    placements = Placements(margin=0.1, ttl_s=1.0)
    for i in range(100_000):
        placements.choose(id_hash(f"m{i}"), ["a", "b"], now=i / 100)  # 100 a second
        assert len(placements) <= 256


def test_placements_forget_a_burst_of_cold_models_once_it_is_stale() -> None:
    """A burst of cold ids (a scan, random ids) is forgotten within ttl_s of going stale, at
    the next placement: the memo does not keep it until as many cold ids come again."""
    placements = Placements(margin=0.1, ttl_s=5.0)
    for i in range(10_000):
        placements.choose(id_hash(f"m{i}"), ["a", "b"], now=i / 10_000)  # within one second
    assert len(placements) == 10_000  # all fresh
    for i in range(3):
        placements.choose(id_hash(f"late{i}"), ["a", "b"], now=100.0 + i)
    assert len(placements) <= 3


def test_a_cold_placement_outlives_the_routers_stats_period() -> None:
    """With affinity_router_config's stats period, a cold model's requests follow its
    placement until a report can show its load (two periods and the timeout), not a fixed 5 s
    (a second load on its other home, with a 10 s period)."""
    from modelcache_ray import affinity_router_config
    from modelcache_ray._router import CacheAffinityRouter

    config = affinity_router_config(stats_period_s=10.0, stats_timeout_s=1.0)
    router = CacheAffinityRouter.__new__(CacheAffinityRouter)
    router.initialize_state(**config.request_router_kwargs)
    placements = router._placements
    assert placements is not None
    for i in range(100):  # a half-life of placements: shares are judged from then on
        placements.choose(id_hash(f"x{i}"), ["a", "b"], now=0.0)
    assert placements.choose(id_hash("m"), ["a", "b"], now=0.0) == "b"  # a took every load
    for i in range(400):
        placements.choose(id_hash(f"y{i}"), ["b"], now=1.0)  # now b took more
    assert placements.choose(id_hash("m"), ["a", "b"], now=20.9) == "b"  # no report yet
    assert placements.choose(id_hash("m"), ["a", "b"], now=21.0) == "a"
    default = affinity_router_config().request_router_kwargs
    assert default["placement_ttl_s"] == 5.0  # a 1 s period: as before


def test_traffic_shares_halve_every_half_life() -> None:
    """Counts halve every half_life requests: x's 2,000 requests, then m's 10, then y's 10
    (half_life 10) weigh 1 : 1 : 2 (all of x's, decayed, weigh as much as the half-life after
    them), however often the weights were rescaled on the way (~30 times)."""
    shares = TrafficShares(half_life=10)
    for _ in range(2000):
        shares.observe(id_hash("x"))
    for _ in range(10):
        shares.observe(id_hash("m"))
    for _ in range(10):
        shares.observe(id_hash("y"))
    assert shares.share(id_hash("x")) == pytest.approx(1 / 4, rel=1e-6)
    assert shares.share(id_hash("m")) == pytest.approx(1 / 4, rel=1e-6)
    assert shares.share(id_hash("y")) == pytest.approx(1 / 2, rel=1e-6)
    assert shares.share(id_hash("unseen")) == 0.0


def test_traffic_shares_are_zero_until_half_life_requests_are_seen() -> None:
    """A fresh router judges no share: a burst of one cold model's first requests is not yet
    the recent traffic (it must load once, not spread)."""
    shares = TrafficShares(half_life=100)
    for _ in range(99):
        shares.observe(id_hash("m"))
    assert shares.share(id_hash("m")) == 0.0
    shares.observe(id_hash("m"))
    assert shares.share(id_hash("m")) == pytest.approx(1.0)


def test_traffic_shares_stay_bounded_and_keep_hot_models() -> None:
    """However many distinct ids arrive, at most max_models are counted, and a model with a
    large share is never dropped."""
    shares = TrafficShares(half_life=100, max_models=64)
    hot = id_hash("hot")
    for i in range(20_000):
        shares.observe(id_hash(f"cold-{i}") if i % 4 else hot)
        assert len(shares) <= 64
    assert shares.share(hot) == pytest.approx(0.25, rel=0.02)


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


def test_the_balance_margin_is_a_share_of_a_fair_share() -> None:
    """balance_margin is measured in one replica's fair share of the cold loads (1 / replicas):
    an excess of ~0.12 sends a cold model to its second home among 16 replicas (fair share
    0.0625) but not among 2 (0.5); in absolute shares one replica of 16 took 2.6x its share."""
    placements = Placements(margin=0.3, half_life=10)
    for i in range(20):
        placements.choose(id_hash(f"x{i}"), ["a"] if i % 2 else ["b"], now=0.0)
    placements.choose(id_hash("y"), ["a"], now=0.0)
    excess = placements.share("a") - placements.share("b")
    assert 0.3 / 16 < excess < 0.3 / 2
    assert placements.choose(id_hash("m2"), ["a", "b"], now=0.0, replicas=2) == "a"
    assert placements.choose(id_hash("m16"), ["a", "b"], now=0.0, replicas=16) == "b"
