"""Random sequences of use / release / cancel / block / fail / close against the cache's invariants.

Weight reads may be *slow* (an example draws it): each waits until the machine finishes it,
while header reads stay fast - the timing of remote stores, under which a freshly loaded model
was once evicted before its caller could lease it, and two models reloaded each other forever.
Or the wait comes *after* the read (a slow build): a load holds a version read before a publish
while a refresh() runs, under which a refresh() once returned True and the old version was
served after it. Or that wait is a worker-thread call's ("thread"): a cancellation does not
stop it, and it returns normally once cancelled (anyio waits for the thread) - a load's last
call, under which a cache closing mid-load once served its model (a use, a host prefetch).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from concurrent.futures import Future
from functools import partial
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)
from safetensors.torch import save

import modelcache._cache as cache_module
from modelcache import (
    CacheClosedError,
    CacheObserver,
    LRUPolicy,
    ModelBuildError,
    ModelCache,
    ModelChangedError,
    ModelTooLargeError,
    Store,
    Weights,
)
from modelcache._cache import ModelCache as _ModelCache
from modelcache._format import ModelInfo
from modelcache._torch import TorchBackend

from .conftest import GatedStore, MemoryModels, check_invariants, settle

#: `settle` counts worker threads.
pytestmark = pytest.mark.usefixtures("count_threads")

SIZES = {"a": 300, "b": 500, "c": 700, "d": 200, "e": 900, "huge": 5000}
BUDGET = 1200
HOST_BUDGET = 1000
DISK_BUDGET = 4000  # files: headers and manifests count too
IDS = st.sampled_from(sorted(SIZES))
#: A step of the machine settles within this, or the cache is spinning (a livelock).
SETTLE_SECONDS = 5


class _Handle:
    """One caller holding (or waiting for) a lease until told to release it."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.release = anyio.Event()
        self.scope = anyio.CancelScope()
        self.future: Future[str] | None = None
        self.entered = False  # got its lease (set once, never cleared)
        self.finished = False  # its task ended, whatever the outcome
        self.cancel_requested = False

    @property
    def waiting(self) -> bool:
        """Still waiting for its model, and still wanting it."""
        return not (self.entered or self.finished or self.cancel_requested)


