"""The disk tier's on-disk format: entry names, manifests, the files an entry is made of.

An entry is a directory named by `entry_name` (sha256 of the id + a readable slug) holding the
model's files laid out like the store and, written last, a manifest (`MANIFEST_NAME`) listing
every file with its size and its XXH3-64 checksum. `read_entry` trusts a directory only when the
manifest is valid and every file has exactly its recorded size; anything else is
`InvalidEntry`. The tier itself (locks, budget, eviction) is `modelcache._disk`.

**Content checks.** Sizes catch a truncated file, not a flipped bit. Each file's checksum is
computed while it is written (`write_file`: the bytes are hashed in the chunks they are written
in, in file order), and checked against the bytes a load actually read (`verify_loaded`: the
headers the loader parsed, the index re-made from what it parsed, the weights in the buffer they
landed in), so what reaches a model is what was written, not merely what a later read saw. A
mismatch is `EntryDamagedError`: the entry is dropped and the model read from the store.
``config.json``, the side files and their marker, read back from the entry (`_sidefiles`), are
checked as read (`verify_bytes`): a file the manifest does not list is not served. XXH3 runs
at memory bandwidth (several GB/s a core, GIL released), far above a disk's.
A manifest without checksums (written before they existed) is `InvalidEntry`: such an entry is
deleted when seen and the model fetched again, once.

Symlinks are never followed inside an entry: the directory, every directory on a file's path
and every file must be the real thing (``lstat``, ``O_NOFOLLOW``), so a link planted in the
directory cannot make the tier serve bytes from elsewhere. Any I/O error reading an entry (EIO,
a manifest replaced by a directory) makes it `InvalidEntry` too: the tier drops it and the
model comes from the store.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import xxhash

from ._exceptions import StoreError
from ._format import INDEX_NAME, SINGLE_NAME, ModelInfo, Segment
from ._sidefiles import SIDE_MARKER, marker_bytes
from ._versions import ModelVersion

__all__ = [
    "CHECKSUM_FIELD",
    "MANIFEST_NAME",
    "OPEN_DIR",
    "OPEN_LOCK",
    "OPEN_NEW",
    "OPEN_READ",
    "DiskEntry",
    "EntryDamagedError",
    "EntryFile",
    "InvalidEntry",
    "entry_name",
    "file_size",
    "flocked",
    "fsync_dir",
    "ident",
    "manifest_bytes",
    "open_beneath",
    "plan_files",
    "pwrite_all",
    "read_entry",
    "remove_tree",
    "safe_name",
    "same_manifest",
    "unlocked",
    "verify_bytes",
    "verify_files",
    "verify_loaded",
    "write_file",
]

MANIFEST_NAME = ".modelcache-entry.json"
CONFIG_NAME = "config.json"  # as modelcache._loader.CONFIG_NAME (not imported: no cycle risk)
_FORMAT = 1
_SLUG_BAD = re.compile(r"[^A-Za-z0-9._+=@-]")
_SLUG_LENGTH = 48
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
OPEN_READ = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
#: The lock file: never through a link (O_CREAT would make its target, wherever it points).
OPEN_LOCK = os.O_RDWR | os.O_CREAT | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_WRITE_CHUNK = 1 << 30  # below Linux's ~2 GiB cap on one write
#: The manifest's field of per-file checksums (a list aligned with "files"): an additive field,
#: so the format number stays; a manifest without it is an entry from before content checks.
CHECKSUM_FIELD = "xxh3_64"
#: A checksum as written in the manifest: 16 lowercase hex digits (fixed width, so the
#: manifest's size, charged to the budget before the write, does not depend on the values).
_DIGEST = re.compile(r"[0-9a-f]{16}")
_NO_DIGEST = "0" * 16
#: Bytes hashed then written at a time: small enough to be in the CPU cache for the write.
_HASH_CHUNK = 4 << 20


def entry_name(model_id: str) -> str:
    """The directory name of ``model_id``'s entry: sha256 hex + a readable slug (<= 113 bytes).

    Safe for any string: the slug keeps only ``A-Z a-z 0-9 . _ + = @ -`` (``/`` becomes ``_``)
    and is cut short; the hash keeps distinct ids (``a/b``, ``a_b``) apart.
    """
    digest = hashlib.sha256(model_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{digest}-{_SLUG_BAD.sub('_', model_id)[:_SLUG_LENGTH]}"


@dataclass(frozen=True, slots=True)
class DiskEntry:
    """One complete model on disk."""

    model_id: str
    #: Absolute path of the entry's directory (laid out like the store).
    directory: str
    #: Bytes of its files on disk: what the budget is charged.
    size: int
    #: Size of the model's buffer (``ModelInfo.nbytes``).
    nbytes: int
    #: The store's etag when it was written, to compare with the store's current one.
    etag: str | None
    #: (relative file name, size) of each model file, manifest excluded.
    files: tuple[tuple[str, int], ...]
    #: When it was written (seconds since the epoch).
    created: float
    #: The store's version of the model's files it was written from (`_versions`), when known.
    version: ModelVersion | None = None
    #: XXH3-64 of each file in ``files`` (16 hex digits), in the same order.
    checksums: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        """The directory as a ``file://`` URL, for a local `Store`."""
        return f"file://{self.directory}"


