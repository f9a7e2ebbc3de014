"""Model versions: what the store says identifies a model's content, and one version per load.

Design notes:

- A file's *tag* is what the store says identifies its content: the ETag (or checksum) of an
  http(s) or s3 object, ``size:mtime_ns:inode`` of a local file (a new file renamed over the old
  one has a new inode even when the clock did not tick), the identity of a ``memory://`` file.
  A `ModelVersion` is the tags of every file one load read (the weights or shards, the index,
  the config), keyed by URL; its ``token`` is a short digest of them, the name users see.
- One version per load: every read of a load runs inside a `reading` scope (a ContextVar, so
  the Store's signatures and its subclasses stay as they are). The first read of a file records
  its tag; every later read of that file within the scope is pinned to it: ``If-Match`` on
  http(s) and s3 ranged GETs (a 412, or a response with another ETag, means it changed), a
  fstat of the opened local file (at open and again after the read), the file's identity for
  ``memory://``. A difference raises `ModelChangedError`: a load never mixes two versions of a
  file. Filesystems we cannot pin (other fsspec async or sync ones) are read unpinned.
- The weights' reads are seeded from the version the headers were read at (``info.version``),
  so the data of a shard comes from the same object as its header.
- Files are tagged, not models: a writer that replaces a model's files one by one can be seen
  between two of them (new index, old shard...). Each file read is still one version, and the
  revalidation (`Revalidator`) finds the difference at its next check and swaps it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from ._exceptions import ModelChangedError

__all__ = [
    "ModelVersion",
    "VersionMismatch",
    "expected",
    "if_match",
    "local_tag",
    "memory_tag",
    "reading",
    "remote_tag",
    "see",
]

#: Keys of fsspec ``info`` dicts that identify a remote object's content, best first.
_TAG_KEYS = ("ETag", "etag", "VersionId", "md5Hash", "Content-MD5", "crc32c", "checksum")


class VersionMismatch(OSError):
    """A ranged read found another version of the file than the one asked for (a 412, or a
    response whose ETag differs); the Store turns it into `ModelChangedError`."""


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """The store's tags of every file of one loaded model: ((url, tag), ...) sorted by URL."""

    files: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, tags: Mapping[str, str]) -> ModelVersion:
        return cls(tuple(sorted(tags.items())))

    @property
    def token(self) -> str:
        """A short name of this version (16 hex digits): equal tokens, equal versions."""
        digest = hashlib.sha256(json.dumps(self.files).encode()).hexdigest()
        return digest[:16]

    def to_json(self) -> list[list[str]]:
        return [[url, tag] for url, tag in self.files]

    @classmethod
    def from_json(cls, value: object) -> ModelVersion | None:
        """The version a manifest recorded, or None for anything else (an older entry)."""
        if not isinstance(value, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p)
            for p in value
        ):
            return None
        return cls(tuple(sorted((p[0], p[1]) for p in value)))

    def __str__(self) -> str:
        return self.token


def local_tag(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def memory_tag(file: io.BytesIO) -> str:
    # pipe_file makes a new MemoryFile: its identity and creation time name the content.
    with file.getbuffer() as buf:
        size = buf.nbytes
    return f"mem:{id(file):x}:{size}:{getattr(file, 'created', '')}"


def remote_tag(info: Mapping[str, Any]) -> str | None:
    """The tag of a remote file from fsspec's ``info``; None when the store gives none."""
    for key in _TAG_KEYS:
        value = info.get(key)
        if isinstance(value, str) and value:
            return value
    modified = info.get("Last-Modified") or info.get("LastModified") or info.get("mtime")
    if modified:
        return f"lm:{modified}:{info.get('size')}"
    return None


def if_match(tag: str | None) -> str | None:
    """``tag`` as an ``If-Match`` value when it is a strong ETag, else None."""
    return tag if tag is not None and tag.startswith('"') else None


class _Reads:
    """The tags one load has seen, by URL."""

    __slots__ = ("tags",)

    def __init__(self, tags: dict[str, str]) -> None:
        self.tags = tags


_current: ContextVar[_Reads | None] = ContextVar("modelcache_reads", default=None)


class reading:  # lower case: used as a function, ``with reading() as tags``
    """A scope whose reads are one version of each file (seeded with ``version``'s tags);
    yields the tags seen, by URL, for the caller to make the load's `ModelVersion` from.

    A class rather than a generator context manager: a load enters one or two, and a small
    model's fill is mostly such per-load costs (a generator, its frame and a wrapper each)."""

    __slots__ = ("_reads", "_token")

    def __init__(self, version: ModelVersion | None = None) -> None:
        self._reads = _Reads(dict(version.files) if version is not None else {})

    def __enter__(self) -> dict[str, str]:
        self._token = _current.set(self._reads)
        return self._reads.tags

    def __exit__(self, *exc_info: object) -> None:
        _current.reset(self._token)


def see(url: str, tag: str | None, model_id: str) -> None:
    """Record ``url``'s tag in the current scope; ModelChangedError if it saw another one."""
    reads = _current.get()
    if reads is None or tag is None:
        return
    known = reads.tags.setdefault(url, tag)
    if known != tag:
        raise ModelChangedError(
            f"model {model_id!r}: {url} changed in the store while it was loaded "
            f"(version {known} -> {tag})",
            model_id=model_id,
            path=url,
        )


def expected(url: str) -> str | None:
    """The tag reads of ``url`` are pinned to in the current scope, if any."""
    reads = _current.get()
    return None if reads is None else reads.tags.get(url)


def changed(url: str, model_id: str, exc: BaseException) -> ModelChangedError:
    error = ModelChangedError(
        f"model {model_id!r}: {url} changed in the store while it was loaded ({exc})",
        model_id=model_id,
        path=url,
    )
    error.__cause__ = exc
    return error
