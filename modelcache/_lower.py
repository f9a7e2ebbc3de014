"""The tiers under the device: host memory and a disk directory, and the moves among them.

Invariants (checked by the cache's tests after every step):

* The host budget's reserved bytes = bytes of host entries + ``in_flight`` (claimed by a promotion, being
  loaded, being copied in from the device, or a block that left the tier while a disk write
  still reads it) + bytes being freed; never above the host budget (`check`). So the host budget counts
  every byte of the host arena in use.
* Model ids in ``moving`` have bytes on their way between tiers: a load of such an id waits for
  the move to end and then looks again, so a model is never read twice at once.
* A host entry being read by a background copy (to the disk tier) is pinned (``users``): it is
  not evicted, and if it leaves the tier meanwhile its memory is freed by the copy's end.
* The disk tier only holds models of remote stores; writes to it run in the background and
  never fail a load. A write keeps its model's buffer alive until it ends: on ``on_host``
  backends that buffer may have left every budgeted tier meanwhile, so those writes are bounded
  by ``write_behind`` bytes (``writing``); a write that does not fit is skipped, never queued
  (a queued write would hold its buffer too), and the next load of the model from the store
  tries again. One write may always run, so any model can reach the disk.
* A disk copy that cannot be read (removed or damaged under a load) is dropped and the model
  read from the store: the disk tier is never the reason a load fails. What a load read from a
  disk copy is checked against the copy's checksums before it is used (`_check_disk_copy`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from . import _observe
from ._arena import HostArena, HostBlock
from ._backend import DeviceBackend, LoadedWeights
from ._concurrency import Background
from ._cost import LoadCosts, MissCosts
from ._disk import DiskEntry, DiskTier
from ._exceptions import CacheClosedError, ModelCacheError, ModelLoadError, as_model_error
from ._failures import for_caller, release_frames
from ._format import INDEX_NAME, ModelInfo
from ._loader import fill_buffer, read_model_info
from ._observe import Observers
from ._policy import EvictionPolicy, admits
from ._refresh import load_one_version, read_again
from ._sidefiles import check_host_fits, read_extras
from ._store import Store
from ._tiers import ByteBudget, HostEntry, TierStats, check_fits, host_evictable
from ._units import format_bytes
from ._versions import ModelVersion

__all__ = ["HostDiskTiers"]

logger = logging.getLogger("modelcache")


def _unreadable(exc: Exception) -> bool:
    """Whether reading a disk copy failed because of the copy (gone, damaged, I/O), not memory."""
    return isinstance(exc, ModelCacheError | OSError) and not isinstance(exc, ModelLoadError)


class _HostLoad:
    """A load into the host tier (prefetch): its outcome, for whoever waits on it."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: BaseException | None = None


