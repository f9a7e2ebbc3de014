"""Request handling: the model class's hooks, or the defaults.

A request runs ``preprocess -> predict -> postprocess`` inside one lease of the model
(``async with cache.use(model_id) as model``). Each step is the model class's method of that name
when it has one - sync or async - else the default here:

* ``preprocess(payload, headers) -> inputs``; a ValueError, TypeError, KeyError or IndexError it
  raises answers 400 (the payload is wrong), as kserve's InvalidInput does. V1 ``{"instances": [...]}`` becomes
  ``torch.tensor(instances, dtype=torch.float32)``; a V2 `InferRequest` with one input becomes a
  tensor of its datatype and shape. Both land on the cache's device.
* ``predict(inputs) -> outputs``: ``model(inputs)`` under ``torch.inference_mode()``. A
  ValueError, TypeError, IndexError, KeyError or RuntimeError it raises answers 422: predict
  computes on the request's tensors, so such an error (``mat1 and mat2 shapes cannot be
  multiplied``) says the request does not fit the model. Out-of-memory, NotImplementedError,
  RecursionError and modelcache's own errors stay the server's (500).
* ``postprocess(outputs, request) -> response``. V1: ``{"predictions": outputs.tolist()}``; V2: an
  `InferResponse` whose outputs are ``output-0``, ``output-1``... (a tensor, or a tuple/list of
  them) or the keys of a dict of tensors, with the request's ``id`` (a new uuid4 when it has none).

Every step runs on the event loop, as KServe runs a `kserve.Model`'s own: a hop to a worker thread
costs ~0.3 ms on a 2-core machine, a fifth of KServe's whole warm request. A model class whose
predict is long and synchronous sets ``predict_in_thread = True`` (predict then runs in a worker
thread) or makes ``predict`` async and offloads what it wants.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import anyio.to_thread
import numpy as np
import torch
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from kserve.utils.numpy_codec import from_np_dtype

from modelcache import ModelCacheError

from ._errors import RejectedInput

__all__ = ["Hooks", "default_postprocess", "default_predict", "default_preprocess"]

#: V2 datatypes -> torch dtypes (BYTES and FP16-as-JSON have no tensor form here).
_V2_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "UINT8": torch.uint8,
    "UINT16": torch.uint16,
    "UINT32": torch.uint32,
    "UINT64": torch.uint64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}


#: What torch raises for numbers that do not make a tensor of the dtype (10**400 as FP32, -1
#: as UINT64: OverflowError) - the payload's fault - but not the device's faults.
_DECODE_ERRORS = (TypeError, ValueError, OverflowError, RuntimeError)


def _decode_fault(exc: BaseException) -> bool:
    """``exc``, raised while making the request's tensor, is the device's fault, not the
    payload's (out of memory on the device, a broken device)."""
    return isinstance(exc, torch.OutOfMemoryError | torch.AcceleratorError)


def default_preprocess(
    payload: Any, headers: Mapping[str, str] | None = None, *, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """V1 ``{"instances": [...]}`` or a one-input V2 `InferRequest` -> a tensor on ``device``.
    Raises kserve's InvalidInput (HTTP 400) for anything else."""
    if isinstance(payload, InferRequest):
        return _v2_tensor(payload, device)
    if not isinstance(payload, dict) or "instances" not in payload:
        raise InvalidInput('expected a V1 request {"instances": [...]}')
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise InvalidInput('"instances" must be a list')
    try:
        return torch.tensor(instances, dtype=torch.float32, device=device)
    except _DECODE_ERRORS as exc:
        if _decode_fault(exc):
            raise
        raise InvalidInput(f'"instances" is not a numeric array: {exc}') from exc


def _v2_tensor(request: InferRequest, device: torch.device | str) -> torch.Tensor:
    if len(request.inputs) != 1:
        raise InvalidInput(
            f"expected one input tensor, got {len(request.inputs)}: "
            "give the model class a preprocess(payload, headers) method to take several"
        )
    (tensor,) = request.inputs
    dtype = _V2_DTYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidInput(f"input {tensor.name!r}: datatype {tensor.datatype} is not supported")
    try:
        if tensor._raw_data is not None:  # binary extension: the bytes as sent
            array = tensor.as_numpy()
            return torch.from_numpy(array.copy()).to(device)
        shape = [int(n) for n in tensor.shape]
        return torch.tensor(tensor.data, dtype=dtype, device=device).reshape(shape)
    except _DECODE_ERRORS as exc:
        if _decode_fault(exc):
            raise
        raise InvalidInput(
            f"input {tensor.name!r} does not match datatype {tensor.datatype} and shape "
            f"{tensor.shape}: {exc}"
        ) from exc


def default_predict(model: Callable[[Any], Any], inputs: Any) -> Any:
    """``model(inputs)`` under ``torch.inference_mode()``."""
    with torch.inference_mode():
        return model(inputs)


def default_postprocess(outputs: Any, request: Any) -> dict[str, Any] | InferResponse:
    """V1: ``{"predictions": outputs.tolist()}``; V2 (``request`` is an `InferRequest`): an
    `InferResponse` echoing the request's id, or carrying a new one."""
    if isinstance(request, InferRequest):
        if isinstance(outputs, Mapping):
            named = list(outputs.items())
        elif isinstance(outputs, tuple | list):
            named = [(f"output-{i}", t) for i, t in enumerate(outputs)]
        else:
            named = [("output-0", outputs)]
        return InferResponse(
            response_id=request.id or str(uuid.uuid4()),
            model_name=request.model_name,
            infer_outputs=[_v2_output(name, value) for name, value in named],
        )
    if isinstance(outputs, torch.Tensor):
        return {"predictions": outputs.tolist()}
    return {"predictions": outputs}


def _v2_output(name: str, value: Any) -> InferOutput:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    output = InferOutput(name=name, shape=list(array.shape), datatype=from_np_dtype(array.dtype))
    output.set_data_from_numpy(array, binary_data=False)
    return output


#: Errors of a model class's preprocess that mean the payload is wrong (HTTP 400).
_PAYLOAD_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError)


