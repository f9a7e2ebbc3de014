"""The failure memory: errors of failed loads, kept for a while so that a storm of requests for
a broken model fails fast instead of reading the store again and again.

Invariants:

* A kept error holds no frame. The frames of a failed load reference its buffer (the builder's
  ``weights``, the store read's destination); an error that kept them would keep those bytes
  alive outside every budget, on CUDA device memory the budget believes free. So before an
  error is kept or handed to waiters, `release_frames` drops the tracebacks of it and of every
  exception it chains (causes, contexts, group members), keeping each foreign one's traceback as
  text in a note. Frames are released, not cleared: ``frame.clear()`` on a suspended coroutine's
  frame (Python 3.11) would close a coroutine that is still running elsewhere.
* Errors leave by time, not only when another failure comes: a sweeper task (in the cache's
  task group, alive only while something is kept) sleeps until the oldest error expires and
  drops every expired one.
* A kept error is never raised itself: each caller raises its own copy (`for_caller`). Raising
  an exception attaches the raiser's frames (``__traceback__``) and the exception it was
  handling (``__context__``); on a shared error those would keep the last caller's locals alive
  for ``failure_ttl`` and show one waiter another waiter's traceback.
* Releasing is cheap and bounded: the note is written without the source-line carets of
  `traceback.format_tb` (which parse each line), for the first `_NOTED` exceptions of a chain.
* One ttl for every error, so insertion order is expiry order: expired errors are popped from
  the front, and a key remembered again moves to the back.
"""

from __future__ import annotations

import copy
import errno
import linecache
import time
import traceback
import types
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

import anyio
import anyio.abc

from ._exceptions import ModelCacheError, ModelFormatError, ModelNotFoundError, StoreError

__all__ = ["FailureMemory", "LoadFailures", "for_caller", "release_frames"]

K = TypeVar("K", bound=Hashable)

#: Opens the note that keeps a released traceback as text.
_NOTE = "Traceback of this error (as text: its frames were released with the failed load):\n"
#: Innermost frames kept in that note.
_NOTE_FRAMES = 32
#: Exceptions of one chain that get that note (a chain may be thousands long).
_NOTED = 16


