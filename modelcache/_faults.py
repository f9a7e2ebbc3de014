"""How a store's errors are read: transient or permanent, missing or failing, and typed.

fsspec and its backends report failures in their own ways (aiohttp's ClientResponseError,
botocore's ClientError with an S3 error code, fsspec's http ``_info`` turning even a 503 into a
FileNotFoundError): the functions here look along an error's cause chain for an HTTP status or an
S3 code and decide. `translated` turns the result into the library's typed errors at the Store's
boundary; `is_transient` decides the Store's retries.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator, Mapping
from types import TracebackType

from ._exceptions import ModelCacheError, ModelNotFoundError, StoreError

__all__ = [
    "HttpStatusError",
    "describe",
    "http_status",
    "is_missing",
    "is_transient",
    "status_error",
    "translated",
    "truncated",
]


class HttpStatusError(OSError):
    """An error status answered to a request made without aiohttp (`_sockets`), told apart
    (transient or not, missing or not) by its status as aiohttp's ClientResponseError is."""

    def __init__(self, status: int, reason: str, url: str) -> None:
        super().__init__(errno.EIO, f"{status}, message={reason!r}, url={url!r}")
        self.status = status


class _HttpMissing(HttpStatusError, FileNotFoundError):
    """404 and 410: a FileNotFoundError, as fsspec's http raises for them."""


def status_error(status: int, reason: str, url: str) -> HttpStatusError:
    """The error for an http error ``status``."""
    cls = _HttpMissing if status in (404, 410) else HttpStatusError
    return cls(status, reason, url)


# S3 error codes that mean "try again later" whatever the HTTP status says.
_TRANSIENT_CODES = frozenset(
    (
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
    )
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes (or contexts), innermost last."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        yield current
        cause = current.__cause__
        current = (
            cause if cause is not None or current.__suppress_context__ else current.__context__
        )


def _own_status(exc: BaseException) -> int | None:
    """The HTTP status ``exc`` itself carries: aiohttp's, botocore's ClientError's, requests'."""
    if isinstance(exc, HttpStatusError):
        return exc.status
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None and isinstance(exc, aiohttp.ClientResponseError):
        status: int = exc.status
        return status
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):  # botocore ClientError
        meta = response.get("ResponseMetadata")
        found = meta.get("HTTPStatusCode") if isinstance(meta, Mapping) else None
        return found if isinstance(found, int) else None
    found = getattr(response, "status_code", None)  # requests.HTTPError
    return found if isinstance(found, int) else None


def _error_code(exc: BaseException) -> object:
    response = getattr(exc, "response", None)
    error = response.get("Error") if isinstance(response, Mapping) else None
    return error.get("Code") if isinstance(error, Mapping) else None


def http_status(exc: BaseException) -> int | None:
    """The first HTTP status found along ``exc``'s cause chain."""
    for e in _chain(exc):
        status = _own_status(e)
        if status is not None:
            return status
    return None


def _transient_types() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(transient, permanent-though-they-look-transient) exception types of loaded libraries."""
    transient: list[type[BaseException]] = [TimeoutError, ConnectionError]
    permanent: list[type[BaseException]] = []
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        transient += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
        permanent.append(aiohttp.ClientSSLError)  # a bad certificate stays bad
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None:
        for name in (
            "ConnectionError",  # EndpointConnectionError, ConnectTimeoutError, ...
            "HTTPClientError",  # ConnectionClosedError, ReadTimeoutError, ...
            "IncompleteReadError",
            "ResponseStreamingError",
        ):
            transient += [getattr(botocore, name)] if hasattr(botocore, name) else []
        permanent += [botocore.SSLError] if hasattr(botocore, "SSLError") else []
    return tuple(transient), tuple(permanent)


def is_transient(exc: BaseException) -> bool:
    """Whether a request that raised ``exc`` may succeed if made again.

    Yes for connection errors and resets, timeouts, truncated bodies, HTTP 408, 429 and 5xx except
    501, and S3 throttling and timeout codes; no for everything else (404, 403, TLS errors, our own
    errors). The first error code or HTTP status along the cause chain decides.
    """
    transient, permanent = _transient_types()
    for e in _chain(exc):
        if isinstance(e, ModelCacheError):
            return False
        if _error_code(e) in _TRANSIENT_CODES:  # before the status: S3's RequestTimeout is a 400
            return True
        status = _own_status(e)
        if status is not None:
            return status in (408, 429) or (500 <= status < 600 and status != 501)
        if isinstance(e, permanent):
            return False
        if isinstance(e, transient):
            return True
    return False


def is_missing(exc: BaseException) -> bool:
    """A FileNotFoundError that means the file is not there (not a 503 or a reset in disguise)."""
    if not isinstance(exc, FileNotFoundError):
        return False
    status = http_status(exc)
    if status is not None:
        return status in (404, 410)
    return not is_transient(exc)


def describe(exc: BaseException) -> str:
    """``Type: message`` of ``exc`` and of its direct cause (fsspec's http reports a 503 as a
    FileNotFoundError from the aiohttp error; s3fs an OSError from botocore's)."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    return text if cause is None else f"{text} (from {type(cause).__name__}: {cause})"


class translated:  # lower case: used as a function, ``with translated(op, url, model_id):``
    """Turn filesystem errors into the library's typed errors; let ours and BaseException pass.

    A class rather than a generator context manager: every read enters one (a small model's
    load two), and a generator, its frame and contextlib's wrapper were three objects each."""

    __slots__ = ("_model_id", "_op", "_url")

    def __init__(self, op: str, url: str, model_id: str) -> None:
        self._op = op
        self._url = url
        self._model_id = model_id

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, ModelCacheError):
            return
        url, model_id = self._url, self._model_id
        if is_missing(exc):
            raise ModelNotFoundError(
                f"model {model_id!r} not found: no file at {url}", model_id=model_id, path=url
            ) from exc
        raise StoreError(
            f"cannot {self._op} {url} for model {model_id!r}: {describe(exc)}",
            model_id=model_id,
            path=url,
        ) from exc


def truncated(url: str, model_id: str, offset: int, expected: int, got: int) -> StoreError:
    return StoreError(
        f"{url} of model {model_id!r} is truncated: expected {expected} bytes from offset "
        f"{offset}, got {got}",
        model_id=model_id,
        path=url,
    )