@dataclass(slots=True)
class EntryFile:
    name: str
    size: int
    prefix: bytes  # written at offset 0
    segments: list[Segment] = field(default_factory=list)  # buffer ranges written at seg.src


class InvalidEntry(Exception):
    """A final directory that is not a complete, consistent entry."""


class EntryDamagedError(StoreError):
    """A disk entry's bytes do not match the checksums written with it (a flipped bit, a
    rewritten file): the load that read them drops the entry and reads the store."""


# -- file helpers ----------------------------------------------------------------------------


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data[:_WRITE_CHUNK], offset)
        data = data[n:]
        offset += n


def fsync_dir(path: str) -> None:
    fd = os.open(path, OPEN_DIR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: str) -> None:
    """Remove a directory tree, or a file or symlink (never what a symlink points to)."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)
            return
    except OSError:
        return
    shutil.rmtree(path, ignore_errors=True)


def unlocked(path: str) -> bool:
    """True when no process holds ``path``'s flock: a leftover, whatever pid its name carries.

    A pid says nothing here: after a restart (always, in a container, where the writer is
    pid 1) a dead writer's pid is alive again. A writer holds the flock for its whole write and
    the kernel drops it when the writer dies. Something that is not a directory (a file, a
    symlink) is no one's write in progress: True.
    """
    try:
        fd = os.open(path, OPEN_DIR)
    except FileNotFoundError:
        return False  # gone already
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # releases the lock if we took it
    return True


def open_beneath(root: str, path: str) -> int:
    """Open ``path`` (a file under the directory ``root``) for reading without following a link
    below ``root``: each directory on the way is opened from the previous one with
    ``O_NOFOLLOW``, so an entry (or a file in it) replaced by a symlink after it was checked
    fails to open (ELOOP/ENOTDIR) instead of being read from wherever the link points."""
    relative = os.path.relpath(path, root)
    parts = relative.split(os.sep)
    if relative.startswith(os.pardir) or os.path.isabs(relative) or "" in parts:
        raise PermissionError(errno.EACCES, "outside the disk tier", path)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        for part in parts[:-1]:
            parent, fd = fd, -1
            try:
                fd = os.open(part, OPEN_DIR, dir_fd=parent)
            finally:
                os.close(parent)
        return os.open(parts[-1], OPEN_READ, dir_fd=fd)
    finally:
        if fd >= 0:
            os.close(fd)


def safe_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and 0 < len(name) <= 1024
        and not name.startswith("/")
        and "\x00" not in name
        and "\\" not in name
        and all(part not in ("", ".", "..") for part in name.split("/"))
    )


@contextlib.contextmanager
def flocked(path: str, *, read_only: bool = False) -> Iterator[None]:
    """Hold the directory-wide flock (a fresh descriptor each time, so threads queue too).

    ``read_only``: the lock file is opened for reading only (a flock needs no write access);
    where there is none, nobody ever wrote here, and the directory itself is locked instead.
    """
    if not read_only:
        fd = os.open(path, OPEN_LOCK, 0o644)
    else:
        try:
            fd = os.open(path, OPEN_READ)
        except FileNotFoundError:
            fd = os.open(os.path.dirname(path), OPEN_DIR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- what to write -----------------------------------------------------------------------------


def plan_files(info: ModelInfo) -> list[EntryFile]:
    """The files of ``info``'s entry, with the bytes or buffer ranges each is made of."""
    shards = info.shards
    single = len(shards) == 1 and shards[0].name in (SINGLE_NAME, shards[0].url)
    by_url: dict[str, list[Segment]] = {s.url: [] for s in shards}
    for seg in info.segments:
        if seg.url not in by_url:
            raise ValueError(f"model {info.model_id!r}: segment of unknown file {seg.url}")
        if not 0 <= seg.dst <= seg.dst + seg.length <= info.nbytes:
            raise ValueError(f"model {info.model_id!r}: segment outside the buffer: {seg}")
        by_url[seg.url].append(seg)
    files: list[EntryFile] = []
    for shard in shards:
        name = SINGLE_NAME if single else shard.name
        if not safe_name(name):
            raise ValueError(f"model {info.model_id!r}: unsafe shard name {name!r}")
        if shard.data_start != 8 + len(shard.header):
            raise ValueError(
                f"model {info.model_id!r}: shard {shard.name!r} carries no header bytes "
                f"({len(shard.header)} bytes for data at {shard.data_start})"
            )
        # In file order: written (and hashed) front to back, each segment where the last ended.
        segments = sorted(by_url[shard.url], key=lambda seg: seg.src)
        end = shard.data_start + shard.data_size
        ends = [shard.data_start] + [s.src + s.length for s in segments]
        if ends[-1] != end or any(s.src != at for s, at in zip(segments, ends, strict=False)):
            raise ValueError(
                f"model {info.model_id!r}: the segments do not tile shard {shard.name!r}"
            )
        prefix = struct.pack("<Q", len(shard.header)) + shard.header
        files.append(EntryFile(name, end, prefix, segments))
    if not single:
        index = {
            "metadata": dict(info.metadata),
            "weight_map": {t.name: t.shard for t in info.tensors.values()},
        }
        # Keys sorted: a load re-makes these bytes from what it parsed (`verify_loaded`), and
        # the order of the tensors it parsed need not be the order they were written in.
        data = json.dumps(index, indent=2, sort_keys=True).encode()
        files.append(EntryFile(INDEX_NAME, len(data), data))
    if info.config is not None:
        data = json.dumps(info.config).encode()
        files.append(EntryFile(CONFIG_NAME, len(data), data))
    files.extend(side_entry_files(info))
    names = [f.name for f in files]
    if len(set(names)) != len(names) or MANIFEST_NAME in names:
        raise ValueError(f"model {info.model_id!r}: file names collide: {names}")
    return files


