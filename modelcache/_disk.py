"""The disk tier: a local directory with a byte budget that keeps models fetched from a remote store.

A model evicted from RAM comes back from here instead of the network. The directory survives
restarts and may be shared by several processes (on one machine: the locks are ``flock``).
An entry's format (its name, files and manifest, and how it is verified) is `_diskformat`.

Layout of ``directory``::

    .lock                               flock'ed while a process scans, plans or publishes
    <sha256(id)>-<slug>/                one complete entry, laid out like the store:
        model.safetensors               (or the shards + model.safetensors.index.json)
        config.json                     when the model has one
        .modelcache-entry.json          the manifest: real id, file sizes and checksums, nbytes,
                                        etag, time, and the store's version of the files
                                        (`_versions`)
    .tmp-<pid>-<random>-<bytes>/        a write in progress (reserves <bytes> of the budget)
    .del-<pid>-<random>/                an evicted entry being deleted

Invariants:

- **Never half-written.** An entry is written into a temp dir, every file fsynced and its size
  checked, the manifest written last, then the temp dir is renamed to its final name. Readers
  trust only final directories whose manifest lists files of exactly the recorded sizes; any
  other final directory (a truncated file, no manifest) is deleted when seen.
- **Exact budget, across processes.** An entry costs the bytes of its files (headers, index,
  config and manifest included; apparent sizes, not blocks). Every scan, eviction, reservation
  and publish happens under the ``.lock`` flock, and a temp dir's name carries the bytes it will
  hold, so complete entries + writes in flight never exceed the budget of the process planning.
- **In use is never evicted.** `DiskTier.acquire` counts a lease and holds a shared flock on the
  entry's manifest; eviction needs the in-process count at zero *and* an exclusive flock, so an
  entry another process is reading is skipped too.
- **LRU survives restarts.** A use sets the manifest's mtime (explicit nanoseconds); the index
  rebuilt by `DiskTier.open` orders entries by it.
- **Leftovers.** A temp dir or trash dir is abandoned when no process holds its flock: a writer
  holds one for its whole write, a deleter from the rename to the end of the delete, and the
  kernel drops it when they die. The pid in the name is for people only: after a restart it is
  often alive again (always in a container, where the writer was pid 1). Every scan (open, and
  each write) removes abandoned ones, so their bytes never stay reserved. Anything else in the
  directory that is not a well-formed entry is ignored (logged at open); a final-named directory
  that is not a complete entry of regular files is deleted when seen.
- **Damage is a miss.** An entry that cannot be read (a missing file, a symlink, EIO) is dropped
  with a log line; the cache then reads the model from the store. So is one whose bytes, as a
  load read them, do not match the checksums written with them (`verify_loaded`, counted in
  `DiskStats.damaged`): a flipped bit on the disk never reaches a model.
- **A full filesystem.** A write first makes room within the budget, then within the
  filesystem's real free space, evicting least-recently-used entries for both; on ENOSPC it
  evicts at least one entry more and retries once (counted in `DiskStats.full`).
- **Read-only.** A directory this process cannot write (a read-only mount) is served as it is:
  entries are read and pinned as usual, nothing is written, evicted or cleaned up.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial

from ._diskformat import (
    MANIFEST_NAME,
    OPEN_DIR,
    OPEN_LOCK,
    OPEN_NEW,
    OPEN_READ,
    DiskEntry,
    EntryDamagedError,
    EntryFile,
    InvalidEntry,
    entry_name,
    file_size,
    flocked,
    fsync_dir,
    ident,
    manifest_bytes,
    open_beneath,
    plan_files,
    pwrite_all,
    read_entry,
    remove_tree,
    same_manifest,
    unlocked,
    verify_bytes,
    verify_files,
    verify_loaded,
    write_file,
)
from ._exceptions import StoreError
from ._format import ModelInfo
from ._store import Store
from ._units import format_bytes, parse_bytes
from ._versions import ModelVersion

__all__ = ["DiskEntry", "DiskStats", "DiskTier", "entry_name"]

_LOCK_NAME = ".lock"
_TEMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".del-"
_FINAL = re.compile(r"[0-9a-f]{64}-[A-Za-z0-9._+=@-]*")
_TEMP = re.compile(r"\.tmp-(\d+)-[0-9a-f]+-(\d+)")
_FADV_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)
#: A filesystem (or quota) that has no room left.
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: Room a write asks of the filesystem per file beyond its bytes (its last block, its inode).
_PER_FILE_SLACK = 8192

logger = logging.getLogger("modelcache")


def _free_bytes(path: str) -> int:
    """Bytes the filesystem holding ``path`` still has for us (a module function: tests fake it)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclass(frozen=True, slots=True)
