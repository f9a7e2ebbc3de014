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
  few KiB, and are remembered for ``check_ttl`` seconds, positive or negative. Each is bounded
  by ``check_timeout`` (a stalled store answers 503, and is not remembered); ``/load`` by
  ``load_timeout``, as a request's wait is.
* Shutdown (`shut_down`, called when the server starts draining): requests that would wait for
  a load, checks and ``/load`` answer 503 at once, and those already waiting are woken with it,
  instead of holding the drain until the grace period ends. Hits are still served.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import anyio
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
from kserve.metrics import PREDICT_HIST_TIME
from kserve.model import BaseKServeModel, InferenceModel, InferenceVerb
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.model_repository_extension import ModelRepositoryExtension

from modelcache import ModelCache, ModelCacheError, ModelTooLargeError

from ._errors import TIER_HEADER, ModelRequestError
from ._hooks import Hooks

logger = logging.getLogger("modelcache_kserve")

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
        repository = self._repository
        try:
            if tier == "device":  # a hit: use() hands it out at once
                async with cache.use(name, model=self._model_class) as model:
                    response = await self._serve(model, body, headers)
            else:
                async with contextlib.AsyncExitStack() as stack:
                    with repository.waiting(name, repository.load_timeout, "load", tier):
                        model = await stack.enter_async_context(
                            cache.use(name, model=self._model_class)
                        )
                    response = await self._serve(model, body, headers)
        except ModelRequestError:
            raise
        except Exception as exc:
            error = ModelRequestError.wrap(exc, name, tier)
            if error.status >= HTTPStatus.INTERNAL_SERVER_ERROR and not isinstance(
                exc, ModelCacheError
            ):  # the model class's fault: its traceback is for the logs, once
                logger.error("model %r failed to answer", name, exc_info=exc)
            raise error from exc
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
        check_timeout: float | None = 5.0,
    ) -> None:
        super().__init__()
        for what, value in (("load_timeout", load_timeout), ("check_timeout", check_timeout)):
            if value is not None and not value > 0:
                raise ValueError(f"{what} must be positive or None, not {value!r}")
        self.cache = cache
        #: Seconds a request (or ``/load``) may wait for its model to be ready (None: no limit).
        self.load_timeout = load_timeout
        #: Seconds a readiness, metadata or ``/unload`` check may wait for the store.
        self.check_timeout = check_timeout
        if not cache.is_bound(model_class):
            cache.model(model_class)
        self.model_class = model_class
        self.hooks = Hooks(model_class, cache.device)
        self.per_model_metrics = per_model_metrics
        self.check_ttl = check_ttl
        self._proxies: dict[str, CachedModel] = {}
        self._checks: dict[str, tuple[float, BaseException | int]] = {}
        #: The server is draining: nothing new waits (see `shut_down`).
        self.closing = False
        #: The cancel scopes of the waits in progress, cancelled by `shut_down`.
        self._waits: set[anyio.CancelScope] = set()

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
        """``POST /v2/repository/models/{name}/load``: bring the model onto the device, waiting
        at most ``load_timeout`` (503 after it; the load goes on). A model held already is
        checked against the store first: a new version there is loaded and swapped in (requests
        meanwhile are served by the old one)."""
        if name in self.models:
            return True
        tier = self.cache.tier_of(name, model=self.model_class) or "store"
        with self.waiting(name, self.load_timeout, "load", tier):
            if tier != "store":
                await self.cache.refresh(name)
            await self.cache.prefetch([name], tier="device", model=self.model_class)
        return True

    async def current_version(self, name: str) -> str | None:
        """The version of ``name`` a request gets now: the one held, else the one a load
        finds (the model is loaded, within ``load_timeout``, as a request would); None where
        the store names none."""
        version = self.cache.version_of(name)
        if version is None:
            tier = self.cache.tier_of(name, model=self.model_class) or "store"
            with self.waiting(name, self.load_timeout, "load", tier):
                await self.cache.prefetch([name], tier="device", model=self.model_class)
            version = self.cache.version_of(name)
        return version

    def unload(self, name: str) -> None:
        """KServe's sync hook: evict ``name`` from the device (never blocks); KeyError (404)
        if it is neither registered nor resident and unleased."""
        if name in self.models:
            super().unload(name)
        elif not self.cache.evict(name, model=self.model_class):
            raise KeyError(f"model {name!r} is not resident on the device")

    # -- shutdown and bounded waits ------------------------------------------------------------

    def shut_down(self) -> None:
        """The server is draining: from now on nothing waits for a load or the store (503
        "shutting down"), and the waits in progress end with that answer at once. Idempotent;
        called on the loop."""
        self.closing = True
        for scope in self._waits:
            scope.cancel()

    @contextlib.contextmanager
    def waiting(self, name: str, timeout: float | None, what: str, tier: str) -> Iterator[None]:
        """Bound the block, a wait for ``name`` to ``what`` ("load" or "check"): 503 after
        ``timeout`` seconds (None: no limit) or when the server shuts down."""
        if self.closing:
            raise _shutting_down(name, tier)
        scope = anyio.CancelScope()
        self._waits.add(scope)
        try:
            with scope:
                try:
                    with anyio.fail_after(timeout):
                        yield
                except TimeoutError as exc:  # a load goes on, for later requests
                    if what == "load":
                        message = (
                            f"model {name!r} was not ready within {timeout:g} s (still "
                            "loading, or waiting for memory that requests in progress hold); "
                            "try again"
                        )
                    else:
                        message = (
                            f"model {name!r} could not be checked: the store did not answer "
                            f"within {timeout:g} s; try again"
                        )
                    raise ModelRequestError(
                        HTTPStatus.SERVICE_UNAVAILABLE, message, tier=tier
                    ) from exc
        finally:
            self._waits.discard(scope)
        if scope.cancelled_caught:
            raise _shutting_down(name, tier)

    # -- the asynchronous work behind them -----------------------------------------------------

    async def readiness(self, name: str) -> bool:
        """True when resident on the device; False when servable but not resident; raises the
        model's error (ModelNotFoundError, ModelFormatError, ModelTooLargeError...) when it is
        not servable: the error a request for it would answer."""
        tier = self.cache.tier_of(name, model=self.model_class)
        if tier == "device":
            return True
        nbytes = await self.check_exists(name)
        budget = self.cache.stats().bytes_budget
        if nbytes is not None and nbytes > budget:  # every request answers 507: say why
            raise ModelTooLargeError(
                f"model {name!r} needs {nbytes} bytes, more than the whole device budget of "
                f"{budget} bytes",
                model_id=name,
            )
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

    async def check_exists(self, name: str) -> int | None:
        """Raise the model's error if ``name`` is not a loadable model in the store: its headers
        are read (a few KiB), and the answer is remembered for ``check_ttl`` seconds. Returns
        the model's size in bytes (None when it is in a tier, where it is known to fit). A store
        that does not answer within ``check_timeout`` answers 503, remembered by nobody."""
        tier = self.cache.tier_of(name, model=self.model_class)
        if tier is not None:
            return None
        now = time.monotonic()
        known = self._checks.get(name)
        if known is not None and known[0] > now:
            if isinstance(known[1], BaseException):
                raise known[1].with_traceback(None)  # remembered: do not grow its traceback
            return known[1]
        result: BaseException | int
        # The core's describe() may read the store: bounded, so a stalled store cannot hold a
        # probe (or the drain at shutdown) for as long as the store stalls.
        with self.waiting(name, self.check_timeout, "check", "store"):
            try:
                result = (await self.cache.describe(name)).nbytes
            except ModelCacheError as exc:
                result = exc
        self._remember(name, now, result)
        if isinstance(result, BaseException):
            raise result
        return result

    def _remember(self, name: str, now: float, result: BaseException | int) -> None:
        checks = self._checks
        if len(checks) >= _MAX_PROXIES:  # drop the expired, else the oldest
            for key in [k for k, (until, _) in checks.items() if until <= now] or [
                next(iter(checks))
            ]:
                del checks[key]
        checks.pop(name, None)
        checks[name] = (now + self.check_ttl, result)


def _shutting_down(name: str, tier: str) -> ModelRequestError:
    return ModelRequestError(
        HTTPStatus.SERVICE_UNAVAILABLE,
        f"model {name!r}: the server is shutting down; try another replica",
        tier=tier,
    )


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

    def decode(
        self, body: Any, headers: Any, protocol_version: str = "v1", model_name: str | None = None
    ) -> Any:
        """KServe's decode, whose every failure is the client's malformed request (400).

        Its binary-extension path raises ValueError for a bad
        ``Inference-Header-Content-Length``, or for raw bytes that do not fill the declared
        shape, and KeyError for a missing field: KServe would answer those 500 through its
        catch-all; its BYTES path raises struct.error for a length past the end, and
        InferenceError for a shape that does not match the data (a negative dimension)."""
        try:
            return super().decode(body, headers, protocol_version, model_name)
        except InvalidInput:
            raise
        except MemoryError:
            raise
        except Exception as exc:  # InferenceError (a negative shape), struct.error (BYTES)...
            raise InvalidInput(f"malformed request: {type(exc).__name__}: {exc}") from exc


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