class SlowWeights(TorchBackend):
    """Weight loads wait until `finish` (each load of a model id: the oldest or the newest)
    while ``slow``: "before" their reads, or "after" them (the bytes read, the load not yet
    done), or "thread": after them, in a wait that a cancellation ends normally, as a worker
    thread's call returns to a cancelled task; headers stay fast. Two loads of one id (a
    swap's and a fresh one) end in either order."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.slow: str | None = None
        self.pending: dict[str, list[anyio.Event]] = {}

    async def _wait(self, model_id: str, *, thread: bool = False) -> None:
        event = anyio.Event()
        self.pending.setdefault(model_id, []).append(event)
        try:
            await event.wait()
        except anyio.get_cancelled_exc_class():
            if not thread:
                raise
            # The thread's call ended: its caller gets the result, and the cancellation (still
            # pending on its scope) at its next checkpoint.
            waiting = self.pending.get(model_id, [])
            if event in waiting:
                waiting.remove(event)
                if not waiting:
                    del self.pending[model_id]

    async def load(self, store: Store, info: ModelInfo, *, zero_copy: bool = True) -> Weights:
        if self.slow == "before":
            await self._wait(info.model_id)
        weights = await super().load(store, info, zero_copy=zero_copy)
        if self.slow in ("after", "thread"):
            await self._wait(info.model_id, thread=self.slow == "thread")
        return weights

    def finish(self, model_id: str, *, newest: bool = False) -> None:
        waiting = self.pending[model_id]
        waiting.pop(-1 if newest else 0).set()
        if not waiting:
            del self.pending[model_id]


class LeaseWatch(CacheObserver):
    """Records evictions of a model that finished loading for callers who never leased it."""

    def __init__(self, handles: list[_Handle]) -> None:
        self.handles = handles
        self.loaded_for: dict[str, list[_Handle]] = {}
        self.violations: list[str] = []
        self.failed_loads: dict[str, int] = {}

    def load_finished(self, model_id: str, source: str, nbytes: int, seconds: float) -> None:
        self.loaded_for[model_id] = [
            h for h in self.handles if h.model_id == model_id and h.waiting
        ]

    def load_failed(self, model_id: str, error: BaseException) -> None:
        self.failed_loads[model_id] = self.failed_loads.get(model_id, 0) + 1

    def waited(self, model_id: str, seconds: float) -> None:
        return None

    def evicted(self, model_id: str, tier: str, nbytes: int, age_seconds: float) -> None:
        if tier == "device":
            unleased = [h for h in self.loaded_for.pop(model_id, []) if h.waiting]
            if unleased:
                self.violations.append(
                    f"{model_id!r} evicted before {len(unleased)} waiting caller(s) leased it"
                )


class CacheMachine(RuleBasedStateMachine):
    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.models = MemoryModels()
        for model_id in SIZES:
            self._write(model_id, 0)
        self.failing: set[str] = set()
        #: Versions published per model (each a tensor filled with one byte value): a lease sees
        #: one of them, whole, never a mixture.
        self.versions: dict[str, set[int]] = {m: {0} for m in SIZES}
        #: The oldest version a use may get: the newest one published before a refresh() that
        #: returned True and whose swap did not fail.
        self.floor: dict[str, int] = dict.fromkeys(SIZES, 0)
        #: The newest version a use has got: a use begun after that gets no older one (a swap
        #: ending after a newer version was loaded once put the older one back).
        self.newest_served: dict[str, int] = dict.fromkeys(SIZES, 0)
        self.refreshes: list[Future[str]] = []
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self.store = GatedStore(self.models.template)
        self.disk_dir = tempfile.mkdtemp(prefix="mc-disk-")
        self.backend = SlowWeights()
        self.cache = ModelCache(
            self.store,
            backend=self.backend,
            device_budget=BUDGET,
            host_budget=HOST_BUDGET,
            disk_dir=self.disk_dir,
            disk_budget=DISK_BUDGET,
            failure_ttl=0,
        )
        failing = self.failing

        @self.cache.model
        class Model:
            @classmethod
            def from_weights(cls, weights: Weights, info: ModelInfo) -> Weights:
                if info.model_id in failing:
                    raise RuntimeError("told to fail")
                return weights

        self._cache_cm = self.portal.wrap_async_context_manager(self.cache)
        self._cache_cm.__enter__()
        self.all_handles: list[_Handle] = []
        self.prefetches: list[Future[str]] = []
        #: Every error a caller caught, kept to compare identities.
        self.caught: list[BaseException] = []
        self.watch = LeaseWatch(self.all_handles)
        self.cache.add_observer(self.watch)
        #: (entry, its draining event) -> leases then: a victim gains no lease while it drains.
        self.drain_leases: dict[tuple[object, object], int] = {}
        self.spinning = False  # a step never settled: the example failed

    @initialize(
        slow=st.sampled_from([None, "before", "after", "thread"]),
        revalidate=st.sampled_from([60.0, None]),
        close_mid_stage=st.booleans(),
    )
    def weight_reads(
        self, slow: str | None, revalidate: float | None, close_mid_stage: bool
    ) -> None:
        self.backend.slow = slow
        #: Teardown closes the cache with its gates and weight reads still blocked: every load
        #: in flight is at some stage (header, slot, read, disk write, swap) when it closes.
        self.close_mid_stage = close_mid_stage
        # None: a disk copy is served unchecked, so only the swap keeps an old one off the disk.
        self.cache._revalidator.after = revalidate

    async def _hold(self, handle: _Handle) -> str:
        floor = max(self.floor[handle.model_id], self.newest_served[handle.model_id])
        try:
            with handle.scope:
                try:
                    async with self.cache.use(handle.model_id) as model:
                        handle.entered = True
                        assert model["w"].numel() == SIZES[handle.model_id]
                        values = set(model["w"].unique().tolist())
                        assert len(values) == 1, f"a mixture of versions: {values}"
                        assert values <= self.versions[handle.model_id], values
                        assert min(values) >= floor, f"{values} served after {floor} was"
                        served = self.newest_served
                        served[handle.model_id] = max(served[handle.model_id], *values)
                        await handle.release.wait()
                        return "released"
                except (ModelBuildError, ModelTooLargeError, ModelChangedError) as exc:
                    self.caught.append(exc)
                    return type(exc).__name__
            return "cancelled"
        finally:
            handle.finished = True

    def _settle(self) -> None:
        self.portal.call(self._settle_or_fail)

    async def _settle_or_fail(self) -> None:
        try:
            with anyio.fail_after(SETTLE_SECONDS):
                await settle()
        except TimeoutError:
            self.spinning = True
            raise AssertionError("the cache never settled: loads and evictions spin") from None

    @rule(target=handles, model_id=IDS)
    def use(self, model_id: str) -> _Handle:
        handle = self.portal.call(_Handle, model_id)
        handle.future = self.portal.start_task_soon(self._hold, handle)
        self.all_handles.append(handle)
        self._settle()
        return handle

    @rule(handle=consumes(handles))
    def release(self, handle: _Handle) -> None:
        self.portal.call(handle.release.set)
        self._settle()

    @rule(handle=consumes(handles))
    def cancel(self, handle: _Handle) -> None:
        handle.cancel_requested = True
        self.portal.call(handle.scope.cancel)
        self._settle()

    @precondition(lambda self: bool(self.backend.pending))
    @rule(data=st.data())
    def finish_weights(self, data: st.DataObject) -> None:
        model_id = data.draw(st.sampled_from(sorted(self.backend.pending)))
        newest = data.draw(st.booleans())
        self.portal.call(partial(self.backend.finish, model_id, newest=newest))
        self._settle()

    @precondition(lambda self: bool(self.backend.pending))
    @rule(data=st.data())
    def finish_as_its_waiters_leave(self, data: st.DataObject) -> None:
        """A weight read ends in the same step of the loop as every caller waiting for its
        model is cancelled (in either order): the load ends as its last waiter leaves."""
        model_id = data.draw(st.sampled_from(sorted(self.backend.pending)))
        finish_first = data.draw(st.booleans())
        leaving = [h for h in self.all_handles if h.model_id == model_id and h.waiting]

        def finish_and_leave() -> None:
            if finish_first:
                self.backend.finish(model_id)
            for handle in leaving:
                handle.cancel_requested = True
                handle.scope.cancel()
            if not finish_first:
                self.backend.finish(model_id)

        self.portal.call(finish_and_leave)
        self._settle()

    @precondition(lambda self: not self.store.gates)
    @rule(model_id=IDS, operation=st.sampled_from(GatedStore.OPERATIONS))
    def block(self, model_id: str, operation: str) -> None:
        self.store.gate(model_id, operation)

    @precondition(lambda self: bool(self.store.gates))
    @rule()
    def unblock(self) -> None:
        for operation, model_id in list(self.store.gates):
            self.portal.call(self.store.open, model_id, operation)
        self._settle()

    @rule(model_id=IDS)
    def toggle_failure(self, model_id: str) -> None:
        self.failing.symmetric_difference_update({model_id})

    async def _prefetch(self, model_id: str) -> str:
        try:
            await self.cache.prefetch([model_id], tier="host")
        except ModelTooLargeError:
            assert SIZES[model_id] > HOST_BUDGET
            return "ModelTooLargeError"
        except ModelBuildError as exc:  # it joined a device load of the model, which failed
            self.caught.append(exc)
            return "ModelBuildError"
        except ModelChangedError as exc:  # published again while its host load read it
            self.caught.append(exc)
            return "ModelChangedError"
        return "prefetched"

    @rule(model_id=IDS)
    def prefetch_host(self, model_id: str) -> None:
        self.prefetches.append(self.portal.start_task_soon(self._prefetch, model_id))
        self._settle()

    @rule(model_id=IDS)
    def evict(self, model_id: str) -> None:
        self.portal.call(self.cache.evict, model_id)

    def _write(self, model_id: str, value: int) -> None:
        tensor = torch.full((SIZES[model_id],), value % 256, dtype=torch.uint8)
        self.models.put(f"{model_id}/model.safetensors", save({"w": tensor}))

    @rule(model_id=IDS)
    def publish(self, model_id: str) -> None:
        """A new version of the model is written to the store (same size, new contents)."""
        value = max(self.versions[model_id]) + 1
        self.versions[model_id].add(value)
        self._write(model_id, value)

    async def _refresh(self, model_id: str) -> str:
        published = max(self.versions[model_id])
        failed = self.watch.failed_loads.get(model_id, 0)
        changed = await self.cache.refresh(model_id)
        if changed and self.watch.failed_loads.get(model_id, 0) == failed:
            # Swapped in before it returned: no use after it gets an older version.
            self.floor[model_id] = max(self.floor[model_id], published)
        return str(changed)

    @rule(model_id=IDS)
    def refresh(self, model_id: str) -> None:
        """Check the model now: a swap of a new version loads beside leases on the old one."""
        self.refreshes.append(self.portal.start_task_soon(self._refresh, model_id))
        self._settle()

    @invariant()
    def accounting_holds(self) -> None:
        self.portal.call(check_invariants, self.cache)

    @invariant()
    def each_caller_caught_its_own_error(self) -> None:
        # Waiters of one failed load raise copies: a shared object would carry one waiter's
        # traceback (and locals) to the others.
        assert len({id(exc) for exc in self.caught}) == len(self.caught)

    @invariant()
    def a_loaded_model_is_leased_by_its_waiters_before_any_eviction(self) -> None:
        assert not self.watch.violations, self.watch.violations

    @invariant()
    def victims_are_chosen_for_a_waiting_load_and_gain_no_lease(self) -> None:
        self.portal.call(self._check_fairness)

    def _check_fairness(self) -> None:
        c: _ModelCache = self.cache
        entries = list(c._entries.values())
        # The head of the line gets bytes once the leases on its victims end: unless even every
        # ready, unwaited-for model (leased or not) cannot cover it, enough of them must have
        # been chosen (draining) already.
        c._device.check_fairness()
        draining = [(e, getattr(e, "draining", None)) for e in entries]
        drains: dict[tuple[object, object], int] = {
            (e, d): e.leases for e, d in draining if d is not None
        }
        for key, leases in drains.items():
            before = self.drain_leases.get(key)
            assert before is None or leases <= before, "a victim chosen for the line was leased"
        self.drain_leases = drains

    @invariant()
    def only_done_handles_have_results(self) -> None:
        for handle in self.all_handles:
            assert handle.future is not None
            if handle.future.done():
                result = handle.future.result()
                assert result in {
                    "released",
                    "cancelled",
                    "ModelBuildError",
                    "ModelChangedError",
                    "ModelTooLargeError",
                }
                if result == "ModelTooLargeError":
                    assert SIZES[handle.model_id] > BUDGET

    def teardown(self) -> None:
        if self.spinning or self.watch.violations:
            # Failed already, and its cache may spin forever: cancel everything, settle nothing
            # (or each example hypothesis shrinks would wait for a step that never settles).
            stop = AssertionError("the example failed")
            self._portal_cm.__exit__(type(stop), stop, None)
            self.models.cleanup()
            shutil.rmtree(self.disk_dir, ignore_errors=True)
            return
        if self.close_mid_stage:
            self._close_mid_stage()
            return
        try:
            self.backend.slow = None
            while self.backend.pending:
                self.portal.call(self.backend.finish, next(iter(self.backend.pending)))
            self.unblock()
            for handle in self.all_handles:
                self.portal.call(handle.release.set)
            self._settle()
            check_invariants(self.cache)
            for refresh in self.refreshes:  # its swap, if any, ended (its load may have failed)
                assert refresh.result(timeout=5) in {"True", "False"}
            for prefetch in self.prefetches:  # host reservations never wait on leases
                assert prefetch.result(timeout=5) in {
                    "prefetched",
                    "ModelChangedError",
                    "ModelTooLargeError",
                    "ModelBuildError",
                }
            self._cache_cm.__exit__(None, None, None)
            stats = self.cache.stats()
            assert (stats.bytes_reserved, stats.bytes_resident, stats.loading) == (0, 0, 0)
            for handle in self.all_handles:
                assert handle.future is not None
                outcome: Any = handle.future.result(timeout=5)
                assert isinstance(outcome, str)
        except BaseException as exc:
            # Stop the portal cancelling what still runs, so a failure fails instead of hanging.
            self._portal_cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        else:
            self._portal_cm.__exit__(None, None, None)
        finally:
            self.models.cleanup()
            shutil.rmtree(self.disk_dir, ignore_errors=True)

    def _close_mid_stage(self) -> None:
        """Close with loads blocked at their stages: it ends every load and task of the cache,
        accounts every byte back, and each caller ends (with CacheClosedError if still waiting)."""
        try:
            for handle in self.all_handles:
                self.portal.call(handle.release.set)
            self._settle()  # the leases end, and the loads they held up go on
            # Callers that have no model when the close begins get none (CacheClosedError).
            waiting = [h for h in self.all_handles if not h.entered and not h.finished]
            in_flight = [f for f in self.prefetches if not f.done()]
            self._cache_cm.__exit__(None, None, None)
            stats = self.cache.stats()
            assert (stats.bytes_reserved, stats.bytes_resident, stats.loading) == (0, 0, 0)
            self.unblock()  # the callers' own tasks (prefetches, refreshes) may wait on gates
            self.backend.slow = None
            while self.backend.pending:
                self.portal.call(self.backend.finish, next(iter(self.backend.pending)))
            for future in [h.future for h in self.all_handles] + self.prefetches + self.refreshes:
                assert future is not None
                with contextlib.suppress(CacheClosedError):
                    future.result(timeout=5)
            for handle in waiting:
                assert not handle.entered, f"{handle.model_id!r} served by a closing cache"
            for prefetch in in_flight:
                with contextlib.suppress(CacheClosedError):
                    assert prefetch.result(timeout=5) != "prefetched", "a closing cache's prefetch"
            left = self.portal.call(_tasks)
            assert not {t for t in left if t.startswith("modelcache")}, left
        except BaseException as exc:
            self._portal_cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        else:
            self._portal_cm.__exit__(None, None, None)
        finally:
            self.models.cleanup()
            shutil.rmtree(self.disk_dir, ignore_errors=True)


def machine_settings(examples: int, *, steps: int) -> settings:
    """A state machine's hypothesis settings: no deadline (a step may wait on a worker thread
    or the disk), too slow is no failure."""
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


async def _tasks() -> set[str]:
    """The names of the tasks alive on the portal's loop."""
    return {t.get_name() for t in asyncio.all_tasks()}


