"""The adapter's parts without a server: command line, default hooks, error statuses."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from conftest import TINY_BYTES, write_model
from fastapi.exceptions import RequestValidationError
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
from kserve.metrics import PREDICT_HIST_TIME
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse
from mc_models import Tiny
from modelcache_kserve import (
    CacheModelRepository,
    default_postprocess,
    default_preprocess,
    status_for,
)
from modelcache_kserve._cli import load_class, parse_args
from modelcache_kserve._errors import (
    MAX_MESSAGE,
    TIER_HEADER,
    ModelRequestError,
    PayloadTooLarge,
    RejectedInput,
    exception_handler,
)
from modelcache_kserve._hooks import Hooks
from starlette.requests import Request

from modelcache import (
    CacheClosedError,
    InvalidModelIdError,
    ModelBuildError,
    ModelCache,
    ModelFormatError,
    ModelNotFoundError,
    ModelTooLargeError,
    StoreError,
)

REQUIRED = ["--store", "file:///s/{model_id}/", "--model-class", "m:C", "--device-budget", "1GiB"]


def test_flags_come_from_environment_and_command_line_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each flag may be a MODELCACHE_* variable; the command line overrides it."""
    monkeypatch.setenv("MODELCACHE_STORE", "s3://b/{model_id}/")
    monkeypatch.setenv("MODELCACHE_MODEL_CLASS", "pkg.mod:Cls")
    monkeypatch.setenv("MODELCACHE_DEVICE_BUDGET", "2GiB")
    monkeypatch.setenv("MODELCACHE_HTTP_PORT", "9000")
    monkeypatch.setenv("MODELCACHE_PER_MODEL_METRICS", "true")
    args = parse_args(["--device-budget", "3GiB"])
    assert (args.store, args.model_class, args.device_budget) == (
        "s3://b/{model_id}/",
        "pkg.mod:Cls",
        "3GiB",
    )
    assert (args.http_port, args.per_model_metrics, args.host, args.device) == (
        9000,
        True,
        "0.0.0.0",
        "cpu",
    )


@pytest.mark.parametrize(
    "extra",
    [["--workers", "2"], ["--disk-dir", "/tmp/x"]],
)
def test_bad_command_lines_exit_with_usage(extra: list[str]) -> None:
    """More than one worker, or a disk dir without a budget, is a usage error."""
    with pytest.raises(SystemExit) as exc:
        parse_args([*REQUIRED, *extra])
    assert exc.value.code == 2


def test_model_class_is_imported_by_spec() -> None:
    """pkg.mod:Class imports; a spec without a colon or naming a non-class is refused."""
    assert load_class("collections:OrderedDict").__name__ == "OrderedDict"
    with pytest.raises(ValueError, match=r"pkg\.module:Class"):
        load_class("collections.OrderedDict")
    with pytest.raises(TypeError, match="not a class"):
        load_class("os.path:join")


def test_default_hooks_v1() -> None:
    """V1: instances -> float32 tensor; outputs -> predictions list; bad payloads InvalidInput."""
    x = default_preprocess({"instances": [[1, 2], [3, 4]]})
    assert x.dtype == torch.float32
    assert x.shape == (2, 2)
    assert default_postprocess(x * 2, {"instances": []}) == {"predictions": [[2, 4], [6, 8]]}
    bad: object
    for bad in ({"inputs": []}, {"instances": 3}, {"instances": [[1], [2, 3]]}, [1, 2]):
        with pytest.raises(InvalidInput):
            default_preprocess(bad)


def test_default_hooks_v2() -> None:
    """V2: one input -> tensor of its datatype and shape; outputs named output-i or by dict key,
    the request id echoed or generated."""
    tensor = InferInput(name="x", shape=[2, 2], datatype="INT64", data=[1, 2, 3, 4])
    request = InferRequest(model_name="m", infer_inputs=[tensor], request_id="r1")
    x = default_preprocess(request)
    assert x.dtype == torch.int64
    assert x.tolist() == [[1, 2], [3, 4]]
    response = default_postprocess((x, x.float()), request)
    assert isinstance(response, InferResponse)
    assert response.id == "r1"
    assert [(o.name, o.datatype, o.shape) for o in response.outputs] == [
        ("output-0", "INT64", [2, 2]),
        ("output-1", "FP32", [2, 2]),
    ]
    request.id = None
    response = default_postprocess({"logits": x}, request)
    assert isinstance(response, InferResponse)
    assert response.id
    assert response.outputs[0].name == "logits"
    two = InferRequest(model_name="m", infer_inputs=[tensor, tensor])
    with pytest.raises(InvalidInput, match="one input"):
        default_preprocess(two)


