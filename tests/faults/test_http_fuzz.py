"""Fuzz every POST route of /openapi.json with hypothesis: bodies mixing the documented field names with random
JSON values (and random JSON, and bytes that are not JSON). Whatever arrives, the answer is never a 5xx, an
error is an OpenAI error body, and a stream ends with [DONE]. The real app on hypercorn, a fake engine behind."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.server.fake_engine_client import FakeEngineClient
from tests.server.inprocess_server import InProcessServer

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@pytest.fixture(scope="module")
def server():
    with InProcessServer(FakeEngineClient("fake-model")) as s:
        yield s


@pytest.fixture(scope="module")
def routes(server) -> dict[str, list[str]]:
    """POST path -> the field names its documented body schema(s) list."""
    document = httpx.get(f"{server.url}/openapi.json").json()
    schemas = document["components"]["schemas"]
    found = {}
    for path, operations in document["paths"].items():
        body = operations.get("post", {}).get("requestBody")
        if body is None:
            continue
        schema = body["content"]["application/json"]["schema"]
        refs = [schema] if "$ref" in schema else schema["oneOf"]
        found[path] = sorted({name for ref in refs for name in schemas[ref["$ref"].rsplit("/", 1)[1]]["properties"]})
    return found


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert response.json()["error"]["message"], response.text[:300]
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])   # the same examples every CI run
@given(data=st.data())
def test_no_body_makes_a_5xx(server, routes, data) -> None:
    path = data.draw(st.sampled_from(sorted(routes)))
    fields = routes[path]
    kind = data.draw(st.sampled_from(["documented", "random", "bytes"]))
    if kind == "documented":
        body = data.draw(st.dictionaries(st.sampled_from(fields), json_values, max_size=6))
        if data.draw(st.booleans()):   # often a valid prompt, so deeper checks run too
            body.setdefault("prompt", "hello") if "prompt" in fields else body.setdefault("text", "hi")
        content = json.dumps(body).encode()
    elif kind == "random":
        content = json.dumps(data.draw(json_values)).encode()
    else:
        content = data.draw(st.binary(max_size=200))
    response = httpx.post(f"{server.url}{path}", content=content, headers={"Content-Type": "application/json"},
                          timeout=30)
    check(response)
