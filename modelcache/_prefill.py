"""A device prefetch's headers, read for many loads at once before the loads start (issue 16).

A small model's load spent most of its time in its header stage: its own coroutines through
the stage (`Abandonable`, `HostDiskTiers.locate`, `read_model_info`, the small-read batch's
future), although the read itself shares a worker-thread call with other loads'. A device
prefetch knows the next ids before their loads start: `read_infos` reads the headers of a
group of them in ONE small read (`Store.read_heads`) and describes each on the loop, and each
load then starts with its `ModelInfo` and skips its header stage.

Invariants:

* Only what the load itself would have read the same way: a one-file safetensors model on a
  local store (`Store.batches_headers`), whose whole header is in the first read and is parsed
  and laid out on the loop. Anything else - a sharded model (no ``model.safetensors``), a
  longer header, a missing or unreadable file, a header that does not parse, a file that
  changed while it was read - gives None, and that load reads its headers as usual: its
  errors, versions and stats are the per-load path's own.
* The description is the per-load path's: the same functions (`header_length`,
  `_parse_shard`, `layout_model`), the same names and URLs, and the version of the bytes read
  (the tags before and after the read, the version a load's `reading` scope records from
  them), so the load's weight reads are pinned to them as usual.
* No entry or reservation exists while the read runs: a prefetch cancelled during it leaves
  nothing behind but the read's own task (`read_infos_apart`), which ends with the read and
  drops its results.
* The read runs in a task of the cache's (`read_infos_apart`), not the prefetch's: a batch's
  driver waits for its thread call even when cancelled (`_batch`), and a prefetch cancelled
  while a file of its group blocks (a stalled mount) waited with it
  where use()'s caller, whose load drives its read, leaves at once (break7).

The loads whose headers were read here then run in lanes (`load_in_turn`): a few tasks that
take a group's loads in turn, not a task (and its cancel scope) per load, which was the largest
part of a small model's prefetched load after the collector. Each load keeps everything of its
own but its task: its entry (a use() of its id joins it), its error (it fails alone), its
abandonment (at each stage boundary, as any load's). The lanes are as many as the cache's load
slots, so no more weight reads wait on each other than in the slots' line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence

import anyio.abc

from ._concurrency import Background, new_event
from ._device import DeviceEntry
from ._format import SINGLE_NAME, ModelInfo, header_length, layout_model
from ._loader import _LAYOUT_ON_LOOP, _PARSE_ON_LOOP, _PREFIX, _parse_shard
from ._store import Store
from ._versions import ModelVersion

__all__ = ["load_in_turn", "read_infos", "read_infos_apart"]


async def load_in_turn(
    loads: Iterator[tuple[DeviceEntry, ModelInfo]],
    load: Callable[[DeviceEntry, ModelInfo], Awaitable[None]],
    left: Callable[[DeviceEntry, ModelInfo, BaseException], None],
) -> None:
    """A lane: ``load`` each of ``loads`` (shared with the group's other lanes) in turn. A load
    ends its own failures (its entry fails alone, the lane goes on); what it raises - the
    lane cancelled (the cache closing, or its task cancelled by other code), an interrupt - ends
    the lane, and each load it has not run goes to ``left``: nobody else would run them, and
    their waiters would wait for good. ``left`` fails it when the cache closes, and else runs it
    in a task of its own (break9): a lane's task cancelled by other code failed every load in
    line with the closing cache's error, where a task per load lost only the one cancelled."""
    for entry, info in loads:
        try:
            await load(entry, info)
        except BaseException as exc:
            for unrun, unrun_info in loads:
                left(unrun, unrun_info, exc)
            raise


async def read_infos_apart(
    background: Background,
    task_group: anyio.abc.TaskGroup,
    store: Store,
    models: Sequence[tuple[str, str] | None],
) -> list[ModelInfo | None]:
    """`read_infos` in a task of ``task_group`` (counted by ``background``): a caller cancelled
    meanwhile leaves at once, the task ends with the read and its results are dropped. All
    None where it failed as a whole: each load then reads its own headers."""
    if all(model is None for model in models):
        return [None] * len(models)  # nothing to read: no task
    answer: list[list[ModelInfo | None]] = []
    done = new_event()

    async def read() -> None:
        try:
            answer.append(await read_infos(store, models))
        except Exception:
            pass  # each load reads its headers itself, and raises what it meets
        finally:
            done.set()

    background.start(task_group, read, name="modelcache prefetch headers")
    await done.wait()
    return answer[0] if answer else [None] * len(models)


async def read_infos(
    store: Store, models: Sequence[tuple[str, str] | None]
) -> list[ModelInfo | None]:
    """The `ModelInfo` of each ``(model_id, url)`` of ``models`` (its id validated, ``url`` its
    ``store.model_url``, local), from one worker-thread call; None where the load must read
    its headers itself (see the module docstring), and for a None in ``models``."""
    files = [None if m is None else _file_url(store, m[1]) for m in models]
    wanted = [file for file in files if file is not None]
    if not wanted:
        return [None] * len(models)
    heads = iter(await store.read_heads(wanted, _PREFIX))
    infos: list[ModelInfo | None] = []
    for model, file in zip(models, files, strict=True):
        if model is None or file is None:
            infos.append(None)
            continue
        head = next(heads)
        infos.append(None if head is None else _describe(model[0], model[1], file, head))
    return infos


def _file_url(store: Store, url: str) -> str:
    """The file `read_model_info` reads first for a model at ``url``: the file itself, or the
    single ``model.safetensors`` of its directory."""
    return url if url.endswith(".safetensors") else store.join(url, SINGLE_NAME)


def _describe(
    model_id: str, url: str, file: str, head: tuple[int, bytes, str, str]
) -> ModelInfo | None:
    """`read_model_info`'s single-file description from ``head`` (`Store.read_heads`), or None
    where that would read more, work off the loop, or raise (the load's own read then does)."""
    size, prefix, before, after = head
    # What a `reading` scope's two `see` calls would record, without the scope (its objects
    # were a part of each prefetched load): the file changed during the read -> None.
    tag = before if before is not None else after
    if after is not None and after != tag:
        return None
    try:
        length = header_length(prefix, size, model_id=model_id, url=file)
        end = 8 + length
        if len(prefix) < end or length > _PARSE_ON_LOOP:
            return None
        name = file if file == url else SINGLE_NAME
        shard = _parse_shard(prefix, end, b"", size, name, model_id, file)
        if len(shard.tensors) > _LAYOUT_ON_LOOP:
            return None
        version = None if tag is None else ModelVersion(((file, tag),))
        return layout_model(model_id, url, [shard], version=version)
    except Exception:
        return None