CacheMachine.TestCase.settings = machine_settings(40, steps=30)
test_cache_state_machine = CacheMachine.TestCase


#: How a model of the file:// machine is written: the kinds a prefetch reads in its batch
#: ("one"), and those its loads read themselves (`_prefill`'s fallbacks).
KINDS = ("one", "one", "wide", "sharded", "long", "garbage", "missing")
LOCAL_IDS = st.sampled_from(["p", "q", "r", "s"])


class LocalPrefetchMachine(RuleBasedStateMachine):
    """Device prefetches of a file:// store (whose headers are read in a batch before the loads
    start) among writes of every kind of model, uses, evictions and refreshes: each model is
    served whole at the version its load read, each id the prefetch could not load is one use()
    cannot either, with the same error, and the accounting holds after every step."""

    #: Store options beside the template (`LocalDirectPrefetchMachine`: direct reads).
    store_options: dict[str, Any] = {}  # noqa: RUF012 (read only)
    #: Whether each file written is evicted from the page cache (so direct reads take it).
    cold = False
    #: Bytes of each model's tensor ``w`` (twice that in a "wide" one).
    w_size = 4
    device_budget = 1 << 20

    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="mc-local-")
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self.cache = ModelCache(
            Store(f"file://{self.root}/{{model_id}}", **self.store_options),
            device_budget=self.device_budget,
            failure_ttl=0,
            revalidate_after=None,
            max_concurrent_loads=2,  # two lanes: a group of more ids has loads in line
        )
        self._cache_cm = self.portal.wrap_async_context_manager(self.cache)
        self._cache_cm.__enter__()
        #: id -> (kind, value) written now; a missing id is "missing".
        self.written: dict[str, tuple[str, int]] = {}
        #: id -> the value its resident model holds (the version its load read).
        self.loaded: dict[str, int] = {}
        self.value = 0

    def _write(self, model_id: str, kind: str) -> None:
        self.value += 1
        value = self.value
        path = f"{self.root}/{model_id}"
        shutil.rmtree(path, ignore_errors=True)
        self.written[model_id] = (kind, value)
        if kind == "missing":
            return
        os.makedirs(path)
        w = torch.full((self.w_size,), value % 256, dtype=torch.uint8)
        if kind in ("one", "wide"):  # "wide": another size, as a new version may have
            w = w.repeat(2) if kind == "wide" else w
            files = {"model.safetensors": save({"w": w})}
        elif kind == "long":  # a header past the batched read's first 8 KiB
            extra = {f"t_with_a_long_name_{i:04d}": torch.zeros(1) for i in range(300)}
            files = {"model.safetensors": save({"w": w, **extra})}
        elif kind == "sharded":
            index = {"weight_map": {"w": "s1.safetensors", "x": "s2.safetensors"}}
            files = {
                "s1.safetensors": save({"w": w}),
                "s2.safetensors": save({"x": torch.zeros(2)}),
                "model.safetensors.index.json": json.dumps(index).encode(),
            }
        else:
            files = {"model.safetensors": b"\x10" + b"x" * 64}
        for name, data in files.items():
            with open(f"{path}/{name}", "wb") as f:
                f.write(data)
                if self.cold:
                    f.flush()
                    os.fsync(f.fileno())  # clean pages: DONTNEED drops them
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    @initialize()
    def write_all(self) -> None:
        for model_id in ("p", "q", "r", "s"):
            self._write(model_id, "one")

    @rule(model_id=LOCAL_IDS, kind=st.sampled_from(KINDS))
    def write(self, model_id: str, kind: str) -> None:
        self._write(model_id, kind)

    def _expect(self, model_id: str) -> int | None:
        """The value a use() gets now, or None when it must fail."""
        if model_id in self.loaded:
            return self.loaded[model_id]
        kind, value = self.written[model_id]
        return value % 256 if kind in ("one", "wide", "sharded", "long") else None

    async def _use(self, model_id: str) -> int | tuple[type, str]:
        try:
            async with self.cache.use(model_id) as weights:
                values: set[int] = set(weights["w"].tolist())
                assert len(values) == 1, values
                return values.pop()
        except Exception as exc:
            return type(exc), str(exc)

    @rule(ids=st.lists(LOCAL_IDS, min_size=1, max_size=6))
    def prefetch(self, ids: list[str]) -> None:
        expected = {model_id: self._expect(model_id) for model_id in ids}
        try:
            self.portal.call(self.cache.prefetch, ids)
            raised: Exception | None = None
        except Exception as exc:
            raised = exc
        failing = {m for m, v in expected.items() if v is None}
        assert (raised is None) == (not failing), raised
        assert set(self.cache.resident()) >= {m for m in ids if m not in failing}
        first = True
        for model_id in ids:
            got = self.portal.call(self._use, model_id)
            if model_id in failing:
                assert isinstance(got, tuple), got  # use() fails as the prefetch did
                if raised is not None and first and getattr(raised, "model_id", None) == model_id:
                    assert (type(raised), str(raised)) == got
                    first = False
            else:
                assert got == expected[model_id], (model_id, got, expected[model_id])
                assert isinstance(got, int)
                self.loaded[model_id] = got

    @rule(kind=st.sampled_from(KINDS))
    def prefetch_while_earlier_loads_finish(self, kind: str) -> None:
        """A prefetch of every id, two loads in flight, whose third fresh id is rewritten while
        the prefetch waits for its first load: that id's load starts after the write, so it
        serves the new version (or fails as use() would), as a use() started then would."""
        fresh = [m for m in ("p", "q", "r", "s") if m not in self.loaded]
        if len(fresh) < 3:
            return
        last = fresh[2]
        cache: Any = self.cache
        real_wait = cache._prefetch_wait
        rewritten: list[str] = []

        async def wait(entry: Any, *args: Any) -> None:
            if not rewritten:
                rewritten.append(entry.model_id)
                self._write(last, kind)
            await real_wait(entry, *args)

        cache._prefetch_wait = wait
        window = cache_module.PREFETCH_WINDOW
        cache_module.PREFETCH_WINDOW = 2  # groups of one id: the last waits for room
        raised: Exception | None = None
        try:
            self.portal.call(self.cache.prefetch, fresh)
        except Exception as exc:
            raised = exc
        finally:
            cache_module.PREFETCH_WINDOW = window
            del cache._prefetch_wait
        if not rewritten:
            return  # every earlier id failed before a load started: nothing waited
        failing = [m for m in fresh if self._expect(m) is None]
        assert (raised is None) == (not failing), (raised, failing)
        want = self._expect(last)
        got = self.portal.call(self._use, last)
        if want is None:
            assert isinstance(got, tuple), got
        else:
            assert got == want, (last, got, want)
        for model_id in fresh:  # loaded by this rule: at the version written now
            if model_id in self.cache.resident():
                self.loaded[model_id] = self.written[model_id][1] % 256

    async def _prefetch_cancelled(self, ids: list[str], loading: bool, steps: int) -> None:
        done = anyio.Event()

        async def prefetch() -> None:
            try:
                await self.cache.prefetch(ids)
            except Exception:
                pass  # its failures: the prefetch rule's concern
            finally:
                done.set()

        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(prefetch)
                # Loads started (the header read over), or the prefetch over without any.
                while loading and not done.is_set() and not self.cache.stats().loading:
                    await anyio.lowlevel.checkpoint()
                for _ in range(steps):
                    await anyio.lowlevel.checkpoint()
                scope.cancel()
        await self.cache.wait_idle()

    @rule(
        ids=st.lists(LOCAL_IDS, min_size=1, max_size=6),
        loading=st.booleans(),
        steps=st.integers(0, 6),
    )
    def prefetch_cancelled(self, ids: list[str], loading: bool, steps: int) -> None:
        """A prefetch cancelled ``steps`` scheduler steps after it started (``loading``: after
        its loads started): before or during its header read, or with loads in line in its
        lanes. Once the cache is idle nothing of it is left but the models its loads finished
        (at the version written now); the invariant checks the accounting, no load or waiter
        left. Its ids are evicted first, so that it has loads to start."""
        for model_id in ids:
            if self.portal.call(self.cache.evict, model_id):
                del self.loaded[model_id]
        self.portal.call(self._prefetch_cancelled, ids, loading, steps)
        for model_id in self.cache.resident():
            if model_id not in self.loaded:
                self.loaded[model_id] = self.written[model_id][1] % 256

    async def _lane_cancelled(
        self, ids: list[str], steps: int, headers: bool
    ) -> dict[str, int | tuple[type, str]]:
        outcomes: dict[str, int | tuple[type, str]] = {}
        done = anyio.Event()

        async def prefetch() -> None:
            with contextlib.suppress(Exception):  # its failures: the prefetch rule's concern
                await self.cache.prefetch(ids)
            done.set()

        async def use(model_id: str) -> None:
            outcomes[model_id] = await self._use(model_id)

        try:
            with anyio.fail_after(SETTLE_SECONDS):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(prefetch)
                    while not done.is_set() and not self.cache.stats().loading:
                        if headers:  # the prefetch's header read too (once), maybe not yet run
                            for task in asyncio.all_tasks():
                                if task.get_name() == "modelcache prefetch headers":
                                    task.cancel()
                                    headers = False
                        await anyio.lowlevel.checkpoint()
                    for model_id in dict.fromkeys(ids):
                        tg.start_soon(use, model_id)
                    for _ in range(steps):
                        await anyio.lowlevel.checkpoint()
                    # A lane that has run, or one not yet: cancelled before its first step,
                    # its loads run in a new task, cancelled (`Background._never_ran`).
                    lanes = [
                        t
                        for t in asyncio.all_tasks()
                        if t.get_name() == "modelcache prefetch loads"
                    ]
                    if lanes:
                        lanes[0].cancel()
                await self.cache.wait_idle()
        except TimeoutError:
            raise AssertionError(
                "a use() joined to a cancelled lane's load is never answered"
            ) from None
        return outcomes

    @rule(
        ids=st.lists(LOCAL_IDS, min_size=1, max_size=6),
        steps=st.integers(0, 4),
        headers=st.booleans(),
    )
    def lane_cancelled_by_other_code(self, ids: list[str], steps: int, headers: bool) -> None:
        """A lane of a prefetch whose task other code cancels (the cache open), with use()s of
        the group's ids joined: the load under way in it fails (CacheClosedError, as a load's
        own task cancelled), each other use() gets what a use() gets now (break9: the loads in
        line in that lane failed with it). ``headers``: its header read's task is cancelled
        too, maybe before its first step (as a task of the cache's group, that cancelled the
        group: the cache closed; the loads then read their own headers). Its ids are evicted
        first, so that it has loads."""
        for model_id in ids:
            if self.portal.call(self.cache.evict, model_id):
                del self.loaded[model_id]
        expected = {model_id: self._expect(model_id) for model_id in ids}
        outcomes = self.portal.call(self._lane_cancelled, ids, steps, headers)
        closed = [
            m
            for m, got in outcomes.items()
            if isinstance(got, tuple) and got[0] is CacheClosedError
        ]
        assert len(closed) <= 1, outcomes  # the one load the cancelled lane had under way
        for model_id, got in outcomes.items():
            if model_id in closed:
                continue
            if expected[model_id] is None:
                assert isinstance(got, tuple), (model_id, got)
            else:
                assert got == expected[model_id], (model_id, got, expected[model_id])
        for model_id in self.cache.resident():
            if model_id not in self.loaded:
                self.loaded[model_id] = self.written[model_id][1] % 256

    @rule(model_id=LOCAL_IDS)
    def use(self, model_id: str) -> None:
        want = self._expect(model_id)
        got = self.portal.call(self._use, model_id)
        if want is None:
            assert isinstance(got, tuple), got
        else:
            assert got == want, (model_id, got, want)
            self.loaded[model_id] = want

    @rule(model_id=LOCAL_IDS)
    def evict(self, model_id: str) -> None:
        if self.portal.call(self.cache.evict, model_id):
            del self.loaded[model_id]

    @invariant()
    def accounting_holds(self) -> None:
        self.portal.call(check_invariants, self.cache)
        stats = self.cache.stats()
        assert (stats.loading, stats.waiters, stats.leased) == (0, 0, 0)
        assert sorted(self.cache.resident()) == sorted(self.loaded)

    def teardown(self) -> None:
        try:
            self._cache_cm.__exit__(None, None, None)
        finally:
            self._portal_cm.__exit__(None, None, None)
            shutil.rmtree(self.root, ignore_errors=True)


