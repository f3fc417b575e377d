"""Schemathesis against the live api (real Redis, a model published as ready): requests built
from the OpenAPI document itself get no 5xx, and every answer fits the shape it declares."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.gateway import start_gateway

CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]  # fmt: skip


@pytest.fixture(scope="module")
def live_api(tmp_path_factory, gpt2):
    running = start_gateway(tmp_path_factory.mktemp("openapi"), gpt2)
    yield running
    running.stop()


def test_the_api_keeps_its_openapi_promises(live_api, capsys):
    schema = schemathesis.openapi.from_url(f"{live_api.url}/openapi.json")
    headers = {"Authorization": f"Bearer {live_api.key}"}
    tried = []
    for found in schema.get_all_operations():
        operation = found.ok()
        tried.append(_exercise(operation, headers))
    with capsys.disabled():
        print("\nschemathesis: " + "; ".join(tried))
    assert len(tried) >= 10


def _exercise(operation, headers):  # type: ignore[no-untyped-def]
    calls: list[int] = []

    @given(case=operation.as_strategy())
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)  # fmt: skip
    def conforms(case):  # type: ignore[no-untyped-def]
        response = case.call(headers=headers)
        calls.append(response.status_code)
        case.validate_response(response, checks=CHECKS)

    conforms()
    return f"{operation.method.upper()} {operation.path}: {len(calls)}"
