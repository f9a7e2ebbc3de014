"""From errors to HTTP answers, each with the ``modelcache-tier`` header of its model.

The statuses (the README's status table has every one with its cause):

=============================  ======  ==========================================================
error                          status  why
=============================  ======  ==========================================================
InvalidModelIdError            400     the client sent an id that can never name a model
kserve InvalidInput            400     the payload does not decode into the model's inputs
                                       (a malformed binary-extension body included)
ModelNotFoundError             404     no model under that id in the store (not 503: retrying
                                       does not help)
leased model on ``/unload``    409     it is serving requests; it leaves when they end
BodyTimeout                    408     the body did not arrive within ``body_timeout`` s
PayloadTooLarge                413     the body is larger than ``max_request_bytes``
RequestValidationError         422     a V2 body that breaks the protocol's schema
RejectedInput                  422     the model could not compute on the request's inputs
                                       (predict raised ValueError, RuntimeError...: a shape
                                       that does not fit the model is the client's)
NotImplementedError            501     a verb or a version the server does not serve
ModelTooLargeError             507     the model is larger than the whole device budget: a
                                       server capacity limit, not a client mistake
CacheClosedError, shutdown     503     the server is shutting down
readiness of a cold model      503     servable, not on the device (the message names its tier)
not ready in ``load_timeout``  503     still loading or waiting for memory; the load goes on
no store answer in             503     a readiness, metadata or repository check that the store
``check_timeout``                      did not answer in time
StoreError                     502     the store (our upstream) failed after the retries
other errors                   500     format, build and load errors, the model class's bugs;
                                       the message names the model, the path and the cause
=============================  ======  ==========================================================

Every answer goes through Starlette's ExceptionMiddleware (`exception_handler`) or, for an
exception no handler knows, `LastResort`: never through Starlette's ServerErrorMiddleware, which
logs a second traceback and makes uvicorn drop the keep-alive connection.
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus
from typing import Any

import anyio
from fastapi.exceptions import RequestValidationError
from kserve.errors import (
    InferenceError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    UnsupportedProtocol,
)
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelcache import (
    CacheClosedError,
    InvalidModelIdError,
    ModelCache,
    ModelCacheError,
    ModelNotFoundError,
    ModelTooLargeError,
    StoreError,
)

__all__ = [
    "HANDLED",
    "TIER_HEADER",
    "BodyTimeout",
    "LastResort",
    "ModelRequestError",
    "PayloadTooLarge",
    "RejectedInput",
    "exception_handler",
    "status_for",
]

logger = logging.getLogger("modelcache_kserve")

#: Response header naming the tier the model was in when the request arrived:
#: "device", "host", "disk" or "store".
TIER_HEADER = "modelcache-tier"


class RejectedInput(Exception):
    """The model raised while computing on the request's inputs (HTTP 422); the cause is
    ``__cause__``. See ``_hooks.COMPUTE_ERRORS`` for which errors count."""


class PayloadTooLarge(HTTPException):
    """The request's body is larger than the server's limit (HTTP 413).

    An HTTPException so that FastAPI, reading a V2 body for its schema, passes it on as it is
    instead of making it a 400 "error parsing the body". It does not ask to close the
    connection: uvicorn would close it with the body's rest unread, and the kernel then resets
    it, which can discard the answer before the client reads it (1 in 20 chunked uploads of
    8 MiB did); uvicorn reads and drops the rest, and the connection serves the next request.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"the request body is larger than the server's limit of {limit} bytes",
        )


