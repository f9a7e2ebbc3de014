"""What a cache reports about itself."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ._tiers import TierStats
from ._units import format_bytes

__all__ = ["CacheStats"]


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of a `ModelCache`'s counters and occupancy (``cache.stats()``)."""

    #: ``use()`` calls served by a resident model (no I/O).
    hits: int
    #: ``use()`` calls that started or joined a load.
    misses: int
    #: Loads that finished and made a model resident.
    loads: int
    #: Loads that failed, plus calls answered from the remembered failure of a recent one.
    failures: int
    #: Loads that failed (``failures`` without the answers from the failure memory).
    load_failures: int
    #: Models dropped to make room (or by ``evict``).
    evictions: int
    #: Bytes of the resident models' buffers.
    bytes_resident: int
    #: Bytes resident plus bytes reserved by loads in flight; never above ``bytes_budget``.
    bytes_reserved: int
    bytes_budget: int
    #: Resident models.
    models: int
    #: Loads in flight (reading headers, waiting for bytes, reading weights or building).
    loading: int
    #: Tasks waiting in ``use()`` for a load to finish (or for a model chosen as a victim for a
    #: waiting load to leave the device, before loading it again).
    waiters: int
    #: Leases held (``async with cache.use(...)`` blocks open).
    leased: int
    #: Seconds spent in loads that succeeded, summed.
    load_seconds: float
    #: Per tier ("device", "host"): bytes, budget, entries, hits, misses, promotions, demotions.
    tiers: Mapping[str, TierStats]
    #: Bytes of model buffers held by disk-tier writes in flight (at most ``disk_write_buffer``,
    #: or one model): RAM in use beside the device and host budgets.
    disk_write_bytes: int = 0
    #: Disk-tier writes skipped because ``disk_write_bytes`` was at its bound (the model is
    #: written the next time it is read from the store).
    disk_writes_skipped: int = 0
    #: Bytes of dead CPU model buffers kept faulted in for the next loads (`BufferPool`): with
    #: the buffers in use, at most the device plus host budget; not counted in any tier.
    pool_idle_bytes: int = 0
    #: Tasks of the cache in flight: loads, header reads (``describe``), copies down to host
    #: memory, disk-tier writes; ``await cache.wait_idle()`` returns when it is 0.
    background: int = 0
    #: Checks of a model's version against the store (background, ``refresh``, disk copies).
    revalidations: int = 0
    #: Checks that found another version in the store than the one held.
    versions_changed: int = 0
    #: New versions swapped in for resident models.
    swaps: int = 0
    #: Disk copies served unchecked because the store could not be asked (stale-if-error).
    stale_serves: int = 0

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def __str__(self) -> str:
        return (
            f"{format_bytes(self.bytes_resident)}/{format_bytes(self.bytes_budget)} in "
            f"{self.models} models, {self.loading} loading, {self.leased} leased, "
            f"{self.waiters} waiting; hits={self.hits} misses={self.misses} loads={self.loads} "
            f"failures={self.failures} evictions={self.evictions}"
            + "".join(
                f"; {name} {format_bytes(t.bytes)}/{format_bytes(t.budget)} in {t.entries}"
                for name, t in self.tiers.items()
                if name != "device" and t.budget
            )
        )
