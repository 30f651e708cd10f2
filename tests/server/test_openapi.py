"""/openapi.json: generated from the routes, it lists every route the server answers, and every request body it
documents is one the server accepts (and the other way round: a body its schema forbids is a 400); every success
body it documents is what the server sends, checked on real responses by the response models and by the document's
own schemas."""
from __future__ import annotations

import dataclasses
import json
import math
import random
from contextlib import aclosing
from typing import AsyncIterator, get_args

import httpx
import jsonschema_rs
import pytest
from pydantic import BaseModel, RootModel, ValidationError
from tests.server.conftest import FAKE_MODEL
from tests.server.fake_engine_client import FakeEngineClient, render_prompt
from tests.server.inprocess_server import InProcessServer

from minisrv.config import ServerConfig
from minisrv.server.engine_handle import OutputDelta, TokenLogprob
from minisrv.server.protocol import ChatCompletionRequest, CompletionRequest
from minisrv.server.response_schemas import (ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk,
                                             DetokenizeResponse, HealthStatus, ModelCard, ModelList, ServerVersion,
                                             TokenizeResponse)
from minisrv.server.responses_api import ResponsesRequest
from minisrv.server.sglang import SGLangGenerateRequest
from minisrv.server.sglang_schemas import GenerateAnswer, GenerateChunk, GenerateOutput, ModelInfo, ServerInfo

MODEL = FAKE_MODEL
# The success bodies the document declares, by path: (JSON body, each event when streamed).
SUCCESS_BODIES: dict[str, tuple[type[BaseModel], type[BaseModel] | None]] = {
    "/health": (HealthStatus, None), "/ping": (HealthStatus, None), "/health_generate": (HealthStatus, None),
    "/version": (ServerVersion, None),
    "/v1/models": (ModelList, None), "/v1/models/{model}": (ModelCard, None),
    "/v1/chat/completions": (ChatCompletion, ChatCompletionChunk), "/v1/completions": (Completion, CompletionChunk),
    "/tokenize": (TokenizeResponse, None), "/detokenize": (DetokenizeResponse, None),
    "/generate": (GenerateAnswer, GenerateChunk), "/get_model_info": (ModelInfo, None),
    "/get_server_info": (ServerInfo, None)}
MEDIA_TYPES = ("application/json", "text/event-stream")


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


def test_success_bodies_are_the_response_models(document) -> None:
    """Each declared success body (and each event of a stream) is its model's schema, with the fields the server
    always sends required and no others allowed; the routes that declare none document none."""
    for path, operations in document["paths"].items():
        declared = dict(zip(MEDIA_TYPES, SUCCESS_BODIES.get(path, (None, None))))
        for operation in operations.values():
            content = operation["responses"]["200"].get("content", {})
            assert set(content) == {media_type for media_type, model in declared.items() if model}, path
            for media_type, schema in content.items():
                model, properties = object_of(document, declared[media_type], schema["schema"])
                assert set(properties["properties"]) == set(model.model_fields), (path, media_type)
                assert set(properties.get("required", ())) == \
                    {name for name, field in model.model_fields.items() if field.is_required()}
                assert properties["additionalProperties"] is False


def object_of(document: dict, model: type[BaseModel], schema: dict) -> tuple[type[BaseModel], dict]:
    """The model of the object a body is made of, and its schema in the document: a root model's body is that
    object or a list of them (/generate's), each as its model describes it."""
    if not issubclass(model, RootModel):
        return model, resolve(document, schema["$ref"])
    one, many = resolve(document, schema["$ref"])["anyOf"]
    assert many["type"] == "array" and many["items"] == one
    (member, _listed) = get_args(model.model_fields["root"].annotation)
    return member, resolve(document, one["$ref"])


class PromptLogprobsEngine(FakeEngineClient):
    """The fake engine, whose first delta of each choice also carries the prompt's logprobs when they are asked
    for, as the engine sends them: one per prompt token, the first's NaN (nothing came before it)."""

    async def stream(self, inp) -> AsyncIterator[OutputDelta]:
        top = inp.params.prompt_logprobs
        async with aclosing(super().stream(inp)) as deltas:
            async for delta in deltas:
                if top is not None and delta.num_output_tokens == 1:
                    delta = dataclasses.replace(delta, prompt_logprobs=[
                        TokenLogprob(char, ord(char), math.nan if i == 0 else -0.5, char.encode(),
                                     [TokenLogprob("a", ord("a"), -1.5 - k, b"a", rank=k + 1) for k in range(top)],
                                     rank=3) for i, char in enumerate(render_prompt(inp))])
                yield delta


@pytest.fixture(scope="module")
def prompt_logprobs_server():
    with InProcessServer(PromptLogprobsEngine(MODEL)) as s:
        yield s


