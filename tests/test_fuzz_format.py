"""Fuzzing safetensors headers and shard indexes through a cache's describe() and use().

Hypothesis writes files byte by byte (tests/safetensors_files.py): valid ones, and ones with a
lying header length, unknown dtypes, shapes with zeros or huge dims, offsets that overlap, leave
gaps, point past the file or overflow 64 bits, huge tensor counts; and indexes that name missing
or unsafe shards, map tensors to the wrong shard, or are not JSON objects. Every model either
loads bit-exact (every tensor's dtype, shape and bytes as its header says) or raises
`ModelFormatError` from describe() and use() alike, with no giant allocation, and leaves the
cache's accounting exact (nothing reserved, leased, loading or waiting afterwards).

Examples are few (CI runs them: a couple of seconds each test); run with
``HYPOTHESIS_PROFILE=fuzz`` ... or raise ``max_examples`` locally to fuzz longer.
"""

from __future__ import annotations

import json
import resource
import struct
import uuid
from typing import Any

import anyio
import fsspec
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from modelcache import ModelCache, ModelFormatError
from modelcache._format import DTYPE_SIZES

from .safetensors_files import DTYPE_NAMES, tensor_bytes

_TORCH = {name: dtype for dtype, name in DTYPE_NAMES.items()}
_DTYPES = sorted(set(DTYPE_SIZES) & set(_TORCH))
#: A bound on what one example may add to the process's peak RSS: a header that claims terabytes
#: must be refused before anything of its size is allocated.
_PEAK_GROWTH = 256 << 20
_EXAMPLES = settings(
    max_examples=25,
    deadline=None,
    # memory_root is shared by the examples: each writes under a fresh directory of its own.
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)

_dims = st.one_of(st.integers(0, 5), st.sampled_from([0, 1, 2**31, 2**40, 2**63]))
_tensor = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(_DTYPES), st.sampled_from(["F4", "X", "", "f32"])),
        "shape": st.lists(_dims, max_size=3),
        # None: the true offsets of a packed layout; else (start delta, end delta) to it.
        "skew": st.one_of(
            st.none(),
            st.none(),
            st.tuples(st.integers(-8, 8), st.integers(-8, 8)),
            st.tuples(st.just(0), st.sampled_from([2**40, 2**64, -(2**20)])),
        ),
    }
)
_file = st.fixed_dictionaries(
    {
        "tensors": st.lists(_tensor, max_size=6),
        "metadata": st.one_of(
            st.none(),
            st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
            st.just({"format": 1}),
            st.just([]),
        ),
        # Bytes added to (or cut from) the data section; a lying header length.
        "data_delta": st.sampled_from([0, 0, 0, 1, -1, 7]),
        "length_delta": st.sampled_from([0, 0, 0, 1, -1, 2**40, -(2**10)]),
        "seed": st.integers(0, 255),
        "names": st.sampled_from(["plain", "unicode", "dup"]),
    }
)


def _build(spec: dict[str, Any], prefix: str) -> tuple[bytes, dict[str, Any]]:
    """A safetensors file from ``spec``, and the header it says (for checking a load)."""
    header: dict[str, Any] = {}
    offset = 0
    for i, t in enumerate(spec["tensors"]):
        size = DTYPE_SIZES.get(t["dtype"], 1)
        count = 1
        for d in t["shape"]:
            count *= d
        start, end = offset, offset + count * size
        if t["skew"] is not None:
            start, end = start + t["skew"][0], end + t["skew"][1]
        name = {"plain": f"{prefix}{i}", "unicode": f"{prefix}é{i}/ü", "dup": f"{prefix}0"}[
            spec["names"]
        ]
        header[name] = {"dtype": t["dtype"], "shape": t["shape"], "data_offsets": [start, end]}
        offset = max(offset, end) if end < 1 << 20 else offset
    if spec["metadata"] is not None:
        header["__metadata__"] = spec["metadata"]
    encoded = json.dumps(header).encode()
    data_size = max(0, offset + spec["data_delta"])
    data = bytes((spec["seed"] + 31 * i) % 256 for i in range(data_size))
    length = max(0, len(encoded) + spec["length_delta"])
    return struct.pack("<Q", length) + encoded + data, header


def _expected(
    content: bytes, header: dict[str, Any]
) -> dict[str, tuple[torch.dtype, list[int], bytes]]:
    (length,) = struct.unpack("<Q", content[:8])
    data = content[8 + length :]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        out[name] = (_TORCH[t["dtype"]], t["shape"], data[start:end])
    return out