#: Errors of predict that mean the request's inputs do not fit the model (HTTP 422)...
COMPUTE_ERRORS = (ValueError, TypeError, IndexError, KeyError, RuntimeError)
#: ...unless they are one of these, which are the server's faults whatever the input (500):
#: torch's out-of-memory and accelerator errors (an illegal memory access, a device-side
#: assert, a lost device) subclass RuntimeError, yet say the device is full or broken.
SERVER_FAULTS = (
    torch.OutOfMemoryError,
    torch.AcceleratorError,
    NotImplementedError,
    RecursionError,
    ModelCacheError,
)
#: Raised by predict as they are (kserve's InvalidInput keeps its 400).
_KEEP = (*SERVER_FAULTS, InvalidInput)


def _is_async(func: object) -> bool:
    return inspect.iscoroutinefunction(func)


class Hooks:
    """The three steps for one model class, resolved once (not per request)."""

    __slots__ = ("device", "post", "post_async", "pre", "pre_async", "pred", "pred_mode")

    def __init__(self, model_class: type, device: torch.device) -> None:
        self.device = device
        self.pre: Callable[..., Any] | None = getattr(model_class, "preprocess", None)
        self.pred: Callable[..., Any] | None = getattr(model_class, "predict", None)
        self.post: Callable[..., Any] | None = getattr(model_class, "postprocess", None)
        self.pre_async = _is_async(self.pre)
        self.post_async = _is_async(self.post)
        if _is_async(self.pred):
            self.pred_mode = "async"
        elif getattr(model_class, "predict_in_thread", False):
            self.pred_mode = "thread"
        else:
            self.pred_mode = "loop"

    async def run(self, model: Any, payload: Any, headers: Mapping[str, str] | None) -> Any:
        """preprocess -> predict -> postprocess on a leased ``model``."""
        pre = self.pre
        if pre is None:
            inputs = default_preprocess(payload, headers, device=self.device)
        else:
            try:
                if self.pre_async:
                    inputs = await pre(model, payload, headers)
                else:
                    inputs = pre(model, payload, headers)
            except _PAYLOAD_ERRORS as exc:  # preprocess decodes the payload: its fault is 400
                raise InvalidInput(f"bad request: {type(exc).__name__}: {exc}") from exc

        pred = self.pred
        try:
            if self.pred_mode == "loop":
                outputs = default_predict(model, inputs) if pred is None else pred(model, inputs)
            elif self.pred_mode == "async":
                assert pred is not None
                outputs = await pred(model, inputs)
            elif pred is None:
                outputs = await anyio.to_thread.run_sync(default_predict, model, inputs)
            else:
                outputs = await anyio.to_thread.run_sync(pred, model, inputs)
        except COMPUTE_ERRORS as exc:
            if isinstance(exc, _KEEP):
                raise
            raise RejectedInput from exc

        post = self.post
        if post is None:
            return default_postprocess(outputs, payload)
        if self.post_async:
            return await post(model, outputs, payload)
        return post(model, outputs, payload)
