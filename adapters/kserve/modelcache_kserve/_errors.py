"""From modelcache's typed errors to HTTP answers, with the ``modelcache-tier`` header.

The statuses (the README's "Errors" table):

=============================  ======  ==========================================================
error                          status  why
=============================  ======  ==========================================================
InvalidModelIdError            400     the client sent an id that can never name a model
kserve InvalidInput            400     the payload does not decode into the model's inputs
ModelNotFoundError             404     no model under that id in the store (not 503: retrying
                                       does not help)
leased model on ``/unload``    409     it is serving requests; it leaves when they end
ModelTooLargeError             507     the model is larger than the whole device budget: a
                                       server capacity limit, not a client mistake
CacheClosedError               503     the server is shutting down
readiness of a cold model      503     servable, not on the device (the message names its tier)
not ready in ``load_timeout``  503     still loading or waiting for memory; the load goes on
StoreError                     502     the store (our upstream) failed after the retries
other load errors              500     format, build and load errors; the message names the
                                       model, the path and the cause
=============================  ======  ==========================================================
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from kserve.errors import InvalidInput, ModelNotReady
from starlette.requests import Request
from starlette.responses import JSONResponse

from modelcache import (
    CacheClosedError,
    InvalidModelIdError,
    ModelCache,
    ModelCacheError,
    ModelNotFoundError,
    ModelTooLargeError,
    StoreError,
)

__all__ = ["TIER_HEADER", "ModelRequestError", "status_for"]

#: Response header naming the tier the model was in when the request arrived:
#: "device", "host", "disk" or "store".
TIER_HEADER = "modelcache-tier"


def status_for(exc: BaseException) -> int:
    """The HTTP status that answers ``exc``."""
    if isinstance(exc, ModelRequestError):
        return exc.status
    if isinstance(exc, InvalidModelIdError | InvalidInput):
        return HTTPStatus.BAD_REQUEST
    if isinstance(exc, ModelNotFoundError):
        return HTTPStatus.NOT_FOUND
    if isinstance(exc, ModelTooLargeError):
        return HTTPStatus.INSUFFICIENT_STORAGE
    if isinstance(exc, CacheClosedError | ModelNotReady):
        return HTTPStatus.SERVICE_UNAVAILABLE
    if isinstance(exc, StoreError):  # the store (our upstream) failed, after the retries
        return HTTPStatus.BAD_GATEWAY
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
        else:  # the user's pre/post-processing or the model itself raised
            message = f"model {model_id!r} failed to answer: {type(exc).__name__}: {exc}"
        return cls(status_for(exc), message, tier=tier)

    def __str__(self) -> str:
        return self.message


def exception_handler(cache: ModelCache, model_class: type) -> Any:
    """A Starlette exception handler answering ModelRequestError, ModelCacheError and
    InvalidInput with their status and the tier header of the request's model (as built by
    ``model_class``: other classes may be bound to the same cache)."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        tier = exc.tier if isinstance(exc, ModelRequestError) else None
        headers = {}
        model_id = request.path_params.get("model_name")
        if tier is None and isinstance(model_id, str):
            tier = cache.tier_of(model_id, model=model_class) or "store"
        if tier is not None:
            headers[TIER_HEADER] = tier
        return JSONResponse({"error": str(exc)}, status_code=status_for(exc), headers=headers)

    return handle