class HostDiskTiers:
    """Host memory and the disk tier under one device tier, owned by a `ModelCache`."""

    def __init__(
        self,
        store: Store,
        backend: DeviceBackend,
        host_budget: int,
        disk: DiskTier | None,
        observers: Observers | None = None,
        *,
        background: Background | None = None,
        policy: EvictionPolicy | None = None,
        costs: LoadCosts | None = None,
        write_behind: int = 1 << 30,
    ) -> None:
        self._store = store
        self._backend = backend
        self._observers = observers if observers is not None else Observers()
        #: Counts the tasks this starts (copies down, disk writes, host loads): `wait_idle`.
        self._background = background if background is not None else Background()
        #: Bandwidth learned from loads into host memory (shared with the device tier's).
        self.costs = costs if costs is not None else LoadCosts()
        #: What evicting a model from each tier costs (bound to the tiers' policies).
        self.miss_costs = MissCosts(self.costs, host_budget, self.reload_source)
        self.host: ByteBudget[HostEntry] = ByteBudget(
            "host",
            host_budget,
            evictable=host_evictable,
            evict=self._evict_host,
            policy=policy,
            cost=self.miss_costs.host,
        )
        self.entries: dict[str, HostEntry] = {}
        #: Host bytes reserved for work in flight: claimed for a promotion, being loaded or
        #: copied in.
        self.in_flight = 0
        #: Model ids whose bytes are moving between tiers: wait for the move, then look.
        self.moving: dict[str, anyio.Event] = {}
        self.disk = disk
        self.disk_writes: set[str] = set()
        #: -- versions (issue 12): writes in flight of ids whose store version changed (a
        #: `drop_stale` since they began), with the version a write may leave (None: none).
        self._stale_writes: dict[str, ModelVersion | None] = {}
        #: Bound of ``writing``: bytes of buffers held by disk writes (on_host backends).
        self.write_behind = write_behind
        self.writing = 0
        #: Disk writes not started because ``writing`` was at its bound.
        self.writes_skipped = 0
        self.arena: HostArena | None = None  # (pinned) host memory for backends not on_host
        self._loads: dict[str, _HostLoad] = {}
        self._task_group: anyio.abc.TaskGroup | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._closed = True
        #: Whether a disk copy (of a version) may be served now (`Revalidator.validate_disk`).
        self.validate_disk: Callable[[str, ModelVersion | None], Awaitable[bool]] | None = None

    async def open(self, task_group: anyio.abc.TaskGroup, limiter: anyio.CapacityLimiter) -> None:
        """Start: the disk index is rebuilt, the pinned slab is made (both off the loop)."""
        self._task_group, self._limiter = task_group, limiter
        if self.disk is not None:
            await anyio.to_thread.run_sync(self.disk.open)
        if not self._backend.on_host and self.host.budget:
            # Pinning takes seconds: do it now, in a thread. Blocks round up to pages, so the
            # slab gets some slack; a fragmented slab makes a demotion drop instead.
            slack = self.host.budget // 64 + (1 << 20)
            self.arena = self._backend.host_arena(self.host.budget + slack)
            await self.arena.allocate()
        self._closed = False

    def close(self) -> None:
        """Free every host entry (the cache's task group has ended)."""
        self._closed = True
        for entry in list(self.entries.values()):
            self._remove_host(entry)
            self.host.unreserve(entry.nbytes)
            self._free_host_payload(entry)
        self.arena = None

    def check(self) -> None:
        """The host tier's accounting invariants (the tests call it after every step)."""
        self.host.check(self.entries.values(), in_flight=self.in_flight)

    def stats(self) -> dict[str, TierStats]:
        tiers = {"host": self.host.stats(len(self.entries))}
        if self.disk is not None:
            disk = self.disk.stats()
            tiers["disk"] = TierStats(
                bytes=disk.bytes,
                bytes_reserved=disk.bytes,
                budget=disk.budget,
                entries=disk.entries,
                hits=disk.hits,
                misses=disk.misses,
                promotions=disk.hits,
                demotions=disk.writes,
                evictions=disk.evictions,
            )
        return tiers

    # -- the device's evictions ---------------------------------------------------------------

    def take_from_device(self, weights: LoadedWeights, copied: Callable[[int], None]) -> bool:
        """Take a model the device just evicted (synchronous; called while the device plans).

        It moves to host memory if it fits there, else it is dropped. When the backend is
        ``on_host`` the weights themselves move (no copy). Otherwise a (pinned) host block is
        taken now and the backend's copy runs in the background: then True, and the device
        bytes stay in use until ``copied(nbytes)`` is called as the copy ends. False: the
        device bytes are free now.
        """
        nbytes = weights.info.nbytes
        model_id = weights.info.model_id
        host_nbytes = nbytes + weights.info.side_bytes  # side files count in the host budget
        if self._host_can_take(model_id, host_nbytes):
            if self._backend.on_host:
                self._admit_host(HostEntry(weights.info, weights))
                self.host.demoted()
                return False
            block = self._host_block(nbytes)
            if block is not None:
                assert self._task_group is not None
                self.in_flight += host_nbytes
                self.moving[model_id] = anyio.Event()
                self._background.start(self._task_group, self._copy_down, weights, block, copied)
                return True
            self.host.release(host_nbytes)
        return False

    async def _copy_down(
        self, weights: LoadedWeights, block: HostBlock, copied: Callable[[int], None]
    ) -> None:
        """Finish a device demotion: device buffer -> (pinned) host block."""
        info = weights.info
        host_nbytes = info.nbytes + info.side_bytes
        try:
            await self._backend.demote(weights, block)
        except BaseException as exc:
            self._free_block(block)
            self.host.release(host_nbytes)
            if not isinstance(exc, Exception):
                raise
            logger.warning("could not move %r to host memory: %s", info.model_id, exc)
        else:
            self._admit_host(HostEntry(info, block))
            self.host.demoted()
        finally:
            del weights
            self.in_flight -= host_nbytes
            copied(info.nbytes)
            self.moving.pop(info.model_id).set()

    # -- the disk tier --------------------------------------------------------------------------

    def _remote(self, model_id: str) -> bool:
        return self._store.local_path(self._store.model_url(model_id)) is None

    async def locate(
        self, model_id: str, url: str | None = None, *, use_disk: bool = True
    ) -> tuple[ModelInfo, Store, DiskEntry | None]:
        """Describe ``model_id`` from the disk tier if it holds it (acquired: release it after
        reading), else from the store. A disk tier that cannot be read is a miss. ``url``: the
        model's store URL when the caller has it (its id validated): not validated again."""
        disk = self.disk
        if url is None:
            url = self._store.model_url(model_id)
        if use_disk and disk is not None and self._store.local_path(url) is None:
            try:
                entry = await anyio.to_thread.run_sync(disk.get, model_id)
                acquired = entry is not None and await anyio.to_thread.run_sync(disk.acquire, entry)
            except OSError as exc:
                logger.warning("disk tier unreadable for %r, reading the store: %s", model_id, exc)
                entry, acquired = None, False
            if entry is not None and acquired:
                try:
                    # -- versions (issue 12): a copy the store no longer has is not served
                    if self.validate_disk is None or await self.validate_disk(
                        model_id, entry.version
                    ):
                        info = await read_model_info(disk.store, model_id)
                        # The store's version, never the copy's own files' (which a check
                        # would then stat): None when the store named none.
                        version = entry.version
                        info = replace(info, version=version if version and version.files else None)
                        return info, disk.store, entry
                except Exception as exc:
                    disk.release(entry)
                    if not _unreadable(exc):
                        raise
                    disk.count(served=False)
                    await self._drop_disk_copy(model_id, exc)
                except BaseException:
                    disk.release(entry)
                    raise
                else:  # stale: released once, here, so a failed store read below cannot again
                    disk.release(entry)
                    disk.count(served=False)
                    await self._drop_disk_copy(model_id, None)
            else:
                disk.count(served=False)
        return await read_model_info(self._store, model_id, url), self._store, None

    async def read_extras(
        self,
        info: ModelInfo,
        patterns: tuple[str, ...],
        read_store: Store,
        on_disk: DiskEntry | None,
    ) -> tuple[ModelInfo, Store, DiskEntry | None]:
        """``info`` with its config and side files (`_sidefiles.read_extras`), and where to read
        its weights: ``on_disk``'s copy, whose files are checked against its manifest, or, when
        that copy is damaged, the store (the copy released and dropped, as a damaged copy of the
        weights is). ``on_disk`` is released here on any failure; on success it is returned."""
        if on_disk is None:
            return await read_extras(self._store, info, patterns), read_store, None
        assert self.disk is not None
        check = partial(self.disk.check_read, on_disk)
        try:
            with_extras = await read_extras(
                self._store, info, patterns, disk=read_store, check=check
            )
        except Exception as exc:
            self.release_disk(on_disk)
            if not _unreadable(exc):
                raise
            self.disk.count(served=False)
            await self._drop_disk_copy(info.model_id, exc)
        except BaseException:
            self.release_disk(on_disk)
            raise
        else:
            return with_extras, read_store, on_disk
        fresh = await read_model_info(self._store, info.model_id)
        return await read_extras(self._store, fresh, patterns), self._store, None

    async def _drop_disk_copy(self, model_id: str, exc: BaseException | None) -> None:
        """A disk copy failed to read (``exc``) or is stale (None): remove it (if still there)
        so the store is read."""
        if exc is None:
            logger.info("disk copy of %r is not the store's version any more, dropped", model_id)
        else:
            logger.warning("disk copy of %r unreadable, dropped: %s", model_id, exc)
        assert self.disk is not None
        try:
            await anyio.to_thread.run_sync(self.disk.remove, model_id)
        except OSError as error:
            logger.warning("could not remove the disk copy of %r: %s", model_id, error)

    async def read_weights(
        self, read_store: Store, info: ModelInfo, on_disk: DiskEntry | None
    ) -> tuple[LoadedWeights, ModelInfo]:
        """Load ``info`` onto the device from where `locate` found it, releasing ``on_disk``.

        A disk copy that fails to read (removed or damaged since `locate`) is dropped and the
        store read instead; the weights' info is returned with them (the store's, then).
        """
        if on_disk is None:
            return await load_one_version(
                read_store, info, partial(self._backend.load, read_store, zero_copy=True)
            )
        loaded: LoadedWeights | None = None
        try:
            try:
                loaded = await self._backend.load(read_store, info, zero_copy=False)
                await self._check_disk_copy(on_disk, info, self._backend.host_bytes(loaded))
                return loaded, info
            finally:
                self.release_disk(on_disk)
        except Exception as exc:
            loaded = None  # damaged: its memory goes before the store's copy is read
            if not _unreadable(exc):
                raise
            assert self.disk is not None
            self.disk.count(served=False)
            await self._drop_disk_copy(info.model_id, exc)
        fresh = await self._store_info(info)
        return await load_one_version(
            self._store, fresh, partial(self._backend.load, self._store, zero_copy=True)
        )

    async def _store_info(self, info: ModelInfo) -> ModelInfo:
        """The store's description of a model whose bytes are already reserved as ``info``'s,
        its config and side files read from the store too (the disk copy's may be of another
        version than the store's weights now)."""
        fresh = await read_again(self._store, info)
        if fresh.nbytes != info.nbytes:
            raise ModelLoadError(
                f"model {info.model_id!r} changed in the store while its disk copy was read "
                f"({format_bytes(info.nbytes)} -> {format_bytes(fresh.nbytes)}); try again",
                model_id=info.model_id,
                path=fresh.url,
            )
        return fresh

    async def drop_stale(self, model_id: str, keep: ModelVersion | None) -> None:
        """-- versions (issue 12): drop host and disk copies of ``model_id`` that are not of
        version ``keep`` (all of them when it is None): the store has another one now."""
        host = self.entries.get(model_id)
        if host is not None and (keep is None or host.info.version != keep):
            self._remove_host(host)
            self._let_go(host)  # a disk write reading it keeps its block until it ends
        disk = self.disk
        if model_id in self.disk_writes:
            # It may be writing the old version: found nothing yet, the copy would land after.
            self._stale_writes[model_id] = keep
        if disk is not None and not disk.read_only and self._remote(model_id):
            found = await anyio.to_thread.run_sync(disk.get, model_id)
            if found is not None and (keep is None or found.version != keep):
                await self._drop_disk_copy(model_id, None)

    async def _check_disk_copy(
        self, on_disk: DiskEntry, info: ModelInfo, view: memoryview | None
    ) -> None:
        """Check the bytes a load read from ``on_disk`` (in ``view``, or the files again when the
        buffer is not in host memory) against its checksums: `EntryDamagedError` if they differ."""
        assert self.disk is not None
        await anyio.to_thread.run_sync(self.disk.check_loaded, on_disk, info, view)
        self.disk.count(served=True)  # the one place a disk copy is served: a hit

    def release_disk(self, entry: DiskEntry | None) -> None:
        if entry is not None and self.disk is not None:
            self.disk.release(entry)

    def write_through(
        self,
        info: ModelInfo,
        *,
        loaded: LoadedWeights | None = None,
        host_entry: HostEntry | None = None,
    ) -> None:
        """Copy a model fetched from a remote store to the disk tier, in the background.

        The bytes come from weights ``loaded`` into host memory (kept alive by the task) or a
        ``host_entry`` (pinned by the task: not evicted or freed until the copy ends).
        """
        disk, model_id = self.disk, info.model_id
        if disk is None or disk.read_only or model_id in disk or model_id in self.disk_writes:
            return
        if not self._remote(model_id) or self._task_group is None:
            return
        # A (pinned) host block stays counted in the host budget while the write reads it;
        # an on_host buffer may leave every tier meanwhile: it is what write_behind bounds.
        charge = info.nbytes if self._backend.on_host else 0
        if charge and self.writing and self.writing + charge > self.write_behind:
            self.writes_skipped += 1
            logger.info(
                "not copying %r to the disk tier now: %s of disk writes in flight",
                model_id,
                format_bytes(self.writing),
            )
            return
        self.writing += charge
        if host_entry is not None:
            host_entry.users += 1
        self.disk_writes.add(model_id)
        self._background.start(self._task_group, self._write_disk, info, loaded, host_entry, charge)

    async def _write_disk(
        self,
        info: ModelInfo,
        loaded: LoadedWeights | None,
        host_entry: HostEntry | None,
        charge: int,
    ) -> None:
        assert self.disk is not None
        view: memoryview | None = None
        try:
            if host_entry is not None:
                payload = host_entry.payload
                if isinstance(payload, HostBlock):
                    view = payload.view()
                else:
                    loaded = payload
            if view is None:
                assert loaded is not None
                view = self._backend.host_bytes(loaded)
            if view is None:
                return  # not in host memory: nothing to copy from
            primary = (
                info.shards[0].url
                if len(info.shards) == 1
                else self._store.join(info.url, INDEX_NAME)
            )
            etag = await self._store.etag(primary, model_id=info.model_id)
            write = partial(self.disk.write, info, view, etag=etag)
            await anyio.to_thread.run_sync(write)
            if info.model_id in self._stale_writes:
                keep = self._stale_writes.pop(info.model_id)
                if keep is None or info.version != keep:
                    await self._drop_disk_copy(info.model_id, None)
        except Exception as exc:  # the disk tier is an optimisation: log and go on
            logger.warning("could not copy %r to the disk tier: %s", info.model_id, exc)
        finally:
            del view, loaded
            self.writing -= charge
            self.disk_writes.discard(info.model_id)
            self._stale_writes.pop(info.model_id, None)
            if host_entry is not None:
                host_entry.users -= 1
                if host_entry.detached and not host_entry.users:
                    host_entry.detached = False
                    self.in_flight -= host_entry.nbytes
                    self._let_go(host_entry)
                else:
                    self.host.serve_line()

    # -- the host tier --------------------------------------------------------------------------

    def _host_can_take(self, model_id: str, nbytes: int) -> bool:
        """Reserve host bytes for a demotion, if the host tier has (or can make) room."""
        host = self.host
        return (
            model_id not in self.entries
            and model_id not in self.moving
            and nbytes <= host.budget
            and (host.free >= nbytes or admits(host.policy, model_id, nbytes))
            and host.try_reserve(nbytes)
        )

    def reload_source(self, model_id: str) -> str:
        """Where ``model_id`` would be read from once out of RAM: "disk" or "store"."""
        disk = self.disk
        if disk is not None and (model_id in disk or self._remote(model_id)):
            return "disk"
        return "store"

    def _host_block(self, nbytes: int) -> HostBlock | None:
        """A pinned block for a model's bytes, or None when the slab has no run that long."""
        return self.arena.alloc(nbytes) if self.arena is not None else None

    def _free_block(self, block: HostBlock) -> None:
        if self.arena is not None:
            self.arena.free(block)

    def _admit_host(self, entry: HostEntry) -> None:
        """Insert an entry whose host bytes are already reserved.

        A new entry is a new eviction candidate, so reservations waiting in line may now fit.
        """
        self.entries[entry.model_id] = entry
        entry.admitted = _observe.clock()
        self.host.admit(entry)
        self.host.serve_line()

    def _remove_host(self, entry: HostEntry) -> None:
        del self.entries[entry.model_id]
        self.host.remove(entry)

    def _free_host_payload(self, entry: HostEntry) -> None:
        """Free a host entry's memory (nobody reads it: `users` is 0)."""
        if isinstance(entry.payload, HostBlock):
            self._free_block(entry.payload)
        entry.payload = None

    def _let_go(self, entry: HostEntry) -> None:
        """An entry out of the tier for good: free its memory and host bytes now, or, while a
        disk write still reads its block, keep both (as ``in_flight``) until that write ends."""
        if entry.users and isinstance(entry.payload, HostBlock):
            entry.detached = True
            self.in_flight += entry.nbytes
            return
        self._free_host_payload(entry)
        self.host.release(entry.nbytes)

    def _evict_host(self, entry: HostEntry) -> None:
        """Host eviction (synchronous): the weights are dropped; the store still has them."""
        self._remove_host(entry)
        self._free_host_payload(entry)
        self.host.drop_now(entry.nbytes)
        if self._observers:
            age = _observe.clock() - entry.admitted
            self._observers.evicted(entry.model_id, "host", entry.nbytes, age)

    def claim(self, model_id: str) -> HostEntry | None:
        """Take a host entry for a promotion: out of the index, its bytes still reserved."""
        entry = self.entries.get(model_id)
        if entry is not None:
            self._remove_host(entry)
            self.in_flight += entry.nbytes
        elif self.host.budget:
            self.host.missed()
        return entry

    def unclaim(self, entry: HostEntry) -> None:
        """A promotion failed before moving the weights: put them back in the host tier."""
        self.in_flight -= entry.nbytes
        if entry.payload is None:
            self.host.release(entry.nbytes)
        elif entry.model_id in self.entries or self._closed:
            self._let_go(entry)
        else:
            self._admit_host(entry)

    def discard(self, entry: HostEntry) -> None:
        """A claimed entry that must not be served (of a version the store no longer has):
        its bytes go, nothing goes back to the tier."""
        self.in_flight -= entry.nbytes
        self._let_go(entry)

    async def promote(self, entry: HostEntry, info: ModelInfo) -> LoadedWeights:
        """Host -> device for a claimed entry (device bytes already reserved)."""
        weights: LoadedWeights
        if isinstance(entry.payload, HostBlock):
            weights = await self._backend.promote(entry.payload, info)
        else:  # an on_host backend: the weights move, no copy
            weights, entry.payload = entry.payload, None
        self.in_flight -= entry.nbytes
        self._let_go(entry)  # a disk write may still read the block: then it stays counted
        self.host.promoted()
        return weights

    async def load(self, model_id: str) -> None:
        """Bring ``model_id``'s weights into host memory (single-flight per id)."""
        load = self._loads.get(model_id)
        if load is None:
            while (moving := self.moving.get(model_id)) is not None:
                await moving.wait()
            if model_id in self.entries:
                return
            load = self._loads.get(model_id)
            if load is None:
                assert self._task_group is not None
                load = self._loads[model_id] = _HostLoad()
                self.moving[model_id] = anyio.Event()
                self._background.start(self._task_group, self._load, model_id, load)
        await load.done.wait()
        if load.error is not None:
            raise for_caller(load.error)  # shared: each caller raises its own copy

    async def _load(self, model_id: str, load: _HostLoad) -> None:
        assert self._limiter is not None
        try:
            use_disk = True
            while True:
                async with self._limiter:
                    info, read_store, on_disk = await self.locate(model_id, use_disk=use_disk)
                try:
                    try:
                        payload = await self._read_reserved(info, read_store, on_disk)
                    finally:
                        self.release_disk(on_disk)
                except Exception as exc:
                    if on_disk is None or not _unreadable(exc):
                        raise
                    assert self.disk is not None
                    self.disk.count(served=False)
                    await self._drop_disk_copy(model_id, exc)
                    use_disk = False
                    continue
                break
            host_entry = HostEntry(info, payload)
            self._admit_host(host_entry)
            if on_disk is None:
                self.write_through(info, host_entry=host_entry)
        except Exception as exc:
            error = as_model_error(exc, model_id)
            release_frames(error)  # its frames hold the load's buffer; its callers keep it
            load.error = error
        except BaseException:
            load.error = CacheClosedError(
                f"the cache closed while model {model_id!r} was loading", model_id=model_id
            )
            raise
        finally:
            del self._loads[model_id]
            self.moving.pop(model_id).set()
            load.done.set()

    async def _read_reserved(
        self, info: ModelInfo, read_store: Store, on_disk: DiskEntry | None
    ) -> LoadedWeights | HostBlock:
        """Reserve host bytes for ``info`` and read it there (the bytes go back on failure)."""
        assert self._limiter is not None
        check_fits(self.host, info)
        check_host_fits(self.host.budget, info)
        nbytes = info.nbytes + info.side_bytes
        await self.host.reserve(nbytes)
        self.in_flight += nbytes
        try:
            async with self._limiter:
                started = time.perf_counter()
                payload = await self._read_to_host(read_store, info, on_disk)
                self.costs.observe(
                    "store" if on_disk is None else "disk",
                    info.nbytes,
                    time.perf_counter() - started,
                )
        except BaseException:
            self.host.release(nbytes)
            raise
        finally:
            self.in_flight -= nbytes
        return payload

    async def _read_to_host(
        self, read_store: Store, info: ModelInfo, on_disk: DiskEntry | None
    ) -> LoadedWeights | HostBlock:
        if self._backend.on_host:
            loaded = await self._backend.load(read_store, info, zero_copy=on_disk is None)
            if on_disk is not None:
                await self._check_disk_copy(on_disk, info, self._backend.host_bytes(loaded))
            # A close that cancelled the read during its last worker-thread call (anyio waits
            # for the thread) is delivered here: else the weights were admitted to a closing
            # cache and its prefetch callers told it succeeded.
            await anyio.lowlevel.checkpoint_if_cancelled()
            return loaded
        block = self._host_block(info.nbytes)
        if block is None:
            raise ModelLoadError(
                f"model {info.model_id!r}: host memory is too fragmented for "
                f"{format_bytes(info.nbytes)}",
                model_id=info.model_id,
            )
        try:
            await fill_buffer(read_store, info, block.view())
            if on_disk is not None:
                await self._check_disk_copy(on_disk, info, block.view())
            await anyio.lowlevel.checkpoint_if_cancelled()  # as above: a close in a thread call
        except BaseException:
            self._free_block(block)
            raise
        return block
