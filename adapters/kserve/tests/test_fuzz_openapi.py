"""Schemathesis against the adapter's OpenAPI (KServe's FastAPI app serves one), V1 and V2.

Generated requests go to every operation of the real server (``python -m modelcache_kserve``,
the session's main server) with the path's model name drawn from the store's real models (a few
of them broken on purpose) so that they reach predict and infer, not only the 404 of an unknown
id. Rule: no request, whatever its content, gets a 500 (an unexpected error), and the server
survives them all. 501 is KServe's answer to a ``model_version`` in the path ("Model versioning
not supported yet"): a model's version here is the store's (its ETag), not a number in the URL,
so 501 Not Implemented is the right answer and is kept. A model broken in the store answers 500
naming its error, by test_server's rule (the store's content failed, not the request's).

Bounded for CI: a few examples per operation (``max_examples``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import schemathesis
from conftest import Server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.core.result import Ok

#: Models broken in the store (conftest's ``store``): a request for one answers 500 naming the
#: model's own error (test_server's rule: the store's content failed, not the request's).
BROKEN = {"corrupt", "badconfig"}
MODEL_IDS = ["m0", "m1", "m2", "huge", "no-such-model", *sorted(BROKEN)]


def test_no_request_content_makes_a_500(server: Server) -> None:
    """Any generated request to any operation, with a real model name in its path, answers
    something other than 500, and the server is still up afterwards."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # an operation the schema cannot describe
        operations.append(result.ok())
    assert any("infer" in op.path for op in operations)
    assert any("predict" in op.path for op in operations)
    statuses: Counter[int] = Counter()
    for operation in operations:

        @given(case=operation.as_strategy(), model=st.sampled_from(MODEL_IDS))
        @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
        def call(case: Any, model: str) -> None:
            if case.path_parameters and "model_name" in case.path_parameters:
                case.path_parameters["model_name"] = model
            response = case.call(timeout=30)
            statuses[response.status_code] += 1
            broken = model in BROKEN and model == case.path_parameters.get("model_name")
            assert response.status_code != 500 or (broken and model in response.text), (
                case.as_curl_command(),
                response.text[:500],
            )

        call()
        assert server.process.poll() is None
    assert statuses[200] > 0  # the generated requests reached real models
