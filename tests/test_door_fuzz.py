"""Schemathesis against the front door's OpenAPI document, over real HTTP to the real door (its own protocol in
front of real Ray replicas): whatever the request, no 5xx, and every response matches what the document says."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


@pytest.mark.slow
def test_no_request_makes_the_door_fail_or_answer_off_its_schema(served) -> None:  # type: ignore[no-untyped-def]
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/health", "/metrics"}
    calls = 0
    http = httpx.Client(timeout=60)
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case) -> None:  # type: ignore[no-untyped-def]
            nonlocal calls
            if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
                case.body["max_tokens"] = min(case.body["max_tokens"], 64)  # short generations: the door is the target
            # Sent with httpx (the `requests` transport trips over urllib3-future, which a dependency installs).
            kwargs = case.as_transport_kwargs(base_url=served.url)
            response = http.request(kwargs["method"], kwargs["url"], params=kwargs.get("params"),
                                    headers=kwargs.get("headers"), content=kwargs.get("data"), json=kwargs.get("json"))
            case.validate_response(response, checks=CHECKS)
            calls += 1

        check()
    http.close()
    assert calls >= 100