def side_entry_files(info: ModelInfo) -> list[EntryFile]:
    """The side files read with ``info`` and the marker naming them (`_sidefiles`)."""
    marker = marker_bytes(info)
    if marker is None:
        return []
    files = [EntryFile(name, len(data), data) for name, data in info.files.items()]
    return [*files, EntryFile(SIDE_MARKER, len(marker), marker)]


def manifest_bytes(
    model_id: str,
    files: Sequence[EntryFile],
    nbytes: int,
    etag: str | None,
    created: float,
    checksums: Sequence[str] | None = None,
    *,
    version: ModelVersion | None = None,
) -> bytes:
    """The manifest; without ``checksums``, one of the exact size with placeholders for them."""
    digests = list(checksums) if checksums is not None else [_NO_DIGEST] * len(files)
    if len(digests) != len(files) or not all(_DIGEST.fullmatch(d) for d in digests):
        raise ValueError(f"model {model_id!r}: invalid checksums {digests!r}")
    fields = {
        "format": _FORMAT,
        "model_id": model_id,
        "files": [[f.name, f.size] for f in files],
        "nbytes": nbytes,
        "etag": etag,
        "created": created,
        CHECKSUM_FIELD: digests,
    }
    if version is not None:  # an optional field: entries written without it still read
        fields["version"] = version.to_json()
    return json.dumps(fields).encode()


