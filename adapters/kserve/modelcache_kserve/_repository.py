"""KServe's model registry over a `ModelCache`: every id in the store is a model, none registered.

How KServe 0.21 reaches a model, and what each hook does here:

* ``ModelRepository.get_model(name)`` (sync, twice per request) returns a small per-id proxy,
  `CachedModel`, made on first sight and kept in a bounded dict: no I/O, no store check. An id
  that can never name a model raises InvalidModelIdError (HTTP 400). Models registered the
  KServe way (``repository.update(model)``) are found first and served as KServe serves them.
* `CachedModel.__call__` is the whole request: read the tier (for the ``modelcache-tier``
  header), lease the model - a hit costs microseconds, a miss loads it, single-flight - and run
  the model class's hooks inside the lease. A missing id fails its load with ModelNotFoundError
  (HTTP 404), remembered by the cache for ``failure_ttl`` seconds, so a flood of requests for
  one bad id reads the store once per ``failure_ttl``.
* KServe's ``DataPlane`` would ask ``is_model_ready`` on every request and call the *sync*
  ``Model.load()`` when it says no. `CacheDataPlane` skips both on the inference path (the lease
  loads, asynchronously) and keeps the readiness endpoints truthful: ready means resident on the
  device; a servable model that is not answers 503 naming its tier; an unknown id 404.
* ``POST /v2/repository/models/{id}/load`` prefetches to the device; ``.../unload`` evicts (the
  model moves to host memory when it fits). `CacheRepositoryExtension` runs both asynchronously;
  the sync ``ModelRepository.unload`` (KServe calls it at shutdown) only evicts, which never
  blocks.
* Existence checks outside a request (readiness, unload, metadata) read the model's headers, a
  few KiB, and are remembered for ``check_ttl`` seconds, positive or negative.
"""

from __future__ import annotations

import contextlib
import time
from http import HTTPStatus
from typing import Any

import anyio
from kserve.errors import ModelNotFound, ModelNotReady
from kserve.metrics import PREDICT_HIST_TIME
from kserve.model import BaseKServeModel, InferenceModel, InferenceVerb
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.model_repository_extension import ModelRepositoryExtension

from modelcache import ModelCache, ModelCacheError

from ._errors import TIER_HEADER, ModelRequestError
from ._hooks import Hooks

__all__ = ["CacheDataPlane", "CacheModelRepository", "CacheRepositoryExtension", "CachedModel"]

#: Proxies kept at most (each is a few hundred bytes); the oldest go first.
_MAX_PROXIES = 16384
#: The ``model_name`` label of KServe's request histograms unless per-model metrics are on:
#: thousands of ids would otherwise make thousands of series per bucket.
ALL_MODELS_LABEL = "*"


