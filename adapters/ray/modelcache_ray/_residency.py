"""What a replica tells the routers about its cache, in a payload of bounded size.

A replica's `record_routing_stats` answer travels replica -> controller -> every router, once
per period, so it stays small whatever the cache holds: model ids go as 64-bit hashes (8 bytes
each, however long the id), sorted and packed into one ``bytes``, at most `MAX_IDS` of them
(device ids first: they matter most to a router). A hash collision can only make a router prefer
a replica that lacks the model: it then loads it, as on a miss; never a wrong answer.

The routers never see a model id in the payload; they hash the request's id the same way.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import sys
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_IDS",
    "STATS_VERSION",
    "Residency",
    "decode_ids",
    "encode_ids",
    "id_hash",
    "rendezvous_order",
]

#: Ids reported per replica, all tiers together: 800,000 bytes of hashes at most.
MAX_IDS = 100_000
#: The payload's ``"v"``; a router ignores payloads of another version (mixed upgrades).
STATS_VERSION = 1


@functools.lru_cache(maxsize=2 * MAX_IDS)
def id_hash(key: str) -> int:
    """A 64-bit hash of ``key``, the same in every process (Python's ``hash`` is salted).
    Memoised: a replica hashes the same resident ids every period."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def encode_ids(ids: Iterable[str], limit: int = MAX_IDS) -> bytes:
    """The first ``limit`` ids' hashes, sorted, as little-endian uint64s."""
    out = array("Q", sorted(map(id_hash, itertools.islice(ids, limit))))
    if sys.byteorder != "little":
        out.byteswap()
    return out.tobytes()


def decode_ids(blob: bytes) -> frozenset[int]:
    """The hashes `encode_ids` packed (an odd-sized blob is a bad payload: empty)."""
    if len(blob) % 8:
        return frozenset()
    hashes = array("Q")
    hashes.frombytes(blob)
    if sys.byteorder != "little":
        hashes.byteswap()
    return frozenset(hashes)


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

    device: frozenset[int] = frozenset()
    lower: frozenset[int] = frozenset()
    loading: frozenset[int] = frozenset()
    free: Mapping[str, int] | None = None

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any] | None) -> Residency:
        """Decode a replica's routing stats; anything else (no stats yet, another version, a
        replica not serving through a cache) reads as an empty report."""
        if not stats or stats.get("v") != STATS_VERSION:
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
