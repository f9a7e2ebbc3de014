"""The exceptions modelcache raises.

Every error is a :class:`ModelCacheError`; each leaf also subclasses the builtin a caller would
naturally catch, so ``except KeyError`` still works for a missing model::

    ModelCacheError
     ├── InvalidModelIdError (ValueError)      the id could escape the store root or is malformed
     ├── ModelNotFoundError (KeyError)         the store has no model under that id
     ├── StoreError (OSError)                  any other failure talking to the store
     │    └── ModelChangedError                a file changed in the store during a load
     ├── ModelFormatError (ValueError)         the model's files are not valid safetensors
     ├── ModelTooLargeError (ValueError)       the model can never fit the tier's byte budget
     ├── ModelLoadError (RuntimeError)         loading failed for another reason (e.g. out of memory)
     │    └── ModelBuildError                  the user's builder raised while making the model
     ├── DeviceOutOfMemoryError (MemoryError)  the device had no memory left for the model now
     └── CacheClosedError (RuntimeError)       the cache is not open (not entered, or closed)

Errors with ``remember = False`` (`DeviceOutOfMemoryError`) are transient: the cache does not
remember them as the model's failure, so the next request tries again.

Messages name the model id and, where there is one, the store path. Errors from fsspec, the OS
and torch are translated at the boundary with ``raise ... from exc`` so the cause is kept.
"""

from __future__ import annotations

__all__ = [
    "CacheClosedError",
    "DeviceOutOfMemoryError",
    "InvalidModelIdError",
    "ModelBuildError",
    "ModelCacheError",
    "ModelChangedError",
    "ModelFormatError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelTooLargeError",
    "StoreError",
    "as_model_error",
]


class ModelCacheError(Exception):
    """Base class of every error modelcache raises."""

    #: Whether a failed load with this error is remembered for ``failure_ttl`` (a broken model
    #: fails fast); False for conditions of the moment that say nothing about the model.
    remember: bool = True

    def __init__(self, message: str, *, model_id: str | None = None, path: str | None = None):
        super().__init__(message)
        self.message = message
        self.model_id = model_id
        self.path = path

    def __str__(self) -> str:
        # KeyError's __str__ would repr() the message; every subclass reads the same way instead.
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.message, self.model_id, self.path))


def _rebuild(
    cls: type[ModelCacheError], message: str, model_id: str | None, path: str | None
) -> ModelCacheError:
    return cls(message, model_id=model_id, path=path)


class InvalidModelIdError(ModelCacheError, ValueError):
    """The model id is malformed or could leave the store root (``..``, ``/``, URL syntax...)."""


class ModelNotFoundError(ModelCacheError, KeyError):
    """The store holds no model under this id."""


class StoreError(ModelCacheError, OSError):
    """Reading from the store failed for a reason other than a missing model."""


class ModelChangedError(StoreError):
    """A file of the model changed in the store while one load read it: the load never mixes
    two versions. Transient (``remember = False``): the next load reads the new version."""

    remember = False


class ModelFormatError(ModelCacheError, ValueError):
    """The model's files are not valid safetensors (or its shard index is invalid)."""


class ModelTooLargeError(ModelCacheError, ValueError):
    """The model is larger than the whole byte budget of the tier it must go to."""


class ModelLoadError(ModelCacheError, RuntimeError):
    """Loading failed for a reason that is neither the store's nor the file's (e.g. memory)."""


class ModelBuildError(ModelLoadError):
    """The model class or builder raised while making a model from its weights."""


class DeviceOutOfMemoryError(ModelCacheError, MemoryError):
    """The device could not allocate the model's buffer, even after its cached blocks were freed.

    Transient (``remember = False``): device memory the budget does not count (other processes,
    the user's tensors, the allocator's cache) was in the way; a later load may well succeed.
    """

    remember = False


class CacheClosedError(ModelCacheError, RuntimeError):
    """The cache was used before ``async with cache:`` or after it closed."""


def as_model_error(exc: Exception, model_id: str) -> ModelCacheError:
    """``exc`` if it is already typed, else a ModelLoadError naming the model, caused by it."""
    if isinstance(exc, ModelCacheError):
        return exc
    wrapped = ModelLoadError(
        f"model {model_id!r} failed to load: {type(exc).__name__}: {exc}", model_id=model_id
    )
    wrapped.__cause__ = exc
    return wrapped