LocalPrefetchMachine.TestCase.settings = machine_settings(30, steps=20)
test_local_prefetch_state_machine = LocalPrefetchMachine.TestCase


class LocalDirectPrefetchMachine(LocalPrefetchMachine):
    """`LocalPrefetchMachine` reading files not in the page cache with ``direct_reads=True``
    in chunks of 64 KiB and a byte: every model's data is many chunks read with O_DIRECT (where
    the filesystem takes it), straight into the pool's buffers congruent with their files but
    for each chunk's partial blocks, among the same writes, replacements and refreshes."""

    store_options = {"direct_reads": True, "read_chunk_size": 65_537}  # noqa: RUF012 (read only)
    cold = True
    # Past the header's read and its readahead (128 KiB), so the data is mostly not in the page
    # cache (read with O_DIRECT), and past the 1 MiB below which a model is on the heap.
    w_size = 1_200_000
    device_budget = 16 << 20


LocalDirectPrefetchMachine.TestCase.settings = machine_settings(15, steps=15)
test_local_direct_prefetch_state_machine = LocalDirectPrefetchMachine.TestCase


#: Overlapping traffic on two resident models: a new lease on one of them, or the end of the
#: oldest lease still held.
TRAFFIC = st.lists(st.sampled_from(["a", "b", "release"]), max_size=24)


