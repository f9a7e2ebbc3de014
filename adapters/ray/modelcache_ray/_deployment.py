"""`CachedModels`: the base class of a Ray Serve deployment whose replicas each own a ModelCache.

Design notes:

- The cache is an async context manager owning a task group, which must be entered and exited
  by one task. Ray calls ``__init__``, the request methods and ``__del__`` from different tasks
  of the replica's loop, so one *owner task* holds ``async with cache`` for the replica's life:
  started in ``__init__`` (Ray runs a deployment's constructor on the replica's event loop),
  asked to exit by ``__del__`` (Ray awaits an async ``__del__`` on shutdown).
- The model id is Ray's multiplexed id (``handle.options(multiplexed_model_id=...)`` or the
  ``serve_multiplexed_model_id`` header): Ray's clients, and its routers, already carry it.
- Errors: a handle caller gets the typed `ModelCacheError` itself (Ray re-raises it as a
  subclass of its type); an HTTP caller gets its status (404 for an id not in the store).
- ``loading``, the ids this replica has requests waiting on, is owned here (the cache reports
  only a count): a router joins a load in flight instead of starting another elsewhere.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable
from typing import Any, ClassVar

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from modelcache import (
    DeviceOutOfMemoryError,
    InvalidModelIdError,
    ModelCache,
    ModelCacheError,
    ModelFormatError,
    ModelNotFoundError,
    ModelTooLargeError,
)

from ._residency import MAX_IDS, STATS_VERSION, encode_ids

__all__ = ["CachedModels", "http_status"]

#: Bytes the load estimates in the stats are priced at.
_GIB = 1 << 30


def http_status(exc: ModelCacheError) -> int:
    """The HTTP status an error answers with."""
    if isinstance(exc, ModelNotFoundError):
        return 404
    if isinstance(exc, InvalidModelIdError):
        return 400
    if isinstance(exc, DeviceOutOfMemoryError):
        return 503
    if isinstance(exc, (ModelTooLargeError, ModelFormatError)):
        return 422
    return 500


class CachedModels:
    """Subclass it, set ``model_class``, write ``handle``, and decorate with
    ``@serve.deployment``; bind with the cache's arguments::

        @serve.deployment(num_replicas=3, request_router_config=affinity_router_config())
        class Classifier(CachedModels):
            model_class = MyModule          # built as modelcache builds it; None: Weights

            async def handle(self, model, request):
                ...  # request: a starlette Request over HTTP, else what the caller passed

        app = Classifier.bind("s3://bucket/models/{model_id}/", device="cuda", device_budget="40GiB")

    Every replica opens its own `ModelCache(store, **cache_options)` on its event loop and
    closes it on shutdown. A request's model id is Ray's multiplexed model id.
    """

    #: The model class the cache builds models with (``from_weights`` or a torch Module).
    model_class: ClassVar[type | None] = None

    def __init__(self, store: Any, **cache_options: Any) -> None:
        self.cache = ModelCache(store, **cache_options)
        self._model: type | None = None
        if self.model_class is not None:
            # A subclass per replica, bound to this cache: the user's class is left unbound,
            # so several caches in one process (tests, local mode) can each bind it.
            self._model = self.cache.model(type(self.model_class.__name__, (self.model_class,), {}))
        self._waiting: Counter[str] = Counter()
        self._close = asyncio.Event()
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._owner = asyncio.create_task(self._own_cache())

    async def _own_cache(self) -> None:
        try:
            async with self.cache:
                self._opened.set_result(None)
                await self._close.wait()
        except BaseException as exc:
            if not self._opened.done():
                self._opened.set_exception(exc)
            raise

    async def ready(self) -> None:
        """Wait until this replica's cache is open (requests wait for it themselves); raises
        what opening it raised."""
        await self._opened

    def check_health(self) -> None:
        """Ray's health check: a replica whose cache could not open, or closed before Ray shut
        the replica down, is unhealthy (Ray replaces it) rather than failing every request."""
        if self._owner.done() and not self._close.is_set():
            error = self._owner.exception() if not self._owner.cancelled() else None
            raise RuntimeError("this replica's model cache is not open") from error

    async def handle(self, model: Any, request: Any) -> Any:
        """Answer ``request`` with ``model`` (leased for the call). Override it."""
        raise NotImplementedError(f"{type(self).__qualname__} must define handle()")

    async def __call__(self, request: Any) -> Any:
        if not isinstance(request, Request):
            return await self._serve(request)
        try:
            return await self._serve(request)
        except ModelCacheError as exc:
            return JSONResponse(
                {"error": str(exc), "model_id": exc.model_id}, status_code=http_status(exc)
            )

    async def _serve(self, request: Any) -> Any:
        model_id = serve.get_multiplexed_model_id()
        if not model_id:
            raise InvalidModelIdError(
                "no model id: pass handle.options(multiplexed_model_id=...) or the "
                "serve_multiplexed_model_id header"
            )
        await self.ready()
        self._waiting[model_id] += 1
        waiting = True
        try:
            async with self.cache.use(model_id, model=self._model) as model:
                self._unwait(model_id)
                waiting = False
                return await self.handle(model, request)
        finally:
            if waiting:
                self._unwait(model_id)

    def _unwait(self, model_id: str) -> None:
        self._waiting[model_id] -= 1
        if not self._waiting[model_id]:
            del self._waiting[model_id]

    async def record_routing_stats(self) -> dict[str, Any]:
        """What `CacheAffinityRouter` ranks this replica by (Ray polls it): ids on the device,
        in host memory, and loading, as hashes (at most `MAX_IDS` in all); free bytes per tier;
        learned seconds to load 1 GiB from each source; the cache's counters."""
        if not self._opened.done() or self._opened.exception() is not None:
            return {}
        cache = self.cache
        # Snapshots taken on the loop; hashing up to MAX_IDS of them (tenths of a second) is
        # done in a thread, so requests keep being served meanwhile.
        device = cache.resident("device")
        host = cache.resident("host")[: max(0, MAX_IDS - len(device))]
        loading = list(self._waiting)[: max(0, MAX_IDS - len(device) - len(host))]
        stats = cache.stats()
        encoded = await asyncio.to_thread(lambda: [encode_ids(i) for i in (device, host, loading)])
        return {
            "v": STATS_VERSION,
            "device": encoded[0],
            "lower": encoded[1],
            "loading": encoded[2],
            "free": {name: t.budget - t.bytes for name, t in stats.tiers.items()},
            "load_s_per_gib": {
                source: round(cache.load_costs.seconds(source, _GIB), 3)
                for source in ("host", "disk", "store")
            },
            "loads": stats.loads,
            "hits": stats.hits,
            "misses": stats.misses,
            "evictions": stats.evictions,
        }

    def __del__(self) -> Awaitable[None] | None:
        """Close the cache: Ray awaits what this returns when the replica shuts down. A sync
        method returning the awaitable, so that a garbage collection after that (the cache
        closed) creates no coroutine nobody awaits."""
        owner = getattr(self, "_owner", None)
        if owner is None or owner.done():
            return None
        self._close.set()
        return self._wait_closed(owner)

    @staticmethod
    async def _wait_closed(owner: asyncio.Task[None]) -> None:
        await asyncio.gather(owner, return_exceptions=True)
