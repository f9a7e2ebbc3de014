"""Run awaitables concurrently and fail like a plain call would."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import anyio
import anyio.abc

__all__ = ["Background", "gather"]

T = TypeVar("T")


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
    sweeper) are started without it."""

    __slots__ = ("_idle", "running")

    def __init__(self) -> None:
        #: Tasks started and not yet ended (a task counts from `start`, before it first runs).
        self.running = 0
        self._idle: anyio.Event | None = None

    def start(
        self,
        task_group: anyio.abc.TaskGroup,
        func: Callable[..., Awaitable[object]],
        *args: object,
        name: str | None = None,
    ) -> None:
        self.running += 1
        task_group.start_soon(self._run, func, args, name=name or f"modelcache {func.__name__}")

    async def _run(self, func: Callable[..., Awaitable[object]], args: tuple[object, ...]) -> None:
        # The task's arguments live in the coroutine alone: a task that drops a buffer before
        # it frees the buffer's bytes (`del weights` in a copy down) must not find it kept here.
        running = func(*args)
        del args
        try:
            await running
        finally:
            self.running -= 1
            if not self.running and self._idle is not None:
                self._idle.set()
                self._idle = None

    async def wait_idle(self) -> None:
        """Return once no task started here runs (at once if none does)."""
        while self.running:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()