async def _check(template: str, expected: dict[str, Any] | None) -> None:
    """describe() and use() agree: both ModelFormatError, or a bit-exact load."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    async with ModelCache(template, device_budget="64MiB", failure_ttl=0) as cache:
        try:
            info = await cache.describe("m")
        except ModelFormatError:
            described = False
        else:
            described = True
            assert info.nbytes <= 64 << 20
        try:
            async with cache.use("m") as weights:
                assert described, "use() loaded a model describe() refused"
                assert expected is not None
                assert set(weights) == set(expected)
                for name, (dtype, shape, data) in expected.items():
                    tensor = weights[name]
                    assert tensor.dtype == dtype and list(tensor.shape) == shape, name
                    assert tensor_bytes(tensor) == data, name
            event("loaded")
        except ModelFormatError:
            assert not described, "describe() accepted a model use() refused"
            event("ModelFormatError")
        stats = cache.stats()
        assert stats.bytes_reserved == stats.bytes_resident
        assert (stats.loading, stats.waiters, stats.leased) == (0, 0, 0)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak
    assert grown < _PEAK_GROWTH


@pytest.fixture
def memory_root() -> Any:
    fs = fsspec.filesystem("memory")
    root = f"/fuzz-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


@_EXAMPLES
@given(spec=_file)
def test_any_single_file_loads_bit_exact_or_is_a_format_error(
    memory_root: tuple[Any, str], spec: dict[str, Any]
) -> None:
    """A fuzzed model.safetensors loads with every tensor as its header says, or describe()
    and use() both raise ModelFormatError; accounting exact, no giant allocation."""
    fs, root = memory_root
    base = f"{root}/{uuid.uuid4().hex}"
    content, header = _build(spec, "t")
    fs.pipe(f"{base}/m/model.safetensors", content)
    try:
        expected = (
            _expected(content, header)
            if all(
                isinstance(t, dict) and t.get("dtype") in _TORCH
                for k, t in header.items()
                if k != "__metadata__"
            )
            else None
        )
    except (KeyError, TypeError, struct.error):
        expected = None
    anyio.run(_check, f"memory://{base}/{{model_id}}/", expected)


_index = st.fixed_dictionaries(
    {
        "shards": st.lists(_file, min_size=1, max_size=3),
        "shard_names": st.sampled_from(["good", "missing", "../up", "/abs", "sub/dir", "é", ""]),
        "weight_map": st.sampled_from(["true", "drop", "extra", "swap", "not-a-dict", "list"]),
        "metadata": st.one_of(st.none(), st.just({"total_size": 3, "x": [1]}), st.just("str")),
        "raw": st.sampled_from([None, None, None, b"", b"[]", b"{", b'{"weight_map": null}']),
    }
)


@_EXAMPLES
@given(spec=_index)
def test_any_sharded_model_loads_bit_exact_or_is_a_format_error(
    memory_root: tuple[Any, str], spec: dict[str, Any]
) -> None:
    """A fuzzed model.safetensors.index.json and its shards load bit-exact, or describe() and
    use() both raise ModelFormatError; accounting exact."""
    fs, root = memory_root
    base = f"{root}/{uuid.uuid4().hex}"
    weight_map: dict[str, str] = {}
    expected: dict[str, Any] | None = {}
    names = []
    for i, shard in enumerate(spec["shards"]):
        good = f"model-{i + 1:05d}-of-{len(spec['shards']):05d}.safetensors"
        name = {"good": good, "missing": good, "../up": f"../{good}", "/abs": f"/{good}",
                "sub/dir": f"sub/{good}", "é": f"é{i}.safetensors", "": ""}[spec["shard_names"]]  # fmt: skip
        names.append(name)
        content, header = _build(shard, f"s{i}.")
        stored = spec["shard_names"] != "missing" or i == 0
        if stored and name and not name.startswith(("/", "..")):
            fs.pipe(f"{base}/m/{name}", content)
        try:
            tensors = _expected(content, header)
        except (KeyError, TypeError, struct.error):
            expected = None  # a dtype torch has no name for: it cannot load
        else:
            if expected is not None:
                expected.update(tensors)
        weight_map.update({k: name for k in header if k != "__metadata__"})
    mode = spec["weight_map"]
    if mode == "drop" and weight_map:
        weight_map.pop(next(iter(weight_map)))
    elif mode == "extra":
        weight_map["ghost"] = names[0]
    elif mode == "swap" and len(names) > 1 and weight_map:
        weight_map[next(iter(weight_map))] = names[-1] if names[-1] != names[0] else names[1]
    index: Any = {"weight_map": weight_map}
    if mode == "not-a-dict":
        index = {"weight_map": list(weight_map)}
    elif mode == "list":
        index = [weight_map]
    if spec["metadata"] is not None and isinstance(index, dict):
        index["metadata"] = spec["metadata"]
    raw = spec["raw"] if spec["raw"] is not None else json.dumps(index).encode()
    fs.pipe(f"{base}/m/model.safetensors.index.json", raw)
    anyio.run(_check, f"memory://{base}/{{model_id}}/", expected)
