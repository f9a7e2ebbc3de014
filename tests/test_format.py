"""modelcache._format: header and index validation, and the one-buffer layout of a model."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import modelcache._format as fmt
from modelcache._exceptions import ModelFormatError
from modelcache._format import (
    BYTES_PER_TENSOR,
    DTYPE_SIZES,
    MAX_HEADER_SIZE,
    MAX_TENSORS,
    SHARD_ALIGNMENT,
    ModelInfo,
    ShardHeader,
    header_length,
    layout_model,
    max_tensors,
    parse_header,
    parse_index,
)

from .safetensors_files import raw_file, shard_name

MODEL_ID = "tenant-7"
MODEL_URL = "memory://models/tenant-7"
URL = f"{MODEL_URL}/model.safetensors"
INDEX_URL = f"{MODEL_URL}/model.safetensors.index.json"


# -- helpers --------------------------------------------------------------------------------------


@contextmanager
def refused(url: str = URL) -> Iterator[None]:
    """Expect a ModelFormatError (a ValueError) whose message names the model id and the url."""
    with pytest.raises(ModelFormatError) as info:
        yield
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert MODEL_ID in message, message
    assert url in message, message
    assert info.value.model_id == MODEL_ID
    assert info.value.path == url


def parse(content: bytes, *, name: str = "model.safetensors", url: str = URL) -> ShardHeader:
    """Parse a whole file's bytes as the loader does: length prefix, then header JSON."""
    n = header_length(content[: 8 << 10], len(content), model_id=MODEL_ID, url=url)
    return parse_header(content[8 : 8 + n], len(content), name=name, model_id=MODEL_ID, url=url)


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` bytes that differ with position, so a misplaced copy shows."""
    return bytes((i * 131 + seed * 17 + 7) % 251 for i in range(n))


def entry(dtype: str, shape: Sequence[int], start: int) -> dict[str, Any]:
    nbytes = DTYPE_SIZES[dtype]
    for d in shape:
        nbytes *= d
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, start + nbytes]}


def packed(
    tensors: Sequence[tuple[str, str, Sequence[int]]], *, align: int = 8, seed: int = 0
) -> bytes:
    """A valid file with ``(name, dtype, shape)`` tensors packed back to back in that order."""
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in tensors:
        header[name] = entry(dtype, shape, offset)
        offset = header[name]["data_offsets"][1]
    return raw_file(header, pattern(offset, seed), align=align)


def apply_segments(info: ModelInfo, files: Mapping[str, bytes]) -> bytes:
    """Simulate the load: copy every segment into a fresh buffer; check the plan as it goes.

    Segments must stay inside the buffer and their file, never write a buffer byte twice, and
    read every byte of every shard's data section exactly once.
    """
    buffer = bytearray(b"\xee" * info.nbytes)
    written = bytearray(info.nbytes)
    read: dict[str, bytearray] = {url: bytearray(len(data)) for url, data in files.items()}
    for seg in info.segments:
        assert seg.length > 0
        assert seg.dst >= 0 and seg.dst + seg.length <= info.nbytes
        data = files[seg.url]
        assert seg.src >= 0 and seg.src + seg.length <= len(data)
        buffer[seg.dst : seg.dst + seg.length] = data[seg.src : seg.src + seg.length]
        for i in range(seg.dst, seg.dst + seg.length):
            assert not written[i], f"buffer byte {i} written twice"
            written[i] = 1
        for i in range(seg.src, seg.src + seg.length):
            assert not read[seg.url][i], f"{seg.url} byte {i} read twice"
            read[seg.url][i] = 1
    for shard in info.shards:
        counts = read[shard.url]
        assert all(counts[shard.data_start : shard.data_start + shard.data_size])
        assert not any(counts[: shard.data_start])
    return bytes(buffer)


def check_layout(info: ModelInfo, files: Mapping[str, bytes]) -> None:
    """Every tensor sits at an aligned offset and the copy puts its file bytes there."""
    buffer = apply_segments(info, files)
    shards = {s.name: s for s in info.shards}
    for t in info.tensors.values():
        shard = shards[t.shard]
        assert t.offset >= 0 and t.offset + t.nbytes <= info.nbytes
        if t.nbytes:
            assert t.offset % DTYPE_SIZES[t.dtype] == 0, t
        src = files[shard.url][shard.data_start + t.start : shard.data_start + t.end]
        assert buffer[t.offset : t.offset + t.nbytes] == src, t.name


def single(content: bytes) -> ModelInfo:
    return layout_model(MODEL_ID, MODEL_URL, [parse(content)])


# -- header_length --------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\x00", b"\x02\x00\x00\x00\x00\x00\x00"])
def test_file_shorter_than_prefix_is_refused(content: bytes) -> None:
    """A file of fewer than 8 bytes (empty included) has no header: ModelFormatError."""
    with refused():
        header_length(content, len(content), model_id=MODEL_ID, url=URL)


@pytest.mark.parametrize(("declared", "size"), [(3, 10), (100, 8 + 99), (2**63, 1 << 40)])
def test_header_length_past_end_of_file_is_refused(declared: int, size: int) -> None:
    """A header length that runs past the end of the file is refused."""
    with refused():
        header_length(struct.pack("<Q", declared), size, model_id=MODEL_ID, url=URL)


@pytest.mark.parametrize("declared", [MAX_HEADER_SIZE + 1, 2**64 - 1])
def test_absurd_header_length_is_refused(declared: int) -> None:
    """A header length over 100 MB is refused even when the file is large enough."""
    with refused():
        header_length(struct.pack("<Q", declared), 1 << 50, model_id=MODEL_ID, url=URL)


@pytest.mark.parametrize("declared", [0, 2, MAX_HEADER_SIZE])
def test_header_length_in_bounds_is_returned(declared: int) -> None:
    """A header length inside the file and the limit comes back as it is."""
    prefix = struct.pack("<Q", declared) + b"{}"
    size = 8 + declared
    assert header_length(prefix, size, model_id=MODEL_ID, url=URL) == declared


def test_header_length_lying_about_file_is_refused() -> None:
    """A prefix declaring more header than the file holds is refused through parse()."""
    with refused():
        parse(raw_file({}, b"", header_len=64))


# -- parse_header: refusals -----------------------------------------------------------------------

F32_1 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}

BAD_HEADERS: list[tuple[str, bytes | dict[str, Any], bytes]] = [
    ("invalid-json", b'{"a": ', b""),
    ("invalid-json-trailing", b"{} x", b""),
    ("not-object-list", b"[]", b""),
    ("not-object-number", b"42", b""),
    ("not-object-string", b'"x"', b""),
    ("not-object-null", b"null", b""),
    ("non-utf8-key", b'{"a\xff": {}}', b""),
    ("non-utf8-latin1", '{"\u00e9": 1}'.encode("latin-1"), b""),
    ("entry-not-object", {"a": [0, 4]}, b"\0" * 4),
    ("entry-string", {"a": "F32"}, b"\0" * 4),
    ("unknown-dtype", {"a": {**F32_1, "dtype": "F4"}}, b"\0" * 4),
    ("lowercase-dtype", {"a": {**F32_1, "dtype": "f32"}}, b"\0" * 4),
    ("dtype-i128", {"a": {**F32_1, "dtype": "I128"}}, b"\0" * 4),
    ("dtype-number", {"a": {**F32_1, "dtype": 4}}, b"\0" * 4),
    ("dtype-null", {"a": {**F32_1, "dtype": None}}, b"\0" * 4),
    ("dtype-list", {"a": {**F32_1, "dtype": ["F32"]}}, b"\0" * 4),
    ("dtype-missing", {"a": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    ("shape-negative", {"a": {**F32_1, "shape": [-1]}}, b"\0" * 4),
    ("shape-negative-pair", {"a": {**F32_1, "shape": [-1, -1]}}, b"\0" * 4),
    ("shape-float", {"a": {**F32_1, "shape": [1.0]}}, b"\0" * 4),
    ("shape-string", {"a": {**F32_1, "shape": ["1"]}}, b"\0" * 4),
    ("shape-bool", {"a": {**F32_1, "shape": [True]}}, b"\0" * 4),
    ("shape-null", {"a": {**F32_1, "shape": None}}, b"\0" * 4),
    ("shape-int", {"a": {**F32_1, "shape": 1}}, b"\0" * 4),
    ("shape-missing", {"a": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4),
    ("shape-mismatch-small", {"a": {**F32_1, "shape": [2]}}, b"\0" * 4),
    ("shape-mismatch-large", {"a": {**F32_1, "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
    ("shape-mismatch-zero", {"a": {**F32_1, "shape": [0]}}, b"\0" * 4),
    # Empty, so no bytes bound the other sizes: past int64, torch cannot make them (fuzzed).
    ("shape-empty-size-past-int64", {"a": entry("F32", [0, 2**63], 0)}, b""),
    ("shape-empty-count-past-int64", {"a": entry("F32", [2**62, 4, 0], 0)}, b""),
    ("offsets-reversed", {"a": {**F32_1, "data_offsets": [4, 0]}}, b"\0" * 4),
    ("offsets-one", {"a": {**F32_1, "data_offsets": [4]}}, b"\0" * 4),
    ("offsets-three", {"a": {**F32_1, "data_offsets": [0, 4, 8]}}, b"\0" * 8),
    ("offsets-empty", {"a": {**F32_1, "data_offsets": []}}, b"\0" * 4),
    ("offsets-negative", {"a": {**F32_1, "data_offsets": [-4, 0]}}, b"\0" * 4),
    ("offsets-float", {"a": {**F32_1, "data_offsets": [0.0, 4.0]}}, b"\0" * 4),
    ("offsets-bool", {"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, b"\0"),
    ("offsets-object", {"a": {**F32_1, "data_offsets": {"0": 4}}}, b"\0" * 4),
    ("offsets-missing", {"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
    (
        "overlap",
        {"a": entry("F32", [2], 0), "b": entry("F32", [2], 4)},
        b"\0" * 12,
    ),
    (
        "duplicate-range",
        {"a": entry("F32", [2], 0), "b": entry("F32", [2], 0)},
        b"\0" * 8,
    ),
    ("hole-at-start", {"a": entry("F32", [1], 4)}, b"\0" * 8),
    (
        "hole-between",
        {"a": entry("F32", [1], 0), "b": entry("F32", [1], 8)},
        b"\0" * 12,
    ),
    ("truncated", {"a": entry("F32", [4], 0)}, b"\0" * 12),
    ("truncated-empty-data", {"a": entry("F32", [1], 0)}, b""),
    ("trailing-bytes", {"a": entry("F32", [1], 0)}, b"\0" * 5),
    ("trailing-bytes-no-tensors", {}, b"\0"),
    ("metadata-int-value", {"__metadata__": {"k": 1}}, b""),
    ("metadata-null-value", {"__metadata__": {"k": None}}, b""),
    ("metadata-nested", {"__metadata__": {"k": {"x": "y"}}}, b""),
    ("metadata-list", {"__metadata__": ["k", "v"]}, b""),
    ("metadata-string", {"__metadata__": "k=v"}, b""),
    ("metadata-number", {"__metadata__": 3}, b""),
]


@pytest.mark.parametrize(("header", "data"), [pytest.param(h, d, id=i) for i, h, d in BAD_HEADERS])
def test_bad_header_is_refused(header: bytes | dict[str, Any], data: bytes) -> None:
    """Each malformed header gives ModelFormatError naming the model and the file."""
    with refused():
        parse(raw_file(header, data))


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"[" * 100_000, id="deeply-nested-array"),
        pytest.param(b'{"a":' * 100_000, id="deeply-nested-object"),
    ],
)
def test_deeply_nested_header_is_format_error(header: bytes) -> None:
    """JSON nested past the recursion limit is a ModelFormatError, not a RecursionError."""
    with refused():
        parse(raw_file(header, b""))


def test_huge_integer_in_header_is_format_error() -> None:
    """A 5000-digit integer (over int's str-conversion limit) is a ModelFormatError."""
    header = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, ' + b"1" * 5000 + b"]}}"
    with refused():
        parse(raw_file(header, b"\0"))


def test_data_truncated_message_says_truncated() -> None:
    """Tensors needing more bytes than the data section holds are reported as truncated."""
    with pytest.raises(ModelFormatError, match="truncated"):
        parse(raw_file({"a": entry("U8", [10], 0)}, b"\0" * 9))


# -- parse_header: accepted files -----------------------------------------------------------------


def test_metadata_is_kept() -> None:
    """``__metadata__`` string pairs come back unchanged and are not taken for a tensor."""
    content = raw_file(
        {"__metadata__": {"format": "pt", "note": ""}, "a": entry("U8", [2], 0)}, b"ab"
    )
    header = parse(content)
    assert dict(header.metadata) == {"format": "pt", "note": ""}
    assert [t.name for t in header.tensors] == ["a"]
    assert single(content).metadata == header.metadata


@pytest.mark.parametrize(
    "tensors",
    [
        pytest.param([], id="no-tensors"),
        pytest.param([("s", "F32", [])], id="scalar"),
        pytest.param([("s", "F64", []), ("b", "BOOL", [])], id="two-scalars"),
        pytest.param([("z", "F32", [0])], id="zero-size"),
        pytest.param([("z", "F32", [3, 0, 2])], id="zero-size-3d"),
        pytest.param(
            [("a", "F32", [2]), ("z", "I64", [0]), ("y", "F16", [0, 5]), ("b", "U8", [3])],
            id="zero-size-between",
        ),
        pytest.param([("z", "F32", [0]), ("w", "F32", [0])], id="two-zero-size-same-offset"),
        pytest.param([("z", "F32", [0, 2**63 - 1])], id="zero-size-largest-size"),
        pytest.param([("a", "C64", [2, 1]), ("b", "BF16", [1, 1, 1])], id="mixed"),
    ],
)
def test_zero_size_and_scalar_tensors_are_accepted(
    tensors: list[tuple[str, str, list[int]]],
) -> None:
    """Scalars (shape []) and tensors with a zero dimension parse, keeping their shapes."""
    content = packed(tensors)
    header = parse(content)
    assert {t.name: (t.dtype, t.shape) for t in header.tensors} == {
        name: (dtype, tuple(shape)) for name, dtype, shape in tensors
    }
    info = single(content)
    check_layout(info, {URL: content})


def test_parse_header_describes_the_file() -> None:
    """data_start, data_size and per-tensor ranges match the file; tensors sorted by start."""
    content = packed([("b", "F32", [2]), ("a", "U8", [3])])
    header = parse(content)
    n = struct.unpack("<Q", content[:8])[0]
    assert header.data_start == 8 + n
    assert header.data_size == 11
    assert [(t.name, t.start, t.end) for t in header.tensors] == [("b", 0, 8), ("a", 8, 11)]
    assert header.url == URL
    assert header.name == "model.safetensors"


@pytest.mark.parametrize("dtype", sorted(DTYPE_SIZES))
def test_every_dtype_parses(dtype: str) -> None:
    """Every dtype in DTYPE_SIZES is accepted with its item size."""
    header = parse(packed([("t", dtype, [2, 3])]))
    assert header.tensors[0].nbytes == 6 * DTYPE_SIZES[dtype]


# -- parse_index ----------------------------------------------------------------------------------


def index(weight_map: object, **extra: object) -> bytes:
    return json.dumps({"weight_map": weight_map, **extra}).encode()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"{}", id="missing-weight-map"),
        pytest.param(json.dumps({"metadata": {}}).encode(), id="only-metadata"),
        pytest.param(index(None), id="weight-map-null"),
        pytest.param(index([["a", "x.safetensors"]]), id="weight-map-list"),
        pytest.param(index("x.safetensors"), id="weight-map-string"),
        pytest.param(index({}), id="weight-map-empty"),
        pytest.param(index({"a": 3}), id="shard-not-string"),
        pytest.param(index({"a": None}), id="shard-null"),
        pytest.param(index({"a": "x.safetensors"}, metadata=[1]), id="metadata-list"),
        pytest.param(b"[]", id="not-object"),
        pytest.param(b"{", id="invalid-json"),
        pytest.param(b'{"weight_map": {"\xff": "x"}}', id="non-utf8"),
    ],
)
def test_bad_index_is_refused(data: bytes) -> None:
    """An index without a usable weight_map object is a ModelFormatError naming the index."""
    with refused(INDEX_URL):
        parse_index(data, model_id=MODEL_ID, url=INDEX_URL)


@pytest.mark.parametrize(
    "shard",
    [
        "../x.safetensors",
        "..",
        ".",
        "./x.safetensors",
        "/etc/passwd",
        "a/../../b",
        "a/../b.safetensors",
        "s3://bucket/x",
        "file:///etc/passwd",
        "C:\\x",
        "C:x",
        "",
        "a\\b",
        "..\\x",
        "a\x00b",
        "x.safetensors\x00",
        "a//b",
        "a/",
        "~/x",
        "a\nb",
        "x?y",
        "x#y",
        "%2e%2e/x",
        "x" * 256,
    ],
)
def test_index_shard_outside_model_is_refused(shard: str) -> None:
    """A shard name that could leave the model's directory is refused."""
    with refused(INDEX_URL):
        parse_index(index({"a": shard}), model_id=MODEL_ID, url=INDEX_URL)


@pytest.mark.parametrize(
    "shard",
    ["model-00001-of-00002.safetensors", "sub/dir.safetensors", "a.b-c_d.safetensors", "x"],
)
def test_index_normal_shard_names_are_accepted(shard: str) -> None:
    """Plain and nested-relative shard names pass through unchanged."""
    weight_map, metadata = parse_index(
        index({"w": shard, "v": shard}), model_id=MODEL_ID, url=INDEX_URL
    )
    assert weight_map == {"w": shard, "v": shard}
    assert dict(metadata) == {}


def test_index_metadata_numbers_are_json_text() -> None:
    """Non-string index metadata (total_size) is kept as its JSON text; strings unchanged."""
    data = index(
        {"w": "a.safetensors"},
        metadata={"total_size": 123456, "format": "pt", "flags": [1, True], "none": None},
    )
    _, metadata = parse_index(data, model_id=MODEL_ID, url=INDEX_URL)
    assert dict(metadata) == {
        "total_size": "123456",
        "format": "pt",
        "flags": "[1, true]",
        "none": "null",
    }


# -- layout_model ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensors",
    [
        pytest.param([("a", "F32", [4])], id="one"),
        pytest.param([("a", "F64", [2, 3]), ("b", "F32", [5]), ("c", "U8", [3])], id="sorted"),
        pytest.param([("a", "I64", [1]), ("s", "F16", []), ("z", "BF16", [0])], id="scalar"),
    ],
)
def test_aligned_single_file_is_one_segment(tensors: list[tuple[str, str, list[int]]]) -> None:
    """An aligned file is one read of its whole data section into a buffer of the same size."""
    content = packed(tensors)
    info = single(content)
    shard = info.shards[0]
    assert info.nbytes == shard.data_size
    assert info.segments == (type(info.segments[0])(URL, shard.data_start, 0, shard.data_size),)
    assert info.mappable
    assert all(t.offset == t.start for t in info.tensors.values())
    check_layout(info, {URL: content})


def test_layout_of_an_empty_model() -> None:
    """A file with no tensors lays out to an empty buffer and no reads."""
    info = single(raw_file({}, b""))
    assert info.nbytes == 0
    assert info.segments == ()
    assert dict(info.tensors) == {}


MISALIGNED: list[list[tuple[str, str, list[int]]]] = [
    [("u", "U8", [3]), ("f", "F32", [2])],
    [("u", "U8", [1]), ("d", "F64", [2]), ("h", "F16", [3]), ("i", "I64", [1])],
    [("u", "U8", [1]), ("a", "F16", [1]), ("b", "F16", [1]), ("c", "F32", [1])],
    [("u", "U8", [5]), ("z", "F32", [0]), ("f", "F32", [1]), ("s", "C64", [])],
    [("b", "BOOL", [7]), ("x", "I32", [2, 2]), ("y", "U16", [1]), ("w", "U64", [1])],
]


@pytest.mark.parametrize("tensors", MISALIGNED)
def test_misaligned_tensors_are_shifted(tensors: list[tuple[str, str, list[int]]]) -> None:
    """Misaligned tensors get aligned buffer offsets; segments still move each byte once."""
    content = packed(tensors)
    info = single(content)
    assert not info.mappable
    assert info.nbytes >= info.shards[0].data_size
    assert len(info.segments) > 1
    check_layout(info, {URL: content})


@pytest.mark.parametrize("header_pad", range(8))
def test_mappable_means_layout_offsets_are_file_offsets(header_pad: int) -> None:
    """When mappable, each tensor's buffer offset equals its data-section offset."""
    # The zero-copy path views the mapped file at ``data_start + offset``, so a shifted layout
    # offset reads the wrong bytes. Header lengths that are not multiples of 8 make file-relative
    # and data-relative alignment differ.
    header = {"u": entry("U8", [4], 0), "q": entry("I64", [1], 4), "f": entry("F32", [1], 12)}
    encoded_len = len(json.dumps(header))
    content = raw_file(header, pattern(16), align=1, size=encoded_len + header_pad)
    info = single(content)
    check_layout(info, {URL: content})
    if info.mappable:
        data_start = info.shards[0].data_start
        for t in info.tensors.values():
            assert (data_start + t.start) % DTYPE_SIZES[t.dtype] == 0
            assert t.offset == t.start, (t.name, t.start, t.offset, data_start)


# -- sharded layouts ------------------------------------------------------------------------------


def sharded(
    shards: Sequence[Sequence[tuple[str, str, Sequence[int]]]],
) -> tuple[list[ShardHeader], dict[str, bytes], dict[str, str]]:
    """Parsed headers, file contents by url, and the true weight map of a sharded model."""
    headers: list[ShardHeader] = []
    files: dict[str, bytes] = {}
    weight_map: dict[str, str] = {}
    for i, tensors in enumerate(shards):
        name = shard_name(i, len(shards))
        url = f"{MODEL_URL}/{name}"
        content = packed(tensors, seed=i)
        headers.append(parse(content, name=name, url=url))
        files[url] = content
        weight_map.update({t[0]: name for t in tensors})
    return headers, files, weight_map


SHARDED = [
    [("a", "F32", [3]), ("u", "U8", [3])],
    [("b", "U8", [1]), ("c", "F64", [2]), ("s", "I16", [])],
    [("d", "BF16", [5]), ("z", "F32", [0])],
]


def test_sharded_layout_places_every_tensor() -> None:
    """Shards are laid out one after another, each at a 256-byte boundary; every tensor lands."""
    headers, files, weight_map = sharded(SHARDED)
    info = layout_model(
        MODEL_ID, MODEL_URL, headers, weight_map=weight_map, metadata={"total_size": "1"}
    )
    assert not info.mappable
    assert set(info.tensors) == set(weight_map)
    assert dict(info.metadata) == {"total_size": "1"}
    firsts = [min(t.offset for t in info.tensors.values() if t.shard == h.name) for h in headers]
    assert all(f % SHARD_ALIGNMENT == 0 for f in firsts)
    assert firsts == sorted(firsts)
    check_layout(info, files)


def test_a_laid_out_model_keeps_one_tensor_table() -> None:
    """A model's shards keep no tensor table of their own once laid out (the model's
    ``tensors`` holds them all), and keep everything else their headers said."""
    headers, files, weight_map = sharded(SHARDED)
    info = layout_model(MODEL_ID, MODEL_URL, headers, weight_map=weight_map)
    assert [s.tensors for s in info.shards] == [()] * len(headers)
    assert [
        (s.name, s.url, s.data_start, s.data_size, s.metadata, s.header) for s in info.shards
    ] == [(h.name, h.url, h.data_start, h.data_size, h.metadata, h.header) for h in headers]
    assert len(info.tensors) == sum(len(h.tensors) for h in headers)
    check_layout(info, files)


def test_two_shard_aligned_model_is_not_mappable() -> None:
    """A model of several files is never mappable, aligned or not."""
    headers, files, weight_map = sharded([[("a", "F32", [1])], [("b", "F32", [1])]])
    info = layout_model(MODEL_ID, MODEL_URL, headers, weight_map=weight_map)
    assert not info.mappable
    check_layout(info, files)


def test_tensor_in_wrong_shard_is_refused() -> None:
    """A tensor found in a shard other than the one the weight_map names is refused."""
    headers, _, weight_map = sharded(SHARDED)
    weight_map["a"] = headers[1].name
    with refused(MODEL_URL):
        layout_model(MODEL_ID, MODEL_URL, headers, weight_map=weight_map)


def test_tensor_missing_from_weight_map_is_refused() -> None:
    """A shard holding a tensor the weight_map does not name is refused."""
    headers, _, weight_map = sharded(SHARDED)
    del weight_map["c"]
    with refused(MODEL_URL):
        layout_model(MODEL_ID, MODEL_URL, headers, weight_map=weight_map)


@pytest.mark.parametrize("with_map", [True, False])
def test_tensor_in_two_shards_is_refused(with_map: bool) -> None:
    """The same tensor name in two shards is refused, with or without a weight_map."""
    headers, _, weight_map = sharded([[("a", "F32", [1])], [("a", "F32", [1])]])
    with refused(MODEL_URL):
        layout_model(MODEL_ID, MODEL_URL, headers, weight_map=weight_map if with_map else None)


def test_weight_map_naming_absent_tensor_is_refused() -> None:
    """A weight_map entry no shard holds is refused."""
    headers, _, weight_map = sharded(SHARDED)
    weight_map["ghost"] = headers[0].name
    with pytest.raises(ModelFormatError, match="ghost") as info:
        layout_model(MODEL_ID, MODEL_URL, headers, weight_map=weight_map)
    assert MODEL_ID in str(info.value)
    assert MODEL_URL in str(info.value)


# -- property: any valid file lays out correctly --------------------------------------------------

_DTYPES = sorted(DTYPE_SIZES)
_tensor = st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 4), min_size=0, max_size=3))
_shard = st.tuples(
    st.lists(_tensor, min_size=0, max_size=8),
    st.integers(0, 15),  # extra spaces after the header JSON: moves data_start
)


@settings(max_examples=150, deadline=None)
@given(shards=st.lists(_shard, min_size=1, max_size=3), seed=st.integers(0, 250))
def test_any_valid_model_lays_out_exactly(
    shards: list[tuple[list[tuple[str, list[int]]], int]], seed: int
) -> None:
    """Valid files of random tensors and padding parse, and the copy plan places every tensor."""
    headers: list[ShardHeader] = []
    files: dict[str, bytes] = {}
    weight_map: dict[str, str] = {}
    for i, (tensors, pad) in enumerate(shards):
        name = shard_name(i, len(shards))
        url = f"{MODEL_URL}/{name}"
        header: dict[str, Any] = {}
        offset = 0
        for j, (dtype, shape) in enumerate(tensors):
            header[f"s{i}.t{j}"] = entry(dtype, shape, offset)
            offset = header[f"s{i}.t{j}"]["data_offsets"][1]
        encoded = json.dumps(header).encode()
        content = raw_file(encoded, pattern(offset, seed + i), align=1, size=len(encoded) + pad)
        headers.append(parse(content, name=name, url=url))
        files[url] = content
        weight_map.update(dict.fromkeys(header, name))
    if len(shards) == 1:
        info = layout_model(MODEL_ID, MODEL_URL, headers)
    else:
        info = layout_model(MODEL_ID, MODEL_URL, headers, weight_map=weight_map)
    assert set(info.tensors) == set(weight_map)
    check_layout(info, files)
    data = sum(h.data_size for h in headers)
    padding = sum(len(h.tensors) for h in headers) * 7 + (len(headers) - 1) * SHARD_ALIGNMENT
    assert data <= info.nbytes <= data + padding


# -- limits on what a header may describe -----------------------------------------------------------


def test_more_tensors_than_the_cap_is_format_error() -> None:
    """A file listing more than MAX_TENSORS tensors (zero-size ones cost no weight byte) is
    refused before its tensors are described; exactly MAX_TENSORS parse."""
    empty = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
    at_cap = raw_file({f"t{i}": empty for i in range(MAX_TENSORS)}, b"")
    assert len(single(at_cap).tensors) == MAX_TENSORS
    with pytest.raises(ModelFormatError, match=f"limit of {MAX_TENSORS}"):
        parse(raw_file({f"t{i}": empty for i in range(MAX_TENSORS + 1)}, b""))


def test_tensor_cap_grows_with_the_weight_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond MAX_TENSORS a file or model may hold one tensor per BYTES_PER_TENSOR of weights:
    a model of many real tensors loads, the same count of empty ones is refused."""
    monkeypatch.setattr(fmt, "MAX_TENSORS", 4)
    assert max_tensors(0) == 4 and max_tensors(10 * BYTES_PER_TENSOR) == 10
    assert len(parse(packed([(f"t{i}", "U8", [BYTES_PER_TENSOR]) for i in range(6)])).tensors)
    with pytest.raises(ModelFormatError, match="limit of 4"):
        parse(packed([(f"t{i}", "U8", [0]) for i in range(6)]))


def test_tensors_of_all_shards_count_toward_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cap is per model: shards within it one by one are refused together, and an index
    that lists more tensors than the cap is refused before any shard is read."""
    monkeypatch.setattr(fmt, "MAX_TENSORS", 4)
    headers, _, weight_map = sharded([[(f"a{i}", "U8", [0]) for i in range(3)]] * 2)
    with pytest.raises(ModelFormatError, match="limit of 4"):
        layout_model(MODEL_ID, MODEL_URL, headers, weight_map=weight_map)
    data = index({f"t{i}": "model-00001-of-00001.safetensors" for i in range(5)})
    with pytest.raises(ModelFormatError, match="limit of 4"):
        parse_index(data, model_id=MODEL_ID, url=INDEX_URL)
