"""Run awaitables concurrently and fail like a plain call would."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

import anyio
import anyio.abc

__all__ = ["Background", "Event", "gather", "new_event", "new_scope", "new_signal"]

T = TypeVar("T")


#: The running asyncio loop, or None on another backend (trio): the fast paths here are
#: asyncio's own; elsewhere anyio's primitives are used (a test forces those on asyncio). The
#: function itself, not a wrapper: it is asked several times per load.
_asyncio_loop: Callable[[], asyncio.AbstractEventLoop | None] = asyncio._get_running_loop


class Event(Protocol):
    """What the cache's code asks of an event: `anyio.Event`'s verbs, which `asyncio.Event`
    has too."""

    def set(self) -> object: ...

    def is_set(self) -> bool: ...

    def wait(self) -> Awaitable[object]: ...


class _Signal(asyncio.Future[None]):
    """An event with one waiter, on asyncio: the future it awaits (`new_signal`)."""

    def set(self) -> None:
        if not self.done():  # its waiter may have been cancelled (the future with it)
            self.set_result(None)

    def is_set(self) -> bool:
        return self.done()

    def wait(self) -> Awaitable[None]:
        return self


def new_signal() -> Event:
    """An event that one task waits for, once: on asyncio the future it awaits (no event, no
    deque of waiters, no ``wait`` coroutine), else an `anyio.Event`. Cancelling its waiter
    cancels the future: `set` then does nothing."""
    loop = _asyncio_loop()
    if loop is not None:
        return _Signal(loop=loop)
    return anyio.Event()


def new_event() -> Event:
    """An event for the running loop: on asyncio an `asyncio.Event` itself, else an
    `anyio.Event`.

    anyio's event on asyncio wraps an asyncio one (made twice: its constructor runs twice) and
    its ``wait`` is one coroutine more per waiter; a small model's load waited on two. Waiting
    on an asyncio event is cancelled by anyio's cancel scopes as any await in the task is (a
    scope cancels the task's awaited future). One difference: anyio's ``wait`` on an event
    already set is a checkpoint, asyncio's returns at once: no caller here relies on it."""
    if _asyncio_loop() is not None:
        return asyncio.Event()
    return anyio.Event()


#: The concrete cancel scope class of anyio's asyncio backend, once one was made.
_asyncio_scope: type[anyio.CancelScope] | None = None


def new_scope() -> anyio.CancelScope:
    """``anyio.CancelScope()``, made directly from the backend's class on asyncio: the public
    constructor looks the backend up and then runs the scope's ``__init__`` twice (its
    ``__new__`` returns an instance of a subclass, which Python initialises again)."""
    global _asyncio_scope
    if _asyncio_loop() is None:
        return anyio.CancelScope()
    if _asyncio_scope is None:
        _asyncio_scope = type(anyio.CancelScope())
    return _asyncio_scope()


