"""From a model id to a validated `ModelInfo`, and from a `ModelInfo` to filled bytes.

Reading a model's description costs a few KiB of I/O whatever its size: the file's size, then one
ranged read of the first 8 KiB, which holds the whole header of most models (one more read
fetches the rest of a longer one). A sharded model costs one index read and then its shard headers,
read concurrently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import partial
from typing import Any

from ._concurrency import gather
from ._exceptions import ModelFormatError, ModelNotFoundError
from ._format import (
    INDEX_NAME,
    SINGLE_NAME,
    ModelInfo,
    ShardHeader,
    header_length,
    layout_model,
    parse_header,
    parse_index,
)
from ._store import Store

__all__ = ["CONFIG_NAME", "fill_buffer", "read_config", "read_model_info"]

CONFIG_NAME = "config.json"
#: First read of a file: the whole header of a model with up to ~80 tensors; larger headers
#: take one more read of exactly the rest.
_PREFIX = 8 << 10
#: Index and config files larger than this are refused rather than read.
_MAX_SIDE_FILE = 16 << 20


async def read_model_info(store: Store, model_id: str) -> ModelInfo:
    """Describe ``model_id``'s weights from its headers: tensor table, exact size, read plan.

    Raises InvalidModelIdError, ModelNotFoundError, ModelFormatError or StoreError.
    """
    url = store.model_url(model_id)
    if url.endswith(".safetensors"):
        return layout_model(model_id, url, [await _read_shard(store, model_id, url, url)])
    single = store.join(url, SINGLE_NAME)
    try:
        size = await store.size(single, model_id=model_id)
    except ModelNotFoundError:
        pass
    else:
        shard = await _read_shard(store, model_id, single, SINGLE_NAME, size=size)
        return layout_model(model_id, url, [shard])

    index_url = store.join(url, INDEX_NAME)
    try:
        data = await _read_side_file(store, model_id, index_url)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(
            f"model {model_id!r} not found: no {SINGLE_NAME} or {INDEX_NAME} at {url}",
            model_id=model_id,
            path=url,
        ) from exc
    weight_map, metadata = parse_index(data, model_id=model_id, url=index_url)

    async def read(name: str) -> ShardHeader:
        shard_url = store.join(url, name)
        try:
            return await _read_shard(store, model_id, shard_url, name)
        except ModelNotFoundError as exc:
            raise ModelFormatError(
                f"model {model_id!r}: {INDEX_NAME} names shard {name!r}, "
                f"but there is no file at {shard_url}",
                model_id=model_id,
                path=shard_url,
            ) from exc

    names = sorted(set(weight_map.values()))
    headers = await gather([partial(read, name) for name in names])
    return layout_model(model_id, url, headers, weight_map=weight_map, metadata=metadata)


async def _read_shard(
    store: Store, model_id: str, url: str, name: str, *, size: int | None = None
) -> ShardHeader:
    if size is None:
        size = await store.size(url, model_id=model_id)
    prefix = await store.read_range(url, 0, min(size, _PREFIX), model_id=model_id)
    length = header_length(prefix, size, model_id=model_id, url=url)
    end = 8 + length
    if len(prefix) < end:
        prefix += await store.read_range(url, len(prefix), end, model_id=model_id)
        if len(prefix) < end:
            raise ModelFormatError(
                f"model {model_id!r}: {url}: file shrank while its header was read",
                model_id=model_id,
                path=url,
            )
    return parse_header(prefix[8:end], size, name=name, model_id=model_id, url=url)


async def _read_side_file(store: Store, model_id: str, url: str) -> bytes:
    size = await store.size(url, model_id=model_id)
    if size > _MAX_SIDE_FILE:
        raise ModelFormatError(
            f"model {model_id!r}: {url} is {size} bytes, too large for a side file",
            model_id=model_id,
            path=url,
        )
    return await store.read_range(url, 0, size, model_id=model_id)


async def read_config(store: Store, model_id: str) -> Mapping[str, Any] | None:
    """The model's ``config.json`` as a dict, or None when it has none."""
    url = store.model_url(model_id)
    if url.endswith(".safetensors"):
        return None
    config_url = store.join(url, CONFIG_NAME)
    try:
        data = await _read_side_file(store, model_id, config_url)
    except ModelNotFoundError:
        return None
    try:
        config = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, absurd nesting or numbers
        raise ModelFormatError(
            f"model {model_id!r}: {config_url} is not valid JSON ({exc})",
            model_id=model_id,
            path=config_url,
        ) from exc
    if not isinstance(config, dict):
        raise ModelFormatError(
            f"model {model_id!r}: {config_url} is not a JSON object",
            model_id=model_id,
            path=config_url,
        )
    return config


async def fill_buffer(store: Store, info: ModelInfo, dest: memoryview) -> None:
    """Read every segment of ``info`` into ``dest`` (``info.nbytes`` writable bytes), concurrently.

    The store splits each segment into chunks and bounds its own concurrency.
    """
    if len(dest) != info.nbytes:
        raise ValueError(
            f"buffer is {len(dest)} bytes, model {info.model_id!r} needs {info.nbytes}"
        )
    await gather(
        [
            partial(
                store.read_into,
                seg.url,
                seg.src,
                dest[seg.dst : seg.dst + seg.length],
                model_id=info.model_id,
            )
            for seg in info.segments
        ]
    )
