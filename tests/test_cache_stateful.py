"""Random sequences of use / release / cancel / block / fail / close against the cache's invariants."""

from __future__ import annotations

import shutil
import tempfile
from concurrent.futures import Future
from typing import Any

import anyio
import anyio.from_thread
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from modelcache import ModelBuildError, ModelCache, ModelTooLargeError, Weights
from modelcache._format import ModelInfo

from .conftest import GatedStore, MemoryModels, cache_stores, check_invariants, settle

SIZES = {"a": 300, "b": 500, "c": 700, "d": 200, "e": 900, "huge": 5000}
BUDGET = 1200
HOST_BUDGET = 1000
DISK_BUDGET = 4000  # files: headers and manifests count too
IDS = st.sampled_from(sorted(SIZES))


class _Handle:
    """One caller holding (or waiting for) a lease until told to release it."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.release = anyio.Event()
        self.scope = anyio.CancelScope()
        self.future: Future[str] | None = None


class CacheMachine(RuleBasedStateMachine):
    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.models = MemoryModels()
        for model_id, size in SIZES.items():
            self.models.add(model_id, size)
        self.failing: set[str] = set()
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self.store = GatedStore(self.models.template)
        self.disk_dir = tempfile.mkdtemp(prefix="mc-disk-")
        self.cache = ModelCache(
            self.store,
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

    async def _hold(self, handle: _Handle) -> str:
        with handle.scope:
            try:
                async with self.cache.use(handle.model_id) as model:
                    assert model["w"].numel() == SIZES[handle.model_id]
                    await handle.release.wait()
                    return "released"
            except (ModelBuildError, ModelTooLargeError) as exc:
                self.caught.append(exc)
                return type(exc).__name__
        return "cancelled"

    def _settle(self) -> None:
        self.portal.call(lambda: settle(*cache_stores(self.cache)))

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
        self.portal.call(handle.scope.cancel)
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
        return "prefetched"

    @rule(model_id=IDS)
    def prefetch_host(self, model_id: str) -> None:
        self.prefetches.append(self.portal.start_task_soon(self._prefetch, model_id))
        self._settle()

    @rule(model_id=IDS)
    def evict(self, model_id: str) -> None:
        self.portal.call(self.cache.evict, model_id)

    @invariant()
    def accounting_holds(self) -> None:
        self.portal.call(check_invariants, self.cache)

    @invariant()
    def each_caller_caught_its_own_error(self) -> None:
        # Waiters of one failed load raise copies: a shared object would carry one waiter's
        # traceback (and locals) to the others.
        assert len({id(exc) for exc in self.caught}) == len(self.caught)

    @invariant()
    def only_done_handles_have_results(self) -> None:
        for handle in self.all_handles:
            assert handle.future is not None
            if handle.future.done():
                result = handle.future.result()
                assert result in {"released", "cancelled", "ModelBuildError", "ModelTooLargeError"}
                if result == "ModelTooLargeError":
                    assert SIZES[handle.model_id] > BUDGET

    def teardown(self) -> None:
        try:
            self.unblock()
            for handle in self.all_handles:
                self.portal.call(handle.release.set)
            self._settle()
            check_invariants(self.cache)
            for prefetch in self.prefetches:  # host reservations never wait on leases
                assert prefetch.result(timeout=5) in {
                    "prefetched",
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


CacheMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_cache_state_machine = CacheMachine.TestCase