def test_error_statuses() -> None:
    """Each error answers the status the README's table gives it."""
    assert status_for(InvalidModelIdError("x")) == 400
    assert status_for(InvalidInput("x")) == 400
    assert status_for(ModelNotFoundError("x")) == 404
    assert status_for(ModelNotFound("x")) == 404
    assert status_for(ModelRequestError(409, "x")) == 409
    assert status_for(PayloadTooLarge(10)) == 413
    assert status_for(RequestValidationError([])) == 422
    assert status_for(RejectedInput()) == 422
    assert status_for(NotImplementedError()) == 501
    assert status_for(ModelTooLargeError("x")) == 507
    assert status_for(CacheClosedError("x")) == 503
    assert status_for(ModelNotReady("x")) == 503
    assert status_for(StoreError("x")) == 502  # the store failed: a bad gateway
    assert status_for(ModelBuildError("x")) == 500
    assert status_for(ModelFormatError("x")) == 500
    assert status_for(KeyError("x")) == 500


class _Raises(torch.nn.Module):
    """A model whose forward raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise self.error


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), 422),
        (ValueError("bad"), 422),
        (TypeError("bad"), 422),
        (IndexError("index 7 is out of bounds"), 422),
        (KeyError("x"), 422),
        (InvalidInput("no"), 400),
        (torch.OutOfMemoryError("CUDA out of memory"), 500),
        (torch.AcceleratorError("CUDA error: an illegal memory access was encountered"), 500),
        (NotImplementedError("todo"), 501),  # as KServe answers it
        (RecursionError("deep"), 500),
        (ModelBuildError("x"), 500),
        (AssertionError("bug"), 500),
        (ZeroDivisionError("bug"), 500),
    ],
)
async def test_errors_of_predict_on_the_inputs_are_the_clients(
    error: BaseException, status: int
) -> None:
    """predict's ValueError, TypeError, IndexError, KeyError and RuntimeError answer 422 naming
    the cause; out-of-memory, a broken accelerator (both RuntimeErrors), NotImplementedError (501), RecursionError, the cache's errors and
    any other type stay the server's (5xx), in every predict mode."""
    for mode in ("loop", "async", "thread"):
        hooks = Hooks(_Raises, torch.device("cpu"))
        hooks.pred_mode = mode
        if mode == "async":  # an async predict of the model class

            async def predict(model: _Raises, inputs: torch.Tensor) -> torch.Tensor:
                return model(inputs)  # type: ignore[no-any-return]

            hooks.pred = predict
        with pytest.raises(Exception) as caught:
            await hooks.run(_Raises(error), {"instances": [[1.0]]}, None)
        answer = ModelRequestError.wrap(caught.value, "m", "device")
        assert answer.status == status, (mode, caught.value)
        if status == 422:
            assert answer.message.startswith("model 'm' could not compute on the request's")
            assert str(error) in answer.message


async def test_error_handler_names_the_tier_with_several_classes_bound() -> None:
    """The error handler asks for the served class's tier, so a second bound class is no crash."""
    cache = ModelCache("memory://none/{model_id}/", device_budget=1000)

    @cache.model
    class A:
        @classmethod
        def from_weights(cls, weights: object, info: object) -> int:
            return 0

    @cache.model
    class B:
        @classmethod
        def from_weights(cls, weights: object, info: object) -> int:
            return 1

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "path_params": {}}
    scope["path_params"] = {"model_name": "m"}  # as routed: /v1/models/{model_name}:predict
    response = await exception_handler(cache, A)(Request(scope), ModelNotFoundError("gone"))
    assert response.status_code == 404
    assert response.headers[TIER_HEADER] == "store"


def test_ids_never_served_make_no_metric_series() -> None:
    """A proxy for an id (perhaps not in the store) labels KServe's histogram only once served."""
    cache = ModelCache("memory://none/{model_id}/", device_budget=1000)

    class Net(torch.nn.Module):
        pass

    repository = CacheModelRepository(cache, Net, per_model_metrics=True)
    for i in range(20):
        repository.get_model(f"no-such-model-{i}")
    labelled = {labels[0] for labels in PREDICT_HIST_TIME._metrics}
    assert not any(name.startswith("no-such-model-") for name in labelled)


async def test_a_request_waiting_too_long_for_its_model_answers_503(tmp_path: Path) -> None:
    """With load_timeout, a request whose model cannot load in time (every byte leased) answers
    503; once memory is free the same request is served."""
    for model_id in ("a", "b"):
        write_model(tmp_path, model_id)
    cache = ModelCache(f"file://{tmp_path}/{{model_id}}/", device_budget=TINY_BYTES)
    repository = CacheModelRepository(cache, Tiny, load_timeout=0.05)
    body = {"instances": [[1.0, 2.0, 3.0, 4.0]]}
    proxy: Any = repository.get_model("b")
    async with cache:
        async with cache.use("a", model=Tiny):  # the whole budget, leased
            with pytest.raises(ModelRequestError) as caught:
                await proxy(body)
            assert caught.value.status == 503
            assert "0.05 s" in caught.value.message
        response, headers = await proxy(body)
        assert len(response["predictions"]) == 1
        assert headers[TIER_HEADER] == "store"


