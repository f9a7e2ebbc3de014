"""modelcache on Ray Serve: replicas that each own a `ModelCache`, and a request router that
sends each model id to the replica holding it.

`CachedModels` is the deployment's base class; `affinity_router_config()` its
``request_router_config``; `CacheAffinityRouter` the router.
"""

from ._deployment import CachedModels as CachedModels
from ._deployment import http_status as http_status
from ._residency import MAX_IDS as MAX_IDS
from ._residency import Residency as Residency
from ._router import CacheAffinityRouter as CacheAffinityRouter
from ._router import affinity_router_config as affinity_router_config

__all__ = [
    "MAX_IDS",
    "CacheAffinityRouter",
    "CachedModels",
    "Residency",
    "affinity_router_config",
    "http_status",
]
