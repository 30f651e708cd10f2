"""/openapi.json: generated from the routes, it lists every route the server answers, and every request body it
documents is one the server accepts (and the other way round: a body its schema forbids is a 400)."""
from __future__ import annotations

import json
import random

import httpx
import pytest
from tests.server.conftest import FAKE_MODEL

from minisrv.server.protocol import ChatCompletionRequest, CompletionRequest
from minisrv.server.responses_api import ResponsesRequest
from minisrv.server.sglang import SGLangGenerateRequest

MODEL = FAKE_MODEL


@pytest.fixture(scope="module")
def server(fake_server):
    return fake_server


@pytest.fixture(scope="module")
def document(server) -> dict:
    r = httpx.get(f"{server.url}/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    return r.json()


def resolve(document: dict, ref: str) -> dict:
    assert ref.startswith("#/components/schemas/"), ref
    return document["components"]["schemas"][ref.rsplit("/", 1)[1]]


def test_every_route_is_documented_with_its_methods(server, document) -> None:
    assert document["openapi"].startswith("3.1") and document["info"]["title"] == "minisrv"
    paths = document["paths"]
    expected = {"/health": {"get"}, "/ping": {"get", "post"}, "/health_generate": {"get"}, "/version": {"get"},
                "/metrics": {"get"},
                "/openapi.json": {"get"}, "/v1/models": {"get"}, "/v1/models/{model}": {"get"},
                "/v1/chat/completions": {"post"}, "/v1/completions": {"post"}, "/v1/responses": {"post"},
                "/v1/responses/{response_id}": {"get", "delete"}, "/v1/responses/{response_id}/cancel": {"post"},
                "/generate": {"post"}, "/flush_cache": {"get", "post"}, "/reset_prefix_cache": {"post"},
                "/get_model_info": {"get"}, "/get_server_info": {"get"},
                "/tokenize": {"post"}, "/detokenize": {"post"}, "/v1/embeddings": {"post"},
                "/v1/messages": {"post"}, "/v1/messages/count_tokens": {"post"}, "/invocations": {"post"}}
    assert {path: set(ops) for path, ops in paths.items()} == expected
    # Each documented GET path answers (not 404/405); the model card needs the served model's name. No response
    # is stored to be retrieved: that one says so.
    for path, ops in paths.items():
        if "get" in ops:
            r = httpx.get(f"{server.url}{path.replace('{model}', MODEL)}")
            if "{response_id}" in path:
                assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_stored", path
            else:
                assert r.status_code == 200, path
    assert paths["/v1/models/{model}"]["get"]["parameters"][0]["name"] == "model"
    ids = [op["operationId"] for ops in paths.values() for op in ops.values()]
    assert len(ids) == len(set(ids)) and all(op["summary"] for ops in paths.values() for op in ops.values())


@pytest.mark.parametrize("path, model", [("/v1/chat/completions", ChatCompletionRequest),
                                         ("/v1/completions", CompletionRequest),
                                         ("/v1/responses", ResponsesRequest),
                                         ("/generate", SGLangGenerateRequest)])
def test_request_bodies_are_the_pydantic_schemas(document, path: str, model: type) -> None:
    ref = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = resolve(document, ref)
    assert set(schema["properties"]) == set(model.model_fields)
    assert schema.get("additionalProperties") is False       # unknown fields are refused, as documented
    error = document["paths"][path]["post"]["responses"]["4XX"]["content"]["application/json"]["schema"]
    assert set(resolve(document, error["$ref"])["properties"]) == {"error"}


def test_a_body_of_two_shapes_is_one_of_both(document) -> None:
    schema = document["paths"]["/tokenize"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in schema["oneOf"]} == {"TokenizeCompletionRequest",
                                                                           "TokenizeChatRequest"}


def test_documented_fields_are_accepted_and_undocumented_ones_refused(server, document) -> None:
    """Every documented field of the completions body, sent alone with a valid value where its schema says
    little, is never refused as unknown; a field the document does not list is a 400 naming it."""
    ref = document["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    properties = resolve(document, ref)["properties"]
    for name in properties:
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2, name: None}
                       if name not in ("prompt", "max_tokens") else {"prompt": "hi", "max_tokens": 2})
        assert r.status_code != 500 and "does not support this field" not in r.text, name
    unknown = "".join(random.Random(1).choices("abcdefgh", k=12))
    r = httpx.post(f"{server.url}/v1/completions", content=json.dumps({"prompt": "hi", unknown: 1}),
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == unknown
