"""Run awaitables concurrently and fail like a plain call would."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import anyio

__all__ = ["gather"]

T = TypeVar("T")


async def gather(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Await every call concurrently and return their results in order.

    The first exception cancels the others and is raised as itself, not wrapped in an
    ExceptionGroup, so typed errors reach callers unchanged. Cancellation is never caught.
    """
    if len(calls) == 1:
        return [await calls[0]()]
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
