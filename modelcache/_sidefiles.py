"""A model's config.json and side files (tokenizers, processors): read with it, kept with it.

A bound builder gets ``info.config`` (the parsed ``config.json``, None when there is none) and
``info.files`` (name -> bytes of the side files its class declares, ``side_files = (...)``:
names or globs relative to the model's directory). Rules:

* A single-file model (a URL ending in ``.safetensors``) has no config.json; the side files its
  class declares are read beside the file (give each model its own directory then, as peft's
  ``.../{model_id}/adapter_model.safetensors``).
* Patterns are checked when the class is bound: relative, ``/``-separated, no ``..``, no URL
  syntax. Every file a pattern matches must stay inside the model's directory: a listed name
  with ``..`` or an absolute path is refused, and on a local store so is a file whose path (a
  symlink, a linked directory) leads outside it: the file is opened beneath the directory
  (`_open_within`), so the check holds for the very file read, even one swapped for a link
  after it was listed. Plain names that are missing are simply absent; a glob may
  match nothing.
* A side file is at most `MAX_SIDE_FILE` bytes and a model's side files together at most
  `MAX_SIDE_FILES` bytes: more is a `ModelFormatError`, never a silent truncation.
* ``ModelInfo.side_patterns`` records what ``config`` and ``files`` were read for: None (not
  read), else the patterns covered. An info that travels through the host tier keeps them, so a
  promotion reads nothing again; the host tier counts ``info.side_bytes`` in its budget.
* The disk tier writes the side files into the entry beside the weights (its budget counts
  every file) and a marker, `SIDE_MARKER`, naming the patterns and files it holds: a load from
  the disk entry reads config and side files back from it, with no store round trip, when the
  marker covers the builder's patterns; otherwise from the store (an entry written for another
  class).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import stat
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from functools import partial
from types import MappingProxyType
from typing import Any

from ._concurrency import gather
from ._exceptions import ModelFormatError, ModelNotFoundError, ModelTooLargeError
from ._firstget import read_small_file
from ._format import INDEX_NAME, SINGLE_NAME, ModelInfo
from ._store import OPEN_FILE, Store, opening_with
from ._units import format_bytes
from ._versions import ModelVersion, reading

__all__ = [
    "CONFIG_NAME",
    "MAX_SIDE_FILE",
    "MAX_SIDE_FILES",
    "SIDE_MARKER",
    "check_host_fits",
    "covers",
    "files_dir",
    "read_extras",
    "side_patterns",
]

CONFIG_NAME = "config.json"
#: In a disk entry: the patterns and file names of the side files written with it.
SIDE_MARKER = ".modelcache-side.json"
#: Bytes of one side file, and of all of one model's, at most.
MAX_SIDE_FILE = 16 << 20
MAX_SIDE_FILES = 64 << 20
#: Names a side-file pattern never matches: the weights and files read another way.
_RESERVED = frozenset({SINGLE_NAME, INDEX_NAME, CONFIG_NAME, SIDE_MARKER})
_GLOB = frozenset("*?[")
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# One path component at a time, never through a link (`_open_within` resolves those itself).
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
_OPEN_READ = OPEN_FILE | os.O_NOFOLLOW  # a FIFO opens at once, reads empty (`_store`)


def _is_glob(pattern: str) -> bool:
    return not _GLOB.isdisjoint(pattern)


def _safe_relative(name: str) -> bool:
    return (
        0 < len(name) <= 1024
        and not name.startswith("/")
        and "\\" not in name
        and "\x00" not in name
        and "://" not in name
        and all(part not in ("", ".", "..") for part in name.split("/"))
    )


def side_patterns(value: object, owner: str) -> tuple[str, ...]:
    """A class's ``side_files``, checked: a tuple of safe relative names or globs."""
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"{owner}.side_files must be a tuple of file names or globs, not {value!r}")
    patterns = tuple(value)
    for pattern in patterns:
        if not isinstance(pattern, str) or not _safe_relative(pattern):
            raise ValueError(
                f"{owner}.side_files: {pattern!r} is not a relative name or glob inside the "
                "model's directory (no '..', no leading '/', no URL)"
            )
        if pattern in _RESERVED:
            raise ValueError(f"{owner}.side_files: {pattern!r} is read by the cache itself")
    return patterns


def covers(info: ModelInfo, patterns: tuple[str, ...]) -> bool:
    """Whether ``info`` already carries config and side files for ``patterns``."""
    return info.side_patterns is not None and set(patterns) <= info.side_patterns


