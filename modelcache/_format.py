"""safetensors headers, shard indexes, and the layout of a model in one contiguous buffer.

Everything here is pure: bytes in, validated descriptions out. No I/O and no framework import,
so the same layout serves the torch and any other device backend.

A safetensors file is ``N`` (8 bytes, little-endian) + ``N`` bytes of JSON + the data section.
The JSON maps tensor names to ``{"dtype", "shape", "data_offsets": [start, end]}`` (offsets
relative to the data section) plus an optional ``__metadata__`` of string pairs. Validation follows
the reference implementation: ``N`` at most 100 MB and inside the file, a JSON object, known dtypes,
``end - start == prod(shape) * itemsize``, and the ranges sorted by offset tile the data section
exactly: no overlap, no hole, nothing missing at the end (truncated data) and nothing extra.

Limits of our own, so that what a header costs to parse and to hold is bounded whatever it says
(a model's description is not charged to any tier's byte budget): a file, and a model, hold at
most `max_tensors` of its weight bytes: `MAX_TENSORS`, or one tensor per `BYTES_PER_TENSOR` of
weights where that is more (a 405B checkpoint has a few thousand tensors per shard; the largest
mixture-of-experts checkpoints about 90,000 in all, over hundreds of GB); and a model's headers
total at most `MAX_HEADER_SIZE` bytes (the format's per-file limit, applied to the model). A
tensor's description and view cost about 1.3 KiB, so what a loaded model holds beyond its
charged bytes is at most ~85 MiB (65,536 empty tensors), or ~2% of its weight bytes where more
tensors are allowed; KiBs to a few MiB for real models.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ._exceptions import ModelFormatError

if TYPE_CHECKING:
    from ._versions import ModelVersion

__all__ = [
    "BYTES_PER_TENSOR",
    "DTYPE_SIZES",
    "INDEX_NAME",
    "MAX_HEADER_SIZE",
    "MAX_TENSORS",
    "SINGLE_NAME",
    "ModelInfo",
    "Segment",
    "ShardHeader",
    "TensorInfo",
    "header_length",
    "layout_model",
    "max_tensors",
    "parse_header",
    "parse_index",
]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_SIZE = 100_000_000
#: Tensors in one file or model at most, unless its weights allow more (see `max_tensors`).
#: Zero-size tensors cost no buffer byte but a few hundred bytes of description each.
MAX_TENSORS = 65_536
#: Beyond MAX_TENSORS, a file or model may hold one tensor per this many bytes of weights.
BYTES_PER_TENSOR = 64 << 10


def max_tensors(nbytes: int) -> int:
    """The most tensors a file or model with ``nbytes`` bytes of weights may hold."""
    return max(MAX_TENSORS, nbytes // BYTES_PER_TENSOR)


#: Each shard starts at a multiple of this in the model's buffer (what cudaMalloc guarantees).
SHARD_ALIGNMENT = 256

#: Item size in bytes of every safetensors dtype that has a whole-byte item.
DTYPE_SIZES: Mapping[str, int] = MappingProxyType(
    {
        "BOOL": 1,
        "U8": 1,
        "I8": 1,
        "F8_E5M2": 1,
        "F8_E4M3": 1,
        "F8_E4M3FNUZ": 1,
        "F8_E5M2FNUZ": 1,
        "F8_E8M0": 1,
        "I16": 2,
        "U16": 2,
        "F16": 2,
        "BF16": 2,
        "I32": 4,
        "U32": 4,
        "F32": 4,
        "I64": 8,
        "U64": 8,
        "F64": 8,
        "C64": 8,
    }
)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor: where it is in its shard file and where it goes in the model's buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str
    #: Byte range in the shard's data section, as in the header.
    start: int
    end: int
    #: Byte offset in the model's contiguous buffer (a multiple of the item size unless empty).
    #: A shard's header says ``start``, its place in a buffer of that shard alone: the tensors of
    #: a model's first shard usually keep it, and are then the model's own (`_placed`).
    offset: int = -1

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class ShardHeader:
    """A parsed, validated safetensors header of one file."""

    name: str
    url: str
    #: File offset of the data section: 8 + header length.
    data_start: int
    data_size: int
    #: Sorted by start; ``()`` in a laid-out model's ``shards`` (`layout_model`): its tensors
    #: are then the model's ``tensors``, so that a resident model keeps one table, not two.
    tensors: tuple[TensorInfo, ...]
    metadata: Mapping[str, str]
    #: The header JSON exactly as in the file (bytes 8 to data_start), to write the file again.
    header: bytes = b""


@dataclass(frozen=True, slots=True)
class Segment:
    """Copy ``length`` bytes at ``src`` in the file ``url`` to ``dst`` in the model's buffer."""

    url: str
    src: int
    dst: int
    length: int


