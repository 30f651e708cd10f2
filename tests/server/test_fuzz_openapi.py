"""Schemathesis fuzzes every operation of /openapi.json against the real app (FakeEngineClient behind it): neither
the requests the document describes nor the invalid ones schemathesis derives from it may get a 5xx, and every
refusal is an OpenAI-style error body (Anthropic's on the Messages routes). Bounded: a few dozen examples per operation, so CI spends seconds here, and
derandomized, so CI sees the same examples each run (random runs found a JSON schema with an integer beyond 64
bits that llguidance refuses, once a 500, now a 400: tests/test_structured_output.py)."""
from __future__ import annotations

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

EXAMPLES_PER_OPERATION = 30


def test_no_operation_answers_5xx(fake_server) -> None:
    schema = schemathesis.openapi.from_dict(httpx.get(f"{fake_server.url}/openapi.json").json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10   # every route of the app is in the document
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def check(case) -> None:
                response = case.call(base_url=fake_server.url, timeout=30)
                assert response.status_code < 500, \
                    f"{case.method} {case.path} {case.body!r}: {response.status_code} {response.text}"
                if response.status_code >= 400 and case.path.startswith("/v1/messages"):   # Anthropic's shape
                    body = response.json()
                    assert body["type"] == "error" and set(body["error"]) == {"type", "message"} and \
                        body["error"]["message"]
                elif response.status_code >= 400:
                    error = response.json()["error"]
                    assert set(error) >= {"message", "type", "param", "code"} and error["message"]

            try:
                check()
            except Unsatisfiable:   # nothing to make invalid: an operation with no body and no parameters
                assert mode is GenerationMode.NEGATIVE and "requestBody" not in operation.definition.raw