def _digest(hasher: xxhash.xxh3_64) -> str:
    return f"{hasher.intdigest():016x}"


def write_file(fd: int, f: EntryFile, view: memoryview) -> str:
    """Write ``f`` (its prefix, then its segments of the model's buffer ``view``) to ``fd``,
    hashing each chunk as it is written; return the file's checksum."""
    hasher = xxhash.xxh3_64(f.prefix)
    pwrite_all(fd, memoryview(f.prefix), 0)
    for seg in f.segments:  # in file order (plan_files): the hash is the file's
        for at in range(0, seg.length, _HASH_CHUNK):
            chunk = view[seg.dst + at : seg.dst + min(seg.length, at + _HASH_CHUNK)]
            hasher.update(chunk)
            pwrite_all(fd, chunk, seg.src + at)
    return _digest(hasher)


def _file_digest(f: EntryFile, view: memoryview) -> str:
    hasher = xxhash.xxh3_64(f.prefix)
    for seg in f.segments:
        hasher.update(view[seg.dst : seg.dst + seg.length])
    return _digest(hasher)


def verify_loaded(entry: DiskEntry, info: ModelInfo, view: memoryview) -> None:
    """Check what a load read from ``entry`` against its checksums; `EntryDamagedError` if not.

    ``info`` is the description parsed from the entry's files and ``view`` the buffer its
    weights were read into: each shard's bytes are re-made from the header bytes parsed and the
    weights read, the index from the tensor table and metadata parsed. ``config.json`` and the
    side files are checked where they are read (`verify_bytes`).
    """
    expected = {name: (size, digest) for (name, size), digest in _pairs(entry)}
    try:
        # The weights' files only: config and side files are checked where they are read
        # (`verify_bytes`), and may come from the store (an entry written for another class).
        files = plan_files(replace(info, config=None, side_patterns=None))
    except ValueError as exc:
        raise _damaged(entry, f"its description does not lay out: {exc}") from exc
    for f in files:
        if f.name not in expected:
            raise _damaged(entry, f"{f.name} was read but the manifest does not list it")
        size, digest = expected[f.name]
        if f.size != size or _file_digest(f, view) != digest:
            raise _damaged(entry, f"{f.name} does not match its checksum")


def verify_bytes(entry: DiskEntry, found: Mapping[str, bytes | None]) -> None:
    """Check small files read whole from ``entry`` (config, side files, marker: name -> bytes,
    None for a file that was absent) against its manifest: each present one must be listed with
    its size and checksum, each listed one present. `EntryDamagedError` if not."""
    expected = {name: (size, digest) for (name, size), digest in _pairs(entry)}
    for name, data in found.items():
        listed = expected.get(name)
        if data is None and listed is None:
            continue
        if data is None or listed is None:
            where = "is missing" if data is None else "is not in the manifest"
            raise _damaged(entry, f"{name} {where}")
        size, digest = listed
        if len(data) != size or _digest(xxhash.xxh3_64(data)) != digest:
            raise _damaged(entry, f"{name} does not match its checksum")


def verify_files(entry: DiskEntry) -> None:
    """Read every file of ``entry`` again and check it against its checksum (for loads whose
    buffer is not in host memory: a CUDA device). `EntryDamagedError` on a mismatch."""
    for (name, size), digest in _pairs(entry):
        hasher = xxhash.xxh3_64()
        fd = open_beneath(entry.directory, os.path.join(entry.directory, name))
        try:
            done = 0
            while chunk := os.pread(fd, _HASH_CHUNK, done):
                hasher.update(chunk)
                done += len(chunk)
        finally:
            os.close(fd)
        if done != size or _digest(hasher) != digest:
            raise _damaged(entry, f"{name} does not match its checksum")


def _pairs(entry: DiskEntry) -> list[tuple[tuple[str, int], str]]:
    if len(entry.checksums) != len(entry.files):
        raise _damaged(entry, "its manifest has no checksums")
    return list(zip(entry.files, entry.checksums, strict=True))


