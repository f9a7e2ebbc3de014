"""What a load costs, learned from the cache's own load timings.

A load's seconds are modelled as ``latency + nbytes / bandwidth`` per *source* tier - "host"
(a promotion to the device), "disk" (the local disk tier), "store" (the object store). Both are
learned, as the line through the recent loads: each observed load updates exponentially weighted
moments of (bytes, seconds), and the latency and bandwidth are the intercept and the inverse
slope of their least-squares line. The fixed part is learned too because under load it is not
the store's round trip but mostly the wait behind other loads on the same link: in
benches/ray_routing.py (a 5 ms store) the weight transfers the cache times take ~55-65 ms +
6.7 ms/MiB, and the whole loads their callers wait for (header reads, a load slot, room on the
device, the transfer, the build) ~140-160 ms + 6.5 ms/MiB (issue 15). A fixed knob puts what
it misses of that wait on the bytes, prices big models too high against small ones, and makes
the cost-aware policy keep big models at the price of more, and more seconds of, loads. The
knobs (``defaults``) are the prior, two virtual loads on their line (of 0 and 2 x
``prior_bytes``), and they still hold where the recent loads cannot tell a fixed part from a
per-byte one: sizes too alike (coefficient of variation under `_SPREAD`), or a line that would
not slope up from a positive intercept; then the latency is the knob's and the bandwidth the
recent bytes over their seconds beyond it.

`CostAwarePolicy` turns these estimates into eviction priorities (`MissCosts`, the cost of
evicting from each tier, is what a cache binds to its policies); routers read them through
``cache.estimate_load_seconds(model_id)``, with the sizes the cache remembers (`SizeMemory`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["SOURCES", "LoadCosts", "MissCosts", "SizeMemory", "SourceCost"]

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
    #: Fixed seconds added to every load from this source (learned, see the module docstring).
    latency: float
    #: Loads observed so far.
    samples: int

    def seconds(self, nbytes: int) -> float:
        return self.latency + nbytes / self.bandwidth


#: The least coefficient of variation of recent load sizes for which the fitted line is trusted
#: (below it a fixed part and a per-byte part are too hard to tell apart).
_SPREAD = 0.25


class _Estimate:
    """Exponentially weighted moments of (bytes, seconds) of one source's loads, and the line
    they give."""

    __slots__ = ("knob", "mx", "mxx", "mxy", "my", "samples")

    def __init__(self, bandwidth: float, latency: float, prior_bytes: int) -> None:
        self.knob = latency
        # The prior: loads of 0 and 2 * prior_bytes on the default line, equally weighted.
        far = 2.0 * prior_bytes
        self.mx = far / 2
        self.my = latency + far / bandwidth / 2
        self.mxx = far * far / 2
        self.mxy = far * (latency + far / bandwidth) / 2
        self.samples = 0

    def line(self) -> tuple[float, float]:
        """(latency seconds, seconds per byte)."""
        mx, my = self.mx, self.my
        var = self.mxx - mx * mx
        if var >= (_SPREAD * mx) ** 2:
            slope = (self.mxy - mx * my) / var
            latency = my - slope * mx
            if slope > 0 and latency >= 0:
                return latency, slope
        # Fall back on the knob: the bytes' share of the mean seconds, never below a tenth (a
        # load faster than the knob still says the bandwidth is high, not infinite).
        return self.knob, max(my - self.knob, my * 0.1, 1e-12) / mx


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
        a = self._alpha
        x, y = float(nbytes), seconds
        est.mx += a * (x - est.mx)
        est.my += a * (y - est.my)
        est.mxx += a * (x * x - est.mxx)
        est.mxy += a * (x * y - est.mxy)
        est.samples += 1

    def seconds(self, source: str, nbytes: int) -> float:
        """Estimated seconds to load ``nbytes`` from ``source``."""
        latency, per_byte = self._estimates[source].line()
        return latency + nbytes * per_byte

    def bandwidth(self, source: str) -> float:
        return 1.0 / self._estimates[source].line()[1]

    def snapshot(self) -> dict[str, SourceCost]:
        """The current estimate of every source."""
        lines = {name: (est.line(), est.samples) for name, est in self._estimates.items()}
        return {
            name: SourceCost(1.0 / per_byte, latency, samples)
            for name, ((latency, per_byte), samples) in lines.items()
        }


class _Model(Protocol):
    @property
    def model_id(self) -> str: ...

    @property
    def nbytes(self) -> int: ...


class MissCosts:
    """The seconds a miss costs after an eviction from each tier: where the model would be read
    from next, priced by ``costs``. Bound to the tiers' policies (their ``cost``).

    ``host_budget``: a device victim that fits host memory comes back from there;
    ``read_from(model_id)``: "disk" or "store", where it comes back from once out of RAM."""

    __slots__ = ("_costs", "_host_budget", "_read_from")

    def __init__(self, costs: LoadCosts, host_budget: int, read_from: Callable[[str], str]) -> None:
        self._costs = costs
        self._host_budget = host_budget
        self._read_from = read_from

    def device(self, victim: _Model) -> float:
        """Seconds to bring a device victim back: from host memory when it fits there."""
        nbytes = victim.nbytes
        if nbytes <= self._host_budget:
            return self._costs.seconds("host", nbytes)
        return self._costs.seconds(self._read_from(victim.model_id), nbytes)

    def host(self, victim: _Model) -> float:
        """Seconds to bring a host victim back: from the disk tier or the store."""
        return self._costs.seconds(self._read_from(victim.model_id), victim.nbytes)


class SizeMemory:
    """Sizes of the last ``limit`` models read, by id, kept after they leave every tier (for
    ``estimate_load_seconds``)."""

    __slots__ = ("_limit", "_sizes")

    def __init__(self, limit: int = 100_000) -> None:
        self._limit = limit
        self._sizes: OrderedDict[str, int] = OrderedDict()

    def remember(self, model_id: str, nbytes: int) -> None:
        sizes = self._sizes
        sizes[model_id] = nbytes
        sizes.move_to_end(model_id)
        if len(sizes) > self._limit:
            sizes.popitem(last=False)

    def get(self, model_id: str, default: int | None = None) -> int | None:
        return self._sizes.get(model_id, default)
