"""Revalidation: when a resident model is checked against the store, and what a change starts.

Design notes (the rules are RFC 5861's stale-while-revalidate and stale-if-error):

- The `Revalidator` owns the schedule: per model id, when it was last confirmed (a load reads
  the store, so it confirms too) and the check in flight, if any. ``revalidate_after`` seconds
  after its confirmation, a hit on the model starts a background check and is served the
  resident version at once: the hit path only compares a float (`due`), never awaits.
- A check is single-flight per id: one stat/HEAD per file of the resident version (one for a
  single-file model), in a task of the cache's; `refresh` joins the one in flight. A change
  found starts the swap (the cache's ``on_change``: the new version is loaded beside the old one
  and replaces it when ready) inside the same check, so a second check never starts a second
  swap. A check that fails (store down) keeps the resident version and tries again one
  interval later; it is logged, never raised at a hit.
- The disk tier's copy is validated before it is served (`validate_disk`), at most once per
  interval per id: the same version -> served; another one, or none any more -> not served (the
  store is read); the store unreachable -> served, logged and counted (``stale_serves``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import anyio
import anyio.abc

from ._concurrency import Background, gather
from ._exceptions import CacheClosedError, ModelChangedError, ModelNotFoundError, StoreError
from ._failures import for_caller, release_frames
from ._format import ModelInfo
from ._loader import read_model_info, with_config
from ._sidefiles import read_extras
from ._store import Store
from ._versions import ModelVersion

__all__ = ["DEFAULT_REVALIDATE_AFTER", "Revalidator", "load_one_version"]

T = TypeVar("T")

#: Reads of a model's weights begun again after its files changed under them, before the load
#: fails with ModelChangedError (a model rewritten faster than it can be read).
_RESTARTS = 2

logger = logging.getLogger("modelcache")

#: The default ``revalidate_after``: a minute, as KServe's and Triton's model pollers default to
#: tens of seconds; a check costs one stat/HEAD per file.
DEFAULT_REVALIDATE_AFTER = 60.0

_clock = time.monotonic


class _Check:
    __slots__ = ("asked", "changed", "done", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
        #: The Revalidator's count of checks that had asked the store when this one did (None
        #: before): a `refresh` called before that may predate a version its caller knows of,
        #: so it waits for this one and checks again.
        self.asked: int | None = None
        self.changed = False
        self.error: BaseException | None = None


#: Model ids whose last check time is remembered (most recent first): a cache that has served
#: millions of ids keeps no float for each. A forgotten id is checked at its next hit.
_MAX_REMEMBERED = 100_000


class _Times(OrderedDict[str, float]):
    """When each model id was last confirmed, for at most ``_MAX_REMEMBERED`` ids."""

    def __setitem__(self, model_id: str, when: float) -> None:
        super().__setitem__(model_id, when)
        self.move_to_end(model_id)
        if len(self) > _MAX_REMEMBERED:
            self.popitem(last=False)


class Revalidator:
    """The per-model check schedule, the checks in flight, and their counters."""

    def __init__(
        self, store: Store, after: float | None, background: Background | None = None
    ) -> None:
        if after is not None and not after >= 0:
            raise ValueError(f"revalidate_after must be a number >= 0 or None, got {after}")
        self.store = store
        self.after = after
        self._confirmed = _Times()
        self._disk_confirmed = _Times()
        self._checks: dict[str, _Check] = {}
        #: Counts the checks (and the swaps they start) for the cache's ``wait_idle``.
        self._background = background if background is not None else Background()
        self._asks = 0  # checks that have asked the store (`_Check.asked`)
        self._task_group: anyio.abc.TaskGroup | None = None
        self._version_of: Callable[[str], ModelVersion | None] = lambda _: None
        self._on_change: Callable[[str, ModelVersion], Awaitable[None]] | None = None
        #: Checks made against the store (background, `refresh`, disk validations).
        self.revalidations = 0
        #: Checks that found another version in the store than the one held.
        self.changes = 0
        #: Disk copies served because the store could not be asked (stale-if-error).
        self.stale_serves = 0

    def open(
        self,
        task_group: anyio.abc.TaskGroup,
        version_of: Callable[[str], ModelVersion | None],
        on_change: Callable[[str, ModelVersion], Awaitable[None]],
    ) -> None:
        self._task_group = task_group
        self._version_of = version_of
        self._on_change = on_change

    def close(self) -> None:
        self._task_group = None

    @property
    def in_flight(self) -> int:
        return len(self._checks)

    def confirmed(self, model_id: str) -> float:
        """A load read ``model_id`` from the store: return when its next check is due."""
        now = _clock()
        self._confirmed[model_id] = now
        return self.next_due(now)

    def due_at(self, model_id: str) -> float:
        """When the next check of ``model_id`` is due (now, if it was never confirmed)."""
        last = self._confirmed.get(model_id)
        return -math.inf if last is None else self.next_due(last)

    def next_due(self, now: float) -> float:
        return math.inf if self.after is None else now + self.after

    def due(self, model_id: str) -> float:
        """A hit found ``model_id`` due for a check: start one in the background (unless one
        runs); return when the next is due (for the hit path to compare)."""
        if model_id not in self._checks and self._task_group is not None:
            self._start(model_id)
        return self.next_due(_clock())

    async def check(self, model_id: str) -> bool:
        """Check ``model_id`` now; True if it changed (the new version is then in place, or its
        load failed and was logged). A check in flight is joined only if it asks the store
        after this call: one that asked before may have missed a version published just before
        it (a publisher's refresh after its upload), so it is waited for (its swap ends first)
        and another one made."""
        # A copy held by the disk tier only has no resident version to compare here: its next
        # load checks it against the store, however recently it was checked.
        self._disk_confirmed.pop(model_id, None)
        changed, since = False, self._asks
        while True:
            check = self._checks.get(model_id)
            # One that asks (or asked) after this call: a stream of hits starting checks back
            # to back cannot keep this waiting.
            fresh = check is None or check.asked is None or check.asked > since
            if check is None:
                if self._task_group is None:
                    raise CacheClosedError(f"the cache closed while {model_id!r} was checked")
                check = self._start(model_id)
            await check.done.wait()
            if fresh:
                if check.error is not None:
                    raise for_caller(check.error)  # shared: each caller raises its own copy
                return changed or check.changed
            changed = changed or (check.error is None and check.changed)

    def _start(self, model_id: str) -> _Check:
        assert self._task_group is not None
        check = self._checks[model_id] = _Check()
        self._background.start(
            self._task_group, self._run, model_id, check, name=f"modelcache check {model_id!r}"
        )
        return check

    async def _run(self, model_id: str, check: _Check) -> None:
        try:
            version = self._version_of(model_id)
            self._asks += 1
            check.asked = self._asks  # it may answer for a store older than later callers know
            if version is not None:
                check.changed = await self._changed(model_id, version)
                if check.changed and self._on_change is not None:
                    await self._on_change(model_id, version)
        except Exception as exc:
            release_frames(exc)
            check.error = exc
            logger.warning("could not revalidate %r: %s", model_id, exc)
        except BaseException:  # cancelled: the cache is closing (its swap, if any, undone)
            check.error = CacheClosedError(
                f"the cache closed while {model_id!r} was checked", model_id=model_id
            )
            raise
        finally:
            self._confirmed[model_id] = _clock()
            del self._checks[model_id]
            check.done.set()

    async def _changed(self, model_id: str, version: ModelVersion) -> bool:
        """Whether the store holds another version than ``version`` (a file gone counts)."""
        self.revalidations += 1
        tags: dict[str, str | None] = {}

        async def tag(url: str, into: dict[str, str | None]) -> None:
            try:
                into[url] = await self.store.file_tag(url, model_id=model_id)
            except ModelNotFoundError:
                into[url] = None

        await gather([partial(tag, url, tags) for url, _ in version.files])
        moved = [url for url, known in version.files if tags[url] != known]
        if moved:
            # Asked again: a store that names the same content differently at each ask (per
            # replica ETags behind a balancer) would otherwise swap in a full reload at every
            # check, forever. A real change answers the same twice; a rare one between the two
            # asks is found at the next check.
            again: dict[str, str | None] = {}
            await gather([partial(tag, url, again) for url in moved])
            unstable = [url for url in moved if again[url] != tags[url]]
            if unstable:
                logger.warning(
                    "not revalidating %r: the store names %s differently at each ask",
                    model_id,
                    unstable[0],
                )
                return False
        changed = bool(moved)
        if changed:
            self.changes += 1
            logger.info("model %r changed in the store (was version %s)", model_id, version)
        return changed

    async def validate_disk(self, model_id: str, version: ModelVersion | None) -> bool:
        """Whether the disk copy of ``model_id`` (of ``version``) may be served now."""
        if self.after is None or (version is not None and not version.files):
            return True  # never revalidated; or the store names no version of its files
        last = self._disk_confirmed.get(model_id)
        now = _clock()
        if last is not None and now - last < self.after:
            return True
        url = self.store.model_url(model_id)
        try:
            if version is None or not all(_within(self.store, url, u) for u, _ in version.files):
                # Written before versions were kept (or unreadable), or of files of another
                # store: nothing to compare. Served only when the store cannot be asked.
                await self.store.file_tag(url, model_id=model_id)
                return False
            changed = await self._changed(model_id, version)
        except ModelNotFoundError:
            return False
        except StoreError as exc:  # after the store's own retries
            self.stale_serves += 1
            logger.warning(
                "serving the disk copy of %r (version %s) unchecked: the store is unreachable (%s)",
                model_id,
                version,
                exc,
                extra={"model_id": model_id, "stale": True},
            )
            return True
        if changed:
            self._disk_confirmed.pop(model_id, None)
            return False
        self._disk_confirmed[model_id] = self._confirmed[model_id] = now
        return True


def _within(store: Store, model_url: str, url: str) -> bool:
    """Whether ``url`` is a file of the model at ``model_url`` (itself, or in its directory)."""
    return url == model_url or url.startswith(store.join(model_url, ""))


async def read_again(store: Store, info: ModelInfo) -> ModelInfo:
    """The store's description of ``info``'s model now, its config and side files read as
    ``info``'s were (one version: the headers' scope seeds theirs)."""
    fresh = await read_model_info(store, info.model_id)
    if info.side_patterns is not None:
        return await read_extras(store, fresh, tuple(sorted(info.side_patterns)))
    if info.config is not None:
        return await with_config(store, fresh)
    return fresh


async def load_one_version(
    store: Store, info: ModelInfo, load: Callable[[ModelInfo], Awaitable[T]]
) -> tuple[T, ModelInfo]:
    """``load(info)``, begun again from fresh headers (and config) when a file changed in the
    store under it (`ModelChangedError`): the weights then all come from the new version. Its
    bytes were reserved for ``info``: a new version of another size fails the load (the next
    one reads it), as do more than ``_RESTARTS`` changes in a row."""
    restarts = 0
    while True:
        try:
            return await load(info), info
        except ModelChangedError:
            if restarts == _RESTARTS:
                raise
        restarts += 1
        fresh = await read_again(store, info)
        if fresh.nbytes != info.nbytes:
            raise ModelChangedError(
                f"model {info.model_id!r} changed in the store while it was loaded "
                f"({info.nbytes} -> {fresh.nbytes} bytes); the next load reads the new version",
                model_id=info.model_id,
                path=fresh.url,
            )
        info = fresh
