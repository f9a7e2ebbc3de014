"""modelcache: serve thousands of models from one process.

Models live in a store (any fsspec URL); the ones in use sit on the device within an exact byte
budget; any model id is served on demand. See `ModelCache`.

`CupyBackend` (the ``cuda`` extra) is imported on first access, so ``import modelcache`` never
imports CuPy.
"""

from typing import TYPE_CHECKING, Any

from ._backend import DeviceBackend as DeviceBackend
from ._cache import ModelCache as ModelCache
from ._cost import LoadCosts as LoadCosts
from ._exceptions import CacheClosedError as CacheClosedError
from ._exceptions import DeviceOutOfMemoryError as DeviceOutOfMemoryError
from ._exceptions import InvalidModelIdError as InvalidModelIdError
from ._exceptions import ModelBuildError as ModelBuildError
from ._exceptions import ModelCacheError as ModelCacheError
from ._exceptions import ModelChangedError as ModelChangedError
from ._exceptions import ModelFormatError as ModelFormatError
from ._exceptions import ModelLoadError as ModelLoadError
from ._exceptions import ModelNotFoundError as ModelNotFoundError
from ._exceptions import ModelTooLargeError as ModelTooLargeError
from ._exceptions import StoreError as StoreError
from ._format import ModelInfo as ModelInfo
from ._format import TensorInfo as TensorInfo
from ._observe import CacheObserver as CacheObserver
from ._policy import CostAwarePolicy as CostAwarePolicy
from ._policy import EvictionPolicy as EvictionPolicy
from ._policy import FrequencyHistory as FrequencyHistory
from ._policy import LRUPolicy as LRUPolicy
from ._stats import CacheStats as CacheStats
from ._store import Store as Store
from ._tiers import TierStats as TierStats
from ._torch import Weights as Weights
from ._units import parse_bytes as parse_bytes

if TYPE_CHECKING:
    from ._cupy import CupyBackend as CupyBackend

__all__ = [
    "CacheClosedError",
    "CacheObserver",
    "CacheStats",
    "CostAwarePolicy",
    "CupyBackend",
    "DeviceBackend",
    "DeviceOutOfMemoryError",
    "EvictionPolicy",
    "FrequencyHistory",
    "InvalidModelIdError",
    "LRUPolicy",
    "LoadCosts",
    "ModelBuildError",
    "ModelCache",
    "ModelCacheError",
    "ModelChangedError",
    "ModelFormatError",
    "ModelInfo",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelTooLargeError",
    "Store",
    "StoreError",
    "TensorInfo",
    "TierStats",
    "Weights",
    "parse_bytes",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "CupyBackend":  # the module imports CuPy only when a backend is made
        from ._cupy import CupyBackend

        return CupyBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
