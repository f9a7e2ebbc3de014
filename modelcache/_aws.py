"""One parse of botocore's service descriptions per process, for every Store's S3 client.

Making an aiobotocore client reads and parses botocore's JSON descriptions of the S3 service and
its endpoint rules (megabytes of JSON): 150-700 ms of CPU on the 2-core development VM, paid by
every fresh cache's first S3 load, against 10-20 ms once they are parsed (benches/README.md,
peer_loaders). botocore keeps them in the session's ``data_loader`` component, a cache of
parsed files with no other state; s3fs makes a new session per filesystem. So the Store gives
each s3fs filesystem it makes a session of its own (made as s3fs would make it, with the same
arguments: credentials, profiles and clients stay per Store) whose loader is shared with every
other session of the process that reads the same data path.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

__all__ = ["share_service_descriptions"]

_loaders: dict[object, Any] = {}  # botocore Loaders by data path
_lock = threading.Lock()


def share_service_descriptions(fs: Any) -> None:
    """Give the s3fs filesystem ``fs`` (not yet connected) a session whose service descriptions
    are parsed once per process. A session the caller gave (``session=``) is left as it is, and
    so is ``fs`` on an s3fs or botocore without the parts this needs."""
    if getattr(fs, "session", True) is not None or getattr(fs, "_s3", None) is not None:
        return
    try:  # untyped packages, optional (the s3 extra)
        aio_session: Any = importlib.import_module("aiobotocore.session")
        loaders: Any = importlib.import_module("botocore.loaders")
    except ImportError:
        return
    session = aio_session.AioSession(
        **getattr(fs, "kwargs", {})
    )  # what s3fs's set_session would make
    data_path = session.get_config_variable("data_path")
    with _lock:
        loader = _loaders.get(data_path)
        if loader is None:
            loader = _loaders[data_path] = loaders.create_loader(data_path)
    session.register_component("data_loader", loader)
    fs.session = session