def conforming(document: dict, path: str, raw: bytes | str, media_type: str = "application/json") -> BaseModel:
    """`raw`, a success body (or one event's data) of `path`, as its model validates it; the document's schema for
    it must accept it too."""
    model = dict(zip(MEDIA_TYPES, SUCCESS_BODIES[path]))[media_type]
    schema = next(iter(document["paths"][path].values()))["responses"]["200"]["content"][media_type]["schema"]
    jsonschema_rs.Draft202012Validator({**schema, "components": document["components"]}).validate(json.loads(raw))
    return model.model_validate_json(raw)


def answered(server, document: dict, path: str, body: dict) -> BaseModel:
    r = httpx.post(f"{server.url}{path}", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    return conforming(document, path, r.content)


def streamed(server, document: dict, path: str, body: dict) -> list:
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.read()
        data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [conforming(document, path, event, "text/event-stream") for event in data[:-1]]


def test_chat_completions_are_their_models(prompt_logprobs_server, document) -> None:
    server, path = prompt_logprobs_server, "/v1/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "n": 2, "seed": 3,
            "logprobs": True, "top_logprobs": 2}
    whole = answered(server, document, path, {**body, "prompt_logprobs": 1})
    assert [c.index for c in whole.choices] == [0, 1] and all(c.logprobs.content for c in whole.choices)
    assert whole.prompt_logprobs[0] is None and len(whole.prompt_logprobs[1]) == 2 and whole.usage.total_tokens
    chunks = streamed(server, document, path, {**body, "stream_options": {"include_usage": True}})
    assert {c.choices[0].index for c in chunks[:-1]} == {0, 1} and all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert sum(c.choices[0].delta.role == "assistant" for c in chunks[:-1]) == 2
    assert {c.choices[0].finish_reason for c in chunks[:-1]} == {None, "length"}
    chunks = streamed(server, document, path, {**body, "logprobs": False, "top_logprobs": None,
                                               "stream_options": {"include_usage": True,
                                                                  "continuous_usage_stats": True}})
    assert all(c.usage is not None for c in chunks) and all(c.choices[0].logprobs is None for c in chunks[:-1])


def test_completions_are_their_models(prompt_logprobs_server, document) -> None:
    """Two prompts of two choices each; echoed prompts lead the logprobs, their first token without one."""
    server, path = prompt_logprobs_server, "/v1/completions"
    body = {"model": MODEL, "prompt": ["hi", "yo"], "max_tokens": 4, "n": 2, "seed": 3, "logprobs": 2, "echo": True}
    whole = answered(server, document, path, {**body, "prompt_logprobs": 1})
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert all(c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None for c in whole.choices)
    assert all(c.prompt_logprobs[0] is None and c.prompt_logprobs[1] for c in whole.choices)
    chunks = streamed(server, document, path, {**body, "stream_options": {"include_usage": True}})
    assert {c.choices[0].index for c in chunks[:-1]} == {0, 1, 2, 3} and chunks[-1].usage == whole.usage
    assert sum(c.choices[0].logprobs.token_logprobs[0] is None for c in chunks[:-1]) == 4
    assert answered(server, document, path, {"model": MODEL, "prompt": "hi", "max_tokens": 2}).choices[0].logprobs \
        is None


def test_tool_calls_and_reasoning_are_their_models(document, monkeypatch) -> None:
    import tests.server.fake_engine_client as fake
    monkeypatch.setattr(fake, "REPLY", '<think>\nThe time, then.\n</think>\n\nChecking. <tool_call>{"name": '
                                       '"get_time", "arguments": {"zone": "UTC"}}</tool_call>')
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "time?"}], "tools": [tool], "max_tokens": 200,
            "n": 2, "temperature": 0}
    path = "/v1/chat/completions"
    with InProcessServer(FakeEngineClient(MODEL), ServerConfig(reasoning_parser="qwen3")) as server:
        whole = answered(server, document, path, body)
        chunks = streamed(server, document, path, body)
    for choice in whole.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.reasoning_content.strip() == "The time, then."
        assert [call.function.name for call in choice.message.tool_calls] == ["get_time"]
    call_deltas = [call for c in chunks for call in c.choices[0].delta.tool_calls or []]
    assert {(call.id is not None, call.function.name) for call in call_deltas} == {(True, "get_time"), (False, None)}
    assert any(c.choices[0].delta.reasoning_content for c in chunks)


def test_models_tokens_and_status_are_their_models(server, document) -> None:
    for path in ("/health", "/health_generate", "/version", "/v1/models", "/ping"):
        conforming(document, path, httpx.get(f"{server.url}{path}").content)
    conforming(document, "/ping", httpx.post(f"{server.url}/ping").content)
    assert conforming(document, "/v1/models/{model}", httpx.get(f"{server.url}/v1/models/{MODEL}").content).id == MODEL
    tokens = answered(server, document, "/tokenize", {"prompt": "hello", "return_token_strs": True})
    assert tokens.count == len(tokens.tokens) == len(tokens.token_strs)
    assert answered(server, document, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).token_strs \
        is None
    assert answered(server, document, "/detokenize", {"tokens": tokens.tokens}).prompt.endswith("hello")