class BodyTimeout(HTTPException):
    """The request's body did not arrive within the server's ``body_timeout`` (HTTP 408): a
    client that stalls mid-body would otherwise hold its part of the body, and a connection,
    for as long as it likes. The connection is closed (the rest of the body never came)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            HTTPStatus.REQUEST_TIMEOUT,
            f"the request body did not arrive within {seconds:g} s",
            headers={"connection": "close"},
        )


def status_for(exc: BaseException) -> int:
    """The HTTP status that answers ``exc``."""
    if isinstance(exc, ModelRequestError):
        return exc.status
    if isinstance(exc, InvalidModelIdError | InvalidInput):
        return HTTPStatus.BAD_REQUEST
    if isinstance(exc, ModelNotFoundError | ModelNotFound):
        return HTTPStatus.NOT_FOUND
    if isinstance(exc, HTTPException):
        return exc.status_code
    if isinstance(exc, RequestValidationError | RejectedInput):
        return HTTPStatus.UNPROCESSABLE_ENTITY
    if isinstance(exc, ModelTooLargeError):
        return HTTPStatus.INSUFFICIENT_STORAGE
    if isinstance(exc, CacheClosedError | ModelNotReady):
        return HTTPStatus.SERVICE_UNAVAILABLE
    if isinstance(exc, StoreError):  # the store (our upstream) failed, after the retries
        return HTTPStatus.BAD_GATEWAY
    if isinstance(exc, NotImplementedError | UnsupportedProtocol):
        return HTTPStatus.NOT_IMPLEMENTED
    return HTTPStatus.INTERNAL_SERVER_ERROR


class ModelRequestError(Exception):
    """An error answered with ``status`` and ``{"error": message}``; ``tier`` becomes the
    ``modelcache-tier`` header (None: computed when the answer is made)."""

    def __init__(self, status: int, message: str, *, tier: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.tier = tier

    @classmethod
    def wrap(cls, exc: BaseException, model_id: str, tier: str | None) -> ModelRequestError:
        """``exc`` raised while serving ``model_id`` as an answer; its message names the cause."""
        if isinstance(exc, ModelCacheError | InvalidInput):
            message = str(exc)
        elif isinstance(exc, RejectedInput):
            cause = exc.__cause__
            message = (
                f"model {model_id!r} could not compute on the request's inputs: "
                f"{type(cause).__name__}: {cause}"
            )
        else:  # the user's pre/post-processing or the model itself raised
            message = f"model {model_id!r} failed to answer: {type(exc).__name__}: {exc}"
        return cls(status_for(exc), message, tier=tier)

    def __str__(self) -> str:
        return self.message


def _message(exc: BaseException) -> str:
    if isinstance(exc, HTTPException):
        return str(exc.detail)
    if isinstance(exc, RequestValidationError):
        return f"the request breaks the protocol's schema: {exc.errors()}"
    if isinstance(exc, ModelRequestError | ModelCacheError | InvalidInput | ModelNotReady):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


#: The exception types `exception_handler` answers (registered on KServe's app for each):
#: every type KServe or FastAPI has a handler of its own for, whose answers would lack the tier
#: header and the ``{"error": message}`` body (FastAPI's HTTPException: "error parsing the
#: body", 404, 405).
HANDLED: tuple[type[BaseException], ...] = (
    ModelRequestError,
    ModelCacheError,
    InvalidInput,
    InferenceError,
    UnsupportedProtocol,
    ModelNotReady,
    ModelNotFound,
    NotImplementedError,
    RequestValidationError,
    HTTPException,
)

#: Characters of an error message an answer carries at most: a model's error may hold
#: megabytes of text (a tensor's repr), which no client needs and every error would copy.
MAX_MESSAGE = 4000


def _clip(message: str) -> str:
    """``message`` as an answer carries it: at most `MAX_MESSAGE` characters, and encodable
    (a lone surrogate in an exception's text would fail the JSON answer, and lose its
    status)."""
    if len(message) > MAX_MESSAGE:
        message = f"{message[:MAX_MESSAGE]}... ({len(message)} characters)"
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def _forget_frames(exc: BaseException) -> None:
    """Drop the tracebacks of ``exc`` and its causes, once answered (and logged). The cache
    remembers a failed load's error, and the adapter a failed check's, for seconds: the same
    object, raised again to each request, gets the frames of the last one it went through -
    the request, its body and its decoded payload - and would keep them alive as long."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        error = stack.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        error.__traceback__ = None
        stack += (error.__cause__, error.__context__)


def exception_handler(cache: ModelCache, model_class: type) -> Any:
    """A Starlette exception handler answering ``exc`` with its status, ``{"error": message}``
    and the tier header of the request's model (as built by ``model_class``: other classes may
    be bound to the same cache); no header on a route without a model."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        tier = exc.tier if isinstance(exc, ModelRequestError) else None
        headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
        model_id = request.scope.get("path_params", {}).get("model_name")
        if tier is None and isinstance(model_id, str):
            try:
                tier = cache.tier_of(model_id, model=model_class) or "store"
            except Exception:  # an answer must not fail for its header
                tier = None
        if tier is not None:
            headers[TIER_HEADER] = tier
        status = status_for(exc)
        message = _clip(_message(exc))
        _forget_frames(exc)
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    return handle


class LastResort:
    """ASGI middleware inside Starlette's ServerErrorMiddleware: an exception no handler knows
    becomes a 500 answer here, logged once, with the tier header; the connection stays open
    (ServerErrorMiddleware would re-raise it, and uvicorn closes the connection of a request
    whose app raised). It also refuses a body larger than ``max_body`` with 413: by its
    Content-Length before a byte is read, or as it streams in; uvicorn reads a body only as
    fast as the app takes it, so no more than the limit is ever held."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        handler: Any,
        max_body: int | None,
        body_timeout: float | None = None,
    ) -> None:
        self.app = app
        self.handler = handler
        self.max_body = max_body
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        limit, timeout = self.max_body, self.body_timeout
        received = 0
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        deadline = math.inf  # set when the app first reads the body
        body_done = False

        async def guarded_receive() -> Message:
            # Checked when the app first reads the body, once routed: the answer can name the
            # model's tier, and a request that never reads its body is not refused.
            nonlocal received, deadline, body_done
            if body_done:  # only a disconnect can come now: no limit on waiting for it
                return await receive()
            if limit is not None and declared.isdigit() and int(declared) > limit:
                raise PayloadTooLarge(limit)  # before a byte of it is read
            if timeout is not None and deadline == math.inf:
                deadline = anyio.current_time() + timeout
            with anyio.move_on_after(deadline - anyio.current_time()) as scope_:
                message = await receive()
            if scope_.cancelled_caught:
                assert timeout is not None
                raise BodyTimeout(timeout)
            received += len(message.get("body", b""))
            if limit is not None and received > limit:
                raise PayloadTooLarge(limit)
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        try:
            await self.app(scope, guarded_receive, tracked_send)
        except Exception as exc:
            if started:  # too late for an answer: let the server close the connection
                raise
            if not isinstance(exc, PayloadTooLarge | BodyTimeout):
                logger.exception("%s %s failed", scope.get("method"), scope.get("path"))
            response = await self.handler(Request(scope, receive), exc)
            await response(scope, receive, send)