class DiskStats:
    """A snapshot of a `DiskTier` (this process's view of the shared directory)."""

    #: Bytes of the complete entries known here (files on disk, exactly).
    bytes: int
    budget: int
    entries: int
    #: Loads served from an entry (read and checked) / that looked here and read the store
    #: (no entry, a stale or damaged one): `DiskTier.count`.
    hits: int
    misses: int
    #: Entries this tier wrote and published.
    writes: int
    #: Entries deleted to make room.
    evictions: int
    #: Writes that found the filesystem full (ENOSPC, or less free space than they need).
    full: int = 0
    #: Temp and trash directories of processes that died mid-write or mid-delete, removed.
    leftovers: int = 0
    #: The directory is read-only here: entries are served, nothing is written.
    read_only: bool = False
    #: Loads that found an entry's bytes not matching its checksums (the entry is dropped).
    damaged: int = 0

    def __str__(self) -> str:
        return (
            f"{format_bytes(self.bytes)}/{format_bytes(self.budget)} in {self.entries} entries; "
            f"hits={self.hits} misses={self.misses} writes={self.writes} "
            f"evictions={self.evictions} full={self.full} leftovers={self.leftovers}"
            f" damaged={self.damaged}" + (" read-only" if self.read_only else "")
        )


@dataclass(slots=True)
class _Record:
    entry: DiskEntry
    name: str
    #: The manifest's bytes: what tells this entry from a later one of the same model exactly.
    manifest: bytes
    #: The manifest's (st_dev, st_ino, st_mtime_ns) when last seen: unchanged means "same entry,
    #: not used elsewhere since" (a cheap check; a change means: read the manifest again).
    ident: tuple[int, int, int]
    #: Last use, ns since the epoch (the manifest's mtime), then an in-process tie-breaker.
    used: tuple[int, int]
    evicting: bool = False


def _intact(record: _Record) -> bool:
    """The record's own manifest is in place and every file has its recorded size (no links)."""
    try:
        fd = os.open(record.entry.directory, OPEN_DIR)
    except OSError:
        return False
    try:
        if ident(os.stat(MANIFEST_NAME, dir_fd=fd, follow_symlinks=False)) != record.ident:
            return False
        return all(file_size(fd, name) == size for name, size in record.entry.files)
    except OSError:
        return False
    finally:
        os.close(fd)


# -- the tier --------------------------------------------------------------------------------