@settings(max_examples=40, deadline=None)
@given(before=TRAFFIC, after=TRAFFIC, lru=st.booleans())
def test_a_waiting_load_gets_its_bytes_once_the_leases_held_when_it_queued_end(
    before: list[str], after: list[str], lru: bool
) -> None:
    """Whatever the traffic on resident models, a load waiting for bytes waits only for the
    leases that were held when it queued, never for newer ones."""
    anyio.run(_traffic_then_a_cold_load, before, after, lru)


async def _traffic_then_a_cold_load(before: list[str], after: list[str], lru: bool) -> None:
    models = MemoryModels()
    for name in ("a", "b", "cold"):
        models.add(name, 1000)
    held: list[anyio.Event] = []  # releases of the uses started and not yet told to end
    cold_in, cold_release = anyio.Event(), anyio.Event()

    async def hold(model_id: str, release: anyio.Event, inside: anyio.Event | None) -> None:
        async with cache.use(model_id):
            if inside is not None:
                inside.set()
            await release.wait()

    def step(op: str) -> None:
        if op == "release":
            if held:
                held.pop(0).set()
        else:
            held.append(anyio.Event())
            tg.start_soon(hold, op, held[-1], None)

    policy = LRUPolicy() if lru else None
    cache = ModelCache(models.template, device_budget=2000, policy=policy)  # two of three fit
    try:
        async with cache, anyio.create_task_group() as tg:
            for op in before:
                step(op)
                await settle()
            tg.start_soon(hold, "cold", cold_release, cold_in)
            await settle()
            held_then = list(held)
            for op in after:
                step(op)
                await settle()
                check_invariants(cache)
                if all(release.is_set() for release in held_then):
                    assert cold_in.is_set(), "the cold load waited for leases newer than it"
            for release in held_then:
                release.set()
            await settle()
            assert cold_in.is_set(), "the cold load waited for leases newer than it"
            check_invariants(cache)
            cold_release.set()
            for release in held:
                release.set()
    finally:
        models.cleanup()
