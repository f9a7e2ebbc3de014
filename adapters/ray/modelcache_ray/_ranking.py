"""Which replicas a request for one model id should try, best first: pure, no Ray.

The ranks, each tried only when every replica of the ranks before it is full (Ray's router
probes queue lengths within a rank and takes the least queued that accepts the request):

1. *holders*: the model is on the device there, or being loaded there (joining a load in
   flight costs less than starting another). A *hot* model (see below) whose holders all have
   it on the device gets one more holder here, balanced with them by queue length: the first
   replica that keeps it in host memory or on disk, else its next home;
2. *warm*: the model is in host memory or on disk there (a copy, not a download);
3. the *next home*: the first replica, in the model's rendezvous order, that is none of the
   above. For a cold model that is its home: every router picks the same one, before any
   stats arrive, so concurrent first requests load it once. For a model whose holders are
   full, it is where one more copy goes, again the same replica for every router, so the copy
   loads once and replication grows one replica at a time; copies that go cold age out by
   each cache's own eviction. A model no replica holds goes to its second home instead when
   its first took more of this router's recent cold loads than the second, by over
   ``balance_margin`` of one replica's fair share (`Placements`): the homes' model sets differ in what they cost (popularity, sizes), and
   the replica home to the most-missed models queued its loads on its one store link (in
   ``benches/ray_routing.py``, 38-40% of the loads each on two replicas, 22% on the third, and
   the slowest 1% of requests their loads there);
4. holders queued at ``spread_queue_len`` or deeper (when set): behind the next home, so a hot
   model spreads before its holders are full; unless the next home is queued as deep as they
   are (then they stay first: a copy there would relieve nobody);
5. every other replica, only once the request has waited ``patience_s``: a home that never
   answers (hung, or dead and not yet removed) delays requests, it does not lose them.

*Hot*: the model's share of the router's recent requests (`TrafficShares`) is more than
``hot_share`` of one replica's fair share (1 / replicas) per holder it has. Rendezvous homes
give each replica the models that hash to it, hot ones included, so the replica that is home
to the hottest models serves far more than its share of requests, whatever its queue (a few
clients never fill it), and its one process bounds the throughput; a hot model's copies split
its requests instead. Only hot models get copies (one per ``hot_share`` of a fair share: 1 in
4 replicas' worth of traffic gets 2 holders at 0.25, not 1 per lukewarm model of a busy
replica): copies cost loads and the bytes of colder models. One copy at a time, and only from
a model already on a device: a cold model's first requests still load it once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from ._residency import Residency, id_hash, rendezvous_order

__all__ = ["Placements", "TrafficShares", "rank_replicas"]

R = TypeVar("R")

#: Above this weight a request's increment is rescaled (every count divided by it): floats keep
#: their precision, and the rescale runs once per ~64 half-lives.
_RESCALE_AT = 2.0**64


class TrafficShares:
    """Each model's share of the recent requests, by model hash: counts that halve every
    ``half_life`` requests, at most ``max_models`` of them.

    Decay by request count, not by time: the same requests give the same shares, whatever the
    clock. Rather than multiplying every count on each request, each request adds a weight
    that grows by 2 ** (1 / half_life) (the same ratios, O(1) a request). When more than
    ``max_models`` models are counted the lower half is dropped (their share reads 0): a model
    with more than 2 / ``max_models`` of the traffic is never among them (the counts sum to the
    total, so fewer than ``max_models`` / 2 can each exceed that), and hot models are far above
    it. Memory stays bounded whatever the ids clients send.

    A share is judged only once ``half_life`` requests have been seen: a burst on a fresh
    router (a cold model's 200 first requests) is not yet the recent traffic.
    """

    __slots__ = ("_counts", "_growth", "_total", "_weight", "half_life", "max_models", "seen")

    def __init__(self, half_life: int = 1000, max_models: int = 1024) -> None:
        if half_life < 1 or max_models < 2:
            raise ValueError(
                f"half_life must be >= 1 and max_models >= 2, got {half_life}, {max_models}"
            )
        self.half_life = half_life
        self.max_models = max_models
        #: Requests observed.
        self.seen = 0
        self._growth = 2.0 ** (1.0 / half_life)
        self._weight = 1.0
        self._total = 0.0
        self._counts: dict[int, float] = {}

    def observe(self, model_hash: int) -> None:
        """Count one request for the model."""
        self.seen += 1
        self._counts[model_hash] = self._counts.get(model_hash, 0.0) + self._weight
        self._total += self._weight
        self._weight *= self._growth
        if self._weight > _RESCALE_AT:
            scale = self._weight
            self._weight = 1.0
            self._total /= scale
            for h in self._counts:
                self._counts[h] /= scale
        if len(self._counts) > self.max_models:
            kept = sorted(self._counts.items(), key=lambda kv: kv[1], reverse=True)
            self._counts = dict(kept[: self.max_models // 2])

    def share(self, model_hash: int) -> float:
        """The model's share of the recent requests, 0 to 1 (0 before ``half_life`` requests
        have been seen, or for a model not counted)."""
        if self.seen < self.half_life or not self._total:
            return 0.0
        return self._counts.get(model_hash, 0.0) / self._total

    def __len__(self) -> int:
        """Models counted."""
        return len(self._counts)


class Placements:
    """Where this router sent the loads of models no replica held (cold placements): each
    replica's share of the recent ones (`TrafficShares` by placement, ``half_life``), and each
    model's last placement for ``ttl_s``.

    The memo keeps a cold model's requests on one replica until its report shows the load
    (the stats arrive once a period): without it, the placement itself shifts the shares and
    the model's next request could pick its other home, a second load. Routers each count
    their own placements: two routers may place one cold model apart within a period (a copy,
    loaded twice, never a wrong answer); a fresh router places every model on its home.
    """

    __slots__ = ("_last", "_prune_at", "_prune_due", "_shares", "margin", "ttl_s")

    def __init__(self, margin: float, half_life: int = 100, ttl_s: float = 5.0) -> None:
        if not margin >= 0 or not ttl_s >= 0:
            raise ValueError(f"margin and ttl_s must be >= 0, got {margin}, {ttl_s}")
        self.margin = margin
        self.ttl_s = ttl_s
        self._shares = TrafficShares(half_life=half_life)
        #: Model hash -> (replica key, when): the fresh ones and those that went stale since
        #: the last pruning, which runs when it reaches ``_prune_at`` (twice what the last one
        #: kept) or ``ttl_s`` after the last one (``_prune_due``): by size alone, a burst of
        #: cold ids (a scan, random ids) was kept whole until as many came again.
        self._last: dict[int, tuple[str, float]] = {}
        self._prune_at = 128
        self._prune_due = -math.inf

    def __len__(self) -> int:
        """Models whose last placement is remembered."""
        return len(self._last)

    def share(self, replica_key: str) -> float:
        """The replica's share of this router's recent cold placements (0 until
        ``half_life`` of them)."""
        return self._shares.share(id_hash(replica_key))

    def choose(self, model_hash: int, homes: Sequence[str], now: float, replicas: int = 2) -> str:
        """The replica (of ``homes``, the model's first free homes in rendezvous order) that
        loads the cold model: its last placement if still fresh and free, else the first home
        unless it took more of the recent placements than the second by over ``margin`` of a
        fair share (1 / ``replicas``, the live replicas): an absolute margin let one replica
        of 16 take 2.6 times its share of the cold loads, of 3 1.1 times."""
        last = self._last.get(model_hash)
        if last is not None and now - last[1] < self.ttl_s and last[0] in homes:
            return last[0]
        pick = homes[0]
        excess = self.share(homes[0]) - self.share(homes[1]) if len(homes) > 1 else 0.0
        if excess > self.margin / max(replicas, 1):
            pick = homes[1]
        self._shares.observe(id_hash(pick))
        if len(self._last) >= self._prune_at or now >= self._prune_due:
            self._last = {h: v for h, v in self._last.items() if now - v[1] < self.ttl_s}
            self._prune_at = max(128, 2 * len(self._last))
            self._prune_due = now + self.ttl_s
        self._last[model_hash] = (pick, now)
        return pick


def holders_wanted(share: float, replicas: int, hot_share: float | None) -> int:
    """How many replicas should hold a model with this share of the recent requests: one per
    ``hot_share`` of a replica's fair share (1 / ``replicas``), at least 1, at most all."""
    if hot_share is None or replicas < 2:
        return 1
    return max(1, min(replicas, math.ceil(share * replicas / hot_share)))


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
    share: float = 0.0,
    hot_share: float | None = None,
    placements: Placements | None = None,
    now: float = 0.0,
) -> list[list[R]]:
    """The ranks for a request for the model whose `id_hash` is ``model_hash`` (see the module
    docstring). ``key`` names a replica (its rendezvous key and its ``residency`` key);
    ``queue_len`` is its last known queue length (None: unknown, taken as not busy);
    ``share`` is the model's share of the recent requests (`TrafficShares.share`), judged
    against ``hot_share`` (None: no replica is added for hotness); ``placements`` chooses
    between a cold model's first two homes at time ``now`` (None: always the first)."""
    by_key = {key(r): r for r in replicas}
    order = [by_key[k] for k in rendezvous_order(model_hash, by_key)]
    empty = Residency()
    holders: list[R] = []
    busy: list[R] = []
    warm: list[R] = []
    others: list[R] = []
    copies = 0
    all_loaded = True
    for r in order:
        res = residency.get(key(r), empty)
        on_device = model_hash in res.device
        if on_device or model_hash in res.loading:
            copies += 1
            all_loaded = all_loaded and on_device
            q = queue_len(r)
            if spread_queue_len is not None and q is not None and q >= spread_queue_len:
                busy.append(r)
            else:
                holders.append(r)
        elif model_hash in res.lower:
            warm.append(r)
        else:
            others.append(r)
    if placements is not None and not copies and not warm and len(others) > 1:
        # Held nowhere: a load wherever it goes; the less loaded of its first two homes.
        pick = placements.choose(model_hash, [key(r) for r in others[:2]], now, len(order))
        if pick != key(others[0]):
            others[0], others[1] = others[1], others[0]
    if busy and not holders and not warm and others:
        # Spreading pays only toward a replica less queued than the busy holders; a spread
        # target as queued as them would add a copy (and a load) and relieve nobody.
        target = queue_len(others[0]) or 0
        if target >= min(queue_len(r) or 0 for r in busy):
            holders, busy = busy, []
    if copies and all_loaded and copies < holders_wanted(share, len(order), hot_share):
        # A hot model: one more holder, the same replica for every router (a warm copy, else
        # the next home); its load is then "loading" in its report, and no further copy is
        # added until that one is on the device.
        extra = (warm or others)[:1]
        holders += extra
        warm = [r for r in warm if r not in extra]
        others = [r for r in others if r not in extra]
    ranks = [holders, warm, others[:1], busy]
    if waited_s >= patience_s:
        ranks.append(others[1:])
    return [rank for rank in ranks if rank]