def check_host_fits(budget: int, info: ModelInfo) -> None:
    """ModelTooLargeError unless weights and side files together fit a host budget."""
    if info.nbytes + info.side_bytes > budget:
        raise ModelTooLargeError(
            f"model {info.model_id!r} needs {format_bytes(info.nbytes + info.side_bytes)} "
            f"with its side files, more than the whole host budget of {format_bytes(budget)}",
            model_id=info.model_id,
            path=info.url,
        )


async def _size_optional(store: Store, model_id: str, url: str) -> int | None:
    """The size of a side file (checked against `MAX_SIDE_FILE`), None when there is none."""
    try:
        size = await store.size(url, model_id=model_id)
    except ModelNotFoundError:
        return None
    _check_size(size, model_id, url)
    return size


async def _read_sized(store: Store, model_id: str, url: str, size: int | None) -> bytes | None:
    if size is None:
        return None
    try:
        return await store.read_range(url, 0, size, model_id=model_id)
    except ModelNotFoundError:
        return None


async def _read_file(store: Store, model_id: str, url: str) -> bytes:
    size = await store.size(url, model_id=model_id)
    _check_size(size, model_id, url)
    return await store.read_range(url, 0, size, model_id=model_id)


def _check_size(size: int, model_id: str, url: str) -> None:
    if size > MAX_SIDE_FILE:
        raise ModelFormatError(
            f"model {model_id!r}: {url} is {size} bytes, more than the side-file limit of "
            f"{format_bytes(MAX_SIDE_FILE)}",
            model_id=model_id,
            path=url,
        )


async def _read_optional(store: Store, model_id: str, url: str) -> bytes | None:
    try:
        return await _read_file(store, model_id, url)
    except ModelNotFoundError:
        return None


def _parse_config(data: bytes, model_id: str, url: str) -> Mapping[str, Any]:
    try:
        config = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, absurd nesting or numbers
        raise ModelFormatError(
            f"model {model_id!r}: {url} is not valid JSON ({exc})", model_id=model_id, path=url
        ) from exc
    if not isinstance(config, dict):
        raise ModelFormatError(
            f"model {model_id!r}: {url} is not a JSON object", model_id=model_id, path=url
        )
    return config


#: Symlinks one side file's path may pass through, at most (the kernel's own limit).
_MAX_LINKS = 40


def _escape(model_id: str, url: str, name: str) -> ModelFormatError:
    return ModelFormatError(
        f"model {model_id!r}: side file {name!r} leads outside {url}",
        model_id=model_id,
        path=f"{url}/{name}",
    )


def _beneath(target: str, roots: tuple[str, ...]) -> str | None:
    """``target`` (absolute, normalised) relative to the first of ``roots`` it is under."""
    for root in roots:
        inside = os.path.relpath(target, os.path.normpath(root))
        if inside != os.pardir and not inside.startswith(os.pardir + os.sep):
            return inside
    return None


def _open_within(root: str, model_id: str, url: str, path: str) -> int:
    """Open ``path`` (a file under the model's directory ``root``, whose URL is ``url``) for
    reading, following a symlink only where its target stays beneath ``root``.

    This is the containment check itself, not a check before the open: every component is
    opened from its parent's fd with ``O_NOFOLLOW`` and a link is resolved here, its ``..``
    against the directories walked (never above ``root``), so a file swapped for a link out of
    the directory after the names were listed fails here (`ModelFormatError`) instead of being
    read from wherever it points. A link inside the directory to another file in it is read."""
    name = os.path.relpath(path, root)
    if name == CONFIG_NAME:
        # Read as the weights are (a link followed, as before side files): the containment
        # rule is the side files', whose names a class or a listing chooses.
        return os.open(path, OPEN_FILE)
    pending = name.split(os.sep)
    if not _safe_relative(name.replace(os.sep, "/")):
        raise _escape(model_id, url, name)
    real_root = os.path.realpath(root)
    stack = [os.open(root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)]
    links = 0
    try:
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if len(stack) == 1:
                    raise _escape(model_id, url, name)
                os.close(stack.pop())
                continue
            flags = _OPEN_READ if not pending else _OPEN_DIR
            try:
                fd = os.open(part, flags, dir_fd=stack[-1])
            except OSError:
                st = os.stat(part, dir_fd=stack[-1], follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise
                links += 1
                if links > _MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path) from None
                target = os.readlink(part, dir_fd=stack[-1])
                if os.path.isabs(target):
                    # Only as a place beneath the directory (its path as given, or its real
                    # one; the target's real path too, for a link made through another path to
                    # it), walked from the directory's fd: what this resolves can race, where
                    # the walk leads cannot leave the directory.
                    inside = _beneath(os.path.normpath(target), (root, real_root)) or _beneath(
                        os.path.realpath(target), (real_root,)
                    )
                    if inside is None:
                        raise _escape(model_id, url, name) from None
                    while len(stack) > 1:
                        os.close(stack.pop())
                    target = inside
                pending[:0] = target.split(os.sep)
                continue
            if not pending:
                return fd
            stack.append(fd)
        raise _escape(model_id, url, name)  # the path was the directory itself
    finally:
        for fd in stack:
            os.close(fd)