#: The empty read-only mapping every model without metadata or side files shares: two objects
#: fewer per resident model for the garbage collector to scan (its full passes were a fifth of
#: a small-model fill's CPU time).
_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True, eq=False)
class ModelInfo:
    """Everything known about a model before a weight byte is read."""

    model_id: str
    url: str
    #: The weight files, in order. A shard's tensors are those of ``tensors`` whose ``shard``
    #: names it (``ShardHeader.name``): a laid-out shard's own ``tensors`` is empty.
    shards: tuple[ShardHeader, ...]
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str]
    #: Exact size of the model's buffer in bytes: the figure budgets are charged.
    nbytes: int
    segments: tuple[Segment, ...]
    #: The model's ``config.json`` side file, when its builder asked for it and it exists.
    config: Mapping[str, Any] | None = None
    #: What the store said identified each file read (`_versions.ModelVersion`), when known.
    version: ModelVersion | None = None
    #: The side files its builder declared (``side_files``): name -> bytes (`_sidefiles`).
    files: Mapping[str, bytes] = field(default_factory=lambda: _EMPTY)
    #: The side-file patterns ``config`` and ``files`` were read for; None: not read.
    side_patterns: frozenset[str] | None = None

    @property
    def side_bytes(self) -> int:
        """Bytes of the side files: counted in the host tier's budget beside ``nbytes``."""
        return sum(len(data) for data in self.files.values())

    def files_dir(self) -> contextlib.AbstractContextManager[str]:
        """A temporary directory holding the side files and config.json, removed on exit."""
        from ._sidefiles import files_dir

        return files_dir(self)

    @property
    def mappable(self) -> bool:
        """True when a page-aligned mapping of the (single) file can serve as the buffer.

        That needs every tensor's file offset to be a multiple of its item size: the zero-copy
        path then makes typed views straight into the mapping.
        """
        if len(self.shards) != 1:
            return False
        data_start = self.shards[0].data_start
        return all(
            t.offset == t.start and (data_start + t.start) % DTYPE_SIZES[t.dtype] == 0
            for t in self.tensors.values()
            if t.nbytes
        )


def _error(message: str, model_id: str, url: str) -> ModelFormatError:
    return ModelFormatError(f"model {model_id!r}: {url}: {message}", model_id=model_id, path=url)


def header_length(prefix: bytes, file_size: int, *, model_id: str, url: str) -> int:
    """Return ``N``, the JSON header's length, from the file's first bytes, after bounds checks."""
    if file_size < 8 or len(prefix) < 8:
        raise _error(
            f"file is {file_size} bytes, too small for a safetensors header", model_id, url
        )
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_SIZE:
        raise _error(
            f"header length {length} exceeds the format's limit of {MAX_HEADER_SIZE} bytes",
            model_id,
            url,
        )
    if 8 + length > file_size:
        raise _error(
            f"header length {length} runs past the end of the {file_size}-byte file",
            model_id,
            url,
        )
    return int(length)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A Python call per JSON object: where a header is parsed in a worker thread, the event
    # loop's thread can take the GIL back between objects (json's C scanner never lets go).
    return dict(pairs)


#: One decoder for every header (``json.loads`` with a hook makes one per call); its scanner
#: keeps no state between calls, so threads parsing headers at once may share it.
_DECODER = json.JSONDecoder(object_pairs_hook=_pairs)


