"""The KServe ModelServer that owns the cache: one process, one cache, one HTTP server.

`CacheModelServer` is KServe's `ModelServer` with the parts a cache needs changed:

* The cache is an async context manager: `serve` enters it (and registers its Prometheus
  collector) on the loop that serves HTTP, and closes it when the server stops.
* The REST server binds ``host`` (KServe hard-codes 0.0.0.0), may take port 0 (the bound port is
  passed to ``on_ready``), and answers every error with its own status and the
  ``modelcache-tier`` header, keeping the connection (`LastResort` catches what no handler
  knows); bodies over ``max_request_bytes`` answer 413, bodies that take longer than
  ``body_timeout`` seconds to arrive 408.
* When it starts draining (SIGTERM), the repository is told first (`shut_down`): requests
  waiting for a load answer 503 at once instead of holding the drain for ``grace_period``
  seconds; then uvicorn lets the requests in progress finish, then the cache closes.
* One worker process and no gRPC: a cache is one process's memory (run more replicas to scale),
  and KServe 0.21's gRPC repository load/unload raise TypeError.
* It runs on the default asyncio loop, as ``ModelServer.start`` does.

KServe's FastAPI app is a module global (``kserve.model_server.app``): one server per process.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.model import BaseKServeModel
from kserve.model_server import ModelServer
from kserve.protocol.rest.server import RESTServer, _RefreshingServer

from modelcache import ModelCache

from ._errors import HANDLED, LastResort, exception_handler
from ._repository import CacheDataPlane, CacheModelRepository, CacheRepositoryExtension
from ._versions import VersionedPaths

__all__ = ["CacheModelServer", "build_server"]

_started = False  # the process's one server has started (kserve's app is global)


class _ReadyServer(_RefreshingServer):  # type: ignore[misc]
    """uvicorn's server, telling ``on_ready`` the bound port once it listens."""

    def __init__(
        self,
        config: Any,
        on_ready: Callable[[int], None] | None,
        on_drain: Callable[[], None],
    ) -> None:
        super().__init__(config)
        self._on_ready = on_ready
        self._on_drain = on_drain

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._on_ready is not None:
            port = self.servers[0].sockets[0].getsockname()[1] if self.servers else None
            self._on_ready(int(port if port is not None else self.config.port))

    async def shutdown(self, sockets: Any = None) -> None:
        # Before uvicorn waits for the requests in progress: those waiting for a load would
        # otherwise hold the drain until the grace period ends, then answer 500.
        self._on_drain()
        await super().shutdown(sockets=sockets)


class _RESTServer(RESTServer):  # type: ignore[misc]
    def __init__(self, server: CacheModelServer, on_ready: Callable[[int], None] | None) -> None:
        super().__init__(
            FASTAPI_APP_IMPORT_STRING,
            server.dataplane,
            server.model_repository_extension,
            server.http_port,
            access_log_format=server.access_log_format,
            workers=1,
            grace_period=server.grace_period,
            event_loop="asyncio",
            timeout_keep_alive=server.timeout_keep_alive,
            ssl_certfile=server.ssl_certfile,
            ssl_keyfile=server.ssl_keyfile,
        )
        self.config.host = server.host
        self._server = _ReadyServer(self.config, on_ready, server.repository.shut_down)
        self._handler = exception_handler(server.cache, server.repository.model_class)
        self._repository = server.repository
        self._max_body = server.max_request_bytes
        self._body_timeout = server.body_timeout

    def _add_middlewares(self, app: Any) -> None:
        super()._add_middlewares(app)
        app.add_middleware(VersionedPaths, repository=self._repository, handler=self._handler)
        # Added last, so the outermost of the app's own middlewares: right inside Starlette's
        # ServerErrorMiddleware, which it must keep every exception from.
        app.add_middleware(
            LastResort,
            handler=self._handler,
            max_body=self._max_body,
            body_timeout=self._body_timeout,
        )

    def _add_exception_handlers(self, app: Any) -> None:
        super()._add_exception_handlers(app)
        for error in HANDLED:
            app.add_exception_handler(error, self._handler)

    def request_exit(self) -> None:
        self._server.should_exit = True