async def _names(store: Store, info: ModelInfo, url: str, patterns: tuple[str, ...]) -> list[str]:
    """The file names (relative to the model's directory ``url``) the patterns name: plain ones
    as they are, globs matched against a listing of the directory (made only when there is a
    glob); never the weights' own files."""
    model_id = info.model_id
    exclude = _RESERVED | {shard.name for shard in info.shards}
    names = [p for p in patterns if not _is_glob(p) and p not in exclude]
    globs = [p for p in patterns if _is_glob(p)]
    if globs:
        listed = await store.list_files(url, model_id=model_id)
        for name in listed:
            if not _safe_relative(name):
                raise ModelFormatError(
                    f"model {model_id!r}: {url} lists {name!r}, outside the model's directory",
                    model_id=model_id,
                    path=url,
                )
            if name not in exclude and any(fnmatch.fnmatchcase(name, g) for g in globs):
                names.append(name)
    return sorted(set(names))


async def _from_store(
    store: Store, info: ModelInfo, patterns: tuple[str, ...]
) -> tuple[Mapping[str, Any] | None, dict[str, bytes]]:
    # The store's directory, not ``info.url``: info may describe the disk tier's copy.
    model_id = info.model_id
    url = store.model_url(model_id)
    with_config = True
    if url.endswith(".safetensors"):
        # A single file (``.../{model_id}/adapter_model.safetensors``): no config.json, as
        # before; side files, when the class declares some, are read beside it.
        if not patterns:
            return None, {}
        url, with_config = url.rpartition("/")[0], False
    config_url = store.join(url, CONFIG_NAME)
    names = await _names(store, info, url, patterns)
    local = store.local_path(url)
    # On a local store every side file is opened beneath the directory:
    # the check holds for the file read, however it is swapped after it was listed.
    scope = (
        opening_with(store, partial(_open_within, local, model_id, url))
        if local is not None
        else contextlib.nullcontext()
    )
    with scope:
        return await _read_side(store, model_id, url, names, config_url if with_config else None)


async def _read_side(
    store: Store, model_id: str, url: str, names: list[str], config_url: str | None
) -> tuple[Mapping[str, Any] | None, dict[str, bytes]]:
    # The config beside the side files: one GET on http(s) and s3 (`read_small_file`: its size
    # checked from the response's headers before its body is read).
    calls: list[Callable[[], Awaitable[list[bytes | None]]]] = [
        partial(_read_named, store, model_id, url, names)
    ]
    if config_url is not None:
        calls.append(partial(_read_config, store, model_id, config_url))
    found = await gather(calls)
    files = {n: data for n, data in zip(names, found[0], strict=True) if data is not None}
    raw_config = found[1][0] if config_url is not None else None
    if raw_config is None or config_url is None:
        return None, files
    return _parse_config(raw_config, model_id, config_url), files


async def _read_config(store: Store, model_id: str, url: str) -> list[bytes | None]:
    """``[the config's bytes]``, ``[None]`` when there is none."""
    try:
        size, data = await read_small_file(store, url, MAX_SIDE_FILE, model_id=model_id)
    except ModelNotFoundError:
        return [None]
    if data is None:
        _check_size(size, model_id, url)  # raises: it is over the limit
    return [data]