#: OSError numbers that say the process or system ran out of something (descriptors, memory),
#: not that the model is broken: gone once other work closes or frees it.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def _out_of_resources(error: BaseException) -> bool:
    """Whether ``error`` or one of its causes is an OSError of `_EXHAUSTED`: a load that met
    no free descriptor (a StoreError or ModelLoadError caused by EMFILE) was remembered, and
    every use() for ``failure_ttl`` failed with it after the descriptors were back."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno in _EXHAUSTED:
            return True
        seen.add(id(cause))
        cause = cause.__cause__  # not __context__: an error met while handling another
    return False


def release_frames(error: BaseException) -> None:
    """Drop the traceback of ``error`` and of every exception it chains, so that no frame (and
    no local of a frame, such as a model's buffer) stays reachable from it.

    The traceback of each exception that is not one of ours (the builder's, the filesystem's)
    is kept as text in a note, replacing an earlier such note: the error still says where it
    was raised. Our own errors' tracebacks only show the cache's internals.
    """
    seen: set[int] = set()
    noted = 0
    pending = [error]
    while pending:
        exc = pending.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        tb = exc.__traceback__
        if tb is not None:
            if not isinstance(exc, ModelCacheError) and noted < _NOTED:
                noted += 1
                notes = getattr(exc, "__notes__", None)
                kept = [n for n in notes if not str(n).startswith(_NOTE)] if notes else []
                exc.__notes__ = [*kept, _NOTE + _format_tb(tb)]
            exc.__traceback__ = None
        pending.extend(e for e in (exc.__cause__, exc.__context__) if e is not None)
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)


def _format_tb(tb: types.TracebackType) -> str:
    """The innermost `_NOTE_FRAMES` frames of ``tb`` as `traceback` prints them, less carets."""
    lines = []
    for frame, lineno in list(traceback.walk_tb(tb))[-_NOTE_FRAMES:]:
        code = frame.f_code
        lines.append(f'  File "{code.co_filename}", line {lineno}, in {code.co_name}')
        source = linecache.getline(code.co_filename, lineno or 0, frame.f_globals).strip()
        if source:
            lines.append(f"    {source}")
    return "\n".join(lines)


def for_caller(error: BaseException) -> BaseException:
    """A copy of the shared or kept ``error`` for one caller to raise: same type, message,
    attributes, notes and cause, and no traceback. The original is left untouched by the raise
    (no caller's frames, no caller's ``__context__``). An error that cannot be copied (a
    subclass whose constructor takes other arguments) is raised itself."""
    try:
        own = copy.copy(error)
    except Exception:
        own = error
    if own is error or type(own) is not type(error):
        return error.with_traceback(None)
    vars(own).update(vars(error))
    own.__cause__ = error.__cause__
    own.__context__ = error.__context__
    own.__suppress_context__ = error.__suppress_context__
    return own.with_traceback(None)


class FailureMemory(Generic[K]):
    """Errors by key, each kept for ``ttl`` seconds of ``clock`` (none when ``ttl`` <= 0).

    `open` gives it the task group its sweeper runs in; until then, errors expire only when
    they are looked up or when another is remembered.
    """

    def __init__(self, ttl: float, clock: Callable[[], float]) -> None:
        self.ttl = ttl
        self._clock = clock
        self._errors: OrderedDict[K, tuple[BaseException, float]] = OrderedDict()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._sweeping = False

    def __len__(self) -> int:
        return len(self._errors)

    def open(self, task_group: anyio.abc.TaskGroup) -> None:
        self._task_group = task_group

    def clear(self) -> None:
        """Forget everything (the cache closed; its task group, and so the sweeper, ended)."""
        self._errors.clear()
        self._task_group = None

    def remember(self, key: K, error: BaseException) -> None:
        """Keep ``error`` for ``key`` for ``ttl`` seconds, its frames released; not an error
        that says its cause may pass (``remember = False``: a device out of memory)."""
        if self.ttl <= 0 or not getattr(error, "remember", True) or _out_of_resources(error):
            return
        release_frames(error)
        now = self._clock()
        self.prune(now)
        self._errors[key] = (error, now + self.ttl)
        self._errors.move_to_end(key)
        if not self._sweeping and self._task_group is not None:
            self._sweeping = True
            self._task_group.start_soon(self._sweep, name="modelcache failure memory")

    def recent(self, key: K) -> BaseException | None:
        """The error remembered for ``key``, if it has not expired."""
        kept = self._errors.get(key)
        if kept is None:
            return None
        if self._clock() < kept[1]:
            return kept[0]
        del self._errors[key]
        return None

    def prune(self, now: float) -> None:
        """Drop every error expired at ``now``."""
        errors = self._errors
        while errors and next(iter(errors.values()))[1] <= now:
            errors.popitem(last=False)

    async def _sweep(self) -> None:
        try:
            while self._errors:
                until = next(iter(self._errors.values()))[1]
                await anyio.sleep(max(until - self._clock(), 0.0))
                self.prune(self._clock())
        finally:
            self._sweeping = False


#: Errors of a failed load that say nothing of the model class: `describe` raises them too.
_HEADER_ERRORS = (ModelNotFoundError, ModelFormatError, StoreError)


#: The failure memory's clock (a module attribute so tests can move time).
clock = time.monotonic


class LoadFailures:
    """A cache's failures: its `FailureMemory` and the counts ``cache.stats()`` reports.

    Keys are a load's (builder, model id), or (None, model id) for a header check of
    ``describe``. ``failed_calls`` counts the calls that failed (each failed load, and each call
    answered from the memory); ``failed_loads`` the failed loads alone.
    """

    def __init__(self, ttl: float) -> None:
        self.memory: FailureMemory[tuple[Hashable | None, str]] = FailureMemory(
            ttl, lambda: clock()
        )
        self.failed_calls = 0
        self.failed_loads = 0

    def open(self, task_group: anyio.abc.TaskGroup) -> None:
        self.memory.open(task_group)

    def clear(self) -> None:
        self.memory.clear()

    def load_failed(self, builder: Hashable, model_id: str, error: BaseException) -> None:
        """A load failed with ``error`` (frames released): count it and remember it."""
        self.failed_calls += 1
        self.failed_loads += 1
        self.memory.remember((builder, model_id), error)

    def check_failed(self, model_id: str, error: BaseException) -> None:
        """A header check of ``model_id`` failed: remember it (a call fails with it later)."""
        self.memory.remember((None, model_id), error)

    def raise_recent(self, builder: Hashable, model_id: str) -> None:
        """Raise (a copy of) the remembered failure of this load, if any, and count the call."""
        error = self.memory.recent((builder, model_id))
        if error is not None:
            self.failed_calls += 1
            raise for_caller(error)  # remembered: a copy, so it keeps no caller's frames

    def raise_header_error(self, model_id: str, builders: Iterable[Hashable]) -> None:
        """Raise (a copy of) `header_error`, if any, and count the call."""
        error = self.header_error(model_id, builders)
        if error is not None:
            self.failed_calls += 1
            raise for_caller(error)

    def header_error(self, model_id: str, builders: Iterable[Hashable]) -> BaseException | None:
        """A remembered error that any load of ``model_id`` would meet again: a failed header
        check, or a failed load's missing, invalid or unreadable files (not a build error)."""
        error = self.memory.recent((None, model_id))
        if error is not None:
            return error
        for builder in builders:
            error = self.memory.recent((builder, model_id))
            if isinstance(error, _HEADER_ERRORS):
                return error
        return None