def test_generate_answers_are_their_models(server, document) -> None:
    """/generate from text and from token ids, one output or one per choice, with logprob triples (their text
    only when asked for), and streamed: each event is its choice's whole output so far."""
    path, sampling = "/generate", {"max_new_tokens": 3}
    one = answered(server, document, path, {"text": "hi", "sampling_params": sampling}).root
    assert isinstance(one, GenerateOutput) and one.meta_info.finish_reason.type == "length"
    assert one.meta_info.completion_tokens == len(one.output_ids) == 3 and one.meta_info.output_token_logprobs is None
    assert answered(server, document, path, {"input_ids": [104, 105], "rid": "mine", "sampling_params": sampling}
                    ).root.meta_info.id == "mine"
    logprobs = {"return_logprob": True, "top_logprobs_num": 2}
    two = answered(server, document, path, {"text": "hi", "sampling_params": {**sampling, "n": 2}, **logprobs}).root
    assert len(two) == 2 and all(len(out.meta_info.output_token_logprobs) == len(out.output_ids) for out in two)
    assert all(len(top) == 2 and text is None for out in two for top in out.meta_info.output_top_logprobs
               for *_, text in top)
    texts = answered(server, document, path, {"text": "hi", "sampling_params": sampling, **logprobs,
                                              "return_text_in_logprobs": True}).root.meta_info.output_token_logprobs
    assert all(isinstance(text, str) for *_, text in texts)
    events = streamed(server, document, path, {"text": "hi", "sampling_params": {**sampling, "n": 2}, **logprobs})
    assert all(isinstance(event, GenerateChunk) for event in events) and {e.index for e in events} == {0, 1}
    assert [e.meta_info.finish_reason is None for e in events].count(False) == 2
    assert all(len(e.meta_info.output_token_logprobs) == len(e.output_ids) for e in events)


def test_sglang_model_and_server_info_are_their_models(server, document) -> None:
    """/get_server_info's settings are typed as the config declares them; /get_model_info's sampling defaults
    are null without any, else those set."""
    info = conforming(document, "/get_server_info", httpx.get(f"{server.url}/get_server_info").content)
    assert info.served_model_name == MODEL and len(info.internal_states) == 1 and info.allowed_methods == ("*",)
    assert conforming(document, "/get_model_info", httpx.get(f"{server.url}/get_model_info").content
                      ).preferred_sampling_params is None
    with InProcessServer(FakeEngineClient(MODEL), request_defaults={"temperature": 0.6, "top_k": 20}) as defaulted:
        preferred = conforming(document, "/get_model_info", httpx.get(f"{defaulted.url}/get_model_info").content
                               ).preferred_sampling_params
    assert (preferred.temperature, preferred.top_k, preferred.top_p) == (0.6, 20, None)


def test_the_models_refuse_what_the_server_does_not_send(server, document) -> None:
    """A key the server would newly send, or one it stops sending, is a failure of the tests above."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    sent = httpx.post(f"{server.url}/v1/chat/completions", json=body).json()
    ChatCompletion.model_validate(sent)
    (choice,) = sent["choices"]
    drifted = [{**sent, "system_fingerprint": "fp"}, {**sent, "choices": [{**choice, "finish_reason": "eos"}]},
               {**sent, "choices": [{k: v for k, v in choice.items() if k != "logprobs"}]}]
    for body in drifted:
        with pytest.raises(ValidationError):
            ChatCompletion.model_validate(body)
        with pytest.raises(ValueError):
            conforming(document, "/v1/chat/completions", json.dumps(body))


def test_the_generate_model_refuses_what_the_server_does_not_send(server, document) -> None:
    sent = httpx.post(f"{server.url}/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2},
                                                      "return_logprob": True}).json()
    GenerateAnswer.model_validate_json(json.dumps(sent))   # JSON: strict, a triple is a tuple only there
    meta = sent["meta_info"]
    drifted = [{**sent, "index": 0}, [sent], {**sent, "meta_info": {**meta, "finish_reason": "length"}},
               {**sent, "meta_info": {k: v for k, v in meta.items() if k != "cached_tokens"}},
               {**sent, "meta_info": {**meta, "output_token_logprobs": [[-0.5, 7]]}}]
    for body in drifted:
        with pytest.raises(ValidationError):
            GenerateAnswer.model_validate_json(json.dumps(body))
        with pytest.raises(ValueError):
            conforming(document, "/generate", json.dumps(body))