async def _read_named(
    store: Store, model_id: str, url: str, names: list[str]
) -> list[bytes | None]:
    """The side files ``names`` (None for one that is missing). Sizes first, the caps checked
    on them, then the reads: a glob matching gigabytes must fail before any of it is in memory,
    not after."""
    urls = [store.join(url, n) for n in names]
    sizes = await gather([partial(_size_optional, store, model_id, u) for u in urls])
    total = sum(size or 0 for size in sizes)
    if total > MAX_SIDE_FILES:
        raise ModelFormatError(
            f"model {model_id!r}: its side files total {format_bytes(total)}, more than the "
            f"limit of {format_bytes(MAX_SIDE_FILES)} per model",
            model_id=model_id,
            path=url,
        )
    return await gather(
        [
            partial(_read_sized, store, model_id, u, size)
            for u, size in zip(urls, sizes, strict=True)
        ]
    )


#: Checks what `_from_disk` read (name -> bytes, None when absent) against the disk entry's
#: manifest; raises (`EntryDamagedError`) when they differ.
Check = Callable[[Mapping[str, bytes | None]], None]


async def _from_disk(
    disk: Store, info: ModelInfo, patterns: tuple[str, ...], check: Check | None
) -> tuple[Mapping[str, Any] | None, dict[str, bytes]] | None:
    """Config and side files from a disk entry, or None when its marker does not cover
    ``patterns`` (an entry written before side files, or for a class with fewer).

    Everything read (the marker too) goes through ``check`` before it is parsed or returned:
    a flipped byte or a marker naming files the entry never had is the entry's damage, not
    the model's."""
    model_id = info.model_id
    url = disk.model_url(model_id)
    raw = await _read_optional(disk, model_id, disk.join(url, SIDE_MARKER))
    if raw is None:
        return None
    if check is not None:
        check({SIDE_MARKER: raw})
    try:
        marker = json.loads(raw)
        held, names = set(marker["patterns"]), list(marker["files"])
    except (ValueError, KeyError, TypeError):
        return None
    if not set(patterns) <= held or not all(
        isinstance(n, str) and _safe_relative(n) for n in names
    ):
        return None
    wanted = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    reads = [partial(_read_optional, disk, model_id, disk.join(url, CONFIG_NAME))]
    reads += [partial(_read_optional, disk, model_id, disk.join(url, n)) for n in wanted]
    found = await gather(reads)
    raw_config, contents = found[0], found[1:]
    if check is not None:
        check({CONFIG_NAME: raw_config, **dict(zip(wanted, contents, strict=True))})
    if any(data is None for data in contents):
        return None  # the manifest lists every file: an entry damaged since, read the store
    config = None if raw_config is None else _parse_config(raw_config, model_id, url)
    return config, {n: data for n, data in zip(wanted, contents, strict=True) if data is not None}


async def read_extras(
    store: Store,
    info: ModelInfo,
    patterns: tuple[str, ...],
    *,
    disk: Store | None = None,
    check: Check | None = None,
) -> ModelInfo:
    """``info`` with its config and the side files of ``patterns``: from the disk entry when
    ``disk`` (the disk tier's store, which ``info`` was read from) holds them, checked by
    ``check`` (`_from_disk`), else ``store``."""
    found = await _from_disk(disk, info, patterns, check) if disk is not None else None
    version = info.version
    if found is None:
        # Part of the weights' version: a file replaced since they were read fails the load
        # (ModelChangedError) instead of pairing new side files with old weights.
        with reading(info.version) as tags:
            found = await _from_store(store, info, patterns)
        version = ModelVersion.of(tags) if tags else info.version
    config, files = found
    return replace(
        info,
        version=version,
        config=config,
        files=MappingProxyType(files),
        side_patterns=frozenset(patterns),
    )


def marker_bytes(info: ModelInfo) -> bytes | None:
    """The disk entry's `SIDE_MARKER` for ``info``, or None when it carries no side files read."""
    if info.side_patterns is None:
        return None
    return json.dumps(
        {"patterns": sorted(info.side_patterns), "files": sorted(info.files)}
    ).encode()


@contextlib.contextmanager
def files_dir(info: ModelInfo) -> Iterator[str]:
    """A temporary directory holding ``info``'s side files (and config.json), removed on exit:
    for libraries that load from a path (``AutoTokenizer.from_pretrained(path)``)."""
    with tempfile.TemporaryDirectory(prefix="modelcache-") as root:
        items: list[tuple[str, bytes]] = list(info.files.items())
        if info.config is not None:
            items.append((CONFIG_NAME, json.dumps(info.config).encode()))
        for name, data in items:
            path = os.path.join(root, *name.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as file:
                file.write(data)
        yield root
