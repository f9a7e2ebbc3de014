"""What a load costs, learned from the cache's own load timings.

A load's seconds are modelled as ``latency + nbytes / bandwidth`` per *source* tier - "host"
(a promotion to the device), "disk" (the local disk tier), "store" (the object store). The
latency is a fixed knob per source (set it for your store; it covers request set-up and header
reads, which are hard to tell apart from bandwidth on a few samples); the bandwidth is learned:
each observed load updates exponentially weighted averages of the bytes moved and of the seconds
spent beyond the latency, and the bandwidth is their ratio. Weighting by bytes means a big load
says more about bandwidth than a tiny one, which is mostly latency. Until a source has been
observed, its default bandwidth holds (a prior worth one ``prior_bytes`` load).

`CostAwarePolicy` turns these estimates into eviction priorities; routers read them through
``cache.estimate_load_seconds(model_id)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["SOURCES", "LoadCosts", "SourceCost"]

#: Where a load reads from, fastest first.
SOURCES = ("host", "disk", "store")

#: Defaults: (bytes per second, latency in seconds). Conservative: a PCIe copy from pinned
#: memory, a local NVMe, a remote object store over one connection.
_DEFAULTS: dict[str, tuple[float, float]] = {
    "host": (10e9, 0.0005),
    "disk": (2e9, 0.002),
    "store": (0.5e9, 0.05),
}


@dataclass(frozen=True, slots=True)
class SourceCost:
    """The current estimate for one source tier."""

    #: Learned bytes per second.
    bandwidth: float
    #: Fixed seconds added to every load from this source.
    latency: float
    #: Loads observed so far.
    samples: int

    def seconds(self, nbytes: int) -> float:
        return self.latency + nbytes / self.bandwidth


class _Estimate:
    __slots__ = ("latency", "samples", "wbytes", "wseconds")

    def __init__(self, bandwidth: float, latency: float, prior_bytes: int) -> None:
        self.latency = latency
        self.wbytes = float(prior_bytes)
        self.wseconds = prior_bytes / bandwidth
        self.samples = 0


class LoadCosts:
    """Per-source bandwidth estimates learned from observed loads (see the module docstring).

    ``defaults`` maps a source to ``(bytes_per_second, latency_seconds)`` and overrides the
    built-in ones; ``alpha`` is the weight of each new observation (0 < alpha <= 1).
    """

    __slots__ = ("_alpha", "_estimates")

    def __init__(
        self,
        defaults: Mapping[str, tuple[float, float]] | None = None,
        *,
        alpha: float = 0.25,
        prior_bytes: int = 64 << 20,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        table = dict(_DEFAULTS)
        table.update(defaults or {})
        self._estimates: dict[str, _Estimate] = {}
        for source, (bandwidth, latency) in table.items():
            if not (bandwidth > 0 and math.isfinite(bandwidth)) or not latency >= 0:
                raise ValueError(f"bad defaults for {source!r}: {(bandwidth, latency)}")
            self._estimates[source] = _Estimate(bandwidth, latency, prior_bytes)
        self._alpha = alpha

    def observe(self, source: str, nbytes: int, seconds: float) -> None:
        """Learn from one load of ``nbytes`` from ``source`` that took ``seconds``."""
        est = self._estimates[source]
        if nbytes <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        # Seconds beyond the fixed latency; never below a tenth of the load (a load faster
        # than its latency knob still says the bandwidth is high, not infinite).
        moving = max(seconds - est.latency, seconds * 0.1, 1e-9)
        a = self._alpha
        est.wbytes += a * (nbytes - est.wbytes)
        est.wseconds += a * (moving - est.wseconds)
        est.samples += 1

    def seconds(self, source: str, nbytes: int) -> float:
        """Estimated seconds to load ``nbytes`` from ``source``."""
        est = self._estimates[source]
        return est.latency + nbytes * est.wseconds / est.wbytes

    def bandwidth(self, source: str) -> float:
        est = self._estimates[source]
        return est.wbytes / est.wseconds

    def snapshot(self) -> dict[str, SourceCost]:
        """The current estimate of every source."""
        return {
            name: SourceCost(est.wbytes / est.wseconds, est.latency, est.samples)
            for name, est in self._estimates.items()
        }
