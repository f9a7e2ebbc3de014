"""What a replica tells the routers about its cache, in a payload of bounded size.

A replica's `record_routing_stats` answer travels replica -> controller -> every router, once
per period, so it stays small whatever the cache holds: model ids go as 64-bit hashes (8 bytes
each, however long the id), sorted and packed into one ``bytes``, at most `MAX_IDS` of them
(device and loading ids first: they matter most to a router; see `encode_report`). A hash collision can only make a router prefer
a replica that lacks the model: it then loads it, as on a miss; never a wrong answer.

The routers never see a model id in the payload; they hash the request's id the same way.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_IDS",
    "STATS_VERSION",
    "Hashes",
    "Residency",
    "decode_ids",
    "encode_ids",
    "encode_report",
    "id_hash",
    "rendezvous_order",
]

#: Ids reported per replica, all tiers together: 800,000 bytes of hashes at most.
MAX_IDS = 100_000
#: The payload's ``"v"``; a router ignores payloads of another version (mixed upgrades).
STATS_VERSION = 1


#: Longest id the replica's memo of hashes keeps (valid ids have at most 200 characters by
#: default): the memo stays bounded in bytes, not only in entries, whatever ids requests carry.
_MEMO_MAX_CHARS = 256


def id_hash(key: str) -> int:
    """A 64-bit hash of ``key``, the same in every process (Python's ``hash`` is salted).

    Not memoised: a router hashes each request's id as the client sent it (an HTTP header, not
    validated yet, up to the server's header limit), and a memo of those would hold up to its
    size in attacker-chosen strings. A hash costs about a microsecond."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


_memo_hash = functools.lru_cache(maxsize=2 * MAX_IDS)(id_hash)


def _resident_hash(key: str) -> int:
    """`id_hash`, memoised for short ids: a replica hashes the same resident ids every period."""
    return _memo_hash(key) if len(key) <= _MEMO_MAX_CHARS else id_hash(key)


def encode_ids(ids: Iterable[str], limit: int = MAX_IDS) -> bytes:
    """The first ``limit`` ids' hashes, sorted, as little-endian uint64s."""
    out = array("Q", sorted(map(_resident_hash, itertools.islice(ids, limit))))
    if sys.byteorder != "little":
        out.byteswap()
    return out.tobytes()


def encode_report(
    device: Iterable[str],
    loading: Iterable[str],
    lower: Iterable[str],
    limit: int = MAX_IDS,
) -> dict[str, bytes]:
    """The ``device``, ``loading`` and ``lower`` payloads of a report, at most ``limit`` ids in
    all, taken in the order a router ranks them: device and loading ids (its holders) before
    lower-tier ones, so a replica holding many cold copies still reports the loads a router
    should join. An id is reported once, in its best place (a model on the device may keep a
    host or disk copy; loading ids are only those not on the device yet)."""
    seen: set[str] = set()
    out: dict[str, bytes] = {}
    for name, ids in (("device", device), ("loading", loading), ("lower", lower)):
        fresh: list[str] = []
        for model_id in ids:
            if len(seen) >= limit:
                break
            if model_id not in seen:
                seen.add(model_id)
                fresh.append(model_id)
        out[name] = encode_ids(fresh, limit)
    return out


class Hashes(AbstractSet[int]):
    """The sorted hashes of one payload, kept as they arrived (a packed array): decoding a report
    at the cap costs a copy of its bytes, not 100,000 Python ints in a frozenset (tens of
    milliseconds on the router's event loop, for every replica, every period); a lookup is a
    binary search. A payload not sorted (not `encode_ids`') only misroutes, never fails."""

    __slots__ = ("_sorted",)

    def __init__(self, hashes: array[int] | None = None) -> None:
        self._sorted = hashes if hashes is not None else array("Q")

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int):
            return False
        i = bisect.bisect_left(self._sorted, value)
        return i < len(self._sorted) and self._sorted[i] == value

    def __iter__(self) -> Iterator[int]:
        return iter(self._sorted)

    def __len__(self) -> int:
        return len(self._sorted)

    def __repr__(self) -> str:
        return f"Hashes({len(self)} ids)"

    __hash__ = AbstractSet._hash


def decode_ids(blob: bytes) -> AbstractSet[int]:
    """The hashes `encode_ids` packed (an odd-sized blob is a bad payload: empty)."""
    if len(blob) % 8:
        return Hashes()
    hashes = array("Q")
    hashes.frombytes(blob)
    if sys.byteorder != "little":
        hashes.byteswap()
    return Hashes(hashes)


def rendezvous_order(model_hash: int, replica_keys: Iterable[str]) -> list[str]:
    """``replica_keys`` by decreasing rendezvous weight for the model: its home first.

    Every router computes the same order from the same live replicas, with no coordination;
    a replica joining or leaving changes only the models whose first place it takes or held.
    """
    key = model_hash.to_bytes(8, "little")
    return sorted(
        replica_keys,
        key=lambda r: (hashlib.blake2b(key + r.encode(), digest_size=8).digest(), r),
        reverse=True,
    )


@dataclass(frozen=True, slots=True)
class Residency:
    """One replica's report, decoded: hashes of the ids on the device, in host memory or on
    disk ("lower"), and being loaded; free bytes per tier."""

    device: AbstractSet[int] = frozenset()
    lower: AbstractSet[int] = frozenset()
    loading: AbstractSet[int] = frozenset()
    free: Mapping[str, int] | None = None

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any] | None) -> Residency:
        """Decode a replica's routing stats; anything else (no stats yet, another version, a
        replica not serving through a cache) reads as an empty report."""
        if not isinstance(stats, Mapping) or stats.get("v") != STATS_VERSION:
            return EMPTY
        try:
            return cls(
                device=decode_ids(stats["device"]),
                lower=decode_ids(stats["lower"]),
                loading=decode_ids(stats["loading"]),
                free=dict(stats.get("free") or {}),
            )
        except (KeyError, TypeError, ValueError):
            return EMPTY


EMPTY = Residency()