class DiskTier:
    """A byte-budgeted local directory of complete models, shared safely between processes.

    Methods that touch the disk (`open`, `write`, `remove`, and lightly `get` and `acquire`: a
    few ``stat`` calls) are blocking; run them in a worker thread. Everything is thread-safe.
    """

    def __init__(
        self, directory: str | os.PathLike[str], budget: int | str, *, verify: bool = True
    ) -> None:
        self._root = os.path.abspath(os.fspath(directory))
        self._budget = parse_bytes(budget, name="disk budget")
        #: Check what loads read against the entries' checksums (`check_loaded`). Off: sizes
        #: only (what benches/tier_reload.py compares against).
        self.verify = verify
        self._lock_path = os.path.join(self._root, _LOCK_NAME)
        self._lock = threading.Lock()  # guards everything below; never held during slow I/O
        self._records: dict[str, _Record] = {}
        self._leases: dict[str, list[int]] = {}  # model id -> flock'ed manifest descriptors
        self._seq = 0
        self._opened = False
        self._read_only = False
        #: Trash dirs this process is deleting -> their flock'ed descriptor ("a deleter lives").
        self._trash_fds: dict[str, int] = {}
        self._hits = self._misses = self._writes = self._evictions = 0
        self._full = self._leftovers = self._damaged = 0
        #: The filesystem had less free space than the last write needed (under the flock).
        self._short = False
        # Entries are checked (lstat, O_NOFOLLOW) when found, but read later by path: the
        # store's opens must refuse links too, or one planted in between would be followed.
        self._store = Store(
            self._resolve,
            allow_slash_in_ids=True,
            max_id_length=1 << 16,
            opener=partial(open_beneath, self._root),
        )

    def __repr__(self) -> str:
        return f"DiskTier({self._root!r}, {self.stats()})"

    def __contains__(self, model_id: object) -> bool:
        """Whether this process's index holds ``model_id`` (no I/O, not verified)."""
        with self._lock:
            return model_id in self._records

    @property
    def directory(self) -> str:
        return self._root

    @property
    def budget(self) -> int:
        return self._budget

    @property
    def read_only(self) -> bool:
        """True when the directory could not be written at `open` (entries served, none written)."""
        return self._read_only

    @property
    def store(self) -> Store:
        """A local Store that finds each entry by model id: read it with the usual loader."""
        return self._store

    def url(self, entry: DiskEntry) -> str:
        """The ``file://`` URL of ``entry``'s directory."""
        return entry.url

    def stats(self) -> DiskStats:
        with self._lock:
            return DiskStats(
                bytes=sum(r.entry.size for r in self._records.values()),
                budget=self._budget,
                entries=len(self._records),
                hits=self._hits,
                misses=self._misses,
                writes=self._writes,
                evictions=self._evictions,
                full=self._full,
                leftovers=self._leftovers,
                read_only=self._read_only,
                damaged=self._damaged,
            )

    # -- opening -----------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory, rebuild the index from complete entries, clean up leftovers.

        Removes trash and temp dirs nobody holds and invalid entries, then evicts
        least-recently-used entries while the total is over budget. Idempotent. Blocking.
        A directory that cannot be written opens read-only; one that cannot be made or read
        raises `StoreError` naming it.
        """
        root = self._root
        try:
            os.makedirs(root, exist_ok=True)
            if not os.path.isdir(root):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", root)
            read_only = not self._writable()
            if read_only and not self._read_only:
                logger.warning(
                    "disk tier %s is read-only: serving the models it holds, writing none", root
                )
            self._read_only = read_only
            trash: list[str] = []
            try:
                with self._flocked():
                    reserved = self._scan(trash, opening=True)
                    if not read_only:
                        self._make_room(reserved, trash)
                    self._opened = True
            finally:
                self._empty(trash)
        except OSError as exc:
            raise StoreError(
                f"the disk tier's directory {root!r} cannot be used: {exc}", path=root
            ) from exc

    def _writable(self) -> bool:
        """Whether this process can write the directory (and so its lock file)."""
        if not os.access(self._root, os.W_OK | os.X_OK):
            return False
        try:
            fd = os.open(self._lock_path, OPEN_LOCK, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return False
            raise
        os.close(fd)
        return True

    def _flocked(self) -> contextlib.AbstractContextManager[None]:
        return flocked(self._lock_path, read_only=self._read_only)

    def _require_open(self) -> None:
        if not self._opened:
            raise RuntimeError(f"DiskTier({self._root!r}): call open() first")

    def _resolve(self, model_id: str) -> str:
        return f"file://{os.path.join(self._root, entry_name(model_id))}"

    # -- reading -----------------------------------------------------------------------------

    def get(self, model_id: str) -> DiskEntry | None:
        """The complete entry of ``model_id`` (sizes checked now) or None; marks it used.

        Finds entries other processes wrote. An entry whose files no longer match its manifest
        is deleted and None returned.
        """
        self._require_open()
        with self._lock:
            record = self._records.get(model_id)
        if record is not None and record.evicting:
            record = None
        elif record is None or not _intact(record):
            stale = record
            record = self._discover(entry_name(model_id), locked=False)
            if record is None and stale is not None:
                self._forget(stale)
        if record is None:
            return None
        self._touch(record)
        return record.entry

    def count(self, *, served: bool) -> None:
        """Count a load that looked here: ``served`` from an entry (its bytes read and checked),
        or not (none, stale, damaged: the store read instead). Not `get`: it is also a look
        that serves nothing (a check for a stale copy)."""
        with self._lock:
            if served:
                self._hits += 1
            else:
                self._misses += 1

    def acquire(self, entry: DiskEntry) -> bool:
        """Pin ``entry`` while it is read; False when it is gone or being evicted.

        Every True must be matched by one `release`. A pinned entry is not evicted by this
        process nor, through a shared flock on its manifest, by another one.
        """
        with self._lock:
            record = self._records.get(entry.model_id)
            if record is None or record.evicting or record.entry != entry:
                return False
            leases = self._leases.setdefault(entry.model_id, [])
            leases.append(-1)  # counted now, so it cannot be chosen as a victim meanwhile
            expected = record.manifest
        manifest = os.path.join(entry.directory, MANIFEST_NAME)
        fd = -1
        try:
            fd = os.open(manifest, OPEN_READ)
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            if not os.path.samestat(os.fstat(fd), os.stat(manifest)) or not same_manifest(
                fd, expected
            ):
                raise FileNotFoundError(manifest)  # evicted (and maybe rewritten) meanwhile
        except OSError:
            if fd >= 0:
                os.close(fd)
            fd = -2
        with self._lock:
            leases.remove(-1)
            if fd >= 0:
                leases.append(fd)
            elif not leases:
                del self._leases[entry.model_id]
        return fd >= 0

    def release(self, entry: DiskEntry) -> None:
        """End one `acquire` of ``entry``."""
        with self._lock:
            leases = self._leases.get(entry.model_id)
            held = [i for i, fd in enumerate(leases or ()) if fd >= 0]
            if leases is None or not held:
                raise RuntimeError(f"disk entry {entry.model_id!r} is not acquired")
            fd = leases.pop(held[-1])
            if not leases:
                del self._leases[entry.model_id]
        os.close(fd)

    def check_loaded(self, entry: DiskEntry, info: ModelInfo, view: memoryview | None) -> None:
        """Check the bytes a load read from ``entry`` (described as ``info``) against its
        checksums: those in ``view`` (the buffer they were read into) or, when it is None (not in
        host memory), the files read again. Raises `EntryDamagedError` (counted). Blocking."""
        if not self.verify:
            return
        try:
            if view is None:
                verify_files(entry)
            else:
                verify_loaded(entry, info, view)
        except EntryDamagedError:
            with self._lock:
                self._damaged += 1
            raise

    def check_read(self, entry: DiskEntry, found: Mapping[str, bytes | None]) -> None:
        """Check the small files a load read whole from ``entry`` (config, side files, marker;
        None for an absent one) against its manifest; `EntryDamagedError` (counted) if they
        differ. Checked whatever `verify` says: they are small, and parsed before any check of
        the weights could run."""
        try:
            verify_bytes(entry, found)
        except EntryDamagedError:
            with self._lock:
                self._damaged += 1
            raise

    # -- writing -----------------------------------------------------------------------------

    def write(
        self, info: ModelInfo, buffer: memoryview, *, etag: str | None = None
    ) -> DiskEntry | None:
        """Write ``info``'s files from its buffer and publish them atomically. Blocking.

        Returns the entry; the existing one when the model is already here with the same etag
        (or ``etag`` is None) and version (or ``info.version`` is None); None, writing nothing, when the model is larger than the budget,
        room cannot be made (within the budget and the filesystem's free space) because entries
        are in use, or the directory is read-only. If another process publishes the same model
        first, ours is discarded and theirs returned. On ENOSPC the least recently used entry
        is evicted (more while the filesystem lacks room) and the write is tried once more. Raises ValueError when the
        buffer does not match ``info`` and OSError on I/O errors (after removing its temp dir).
        """
        self._require_open()
        view = memoryview(buffer)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        if len(view) != info.nbytes:
            raise ValueError(
                f"buffer is {len(view)} bytes, model {info.model_id!r} needs {info.nbytes}"
            )
        files = plan_files(info)
        created = time.time()
        # No version (the store names none) is written as an empty one: a manifest without the
        # field is of an older release, whose copy the store's version must replace.
        version = info.version if info.version is not None else ModelVersion(())
        make_manifest = partial(
            manifest_bytes, info.model_id, files, info.nbytes, etag, created, version=version
        )
        # Checksums are fixed-width: the manifest's size is known before they are.
        size = sum(f.size for f in files) + len(make_manifest())
        if size > self._budget or self._read_only:
            return None
        entry = DiskEntry(
            info.model_id,
            os.path.join(self._root, entry_name(info.model_id)),
            size,
            info.nbytes,
            etag,
            tuple((f.name, f.size) for f in files),
            created,
            version,
        )
        full = False  # met ENOSPC: evict before trying again
        while True:
            try:
                started = self._begin(entry, len(files) + 2, evict=full)
            except OSError as exc:
                # Making the temp dir needs an inode and a directory block: a filesystem out of
                # inodes (bytes to spare) fails here, and must evict like a full one.
                if exc.errno not in _FULL_ERRNOS or full:
                    raise
                self._note_full(info.model_id, exc)
                full = True
                continue
            if not isinstance(started, tuple):
                return started
            temp, temp_fd = started
            try:
                try:
                    st, manifest, checksums = self._write_files(temp, files, view, make_manifest)
                except OSError as exc:
                    if exc.errno not in _FULL_ERRNOS or full:
                        raise
                    self._note_full(info.model_id, exc)
                    full = True
                    continue
                return self._publish(replace(entry, checksums=checksums), temp, manifest, st)
            finally:
                remove_tree(temp)  # gone already when it was published
                os.close(temp_fd)

    def _note_full(self, model_id: str, exc: OSError) -> None:
        logger.warning(
            "disk tier %s is full writing %r (%s): evicting to make room, then trying once more",
            self._root,
            model_id,
            exc,
        )
        with self._lock:
            self._full += 1

    def _begin(
        self, entry: DiskEntry, nfiles: int, *, evict: bool
    ) -> tuple[str, int] | DiskEntry | None:
        """Plan a write under the flock: an existing entry to use, None (no room), or a new
        temp dir and its flock'ed descriptor (held while writing: "this writer lives").

        ``evict``: evict at least one entry (the filesystem was full, whatever it reports).
        """
        model_id, size = entry.model_id, entry.size
        trash: list[str] = []
        try:
            with self._flocked():
                reserved = self._scan(trash)
                with self._lock:
                    existing = self._records.get(model_id)
                if existing is not None and (
                    (entry.etag is None or existing.entry.etag == entry.etag)
                    and (entry.version is None or existing.entry.version == entry.version)
                ):
                    self._touch(existing)
                    return existing.entry
                if existing is not None and not self._evict(existing, trash):
                    return None
                if not self._make_room(size + reserved, trash, evict_one=evict):
                    return None
                if not self._make_space(size + nfiles * _PER_FILE_SLACK, trash):
                    logger.warning(
                        "disk tier %s: no room on the filesystem for %r (%s), nothing evictable",
                        self._root,
                        model_id,
                        format_bytes(size),
                    )
                    return None
                if evict:
                    self._empty(trash)  # the evicted entry's inodes, freed before the mkdir
                temp = os.path.join(
                    self._root, f"{_TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{size}"
                )
                os.mkdir(temp)
                try:
                    temp_fd = os.open(temp, OPEN_DIR)
                    fcntl.flock(temp_fd, fcntl.LOCK_EX)
                except BaseException:
                    os.rmdir(temp)
                    raise
                return temp, temp_fd
        finally:
            self._empty(trash)

    def _publish(
        self, entry: DiskEntry, temp: str, manifest: bytes, st: os.stat_result
    ) -> DiskEntry | None:
        """Rename a complete temp dir to its final name and index it, under the flock."""
        name = os.path.basename(entry.directory)
        with self._flocked():  # publish and index at once: no eviction in between
            try:
                os.rename(temp, entry.directory)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not os.path.isdir(
                    entry.directory
                ):
                    raise
                # Another process published this model first: ours goes, theirs is used.
                theirs = self._discover(name, locked=True)
            else:
                fsync_dir(self._root)
                theirs = _Record(entry, name, manifest, ident(st), (0, 0))
                with self._lock:
                    self._records[entry.model_id] = theirs
                    self._writes += 1
            if theirs is not None:
                self._touch(theirs)
        return None if theirs is None else theirs.entry

    def _write_files(
        self,
        temp: str,
        files: Sequence[EntryFile],
        view: memoryview,
        make_manifest: Callable[[Sequence[str]], bytes],
    ) -> tuple[os.stat_result, bytes, tuple[str, ...]]:
        """Write, fsync and check every file, hashing it as it goes, then the manifest with the
        checksums; return the manifest's stat and bytes and the checksums."""
        directories = {temp}
        checksums: list[str] = []
        for f in files:
            path = os.path.join(temp, f.name)
            parent = os.path.dirname(path)
            if parent not in directories:
                os.makedirs(parent, exist_ok=True)
                directories.add(parent)
            fd = os.open(path, OPEN_NEW, 0o644)
            try:
                checksums.append(write_file(fd, f, view))
                os.fsync(fd)
                actual = os.fstat(fd).st_size
                if actual != f.size:
                    raise OSError(errno.EIO, f"{path} is {actual} bytes after writing {f.size}")
                if _FADV_DONTNEED is not None and f.segments:
                    # The host tier holds these bytes already: do not keep a second copy cached.
                    os.posix_fadvise(fd, 0, 0, _FADV_DONTNEED)
            finally:
                os.close(fd)
        manifest = make_manifest(checksums)
        fd = os.open(os.path.join(temp, MANIFEST_NAME), OPEN_NEW, 0o644)
        try:
            pwrite_all(fd, memoryview(manifest), 0)
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        for directory in sorted(directories, key=len, reverse=True):
            fsync_dir(directory)
        return st, manifest, tuple(checksums)

    # -- removing ----------------------------------------------------------------------------

    def remove(self, model_id: str) -> bool:
        """Delete ``model_id``'s entry; False when there is none, it is in use or the directory
        is read-only. Blocking."""
        self._require_open()
        if self._read_only:
            return False
        trash: list[str] = []
        try:
            with self._flocked():
                record = self._discover(entry_name(model_id), locked=True)  # not a stale record
                return record is not None and self._evict(record, trash, count=False)
        finally:
            self._empty(trash)

    # -- internals ---------------------------------------------------------------------------

    def _touch(self, record: _Record) -> None:
        """Mark ``record`` used now, here and in its manifest's mtime (for other processes)."""
        now = time.time_ns()
        try:
            os.utime(os.path.join(record.entry.directory, MANIFEST_NAME), ns=(now, now))
        except OSError:  # gone, or a read-only directory: its order on disk stays as it was
            touched = False
        else:
            touched = True
        with self._lock:
            self._seq += 1
            record.used = max(record.used, (now, self._seq))
            if touched:
                record.ident = (*record.ident[:2], now)

    def _discover(self, name: str, *, locked: bool) -> _Record | None:
        """Index the entry in ``root/name`` (written by another process or an earlier run).

        An invalid entry is deleted, but only under the flock (``locked``: held already), after
        reading it again there: unlocked, it may have been replaced while we looked.
        """
        try:
            entry, st, raw = read_entry(self._root, name)
        except FileNotFoundError:
            return None
        except InvalidEntry as exc:
            if not locked:
                with self._flocked():
                    return self._discover(name, locked=True)
            if not self._read_only:
                logger.warning(
                    "disk tier %s: entry %s is damaged (%s): removed", self._root, name, exc
                )
                self._delete(name)
            return None
        with self._lock:
            record = self._records.get(entry.model_id)
            if record is not None and record.manifest == raw:  # the same entry, used since
                record.ident = ident(st)
                record.used = max(record.used, (st.st_mtime_ns, 0))
            else:
                record = _Record(entry, name, raw, ident(st), (st.st_mtime_ns, 0))
                self._records[entry.model_id] = record
        if not locked:  # evicted while we read it? Then forget it again.
            try:
                still = os.stat(os.path.join(entry.directory, MANIFEST_NAME))
            except OSError:
                still = None
            if still is None or ident(still)[:2] != record.ident[:2]:
                self._forget(record)
                return None
        return record

    def _forget(self, record: _Record) -> None:
        with self._lock:
            if self._records.get(record.entry.model_id) is record:
                del self._records[record.entry.model_id]

    def _delete(self, name: str) -> None:
        """Delete an invalid entry (under the flock)."""
        trash = os.path.join(self._root, f"{_TRASH_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(os.path.join(self._root, name), trash)
        except OSError:
            return
        remove_tree(trash)

    def _empty(self, trash: list[str]) -> None:
        """Delete trash dirs (outside the flock: deleting is slow), then let go of their flocks."""
        for path in trash:
            remove_tree(path)
            with self._lock:
                fd = self._trash_fds.pop(path, -1)
            if fd >= 0:
                os.close(fd)
        trash.clear()

    def _scan(self, trash: list[str], *, opening: bool = False) -> int:
        """Sync the index with the directory (under the flock); return bytes reserved by writes.

        Temp and trash dirs nobody holds go to ``trash``; invalid entries are deleted; other
        names are ignored (logged when ``opening``).
        """
        finals: set[str] = set()
        reserved = 0
        for name in os.listdir(self._root):
            if _FINAL.fullmatch(name):
                finals.add(name)
            elif name.startswith((_TEMP_PREFIX, _TRASH_PREFIX)):
                path = os.path.join(self._root, name)
                if self._read_only:
                    continue  # nothing is written here, and nothing can be removed
                if path not in self._trash_fds and unlocked(path):
                    logger.info(
                        "disk tier %s: removing %s, left by a process that died", self._root, name
                    )
                    trash.append(path)
                    with self._lock:
                        self._leftovers += 1
                elif (match := _TEMP.fullmatch(name)) is not None:
                    reserved += int(match[2])  # a live writer's; a malformed name reserves none
            elif opening and name != _LOCK_NAME:
                logger.info("disk tier %s: ignoring %r, not an entry", self._root, name)
        with self._lock:
            known = {r.name: r for r in self._records.values() if not r.evicting}
        current: set[str] = set()
        for name, record in known.items():
            try:  # gone, replaced, or used by another process since we looked
                st = os.stat(os.path.join(self._root, name, MANIFEST_NAME), follow_symlinks=False)
            except OSError:
                st = None
            if st is None:
                self._forget(record)
            elif ident(st) == record.ident or self._discover(name, locked=True) is not None:
                current.add(name)  # unchanged, or read again (used elsewhere, or replaced)
            else:
                self._forget(record)
        for name in finals - current:
            self._discover(name, locked=True)
        return reserved

    def _victim(self, skip: set[str]) -> _Record | None:
        """The least recently used entry that could be evicted now (not pinned, not skipped)."""
        with self._lock:
            candidates = [
                r
                for r in self._records.values()
                if not r.evicting and r.entry.model_id not in self._leases and r.name not in skip
            ]
        return min(candidates, key=lambda r: (r.used, r.name)) if candidates else None

    def _make_room(self, needed: int, trash: list[str], *, evict_one: bool = False) -> bool:
        """Evict least-recently-used unpinned entries until ``needed`` more bytes fit the budget
        (and, with ``evict_one``, at least one entry is gone)."""
        skip: set[str] = set()
        while True:
            with self._lock:
                used = sum(r.entry.size for r in self._records.values())
            if used + needed <= self._budget and not evict_one:
                return True
            victim = self._victim(skip)
            if victim is None:
                return used + needed <= self._budget
            if self._evict(victim, trash):
                evict_one = False
            else:
                skip.add(victim.name)

    def _make_space(self, needed: int, trash: list[str]) -> bool:
        """Evict least-recently-used unpinned entries until the filesystem has ``needed`` bytes
        free (deleting each at once: only then is its space free). False if it cannot."""
        try:
            free = _free_bytes(self._root)
        except OSError:
            return True  # no figure: the budget alone decides, ENOSPC still handled
        if free >= needed:
            if self._short:
                self._short = False
                logger.info("disk tier %s: the filesystem has room again", self._root)
            return True
        with self._lock:
            self._full += 1
        if not self._short:  # once per episode: every write while it lasts would say it again
            self._short = True
            logger.warning(
                "disk tier %s: the filesystem is full (%s free, %s needed): evicting entries "
                "for room, skipping writes when none can go, until space is freed",
                self._root,
                format_bytes(free),
                format_bytes(needed),
            )
        skip: set[str] = set()
        while True:
            self._empty(trash)
            if _free_bytes(self._root) >= needed:
                return True
            victim = self._victim(skip)
            if victim is None:
                return False
            if not self._evict(victim, trash):
                skip.add(victim.name)

    def _evict(self, record: _Record, trash: list[str], *, count: bool = True) -> bool:
        """Move an unpinned entry to ``trash`` (under the flock); False when it is in use."""
        model_id = record.entry.model_id
        with self._lock:
            if record.evicting or model_id in self._leases:
                return False
            record.evicting = True
        evicted = False
        fd = dir_fd = -1
        try:
            fd = os.open(os.path.join(record.entry.directory, MANIFEST_NAME), OPEN_READ)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while another reader holds it
            if not same_manifest(fd, record.manifest):
                raise BlockingIOError("a newer entry took its place")  # keep it: overcounting
            # Held until deleted: other processes' scans leave a trash dir with a live deleter.
            dir_fd = os.open(record.entry.directory, OPEN_DIR)
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path = os.path.join(self._root, f"{_TRASH_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(record.entry.directory, path)
            with self._lock:
                self._trash_fds[path] = dir_fd
            dir_fd = -1
            trash.append(path)
            evicted = True
        except FileNotFoundError:
            evicted = True  # already gone
        except OSError:
            evicted = False
        finally:
            for descriptor in (fd, dir_fd):
                if descriptor >= 0:
                    os.close(descriptor)
            with self._lock:
                record.evicting = False
                current = self._records.get(model_id)
                if evicted and current is not None and current.ident == record.ident:
                    del self._records[model_id]
                if evicted and count:
                    self._evictions += 1
        return evicted
