"""`CacheAffinityRouter`: Ray Serve's request router, ranking replicas by what their caches hold.

Each handle (the HTTP proxy's, a driver's, another deployment's) runs its own router; they agree
without talking because every one ranks from the same inputs: the replicas' routing stats (from
the controller) and the rendezvous order of the live replicas. See `_ranking` for the ranks.
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from ._ranking import Placements, TrafficShares, rank_replicas
from ._residency import Residency, id_hash

__all__ = ["CacheAffinityRouter", "affinity_router_config"]


# Not FIFOMixin: it hands a replica chosen for one request to the oldest pending request when
# no pending request has the same metadata, i.e. a replica picked for model x to a request for
# model y. The base class gives each chosen replica to the request it was chosen for.
class CacheAffinityRouter(RequestRouter):
    """Send each model id to a replica whose cache holds it; a cold id to its rendezvous home.

    Options (``request_router_kwargs``): ``hot_share`` (a model gets one more holder, its
    requests balanced across them by queue length, per ``hot_share`` of one replica's fair
    share of the recent requests it takes; default 0.25; None: never for hotness alone),
    ``share_half_life`` (requests over which a model's share halves; default 1,000),
    ``balance_margin`` (a model no replica holds loads on its second home when its first took
    more of the router's recent cold loads than the second, by over this much of one
    replica's fair share; default 0.3, 0.1 of the loads with 3 replicas; None: always its
    first home), ``placement_ttl_s`` (how long a cold model's requests follow its
    placement: until its replica's report can show the load; default 5; `affinity_router_config`
    sets it from the stats period),
    ``spread_queue_len`` (a model's holders queued this deep spread it to one more replica
    before they are full; default: only when full, at ``max_ongoing_requests``) and
    ``patience_s`` (a request waiting this long for its model's replicas may go to any
    replica; default 5).
    """

    def initialize_state(
        self,
        spread_queue_len: int | None = None,
        patience_s: float = 5.0,
        hot_share: float | None = 0.25,
        share_half_life: int = 1000,
        balance_margin: float | None = 0.3,
        placement_ttl_s: float = 5.0,
        **_: Any,
    ) -> None:
        if spread_queue_len is not None and spread_queue_len < 1:
            raise ValueError(f"spread_queue_len must be at least 1, got {spread_queue_len}")
        if hot_share is not None and not hot_share > 0:
            raise ValueError(f"hot_share must be > 0 or None, got {hot_share}")
        self._spread_queue_len = spread_queue_len
        self._patience_s = patience_s
        self._hot_share = hot_share
        #: This router's requests by model (each request counted once, on its first ranking):
        #: every router sees its own sample of the traffic, enough to tell which models are hot.
        self._shares = TrafficShares(half_life=share_half_life)
        #: This router's cold loads by replica, and each cold model's last placement.
        self._placements = (
            None if balance_margin is None else Placements(balance_margin, ttl_s=placement_ttl_s)
        )
        #: Decoded reports by replica key, each kept with the stats dict it came from: a
        #: replica's report is decoded once per update, not once per request.
        self._reports: dict[str, tuple[object, Residency]] = {}

    def _residency(self, replica: RunningReplica) -> Residency:
        key: str = replica.replica_id.unique_id
        stats = replica.routing_stats
        known = self._reports.get(key)
        if known is not None and known[0] is stats:
            return known[1]
        report = Residency.from_stats(stats)
        self._reports[key] = (stats, report)
        return report

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is None or not pending_request.metadata.multiplexed_model_id:
            # No model id: the replica answers the typed error; any will do.
            return [candidate_replicas]
        model_id: str = pending_request.metadata.multiplexed_model_id
        model_hash = id_hash(model_id)
        context = pending_request.routing_context
        if not context.should_backoff:
            # The request's first ranking (this router sets the flag below, and a request Ray
            # retries after a rejection keeps its context): counted once, however often ranked.
            self._shares.observe(model_hash)
        # Ranks are retried with Ray's backoff, never in a tight loop.
        context.should_backoff = True
        live = {r.replica_id.unique_id for r in candidate_replicas}
        for gone in self._reports.keys() - live:
            del self._reports[gone]
        residency = {r.replica_id.unique_id: self._residency(r) for r in candidate_replicas}
        cache = self._replica_queue_len_cache
        return rank_replicas(
            model_hash,
            candidate_replicas,
            key=lambda r: r.replica_id.unique_id,
            residency=residency,
            queue_len=lambda r: cache.get(r.replica_id),
            spread_queue_len=self._spread_queue_len,
            waited_s=time.time() - pending_request.created_at,
            patience_s=self._patience_s,
            share=self._shares.share(model_hash),
            hot_share=self._hot_share,
            placements=self._placements,
            now=time.monotonic(),
        )


def affinity_router_config(
    *,
    stats_period_s: float = 1.0,
    stats_timeout_s: float = 1.0,
    spread_queue_len: int | None = None,
    patience_s: float = 5.0,
    hot_share: float | None = 0.25,
    share_half_life: int = 1000,
    balance_margin: float | None = 0.3,
) -> RequestRouterConfig:
    """The ``request_router_config`` of a deployment routed by `CacheAffinityRouter`, its
    replicas reporting their caches every ``stats_period_s`` (the other options: the
    router's)."""
    kwargs: dict[str, Any] = {
        "patience_s": patience_s,
        "hot_share": hot_share,
        "share_half_life": share_half_life,
        "balance_margin": balance_margin,
        "placement_ttl_s": placement_ttl_s(stats_period_s, stats_timeout_s),
    }
    if spread_queue_len is not None:
        kwargs["spread_queue_len"] = spread_queue_len
    # Keyword arguments through a dict: ray's pydantic model confuses mypy's plugin-less view.
    fields: dict[str, Any] = {
        "request_router_class": CacheAffinityRouter,
        "request_router_kwargs": kwargs,
        "request_routing_stats_period_s": stats_period_s,
        "request_routing_stats_timeout_s": stats_timeout_s,
    }
    return RequestRouterConfig(**fields)


def placement_ttl_s(stats_period_s: float, stats_timeout_s: float) -> float:
    """How long a cold model's requests follow its placement (`Placements`): until a report
    showing its load can have reached the router, two stats periods and a timeout (5 s at
    least). A fixed 5 s with a 10 s period let the memo lapse before any report, and the
    model's next request could pick its other home: a second load."""
    return max(5.0, 2 * stats_period_s + stats_timeout_s)