async def gather(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Await every call concurrently and return their results in order.

    The first exception cancels the others and is raised as itself, not wrapped in an
    ExceptionGroup, so typed errors reach callers unchanged. Cancellation is never caught.
    """
    if len(calls) == 1:
        return [await calls[0]()]
    if not calls:  # a model with no weight bytes: no task group for nothing
        return []
    results: list[T | None] = [None] * len(calls)
    errors: list[Exception] = []

    async def run(i: int) -> None:
        try:
            results[i] = await calls[i]()
        except Exception as exc:
            errors.append(exc)
            tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(run, i)
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


class Background:
    """Counts the tasks started through it while they run, so that `wait_idle` can wait for
    none (a cache's loads, header checks, copies down, disk writes: each runs its worker
    threads to their end before its task ends). Long-lived tasks (the failure memory's
    sweeper) are started without it.

    A cache's loads (`start_load`), and the other tasks started here (`start`), are on asyncio
    tasks of their own rather than tasks of the cache's task group: anyio's task of a group
    costs a wrapper coroutine, a cancel scope, an event, a task state and a done callback: a
    measurable part of a small model's load; and a group's task cancelled by other code before
    its first step never runs its coroutine, so never undoes what was set up for it
    (`_never_ran`). Each runs in a cancel scope of its own, which `cancel_tasks` cancels
    (anyio's shields inside one hold, as in a group's task); the cache waits for them with
    `wait_tasks` when it closes, as a group's exit would. None raises (a load's errors go to
    its waiters, the others log theirs); an exception that escaped one anyway is raised in the
    task group, as a group's task's is."""

    __slots__ = ("_cancelled", "_idle", "_tasks", "running")

    def __init__(self) -> None:
        #: Tasks started and not yet ended (a task counts from `start`, before it first runs).
        self.running = 0
        self._idle: anyio.Event | None = None
        #: The tasks running outside a task group (loads and the others: `start`), their
        #: coroutines and the task group their escaped exceptions go to, by the cancel scope
        #: each runs in.
        self._tasks: dict[
            anyio.CancelScope,
            tuple[asyncio.Task[None], Coroutine[Any, Any, object], anyio.abc.TaskGroup],
        ] = {}
        self._cancelled = False  # `cancel_tasks` was called: tasks started now start cancelled

    def start(
        self,
        task_group: anyio.abc.TaskGroup,
        func: Callable[..., Coroutine[Any, Any, object]],
        *args: object,
        name: str | None = None,
    ) -> None:
        """`start_load` ``func(*args)`` (its scope dropped): on asyncio a task of its own too.
        In a task of the group, code that cancelled the task before its first step (a server's
        shutdown cancelling every task) left ``func`` never run, and with it the undoing its
        ``finally`` owes to what its caller set up for it: a copy down's host and device bytes
        stayed reserved after the close, and ``running`` counted it (`wait_idle` waited for
        good). A task of its own is run cancelled then (`_never_ran`)."""
        self.start_load(task_group, func, *args, name=name or f"modelcache {func.__name__}")

    def start_load(
        self,
        task_group: anyio.abc.TaskGroup,
        func: Callable[..., Coroutine[Any, Any, object]],
        *args: object,
        name: str,
    ) -> anyio.CancelScope | None:
        """Run ``func(*args)``, a load, counted while it runs: on asyncio, as a task of its own
        (see the class docstring), and return the cancel scope it runs in; on another backend,
        in ``task_group`` (None)."""
        loop = _asyncio_loop()
        if loop is None:  # not asyncio (trio): a task of the group
            self.running += 1
            task_group.start_soon(self._run, func, args, name=name)
            return None
        scope = new_scope()
        if self._cancelled:
            scope.cancel()
        running = func(*args)  # the arguments live in this coroutine alone, as in `_run`
        self.running += 1
        self._load_task(loop, scope, task_group, running, name)
        return scope

    def _load_task(
        self,
        loop: asyncio.AbstractEventLoop,
        scope: anyio.CancelScope,
        task_group: anyio.abc.TaskGroup,
        running: Coroutine[Any, Any, object],
        name: str,
    ) -> None:
        """Run ``running`` (a load) in ``scope`` in a new task. asyncio keeps only a weak
        reference to a task: it is kept in `_tasks` until it ends, with the load's coroutine,
        for `_never_ran` to run if the task ends before running it.

        An eager task factory (``asyncio.eager_task_factory``, Python 3.12) runs the task's
        first step inside ``create_task``: one whose coroutine ended there (a load nobody waits
        for, a copy down that never awaits) ran, and its end found nothing to take out of
        `_tasks`. Kept there, `_never_ran` took it for a task that never ran and started it
        again, and again: the loop spun for good."""
        task = loop.create_task(self._run_load(scope, task_group, running), name=name)
        if task.done():
            return  # ended in its first step, run by the task factory: counted out already
        task.add_done_callback(functools.partial(self._never_ran, scope))
        self._tasks[scope] = (task, running, task_group)

    def _never_ran(self, scope: anyio.CancelScope, task: asyncio.Task[None]) -> None:
        """``task`` ended: if it never ran its load (cancelled by other code before its first
        step: a server's shutdown cancelling every task in the step after a use() started a
        load), the load runs now in a new task, cancelled, and fails its entry as a load whose
        task is cancelled while it runs does. Else its entry would never be done: the use()s
        joined to it waited for good, and the cache's close with them."""
        held = self._tasks.get(scope)
        if held is None or held[0] is not task:
            return  # it ran: its end took it out of `_tasks`
        _, running, task_group = held
        scope.cancel()
        self._load_task(task.get_loop(), scope, task_group, running, task.get_name())

    def cancel_tasks(self) -> None:
        """Cancel the tasks running outside a task group, and any started from now on."""
        self._cancelled = True
        for scope in self._tasks:
            scope.cancel()

    async def _run_load(
        self,
        scope: anyio.CancelScope,
        task_group: anyio.abc.TaskGroup,
        running: Coroutine[Any, Any, object],
    ) -> None:
        try:
            with scope:
                await running
        except Exception as exc:
            task_group.start_soon(_raise, exc)
        except BaseException:
            # KeyboardInterrupt or SystemExit (from a builder): asyncio stops the loop with it,
            # as with a group's task, and the task ends holding it. Nothing awaits a load's
            # task: it is taken when the task ends (as anyio's group takes its tasks'), else
            # the collector would log it as "never retrieved" on top of the interrupt.
            task = asyncio.current_task()
            if task is not None:
                task.add_done_callback(_retrieve)
            raise
        finally:
            # Absent when the task ended in its first step inside ``create_task`` (`_load_task`).
            self._tasks.pop(scope, None)
            self._ended()

    async def _run(self, func: Callable[..., Awaitable[object]], args: tuple[object, ...]) -> None:
        # The task's arguments live in the coroutine alone: a task that drops a buffer before
        # it frees the buffer's bytes (`del weights` in a copy down) must not find it kept here.
        running = func(*args)
        del args
        try:
            await running
        finally:
            self._ended()

    def _ended(self) -> None:
        self.running -= 1
        if not self.running and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def wait_tasks(self) -> asyncio.CancelledError | None:
        """Return once every task running outside a task group has ended, as a task group's
        exit waits for its tasks: on the tasks themselves, not the count, shielded from
        anyio's cancellation. A task that ended without running its coroutine left a new task
        in its place (`_never_ran`), waited for in turn.

        A native cancellation of the waiting task (``task.cancel()``: asyncio's shutdown, a
        supervisor cancelling again and again) does not end the wait, as it does not end a
        task group's exit: the tasks were cancelled already (`cancel_tasks`), and a close that
        stopped waiting never finished (the cache stayed closing, its tiers never closed). The
        first one is returned once every task has ended, for the caller to raise when it is
        done."""
        cancelled: asyncio.CancelledError | None = None
        with anyio.CancelScope(shield=True):
            while self._tasks:
                tasks = [task for task, _, _ in self._tasks.values()]
                try:
                    await asyncio.wait(tasks)
                except asyncio.CancelledError as exc:
                    cancelled = cancelled or exc
                # Each task's done callbacks run in the order they were added: `_never_ran`
                # (added as the task was made) before the wait's own, so a replacement is in
                # `_tasks` now.
                for scope, (task, _, _) in list(self._tasks.items()):
                    if task.done():
                        self._never_ran(scope, task)
        return cancelled

    async def wait_idle(self) -> None:
        """Return once no task started here runs (at once if none does)."""
        while self.running:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()


async def _raise(exc: BaseException) -> None:
    raise exc


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