def _damaged(entry: DiskEntry, why: str) -> EntryDamagedError:
    return EntryDamagedError(
        f"disk copy of model {entry.model_id!r} is damaged: {why}",
        model_id=entry.model_id,
        path=entry.directory,
    )


def read_entry(root: str, name: str) -> tuple[DiskEntry, os.stat_result, bytes]:
    """Load and verify the entry in ``root/name``: (entry, the manifest's stat and bytes).

    FileNotFoundError when the directory is gone; InvalidEntry when it is anything but a
    complete entry made of real directories and regular files, or cannot be read.
    """
    directory = os.path.join(root, name)
    try:
        dir_fd = os.open(directory, OPEN_DIR)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP: a symlink; ENOTDIR: a file; EIO...
        raise InvalidEntry(f"not a readable directory: {exc}") from exc
    try:
        return _read_entry(directory, dir_fd, name)
    except OSError as exc:
        raise InvalidEntry(f"unreadable: {exc}") from exc
    finally:
        os.close(dir_fd)


def _read_entry(directory: str, dir_fd: int, name: str) -> tuple[DiskEntry, os.stat_result, bytes]:
    try:
        fd = os.open(MANIFEST_NAME, OPEN_READ, dir_fd=dir_fd)
    except FileNotFoundError:
        raise InvalidEntry("no manifest") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidEntry("the manifest is not a regular file")
        raw = os.pread(fd, st.st_size + 1, 0)
    finally:
        os.close(fd)
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidEntry(f"manifest is not JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise InvalidEntry("unknown manifest format")
    model_id, files = manifest.get("model_id"), manifest.get("files")
    nbytes, etag, created = manifest.get("nbytes"), manifest.get("etag"), manifest.get("created")
    checksums = manifest.get(CHECKSUM_FIELD)
    if checksums is None:
        raise InvalidEntry("written before content checksums: fetched again")
    if (
        not isinstance(checksums, list)
        or not isinstance(files, list)
        or len(checksums) != len(files)
        or not all(isinstance(d, str) and _DIGEST.fullmatch(d) for d in checksums)
    ):
        raise InvalidEntry("manifest checksums are invalid")
    if (
        not isinstance(model_id, str)
        or entry_name(model_id) != name
        or not isinstance(files, list)
        or not isinstance(nbytes, int)
        or not (etag is None or isinstance(etag, str))
        or not isinstance(created, int | float)
    ):
        raise InvalidEntry("manifest fields are invalid")
    checked: list[tuple[str, int]] = []
    for item in files:
        if not (isinstance(item, list) and len(item) == 2 and safe_name(item[0])):
            raise InvalidEntry(f"manifest lists an invalid file {item!r}")
        file_name, size = item
        if not isinstance(size, int):
            raise InvalidEntry(f"manifest lists an invalid size for {file_name!r}")
        actual = file_size(dir_fd, file_name)
        if actual is None:
            raise InvalidEntry(f"{file_name} is missing or not a regular file")
        if actual != size:
            raise InvalidEntry(f"{file_name} is {actual} bytes, the manifest says {size}")
        checked.append((file_name, size))
    size = sum(s for _, s in checked) + st.st_size
    version = ModelVersion.from_json(manifest.get("version"))
    entry = DiskEntry(
        model_id,
        directory,
        size,
        nbytes,
        etag,
        tuple(checked),
        float(created),
        version,
        tuple(checksums),
    )
    return entry, st, raw


def file_size(dir_fd: int, name: str) -> int | None:
    """Size of the regular file ``name`` (relative) under ``dir_fd``; None when it is missing or
    it or a directory on its way is not the real thing (a symlink, a device...)."""
    parts = name.split("/")
    try:
        for i in range(1, len(parts)):
            st = os.stat("/".join(parts[:i]), dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                return None
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def ident(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_dev, st.st_ino, st.st_mtime_ns


def same_manifest(fd: int, manifest: bytes) -> bool:
    return os.pread(fd, len(manifest) + 1, 0) == manifest
