"""Which replicas a request for one model id should try, best first: pure, no Ray.

The ranks, each tried only when every replica of the ranks before it is full (Ray's router
probes queue lengths within a rank and takes the least queued that accepts the request):

1. *holders*: the model is on the device there, or being loaded there (joining a load in
   flight costs less than starting another);
2. *warm*: the model is in host memory or on disk there (a copy, not a download);
3. the *next home*: the first replica, in the model's rendezvous order, that is neither. For a
   cold model that is its home: every router picks the same one, before any stats arrive, so
   concurrent first requests load it once. For a hot model whose holders are full, it is where
   one more copy goes, again the same replica for every router, so the copy loads once and
   replication grows one replica at a time; copies that go cold age out by each cache's own
   eviction;
4. holders queued at ``spread_queue_len`` or deeper (when set): behind the next home, so a hot
   model spreads before its holders are full; unless the next home is queued as deep as they
   are (then they stay first: a copy there would relieve nobody);
5. every other replica, only once the request has waited ``patience_s``: a home that never
   answers (hung, or dead and not yet removed) delays requests, it does not lose them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from ._residency import Residency, rendezvous_order

__all__ = ["rank_replicas"]

R = TypeVar("R")


def rank_replicas(
    model_hash: int,
    replicas: Sequence[R],
    *,
    key: Callable[[R], str],
    residency: Mapping[str, Residency],
    queue_len: Callable[[R], int | None],
    spread_queue_len: int | None = None,
    waited_s: float = 0.0,
    patience_s: float = 5.0,
) -> list[list[R]]:
    """The ranks for a request for the model whose `id_hash` is ``model_hash`` (see the module
    docstring). ``key`` names a replica (its rendezvous key and its ``residency`` key);
    ``queue_len`` is its last known queue length (None: unknown, taken as not busy)."""
    by_key = {key(r): r for r in replicas}
    order = [by_key[k] for k in rendezvous_order(model_hash, by_key)]
    empty = Residency()
    holders: list[R] = []
    busy: list[R] = []
    warm: list[R] = []
    others: list[R] = []
    for r in order:
        res = residency.get(key(r), empty)
        if model_hash in res.device or model_hash in res.loading:
            q = queue_len(r)
            if spread_queue_len is not None and q is not None and q >= spread_queue_len:
                busy.append(r)
            else:
                holders.append(r)
        elif model_hash in res.lower:
            warm.append(r)
        else:
            others.append(r)
    if busy and not holders and not warm and others:
        # Spreading pays only toward a replica less queued than the busy holders; a spread
        # target as queued as them would add a copy (and a load) and relieve nobody.
        target = queue_len(others[0]) or 0
        if target >= min(queue_len(r) or 0 for r in busy):
            holders, busy = busy, []
    ranks = [holders, warm, others[:1], busy]
    if waited_s >= patience_s:
        ranks.append(others[1:])
    return [rank for rank in ranks if rank]
