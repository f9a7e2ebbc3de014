"""modelcache-kserve: a KServe predictor serving every model of a store through one modelcache.

::

    from modelcache import ModelCache
    from modelcache_kserve import build_server

    cache = ModelCache("s3://bucket/models/{model_id}/", device="cuda:0", device_budget="40GiB")
    build_server(cache, MyModel).start()  # /v1/models/{id}:predict, /v2/models/{id}/infer

Or from a shell: ``python -m modelcache_kserve --store ... --model-class pkg.mod:Class
--device-budget 40GiB``. See the README for the model class's hooks and the error statuses.
"""

from ._errors import TIER_HEADER as TIER_HEADER
from ._errors import ModelRequestError as ModelRequestError
from ._errors import status_for as status_for
from ._hooks import default_postprocess as default_postprocess
from ._hooks import default_predict as default_predict
from ._hooks import default_preprocess as default_preprocess
from ._repository import CachedModel as CachedModel
from ._repository import CacheModelRepository as CacheModelRepository
from ._server import CacheModelServer as CacheModelServer
from ._server import build_server as build_server

__all__ = [
    "TIER_HEADER",
    "CacheModelRepository",
    "CacheModelServer",
    "CachedModel",
    "ModelRequestError",
    "build_server",
    "default_postprocess",
    "default_predict",
    "default_preprocess",
    "status_for",
]

__version__ = "0.1.0"
