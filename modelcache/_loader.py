"""From a model id to a validated `ModelInfo`, and from a `ModelInfo` to filled bytes.

Reading a model's description costs a few KiB of I/O whatever its size: the file's size and
the first 8 KiB (`Store.read_head`: one worker-thread call for a local file, none for a
``memory://`` one, one ranged GET over http(s) and s3 (`_firstget`: its headers give the size
and the version), a stat and a ranged read elsewhere), which hold the whole header of most
models (one more read fetches the rest of a longer one). A sharded model costs one index read and then its shard headers,
read concurrently.

Parsing is CPU work of about 10 us per tensor: a header longer than the first read (over ~80
tensors), a large index or config, and the layout of a model of many tensors are worked out in a
thread, so the event loop never waits on them. A model's headers total at most
`MAX_HEADER_SIZE` bytes, checked before each is read.

Filling a buffer reads each shard's data section as ONE run of the file, scattered into the
segments of the layout (``Store.read_scatter``): a header of thousands of tensors that each need
their own shift costs one open (or one window of requests), not one per tensor; and at most
``_RUNS_AT_ONCE`` shards are read at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread

from ._concurrency import gather
from ._exceptions import ModelFormatError, ModelNotFoundError
from ._firstget import read_small_file
from ._format import (
    INDEX_NAME,
    MAX_HEADER_SIZE,
    SINGLE_NAME,
    ModelInfo,
    Segment,
    ShardHeader,
    header_length,
    layout_model,
    parse_header,
    parse_index,
)
from ._store import Store
from ._versions import ModelVersion, reading

__all__ = [
    "CONFIG_NAME",
    "fill_buffer",
    "plan_runs",
    "read_config",
    "read_model_info",
    "with_config",
]

CONFIG_NAME = "config.json"
#: First read of a file: the whole header of a model with up to ~80 tensors; larger headers
#: take one more read of exactly the rest.
_PREFIX = 8 << 10
#: Index and config files larger than this are refused rather than read.
_MAX_SIDE_FILE = 16 << 20
#: JSON longer than this is parsed in a thread (~1 ms of parsing), and so is the layout of a
#: model with more tensors than _LAYOUT_ON_LOOP.
_PARSE_ON_LOOP = _PREFIX
_LAYOUT_ON_LOOP = 256
#: Shards one `fill_buffer` reads at once (each read holds a file open or a window of requests).
_RUNS_AT_ONCE = 4

T = TypeVar("T")


async def _off_loop_if(big: bool, call: Callable[[], T]) -> T:
    """``call()``, in a worker thread when ``big`` (CPU work that would hold the event loop)."""
    if big:
        return await anyio.to_thread.run_sync(call)
    return call()


class _HeaderBudget:
    """Bytes of headers a model may still read (`MAX_HEADER_SIZE` for all its shards)."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_HEADER_SIZE

    def take(self, length: int, *, model_id: str, url: str) -> None:
        if length > self.left:
            raise ModelFormatError(
                f"model {model_id!r}: {url}: its headers total more than the limit of "
                f"{MAX_HEADER_SIZE} bytes per model",
                model_id=model_id,
                path=url,
            )
        self.left -= length


async def read_model_info(store: Store, model_id: str, url: str | None = None) -> ModelInfo:
    """Describe ``model_id``'s weights from its headers: tensor table, exact size, read plan,
    and the version (`ModelVersion`) of every file read: one version of each (`_versions`).
    ``url``: its ``store.model_url(model_id)`` when the caller has it (the id validated once).

    Raises InvalidModelIdError, ModelNotFoundError, ModelFormatError, StoreError (among them
    ModelChangedError: a file changed while it was read).
    """
    if url is None:
        url = store.model_url(model_id)
    with reading() as tags:
        return await _read_model_info(store, model_id, url, tags)


async def with_config(store: Store, info: ModelInfo) -> ModelInfo:
    """``info`` with its config.json (None when it has none), read as part of its version."""
    with reading(info.version) as tags:
        config = await read_config(store, info.model_id)
    return replace(info, config=config, version=ModelVersion.of(tags) if tags else info.version)


async def _read_model_info(
    store: Store, model_id: str, url: str, tags: Mapping[str, str]
) -> ModelInfo:
    budget = _HeaderBudget()
    if url.endswith(".safetensors"):
        shard = await _read_shard(store, model_id, url, url, budget)
        return await _layout(model_id, url, [shard], tags)
    single = store.join(url, SINGLE_NAME)
    try:
        head = await store.read_head(single, _PREFIX, model_id=model_id)
    except ModelNotFoundError:
        pass
    else:
        shard = await _read_shard(store, model_id, single, SINGLE_NAME, budget, head=head)
        return await _layout(model_id, url, [shard], tags)

    index_url = store.join(url, INDEX_NAME)
    try:
        data = await _read_side_file(store, model_id, index_url)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(
            f"model {model_id!r} not found: no {SINGLE_NAME} or {INDEX_NAME} at {url}",
            model_id=model_id,
            path=url,
        ) from exc
    weight_map, metadata = await _off_loop_if(
        len(data) > _PARSE_ON_LOOP, partial(parse_index, data, model_id=model_id, url=index_url)
    )

    async def read(name: str) -> ShardHeader:
        shard_url = store.join(url, name)
        try:
            return await _read_shard(store, model_id, shard_url, name, budget)
        except ModelNotFoundError as exc:
            raise ModelFormatError(
                f"model {model_id!r}: {INDEX_NAME} names shard {name!r}, "
                f"but there is no file at {shard_url}",
                model_id=model_id,
                path=shard_url,
            ) from exc

    names = sorted(set(weight_map.values()))
    headers = await gather([partial(read, name) for name in names])
    return await _layout(model_id, url, headers, tags, weight_map=weight_map, metadata=metadata)