def _load_json(data: bytes, what: str, model_id: str, url: str) -> dict[str, Any]:
    try:
        value = _DECODER.decode(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, absurd nesting or numbers
        raise _error(f"{what} is not valid JSON ({exc})", model_id, url) from exc
    if not isinstance(value, dict):
        raise _error(f"{what} is not a JSON object", model_id, url)
    return value


def _metadata(value: object, model_id: str, url: str) -> Mapping[str, str]:
    if value is None:
        return _EMPTY
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _error("__metadata__ must map strings to strings", model_id, url)
    return MappingProxyType(dict(value))


#: The largest size, stride or element count a torch tensor holds (int64).
_INT64_MAX = (1 << 63) - 1


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _too_many_elements(shape: tuple[int, ...]) -> bool:
    """Whether the product of ``shape``'s non-zero sizes passes int64. An empty tensor's bytes
    (0) do not bound its other sizes as a file's bytes bound every other tensor's: torch makes
    its strides and size from them in int64 and refuses (TypeError, RuntimeError) a shape such
    as ``[0, 2**63]`` or ``[2**62, 4, 0]`` when the load builds its views."""
    count = 1
    for size in shape:
        if size:
            count *= size
    return count > _INT64_MAX


def _tensor(name: str, entry: object, shard: str, model_id: str, url: str) -> TensorInfo:
    # Plain loops and ``type(x) is int`` (JSON gives exact ints; a bool is not one), no
    # generator per check: this runs for every tensor of every load (64 tensors parsed in
    # 0.35 ms with ``all(_is_count(d) for d in shape)``; the checks refuse the same entries).
    if not isinstance(entry, dict):
        raise _error(f"tensor {name!r}: entry is not an object", model_id, url)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise _error(f"tensor {name!r}: unknown or unsupported dtype {dtype!r}", model_id, url)
    expected = DTYPE_SIZES[dtype]
    if type(shape) is list:
        for size in shape:
            if type(size) is not int or size < 0:
                break
            expected *= size
        else:
            shape = tuple(shape)
    if type(shape) is not tuple:
        raise _error(f"tensor {name!r}: shape {shape!r} is not a list of sizes", model_id, url)
    if expected == 0 and _too_many_elements(shape):
        raise _error(
            f"tensor {name!r}: shape {list(shape)} counts more elements than a tensor can "
            f"index (2**63 - 1, its zero sizes left out)",
            model_id,
            url,
        )
    if type(offsets) is list and len(offsets) == 2:
        start, end = offsets
        valid = type(start) is int and type(end) is int and 0 <= start <= end
    else:
        valid = False
    if not valid:
        raise _error(f"tensor {name!r}: data_offsets {offsets!r} are invalid", model_id, url)
    if end - start != expected:
        raise _error(
            f"tensor {name!r}: shape {list(shape)} of {dtype} needs {expected} bytes "
            f"but data_offsets [{start}, {end}] span {end - start}",
            model_id,
            url,
        )
    return TensorInfo(name, dtype, shape, shard, start, end, start)


def parse_header(
    header: bytes, file_size: int, *, name: str, model_id: str, url: str
) -> ShardHeader:
    """Validate the header JSON of the file ``name`` (``file_size`` bytes) and describe it."""
    data_start = 8 + len(header)
    raw = _load_json(header, "header", model_id, url)
    metadata = _metadata(raw.pop("__metadata__", None), model_id, url)
    data_size = file_size - data_start
    if len(raw) > max_tensors(data_size):
        raise _error(
            f"header lists {len(raw)} tensors, more than the limit of "
            f"{max_tensors(data_size)} for {data_size} bytes of weights",
            model_id,
            url,
        )
    tensors = sorted(
        (_tensor(key, entry, name, model_id, url) for key, entry in raw.items()),
        key=lambda t: (t.start, t.end),
    )
    position = 0
    for tensor in tensors:
        if tensor.start != position:
            kind = "overlaps the previous tensor" if tensor.start < position else "leaves a hole"
            raise _error(
                f"tensor {tensor.name!r} at byte {tensor.start} {kind} (expected {position})",
                model_id,
                url,
            )
        position = tensor.end
    if position != data_size:
        kind = "truncated" if position > data_size else "has trailing bytes"
        raise _error(
            f"data section {kind}: tensors need {position} bytes, file holds {data_size}",
            model_id,
            url,
        )
    return ShardHeader(name, url, data_start, data_size, tuple(tensors), metadata, bytes(header))


def _shard_name(name: object, model_id: str, url: str) -> str:
    """Refuse shard names that could leave the model's directory."""
    if (
        not isinstance(name, str)
        or not name
        or len(name) > 255
        or name.startswith(("/", "~"))
        or any(c in name for c in "\\:?#%\x00")
        or any(part in ("", ".", "..") for part in name.split("/"))
        or not name.isprintable()
    ):
        raise _error(f"index names shard {name!r}, which is outside the model", model_id, url)
    return name


def parse_index(
    data: bytes, *, model_id: str, url: str
) -> tuple[dict[str, str], Mapping[str, str]]:
    """Parse a ``model.safetensors.index.json``: (tensor name -> shard file name, metadata).

    Metadata values are kept as JSON text when they are not strings (``total_size`` is a number).
    """
    raw = _load_json(data, "index", model_id, url)
    weight_map = raw.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise _error("index has no weight_map object", model_id, url)
    # Before a shard header is read: the claimed total_size may only allow more tensors, and
    # layout_model checks the real figure.
    claimed = raw.get("metadata")
    total = claimed.get("total_size") if isinstance(claimed, dict) else None
    limit = max_tensors(total if isinstance(total, int) and _is_count(total) else 0)
    if len(weight_map) > limit:
        raise _error(
            f"index lists {len(weight_map)} tensors, more than the limit of {limit} per model",
            model_id,
            url,
        )
    for tensor, shard in weight_map.items():
        if not isinstance(tensor, str):
            raise _error("index weight_map keys must be tensor names", model_id, url)
        _shard_name(shard, model_id, url)
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise _error("index metadata is not an object", model_id, url)
    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return dict(weight_map), MappingProxyType(text)


def layout_model(
    model_id: str,
    url: str,
    shards: Sequence[ShardHeader],
    *,
    weight_map: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
    version: ModelVersion | None = None,
) -> ModelInfo:
    """Place the shards in one buffer and plan the reads that fill it (of ``version``).

    With a ``weight_map`` (sharded models), every tensor must be in the shard the index names,
    and every tensor the index names must exist.
    """
    count = sum(len(shard.tensors) for shard in shards)
    weights = sum(shard.data_size for shard in shards)
    if count > max_tensors(weights):
        raise _error(
            f"model has {count} tensors, more than the limit of {max_tensors(weights)} "
            f"for {weights} bytes of weights",
            model_id,
            url,
        )
    tensors: dict[str, TensorInfo] = {}
    segments: list[Segment] = []
    cursor = 0
    for shard in shards:
        base = -(-cursor // SHARD_ALIGNMENT) * SHARD_ALIGNMENT
        shift = 0
        run_start = 0  # start, in the shard's data section, of the current segment
        for tensor in shard.tensors:
            if tensor.name in tensors:
                raise _error(f"tensor {tensor.name!r} appears in two shards", model_id, url)
            if weight_map is not None and weight_map.get(tensor.name) != shard.name:
                raise _error(
                    f"shard {shard.name!r} holds tensor {tensor.name!r}, which the index "
                    f"places in {weight_map.get(tensor.name)!r}",
                    model_id,
                    url,
                )
            itemsize = DTYPE_SIZES[tensor.dtype]
            pad = -(base + tensor.start + shift) % itemsize if tensor.nbytes else 0
            if pad:
                if tensor.start > run_start:
                    segments.append(
                        _segment(shard, run_start, tensor.start, base + run_start + shift)
                    )
                shift += pad
                run_start = tensor.start
            tensors[tensor.name] = _placed(tensor, base + tensor.start + shift)
        if shard.data_size > run_start:
            segments.append(_segment(shard, run_start, shard.data_size, base + run_start + shift))
        cursor = base + shard.data_size + shift
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise _error(
                f"index names tensors that no shard holds: {', '.join(missing[:5])}",
                model_id,
                url,
            )
    if metadata is None:
        metadata = shards[0].metadata if len(shards) == 1 else _EMPTY
    return ModelInfo(
        model_id=model_id,
        url=url,
        shards=tuple(_laid_out(shard) for shard in shards),
        tensors=MappingProxyType(tensors),
        metadata=metadata,
        nbytes=cursor,
        segments=tuple(segments),
        version=version,
    )


def _laid_out(shard: ShardHeader) -> ShardHeader:
    """``shard`` without its tensor table, which the model's ``tensors`` now holds: one
    GC-tracked object fewer per shard of a resident model for each full collection to scan."""
    if not shard.tensors:
        return shard
    return ShardHeader(
        shard.name, shard.url, shard.data_start, shard.data_size, (), shard.metadata, shard.header
    )


def _segment(shard: ShardHeader, start: int, end: int, dst: int) -> Segment:
    return Segment(shard.url, shard.data_start + start, dst, end - start)


def _placed(tensor: TensorInfo, offset: int) -> TensorInfo:
    """``tensor`` at ``offset`` in the model's buffer: the shard's own when it is already there
    (a resident model keeps both its shards' and its own tables: one object per tensor fewer
    for the garbage collector to scan in each of its passes)."""
    if tensor.offset == offset:
        return tensor
    return TensorInfo(
        tensor.name, tensor.dtype, tensor.shape, tensor.shard, tensor.start, tensor.end, offset
    )