class CacheModelServer(ModelServer):  # type: ignore[misc]
    """KServe's ModelServer serving every model of ``repository.cache`` (see the module doc).

    ``start()`` blocks like ``ModelServer.start`` (SIGINT/SIGTERM stop it gracefully);
    ``await serve()`` runs it on a loop that is already running; `stop` asks it to end.
    """

    def __init__(
        self,
        repository: CacheModelRepository,
        *,
        host: str = "0.0.0.0",
        http_port: int = 8080,
        metrics: bool = True,
        grace_period: int = 25,
        max_request_bytes: int | None = 64 << 20,
        body_timeout: float | None = 60.0,
        timeout_keep_alive: int = 65,
        access_log_format: str | None = None,
        enable_latency_logging: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            http_port=http_port,
            workers=1,
            registered_models=repository,
            enable_grpc=False,
            enable_docs_url=False,
            enable_latency_logging=enable_latency_logging,
            access_log_format=access_log_format,
            event_loop="asyncio",
            timeout_keep_alive=timeout_keep_alive,
            grace_period=grace_period,
            **kwargs,
        )
        self.repository = repository
        self.cache: ModelCache = repository.cache
        self.host = host
        self.metrics = metrics
        #: Largest request body accepted (413 above it; None: no limit).
        self.max_request_bytes = max_request_bytes
        #: Seconds a request's body may take to arrive from the app's first read (408 after;
        #: None: no limit).
        self.body_timeout = body_timeout
        self.dataplane = CacheDataPlane(model_registry=repository)
        self.model_repository_extension = CacheRepositoryExtension(model_registry=repository)
        self._rest: _RESTServer | None = None
        self._stop_requested = False

    async def serve(self, *, on_ready: Callable[[int], None] | None = None) -> None:
        """Open the cache, serve HTTP until `stop` (or a signal, in the main thread), close the
        cache. ``on_ready(port)`` is called once the port accepts connections."""
        global _started
        if _started:
            raise RuntimeError(
                "a KServe model server already ran in this process (kserve's app is global)"
            )
        _started = True
        self.setup_event_loop()
        rest = self._rest = _RESTServer(self, on_ready)
        if self._stop_requested:
            rest.request_exit()
        collector = None
        if self.metrics:
            from modelcache.metrics import CacheMetrics

            collector = CacheMetrics(self.cache, per_model=self.repository.per_model_metrics)
        try:
            async with self.cache:
                await rest.start()
        finally:
            if collector is not None:
                collector.unregister()

    def start(
        self,
        models: list[BaseKServeModel] | None = None,
        *,
        on_ready: Callable[[int], None] | None = None,
    ) -> None:
        """Register ``models`` (plain KServe models, served beside the cache's) and serve until
        SIGINT or SIGTERM; the cache closes before this returns. ``on_ready(port)``: as in
        `serve`."""
        for model in models or []:
            self.register_model(model)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: self.stop(signum))
        asyncio.run(self.serve(on_ready=on_ready))

    def stop(self, sig: int | None = None) -> None:
        """Ask the server to finish its requests and stop (thread-safe enough for a signal)."""
        self._stop_requested = True
        if self._rest is not None:
            self._rest.request_exit()


def build_server(
    cache: ModelCache,
    model_class: type,
    *,
    host: str = "0.0.0.0",
    http_port: int = 8080,
    per_model_metrics: bool = False,
    metrics: bool = True,
    load_timeout: float | None = None,
    check_timeout: float | None = 5.0,
    **kwargs: Any,
) -> CacheModelServer:
    """A `CacheModelServer` serving every model of ``cache``'s store, built by ``model_class``
    (bound to ``cache`` here unless it already is). A request that waits more than
    ``load_timeout`` seconds for its model answers 503 (None: it waits as long as it takes); a
    readiness, metadata or ``/unload`` check that waits more than ``check_timeout`` seconds for
    the store too. ``kwargs`` go to `CacheModelServer` (``grace_period``,
    ``max_request_bytes``, ``body_timeout``...)."""
    repository = CacheModelRepository(
        cache,
        model_class,
        per_model_metrics=per_model_metrics,
        load_timeout=load_timeout,
        check_timeout=check_timeout,
    )
    return CacheModelServer(repository, host=host, http_port=http_port, metrics=metrics, **kwargs)
