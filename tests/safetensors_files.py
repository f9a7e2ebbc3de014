"""Write safetensors files byte by byte, so tests can make unusual and invalid ones.

``safetensors.torch.save_file`` only writes valid files with aligned tensors; these helpers write
whatever a test asks for: any header bytes, a lying header length, tensors packed at offsets that
are not multiples of their item size, and sharded models with an index.

A destination is a local `Path` or an fsspec URL string (``memory://...``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fsspec
import torch

__all__ = [
    "DTYPE_NAMES",
    "encode_header",
    "misaligned_pairs",
    "model_file",
    "put",
    "raw_file",
    "shard_name",
    "tensor_bytes",
    "write_model",
    "write_raw",
    "write_sharded",
]

Dest = str | Path

#: torch dtype -> safetensors dtype name, for every dtype this torch has.
DTYPE_NAMES: dict[torch.dtype, str] = {
    getattr(torch, attr): name
    for attr, name in (
        ("bool", "BOOL"),
        ("uint8", "U8"),
        ("int8", "I8"),
        ("int16", "I16"),
        ("uint16", "U16"),
        ("int32", "I32"),
        ("uint32", "U32"),
        ("int64", "I64"),
        ("uint64", "U64"),
        ("float16", "F16"),
        ("bfloat16", "BF16"),
        ("float32", "F32"),
        ("float64", "F64"),
        ("complex64", "C64"),
        ("float8_e4m3fn", "F8_E4M3"),
        ("float8_e5m2", "F8_E5M2"),
        ("float8_e8m0fnu", "F8_E8M0"),
        ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
        ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
    )
    if hasattr(torch, attr)
}


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of ``t`` in C order (works for 0-dim, empty, bool, float8)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes())


def encode_header(
    header: Mapping[str, Any] | bytes, *, align: int = 8, size: int | None = None
) -> bytes:
    """JSON-encode ``header`` (bytes pass as they are), padded with spaces.

    Padded to ``size`` bytes when given, else to a multiple of ``align`` (1: no padding).
    """
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    target = size if size is not None else -(-len(raw) // align) * align
    if target < len(raw):
        raise ValueError(f"header is {len(raw)} bytes, more than the {target} asked for")
    return raw + b" " * (target - len(raw))


def raw_file(
    header: Mapping[str, Any] | bytes,
    data: bytes,
    *,
    header_len: int | None = None,
    align: int = 8,
    size: int | None = None,
) -> bytes:
    """``<u64 N><header><data>``; ``header_len`` overrides the N written (it may lie)."""
    encoded = encode_header(header, align=align, size=size)
    n = len(encoded) if header_len is None else header_len
    return struct.pack("<Q", n) + encoded + data


def put(dest: Dest, data: bytes) -> None:
    """Write ``data`` to a local path (making parent directories) or an fsspec URL."""
    if isinstance(dest, Path):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    else:
        fs, path = fsspec.core.url_to_fs(dest)
        fs.pipe_file(path, data)


def _join(directory: Dest, name: str) -> Dest:
    return directory / name if isinstance(directory, Path) else f"{directory.rstrip('/')}/{name}"


def write_raw(
    dest: Dest,
    header: Mapping[str, Any] | bytes,
    data: bytes,
    *,
    header_len: int | None = None,
    align: int = 8,
) -> bytes:
    """Write a file made by `raw_file` to ``dest``; return its bytes."""
    content = raw_file(header, data, header_len=header_len, align=align)
    put(dest, content)
    return content


def model_file(
    tensors: Mapping[str, torch.Tensor],
    *,
    misalign: bool = False,
    metadata: Mapping[str, str] | None = None,
    align: int = 8,
) -> bytes:
    """The bytes of a safetensors file holding ``tensors``, laid out here, packed back to back.

    By default tensors are ordered by item size, largest first, so each offset is a multiple of
    its item size (as ``save_file`` does). ``misalign=True`` keeps the given order instead: a
    3-byte U8 tensor before an F32 one puts the F32 at offset 3.
    """
    names = list(tensors)
    if not misalign:
        names.sort(key=lambda n: -tensors[n].element_size())
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    chunks: list[bytes] = []
    offset = 0
    for name in names:
        t = tensors[name]
        data = tensor_bytes(t)
        header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    return raw_file(header, b"".join(chunks), align=align)


def misaligned_pairs(n: int) -> dict[str, torch.Tensor]:
    """``n`` pairs of a 1-byte U8 and a 2-byte F16, in that order: once laid out, every F16
    needs its own shift, so the model's layout has ``n + 1`` segments for a few bytes each."""
    g = torch.Generator().manual_seed(n)
    raw = torch.randint(0, 256, (3 * n,), dtype=torch.uint8, generator=g)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(n):
        tensors[f"u{i}"] = raw[3 * i : 3 * i + 1].clone()
        tensors[f"h{i}"] = raw[3 * i + 1 : 3 * i + 3].clone().view(torch.float16)
    return tensors


def write_model(
    directory: Dest,
    tensors: Mapping[str, torch.Tensor],
    *,
    misalign: bool = False,
    metadata: Mapping[str, str] | None = None,
    name: str = "model.safetensors",
    align: int = 8,
) -> bytes:
    """Write `model_file` as ``directory/name``; return the file's bytes."""
    content = model_file(tensors, misalign=misalign, metadata=metadata, align=align)
    put(_join(directory, name), content)
    return content


def shard_name(i: int, n: int) -> str:
    """The Hugging Face name of shard ``i`` (0-based) of ``n``."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_sharded(
    directory: Dest,
    shards: Sequence[Mapping[str, torch.Tensor]],
    *,
    misalign: bool = False,
    weight_map: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write each shard and ``model.safetensors.index.json``; return the weight map written.

    ``weight_map`` replaces the true one in the index (to write inconsistent indexes).
    """
    true_map: dict[str, str] = {}
    for i, tensors in enumerate(shards):
        name = shard_name(i, len(shards))
        write_model(directory, tensors, misalign=misalign, name=name)
        true_map.update(dict.fromkeys(tensors, name))
    written = dict(weight_map) if weight_map is not None else true_map
    index = {"metadata": dict(metadata or {}), "weight_map": written}
    put(_join(directory, "model.safetensors.index.json"), json.dumps(index).encode())
    return written
