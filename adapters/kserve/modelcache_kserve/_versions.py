"""V2's versioned paths (``/v2/models/{id}/versions/{v}/...``), which KServe answers 501.

A cache model's version is what the store says identifies its files (`ModelCache.version_of`;
a model not held yet is loaded to learn it, as a request for it would):
a path naming the version the cache serves now (the one a request would get) is served as the
unversioned path; any other version answers 404 naming the one served. The store keeps only
its newest version, so no older one can be served. Plain KServe models registered beside the
cache keep KServe's answer.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ._errors import ModelRequestError

if TYPE_CHECKING:
    from ._repository import CacheModelRepository

__all__ = ["VersionedPaths"]

_VERSIONED = re.compile(r"^/v2/models/([^/]+)/versions/([^/]+)(/.*)?$")


class VersionedPaths:
    """ASGI middleware: a versioned V2 path of a cache model, served or refused (see above)."""

    def __init__(self, app: ASGIApp, *, repository: CacheModelRepository, handler: Any) -> None:
        self.app = app
        self.repository = repository
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = _VERSIONED.match(scope["path"]) if scope["type"] == "http" else None
        if found is None or found[1] in self.repository.models:
            await self.app(scope, receive, send)
            return
        name, version, rest = found[1], found[2], found[3] or ""
        try:
            current = await self.repository.current_version(name)
            if version != current:
                raise ModelRequestError(
                    HTTPStatus.NOT_FOUND,
                    f"model {name!r} has no version {version!r} here: it serves version "
                    f"{current!r}, the store's newest (older versions are not kept)",
                )
        except Exception as exc:
            # Not routed yet: the path's model, for the handler's tier header.
            routed = {**scope, "path_params": {"model_name": name}}
            response = await self.handler(Request(routed, receive), exc)
            await response(scope, receive, send)
            return
        path = f"/v2/models/{name}{rest}"
        await self.app({**scope, "path": path, "raw_path": path.encode()}, receive, send)
