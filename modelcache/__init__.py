"""modelcache: serve thousands of models from one process.

Models live in a store (any fsspec URL); the ones in use sit on the device within an exact byte
budget; any model id is served on demand. See `ModelCache`.
"""

from ._cache import ModelCache as ModelCache
from ._exceptions import CacheClosedError as CacheClosedError
from ._exceptions import InvalidModelIdError as InvalidModelIdError
from ._exceptions import ModelBuildError as ModelBuildError
from ._exceptions import ModelCacheError as ModelCacheError
from ._exceptions import ModelFormatError as ModelFormatError
from ._exceptions import ModelLoadError as ModelLoadError
from ._exceptions import ModelNotFoundError as ModelNotFoundError
from ._exceptions import ModelTooLargeError as ModelTooLargeError
from ._exceptions import StoreError as StoreError
from ._format import ModelInfo as ModelInfo
from ._format import TensorInfo as TensorInfo
from ._policy import EvictionPolicy as EvictionPolicy
from ._policy import LRUPolicy as LRUPolicy
from ._stats import CacheStats as CacheStats
from ._store import Store as Store
from ._tiers import TierStats as TierStats
from ._torch import Weights as Weights
from ._units import parse_bytes as parse_bytes

__all__ = [
    "CacheClosedError",
    "CacheStats",
    "EvictionPolicy",
    "InvalidModelIdError",
    "LRUPolicy",
    "ModelBuildError",
    "ModelCache",
    "ModelCacheError",
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