def test_new_flags_have_sensible_defaults_and_refuse_nonsense() -> None:
    """--check-timeout 5 s, --grace-period 25 s (below Kubernetes' 30 s before SIGKILL),
    --max-request-size 64 MiB, read as a size; negative values are usage errors."""
    args = parse_args(REQUIRED)
    assert (args.check_timeout, args.grace_period, args.max_request_size) == (5.0, 25, 64 << 20)
    assert parse_args([*REQUIRED, "--max-request-size", "1KiB"]).max_request_size == 1024
    for bad in (["--check-timeout", "-1"], ["--grace-period", "-1"], ["--max-request-size", "x"]):
        with pytest.raises(SystemExit):
            parse_args([*REQUIRED, *bad])


async def test_shutdown_wakes_requests_waiting_for_a_load_with_503(tmp_path: Path) -> None:
    """shut_down() ends every wait for a load at once with 503 'shutting down' (whatever the
    load_timeout), refuses new waits, and still serves hits."""
    for model_id in ("a", "b"):
        write_model(tmp_path, model_id)
    cache = ModelCache(f"file://{tmp_path}/{{model_id}}/", device_budget=TINY_BYTES)

    class Net(Tiny):  # a class of its own: binding marks the class
        pass

    repository = CacheModelRepository(cache, Net)  # no load_timeout: it would wait forever
    body = {"instances": [[1.0, 2.0, 3.0, 4.0]]}
    waiting: Any = repository.get_model("b")
    answers: list[ModelRequestError] = []

    async def request() -> None:
        with pytest.raises(ModelRequestError) as caught:
            await waiting(body)
        answers.append(caught.value)

    async with cache:
        await cache.prefetch(["a"])
        async with cache.use("a", model=Net), anyio.create_task_group() as tg:
            tg.start_soon(request)  # waits for the bytes "a" holds
            await anyio.wait_all_tasks_blocked()
            assert answers == []
            repository.shut_down()
        assert [(e.status, e.tier) for e in answers] == [(503, "store")]
        assert "shutting down" in answers[0].message
        with pytest.raises(ModelRequestError, match="shutting down"):
            await waiting(body)
        with pytest.raises(ModelRequestError, match="shutting down"):
            await repository.check_exists("b")
        hit: Any = repository.get_model("a")
        _, headers = await hit(body)
        assert headers[TIER_HEADER] == "device"


def test_load_timeout_flag_defaults_to_five_minutes_and_zero_means_none() -> None:
    """--load-timeout is 300 s unless given; 0 turns the limit off; negative is a usage error."""
    assert parse_args(REQUIRED).load_timeout == 300.0
    assert parse_args([*REQUIRED, "--load-timeout", "0"]).load_timeout == 0.0
    with pytest.raises(SystemExit):
        parse_args([*REQUIRED, "--load-timeout", "-1"])


@pytest.mark.parametrize(
    ("datatype", "data"), [("FP32", [10**400, 1.0]), ("UINT64", [-1, 2]), ("INT64", [2**70, 1])]
)
def test_numbers_a_dtype_cannot_hold_are_the_payloads_fault(datatype: str, data: list[Any]) -> None:
    """A V2 number the datatype cannot hold (OverflowError in torch) is a malformed payload:
    InvalidInput (400), not the model's 500."""
    request = InferRequest(
        "m", infer_inputs=[InferInput(name="x", shape=[2], datatype=datatype, data=data)]
    )
    with pytest.raises(InvalidInput, match="does not match datatype"):
        default_preprocess(request)


async def test_an_answer_carries_a_clipped_encodable_message() -> None:
    """An error whose text is megabytes long, or holds a lone surrogate, answers its own status
    with at most MAX_MESSAGE characters of it, instead of copying it all or failing as a 500."""
    cache = ModelCache("memory://none/{model_id}/", device_budget=1000)
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "path_params": {}}
    handle = exception_handler(cache, Tiny)
    response = await handle(Request(scope), ModelRequestError(422, "x" * (8 << 20)))
    assert response.status_code == 422
    assert len(response.body) < MAX_MESSAGE + 100
    assert b"(8388608 characters)" in response.body
    response = await handle(Request(scope), ModelRequestError(422, "bad \udcff byte"))
    assert response.status_code == 422
    assert b"bad \\\\udcff byte" in response.body


async def test_an_answered_error_keeps_no_request_frames_alive() -> None:
    """The cache and the checks remember an error object for seconds and raise it again to
    each request: once answered, it holds none of the frames it went through (the request's
    body and payload would stay alive as long)."""
    cache = ModelCache("memory://none/{model_id}/", device_budget=1000)
    remembered = ModelNotFoundError("gone")  # as the cache's failure memory holds it

    class Payload:
        pass

    def serve(payload: Payload) -> None:
        raise remembered

    payload = Payload()
    alive = weakref.ref(payload)
    try:
        try:
            serve(payload)
        except ModelNotFoundError as exc:
            raise ModelRequestError.wrap(exc, "m", "store") from exc
    except ModelRequestError as answer:
        error = answer
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "path_params": {}}
    response = await exception_handler(cache, Tiny)(Request(scope), error)
    assert response.status_code == 404
    del payload, error
    gc.collect()
    assert alive() is None
    assert remembered.__traceback__ is None
