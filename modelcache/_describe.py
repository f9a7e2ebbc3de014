"""Reads of a model's headers for ``cache.describe``, one per model id, shared by its callers.

Invariants: concurrent callers for one id share one read, run in a task of the cache's (a
caller cancelled leaves it to the others), and the read is dropped when its last caller leaves
(so a stalled store keeps nothing for nobody). A failed read is remembered in the failure
memory while the cache is open.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import anyio.abc

from ._concurrency import Background
from ._exceptions import as_model_error
from ._failures import LoadFailures, for_caller, release_frames
from ._format import ModelInfo
from ._loader import read_model_info
from ._store import Store

__all__ = ["HeaderChecks"]


class _Check:
    """One read of a model's headers, shared by its concurrent callers."""

    __slots__ = ("done", "error", "info", "scope", "waiters")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.info: ModelInfo | None = None
        self.error: BaseException | None = None
        self.scope = anyio.CancelScope()  # cancelled when its last caller leaves
        self.waiters = 0


class HeaderChecks:
    """The header reads in flight, by model id (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        failures: LoadFailures,
        background: Background,
        is_open: Callable[[], bool],
    ) -> None:
        self._store = store
        self._failures = failures
        self._background = background
        self._is_open = is_open
        self._checks: dict[str, _Check] = {}
        self._task_group: anyio.abc.TaskGroup | None = None

    def open(self, task_group: anyio.abc.TaskGroup) -> None:
        self._task_group = task_group

    async def read(self, model_id: str) -> ModelInfo | None:
        """``model_id``'s headers, read once for every concurrent caller; raises (a copy of)
        the read's error; None if the read was dropped (the cache is closing): look again."""
        check = self._checks.get(model_id)
        if check is None:
            assert self._task_group is not None
            check = self._checks[model_id] = _Check()
            self._background.start(
                self._task_group,
                self._run,
                model_id,
                check,
                name=f"modelcache describe {model_id!r}",
            )
        check.waiters += 1
        try:
            await check.done.wait()
        finally:
            check.waiters -= 1
            if check.waiters == 0 and not check.done.is_set():
                # Nobody wants the answer any more: drop the read rather than leave it behind
                # on a stalled store, and let the next caller start afresh.
                check.scope.cancel()
                if self._checks.get(model_id) is check:
                    del self._checks[model_id]
        if check.error is not None:
            raise for_caller(check.error)  # shared: each caller raises its own copy
        return check.info

    async def _run(self, model_id: str, check: _Check) -> None:
        """Read ``model_id``'s headers for the check's callers (in a task of the cache's)."""
        try:
            with check.scope:
                check.info = await read_model_info(self._store, model_id)
        except Exception as exc:
            error = as_model_error(exc, model_id)
            release_frames(error)
            check.error = error
            if self._is_open():
                self._failures.check_failed(model_id, error)
        finally:
            if self._checks.get(model_id) is check:
                del self._checks[model_id]
            check.done.set()