async def _layout(
    model_id: str,
    url: str,
    shards: list[ShardHeader],
    tags: Mapping[str, str],
    *,
    weight_map: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> ModelInfo:
    # Every file is read: its version is known, and made part of the info as it is built.
    version = ModelVersion.of(tags) if tags else None
    layout = partial(
        layout_model,
        model_id,
        url,
        shards,
        weight_map=weight_map,
        metadata=metadata,
        version=version,
    )
    return await _off_loop_if(sum(len(s.tensors) for s in shards) > _LAYOUT_ON_LOOP, layout)


async def _read_shard(
    store: Store,
    model_id: str,
    url: str,
    name: str,
    budget: _HeaderBudget,
    *,
    head: tuple[int, bytes] | None = None,
) -> ShardHeader:
    if head is None:
        head = await store.read_head(url, _PREFIX, model_id=model_id)
    size, prefix = head
    length = header_length(prefix, size, model_id=model_id, url=url)
    budget.take(length, model_id=model_id, url=url)
    end = 8 + length
    rest = b""
    if len(prefix) < end:
        rest = await store.read_range(url, len(prefix), end, model_id=model_id)
        if len(prefix) + len(rest) < end:
            raise ModelFormatError(
                f"model {model_id!r}: {url}: file shrank while its header was read",
                model_id=model_id,
                path=url,
            )

    if length <= _PARSE_ON_LOOP:  # the usual header: parsed here, no thread, no closure
        return _parse_shard(prefix, end, rest, size, name, model_id, url)
    return await anyio.to_thread.run_sync(
        _parse_shard, prefix, end, rest, size, name, model_id, url
    )


#: The last header parsed of each file (by URL), up to `_PARSED_KEPT` files with headers of
#: at most `_PARSED_MAX` bytes: a model loaded again (evicted, then used) whose file holds the
#: same header bytes at the same size is not parsed again (~8 us a tensor: 0.5 ms for 64).
_PARSED: dict[str, ShardHeader] = {}
_PARSED_KEPT = 32
_PARSED_MAX = 64 << 10


def _parse_shard(
    prefix: bytes, end: int, rest: bytes, size: int, name: str, model_id: str, url: str
) -> ShardHeader:
    """The header of a shard from its first bytes read (and the rest, when they were short).

    A function of its own rather than a closure in `_read_shard`: a closure's variables are
    cells from the start of its frame, seven objects more for the collector per header read
    in flight.

    Parsing is a function of the header's bytes, the file's size and its name and URL: a
    header parsed before from the same (`_PARSED`) is that parse's result (immutable), which
    the model's id only ever named in an error. Bounded by bytes and files, all dropped at
    once when full (one step: no table iterated while another thread's parse inserts)."""
    header = prefix[8:end] + rest  # joined here: a copy of up to 100 MB is off the loop too
    known = _PARSED.get(url)
    if (
        known is not None
        and known.name == name
        and known.data_start + known.data_size == size
        and known.header == header
    ):
        return known
    shard = parse_header(header, size, name=name, model_id=model_id, url=url)
    if len(header) <= _PARSED_MAX and shard.header == header:
        if len(_PARSED) >= _PARSED_KEPT:
            _PARSED.clear()
        _PARSED[url] = shard
    return shard


async def _read_side_file(store: Store, model_id: str, url: str) -> bytes:
    # One GET on http(s) and s3 (size, tag and bytes), a size then a read elsewhere.
    size, data = await read_small_file(store, url, _MAX_SIDE_FILE, model_id=model_id)
    if data is None:
        raise ModelFormatError(
            f"model {model_id!r}: {url} is {size} bytes, too large for a side file",
            model_id=model_id,
            path=url,
        )
    return data


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
        config = await _off_loop_if(
            len(data) > _PARSE_ON_LOOP, lambda: json.loads(data.decode("utf-8"))
        )
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


def plan_runs(segments: Sequence[Segment]) -> list[list[Segment]]:
    """``segments`` grouped into runs: consecutive segments of one file, each starting where the
    one before it ends, so that a run is one contiguous range of the file (one read)."""
    runs: list[list[Segment]] = []
    for seg in segments:
        if runs:
            last = runs[-1][-1]
            if last.url == seg.url and last.src + last.length == seg.src:
                runs[-1].append(seg)
                continue
        runs.append([seg])
    return runs


async def fill_buffer(store: Store, info: ModelInfo, dest: memoryview) -> None:
    """Read every segment of ``info`` into ``dest`` (``info.nbytes`` writable bytes).

    One scattered read per run of segments (a shard's whole data section), ``_RUNS_AT_ONCE``
    at a time; the store splits each into chunks and bounds its own concurrency.
    """
    if len(dest) != info.nbytes:
        raise ValueError(
            f"buffer is {len(dest)} bytes, model {info.model_id!r} needs {info.nbytes}"
        )
    runs = iter(plan_runs(info.segments))  # shared: each run is read by the worker that takes it
    with reading(info.version):  # each shard's data from the version its header was read at
        await _fill(store, info, dest, runs)


async def _fill(
    store: Store, info: ModelInfo, dest: memoryview, runs: Iterator[list[Segment]]
) -> None:

    async def worker() -> None:
        for run in runs:
            first = run[0]
            if len(run) == 1:  # the usual case: a shard that keeps one shift
                view = dest[first.dst : first.dst + first.length]
                await store.read_into(first.url, first.src, view, model_id=info.model_id)
            else:
                views = [dest[seg.dst : seg.dst + seg.length] for seg in run]
                await store.read_scatter(first.url, first.src, views, model_id=info.model_id)

    await gather([worker] * min(_RUNS_AT_ONCE, len(info.segments)))