class CachedModel(InferenceModel):  # type: ignore[misc]  # kserve ships no type hints
    """The KServe model for one id: each call leases the model from the cache."""

    def __init__(self, name: str, repository: CacheModelRepository) -> None:
        super().__init__(name)
        self.ready = True  # servable: a call loads it (readiness is the repository's to tell)
        self._repository = repository
        self._cache = repository.cache
        self._model_class = repository.model_class
        self._hooks = repository.hooks
        # KServe's request_predict_seconds, here the time of the three steps under the lease
        # (a load is not in it: modelcache_load_wait_seconds has that). Labelled on the first
        # lease, once the model exists: ids that are not in the store never make a series.
        self._predict_hist: Any = None

    def load(self) -> bool:
        """KServe's sync hook: never loads (a request or ``/load`` does, asynchronously)."""
        return True

    async def __call__(
        self,
        body: Any,
        headers: dict[str, str] | None = None,
        verb: InferenceVerb = InferenceVerb.PREDICT,
    ) -> tuple[Any, dict[str, str]]:
        name = self.name
        cache = self._cache
        tier = cache.tier_of(name, model=self._model_class) or "store"
        if verb is not InferenceVerb.PREDICT:
            raise ModelRequestError(
                HTTPStatus.NOT_IMPLEMENTED, f"model {name!r}: only predict is served", tier=tier
            )
        timeout = self._repository.load_timeout
        try:
            if timeout is None or tier == "device":  # a hit: use() hands it out at once
                async with cache.use(name, model=self._model_class) as model:
                    response = await self._serve(model, body, headers)
            else:
                async with contextlib.AsyncExitStack() as stack:
                    try:
                        with anyio.fail_after(timeout):  # the wait for the model, not predict
                            model = await stack.enter_async_context(
                                cache.use(name, model=self._model_class)
                            )
                    except TimeoutError as exc:  # the load goes on, for later requests
                        raise ModelRequestError(
                            HTTPStatus.SERVICE_UNAVAILABLE,
                            f"model {name!r} was not ready within {timeout:g} s (still "
                            "loading, or waiting for memory that requests in progress hold); "
                            "try again",
                            tier=tier,
                        ) from exc
                    response = await self._serve(model, body, headers)
        except ModelRequestError:
            raise
        except Exception as exc:
            raise ModelRequestError.wrap(exc, name, tier) from exc
        return response, {TIER_HEADER: tier}

    async def _serve(self, model: Any, body: Any, headers: dict[str, str] | None) -> Any:
        """The user's hooks on a leased ``model``, timed as KServe's predict histogram."""
        if self._predict_hist is None:
            label = self.name if self._repository.per_model_metrics else ALL_MODELS_LABEL
            self._predict_hist = PREDICT_HIST_TIME.labels(model_name=label)
        with self._predict_hist.time():
            return await self._hooks.run(model, body, headers)

    async def get_input_types(self) -> list[dict[str, Any]]:
        await self._repository.check_exists(self.name)
        return list(getattr(self._model_class, "input_types", []))

    async def get_output_types(self) -> list[dict[str, Any]]:
        return list(getattr(self._model_class, "output_types", []))


class CacheModelRepository(ModelRepository):  # type: ignore[misc]
    """Every model id in ``cache``'s store, built by ``model_class`` (bound to the cache here
    unless it already is), served by name without registration."""

    def __init__(
        self,
        cache: ModelCache,
        model_class: type,
        *,
        per_model_metrics: bool = False,
        check_ttl: float = 5.0,
        load_timeout: float | None = None,
    ) -> None:
        super().__init__()
        if load_timeout is not None and not load_timeout > 0:
            raise ValueError(f"load_timeout must be positive or None, not {load_timeout!r}")
        self.cache = cache
        #: Seconds a request may wait for its model to be ready (None: no limit).
        self.load_timeout = load_timeout
        if not cache.is_bound(model_class):
            cache.model(model_class)
        self.model_class = model_class
        self.hooks = Hooks(model_class, cache.device)
        self.per_model_metrics = per_model_metrics
        self.check_ttl = check_ttl
        self._proxies: dict[str, CachedModel] = {}
        self._checks: dict[str, tuple[float, BaseException | None]] = {}

    # -- KServe's hooks ------------------------------------------------------------------------

    def get_model(self, name: str) -> BaseKServeModel | None:
        model = self.models.get(name) or self._proxies.get(name)
        if model is not None:
            return model
        self.cache.store.model_url(name)  # InvalidModelIdError (400) before anything is kept
        if len(self._proxies) >= _MAX_PROXIES:
            del self._proxies[next(iter(self._proxies))]
        proxy = self._proxies[name] = CachedModel(name, self)
        return proxy

    def get_models(self) -> dict[str, BaseKServeModel]:
        """Registered models and the ids resident on the device (``GET /v2/models``)."""
        resident = {name: self.get_model(name) for name in self.cache.resident("device")}
        return {**resident, **self.models}

    async def is_model_ready(self, name: str) -> bool:
        if name in self.models:
            return bool(await super().is_model_ready(name))
        return await self.readiness(name)

    async def load(self, name: str) -> bool:
        """``POST /v2/repository/models/{name}/load``: bring the model onto the device."""
        if name in self.models:
            return True
        await self.cache.prefetch([name], tier="device", model=self.model_class)
        return True

    def unload(self, name: str) -> None:
        """KServe's sync hook: evict ``name`` from the device (never blocks); KeyError (404)
        if it is neither registered nor resident and unleased."""
        if name in self.models:
            super().unload(name)
        elif not self.cache.evict(name, model=self.model_class):
            raise KeyError(f"model {name!r} is not resident on the device")

    # -- the asynchronous work behind them -----------------------------------------------------

    async def readiness(self, name: str) -> bool:
        """True when resident on the device; False when servable but not resident; raises the
        model's error (ModelNotFoundError, ModelFormatError...) when it is not servable."""
        tier = self.cache.tier_of(name, model=self.model_class)
        if tier == "device":
            return True
        await self.check_exists(name)
        raise ModelNotReady(
            name,
            f"It is not on the device (tier: {tier or 'store'}); the first request, or "
            f"POST /v2/repository/models/{name}/load, loads it.",
        )

    async def evict(self, name: str) -> None:
        """``POST /v2/repository/models/{name}/unload``: evict from the device if resident;
        409 while it is leased; 404 if the store has no such model."""
        tier = self.cache.tier_of(name, model=self.model_class)
        if self.cache.evict(name, model=self.model_class):
            return
        if tier == "device":
            raise ModelRequestError(
                HTTPStatus.CONFLICT,
                f"model {name!r} is serving requests; it can be unloaded when they end",
                tier=tier,
            )
        await self.check_exists(name)

    async def check_exists(self, name: str) -> None:
        """Raise the model's error if ``name`` is not a loadable model in the store: its headers
        are read (a few KiB), and the answer is remembered for ``check_ttl`` seconds."""
        if self.cache.tier_of(name, model=self.model_class) is not None:
            return
        now = time.monotonic()
        known = self._checks.get(name)
        if known is not None and known[0] > now:
            if known[1] is not None:
                raise known[1].with_traceback(None)  # remembered: do not grow its traceback
            return
        error: BaseException | None = None
        try:
            await self.cache.describe(name)
        except ModelCacheError as exc:
            error = exc
        self._remember(name, now, error)
        if error is not None:
            raise error

    def _remember(self, name: str, now: float, error: BaseException | None) -> None:
        checks = self._checks
        if len(checks) >= _MAX_PROXIES:  # drop the expired, else the oldest
            for key in [k for k, (until, _) in checks.items() if until <= now] or [
                next(iter(checks))
            ]:
                del checks[key]
        checks.pop(name, None)
        checks[name] = (now + self.check_ttl, error)


class CacheDataPlane(DataPlane):  # type: ignore[misc]
    """KServe's DataPlane without the sync ``Model.load()`` and the readiness check on the
    inference path: the proxy's lease loads (asynchronously) and reports errors itself."""

    _model_registry: CacheModelRepository

    async def get_model(self, name: str) -> BaseKServeModel:
        model = self._model_registry.get_model(name)
        if model is None:
            raise ModelNotFound(name)
        if not isinstance(model, CachedModel):
            return await super().get_model(name)
        return model

    async def model_ready(
        self, model_name: str, disable_predictor_health_check: bool = False
    ) -> bool:
        model = self._model_registry.get_model(model_name)
        if model is None:
            raise ModelNotFound(model_name)
        if not isinstance(model, CachedModel):
            return bool(await super().model_ready(model_name, disable_predictor_health_check))
        if disable_predictor_health_check:  # an inference request: the lease decides
            return True
        return await self._model_registry.readiness(model_name)


class CacheRepositoryExtension(ModelRepositoryExtension):  # type: ignore[misc]
    """The V2 repository extension with asynchronous load and unload, whose errors keep their
    own status (404 for an unknown id, 507 too large, 500 broken) instead of KServe's 503."""

    _model_registry: CacheModelRepository

    async def load(self, model_name: str) -> None:
        repository = self._model_registry
        if model_name in repository.models:
            await super().load(model_name)
            return
        repository.get_model(model_name)  # validates the id
        await repository.load(model_name)

    async def unload(self, model_name: str) -> None:
        repository = self._model_registry
        if model_name in repository.models:
            await super().unload(model_name)
            return
        repository.get_model(model_name)
        await repository.evict(model_name)
