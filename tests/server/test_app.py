"""The HTTP app on real hypercorn + uvloop, in-process, with a fake engine client: shapes, streaming, errors."""
from __future__ import annotations

import itertools
import json
import logging
import random
import re
import time

import httpx
import openai
import pytest
from tests.server.fake_engine_client import MAX_MODEL_LEN, REPLY, VOCAB_SIZE, FakeEngineClient
from tests.server.conftest import FAKE_MODEL
from tests.server.inprocess_server import InProcessServer

from minisrv.config import EngineConfig, ServerConfig
from minisrv.wire.terms import REQUEST_HISTOGRAMS
from minisrv.server.app import MAX_BODY_BYTES

GREEDY = {"temperature": 0}
MODEL = FAKE_MODEL


@pytest.fixture(scope="module")
def server(fake_server):
    return fake_server


@pytest.fixture(scope="module")
def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_health_and_models(server) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    assert httpx.get(f"{server.url}/v1/models/{MODEL}").json()["id"] == MODEL
    assert_error(httpx.get(f"{server.url}/v1/models/other"), 404, "model")


def test_several_served_names_are_each_the_model() -> None:
    with InProcessServer(FakeEngineClient("first"), ServerConfig(served_model_name=("first", "alias"))) as s:
        assert [m["id"] for m in httpx.get(f"{s.url}/v1/models").json()["data"]] == ["first", "alias"]
        assert httpx.get(f"{s.url}/v1/models/alias").json()["id"] == "alias"
        body = {"model": "alias", "prompt": "x", "max_tokens": 2}
        assert httpx.post(f"{s.url}/v1/completions", json=body).json()["model"] == "first"   # the first name
        error = assert_error(httpx.post(f"{s.url}/v1/completions", json={**body, "model": "other"}), 404, "model")
        assert "'first' or 'alias'" in error["message"]


def test_flush_cache_and_reset_prefix_cache_flush_the_engine_and_need_the_key() -> None:
    client = FakeEngineClient(MODEL)
    with InProcessServer(client, ServerConfig(api_key="k")) as s:
        auth = {"Authorization": "Bearer k"}
        for method, path in (("GET", "/flush_cache"), ("POST", "/flush_cache"), ("POST", "/reset_prefix_cache")):
            assert_error(httpx.request(method, f"{s.url}{path}"), 401)
            r = httpx.request(method, f"{s.url}{path}", headers=auth)
            assert r.status_code == 200, r.text
        assert r.text == "" and client.flushes == 3
        assert httpx.get(f"{s.url}/flush_cache", headers=auth).text == "Cache flushed.\n"   # SGLang's answer
        client.ready = False
        assert_error(httpx.post(f"{s.url}/flush_cache", headers=auth), 503)


def test_a_page_of_another_origin_cannot_flush_the_cache() -> None:
    """The flush routes take no body, so no Content-Type check keeps a page from sending them cross-site (a
    form's POST, an image's GET): a browser's request from another origin is a 403 unless that origin is allowed."""
    client = FakeEngineClient(MODEL)
    config = ServerConfig(allowed_origins=("https://app.example",))
    with InProcessServer(client, config) as s:
        host = s.url.split("://", 1)[1]
        routes = (("GET", "/flush_cache"), ("POST", "/flush_cache"), ("POST", "/reset_prefix_cache"))
        for (method, path), headers in itertools.product(routes, (
                {"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                {"Sec-Fetch-Site": "same-site"})):
            error = assert_error(httpx.request(method, f"{s.url}{path}", headers=headers), 403)
            assert error["code"] == "cross_site_request" and "--allowed-origins" in error["message"]
        assert client.flushes == 0
        for (method, path), headers in itertools.product(routes, (
                {}, {"Origin": "https://app.example"}, {"Origin": f"http://{host}"}, {"Sec-Fetch-Site": "same-origin"},
                {"Sec-Fetch-Site": "none"})):
            assert httpx.request(method, f"{s.url}{path}", headers=headers).status_code == 200
        assert client.flushes == 15


def test_sglang_model_and_server_info() -> None:
    config = ServerConfig(api_key="secret-key", engine=EngineConfig(model="org/model", tp_size=2))
    with InProcessServer(FakeEngineClient(MODEL), config, request_defaults={"temperature": 0.6}) as s:
        auth = {"Authorization": "Bearer secret-key"}
        model = httpx.get(f"{s.url}/get_model_info", headers=auth).json()
        assert (model["model_path"], model["is_generation"], model["preferred_sampling_params"]) == \
            ("org/model", True, {"temperature": 0.6})
        r = httpx.get(f"{s.url}/get_server_info", headers=auth)
        info = r.json()
        assert (info["model_path"], info["tp_size"], info["dp_size"], info["context_length"]) == \
            ("org/model", 2, 1, MAX_MODEL_LEN)
        assert info["internal_states"][0]["num_running"] == 0 and info["version"]
        assert "secret-key" not in r.text and "api_key" not in info
        assert_error(httpx.get(f"{s.url}/get_server_info"), 401)


def test_health_503_while_not_ready_or_dead(server) -> None:
    client = server.client
    try:
        client.ready = False
        assert_error(httpx.get(f"{server.url}/health"), 503)
        assert_error(httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}), 503)
        client.ready, client.dead_worker = True, "tokenizer-0"
        assert "tokenizer-0" in assert_error(httpx.get(f"{server.url}/health"), 503)["message"]
    finally:
        client.ready, client.dead_worker = True, None


def test_chat_whole_response(server, sdk) -> None:
    out = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=200,
                                      **GREEDY)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion" and out.model == MODEL
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == REPLY
    assert out.choices[0].finish_reason == "stop"
    prompt_len = len("<user>hi\n")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_len, len(REPLY))
    assert out.usage.total_tokens == prompt_len + len(REPLY)
    assert out.usage.prompt_tokens_details.cached_tokens == 0
    assert server.client.inputs[-1].params.max_tokens == 200
    # Without max_tokens the app asks for "up to the context length".
    sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert server.client.inputs[-1].params.max_tokens is None


def test_chat_streaming_matches_whole(sdk) -> None:
    rng = random.Random(3)
    for _ in range(3):
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": f"q{rng.randint(0, 999)}"}],
                      max_tokens=rng.randint(1, 70), seed=rng.randint(0, 1000), n=rng.randint(1, 3))
        whole = sdk.chat.completions.create(**kwargs)
        chunks = list(sdk.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        texts: dict[int, str] = {}
        reasons: dict[int, str] = {}
        for chunk in chunks[:-1]:
            assert chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id and chunk.usage is None
            (choice,) = chunk.choices
            if choice.index not in texts:
                assert choice.delta.role == "assistant"   # the first delta of each choice carries the role
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
        assert texts == {c.index: c.message.content for c in whole.choices}
        assert reasons == {c.index: c.finish_reason for c in whole.choices}
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_auto_tool_calls_stream_their_arguments_and_match_the_whole_response(sdk, monkeypatch) -> None:
    """A Hermes call in the output goes through the SSE path as it is written: content up to the tag, then the
    call's name, then its arguments in pieces, reassembling to the unstreamed response."""
    import tests.server.fake_engine_client as fake
    monkeypatch.setattr(fake, "REPLY", 'Let me see. <tool_call>\n{"name": "get_time", "arguments": '
                                       '{"zone": "UTC", "dst": false}}\n</tool_call>')
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "time?"}], tools=[tool], max_tokens=200,
                  **GREEDY)
    whole = sdk.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Let me see. "
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls] == \
        [("get_time", {"zone": "UTC", "dst": False})]
    content, calls, pieces, finish = "", {}, 0, None
    for chunk in sdk.chat.completions.create(stream=True, **kwargs):
        (choice,) = chunk.choices
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            assert content == "Let me see. "   # no call before the content that precedes it
            entry = calls.setdefault(call.index, {"name": call.function.name, "arguments": ""})
            entry["arguments"] += call.function.arguments or ""
            pieces += 1
        finish = choice.finish_reason or finish
    assert (content, finish) == (whole.message.content, "tool_calls") and pieces > 5
    assert [(e["name"], e["arguments"]) for _, e in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_chat_echo_starts_the_answer_with_the_assistant_message_it_continues(sdk) -> None:
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well,"}],
                  max_tokens=5, extra_body={"echo": True, "continue_final_message": True,
                                            "add_generation_prompt": False}, **GREEDY)
    whole = sdk.chat.completions.create(**kwargs).choices[0].message.content
    assert whole == "Well," + REPLY[:5]
    assert "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(stream=True, **kwargs)
                   if c.choices) == whole
    after_a_user = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Well,"}],
                                               max_tokens=5, extra_body={"echo": True}, **GREEDY)
    assert after_a_user.choices[0].message.content == REPLY[:5]   # only an assistant's message is echoed


def test_return_tokens_as_token_ids_names_logprob_tokens_by_id(sdk) -> None:
    """The fake's token id is the character's code point."""
    chat = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       logprobs=True, top_logprobs=1, extra_body={"return_tokens_as_token_ids": True},
                                       **GREEDY)
    assert [t.token for t in chat.choices[0].logprobs.content] == [f"token_id:{ord(c)}" for c in REPLY[:3]]
    assert all(t.top_logprobs[0].token.startswith("token_id:") for t in chat.choices[0].logprobs.content)
    for stream in (False, True):
        out = sdk.completions.create(model=MODEL, prompt="x", max_tokens=3, logprobs=1, stream=stream,
                                     extra_body={"return_tokens_as_token_ids": True}, **GREEDY)
        tokens = [t for c in (out if stream else [out]) for t in (c.choices[0].logprobs.tokens if c.choices and
                                                                  c.choices[0].logprobs else [])]
        assert tokens == [f"token_id:{ord(c)}" for c in REPLY[:3]], stream


def test_chat_logprobs(sdk) -> None:
    out = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                      logprobs=True, top_logprobs=3, **GREEDY)
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == list(REPLY[:4])
    assert all(len(c.top_logprobs) == 3 and c.bytes == list(c.token.encode()) for c in content)
    assert sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=2).choices[0].logprobs is None


def test_completions_several_prompts_and_n(sdk) -> None:
    out = sdk.completions.create(model=MODEL, prompt=["ab", "hij"], n=2, max_tokens=5, seed=11)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert all(len(c.text) == 5 and c.finish_reason == "length" for c in out.choices)
    assert out.choices[0].text != out.choices[1].text   # different choices sample differently
    assert out.usage.prompt_tokens == 2 + 3 and out.usage.completion_tokens == 20
    streamed = list(sdk.completions.create(model=MODEL, prompt=["ab", "hij"], n=2, max_tokens=5, seed=11,
                                           stream=True))
    texts: dict[int, str] = {}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in out.choices}


def test_invocations_answers_a_chat_body_as_chat_and_a_prompt_as_completions(server, sdk) -> None:
    """SageMaker's /invocations, as vLLM routes it: by the body's shape."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "seed": 3}
    completion = {"model": MODEL, "prompt": "ab", "max_tokens": 5, "seed": 3}
    for body, path, kind in ((chat, "/v1/chat/completions", "chat.completion"),
                             (completion, "/v1/completions", "text_completion")):
        invoked = httpx.post(f"{server.url}/invocations", json=body).json()
        direct = httpx.post(f"{server.url}{path}", json=body).json()
        assert invoked["object"] == direct["object"] == kind
        assert invoked["choices"] == direct["choices"] and invoked["usage"] == direct["usage"]
    streamed = sse_events(httpx.post(f"{server.url}/invocations", json={**completion, "stream": True}))
    assert streamed[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in streamed[:-1]) == \
        httpx.post(f"{server.url}/v1/completions", json=completion).json()["choices"][0]["text"]


def test_completions_logprobs_and_echo(sdk) -> None:
    out = sdk.completions.create(model=MODEL, prompt="p", max_tokens=3, logprobs=2, **GREEDY)
    lp = out.choices[0].logprobs
    assert lp.tokens == list(REPLY[:3]) and lp.text_offset == [0, 1, 2] and len(lp.top_logprobs[0]) == 2
    assert sdk.completions.create(model=MODEL, prompt="pre", max_tokens=3, echo=True, **GREEDY).choices[0].text \
        == "pre" + REPLY[:3]


def test_stop_strings_and_finish_reasons(sdk) -> None:
    cut = REPLY.index("world")
    out = sdk.completions.create(model=MODEL, prompt="x", max_tokens=100, stop=["world", "zzz"], **GREEDY)
    assert out.choices[0].text == REPLY[:cut] and out.choices[0].finish_reason == "stop"
    out = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                      stop="world", **GREEDY)
    assert out.choices[0].finish_reason == "length"


def test_generate_endpoint(server) -> None:
    r = httpx.post(f"{server.url}/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 4,
                                                                                   "temperature": 0}})
    body = r.json()
    assert body["text"] == REPLY[:4] and body["output_ids"] == [ord(c) for c in REPLY[:4]]
    assert body["meta_info"]["finish_reason"] == {"type": "length"} and body["meta_info"]["prompt_tokens"] == 2
    with httpx.stream("POST", f"{server.url}/generate", json={"input_ids": [104, 105], "stream": True,
                                                              "sampling_params": {"max_new_tokens": 4,
                                                                                  "temperature": 0}}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["text"] == REPLY[:4]   # SGLang streams the text so far
    two = httpx.post(f"{server.url}/generate", json={"text": "hi", "sampling_params": {"n": 2}}).json()
    assert isinstance(two, list) and len(two) == 2


def test_sse_framing(server) -> None:
    body = {"prompt": "x", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    frames = raw.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    assert all(f.startswith("data: {") for f in frames[:-2])
    usage = json.loads(frames[-3][len("data: "):])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("method, path, body, status, param", [
    ("POST", "/v1/chat/completions", b"{not json", 400, None),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}', 400, None),
    ("POST", "/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}', 404,
     "model"),
    ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 300}', 400, "prompt"),   # longer than the context
    ("POST", "/v1/completions", json.dumps({"prompt": [1, VOCAB_SIZE]}).encode(), 400, "prompt"),
    ("POST", "/v1/completions", b'{"prompt": "x", "stream_options": {"include_usage": true}}', 400, "stream_options"),
    ("GET", "/v1/chat/completions", b"", 405, None),
    ("PUT", "/v1/models", b"", 405, None),
    ("GET", "/v1/nothing", b"", 404, None),
    ("POST", "/generate", b'{"text": 5}', 400, "text"),
    ("POST", "/invocations", b'{"input": "x"}', 400, "messages"),
    ("POST", "/invocations", b'[1, 2]', 400, None),
    ("POST", "/invocations", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ("POST", "/invocations", b'{"messages": []}', 400, "messages"),
])
def test_error_bodies(server, method: str, path: str, body: bytes, status: int, param: str | None) -> None:
    response = httpx.request(method, f"{server.url}{path}", content=body, headers={"Content-Type": "application/json"})
    assert_error(response, status, param)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_bodies_not_sent_as_json_are_415(server, content_type: str | None) -> None:
    """A page of another origin may send these types without asking the server first (a CORS simple request)."""
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps({"prompt": "x", "max_tokens": 2}).encode()
    for path in ("/v1/completions", "/v1/chat/completions", "/generate"):
        r = httpx.post(f"{server.url}{path}", content=body, headers=headers)
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    ok = httpx.post(f"{server.url}/v1/completions", content=body,
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_harmless_client_fields_are_accepted_and_ignored(server, sdk, caplog) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **GREEDY}
    extras = {"store": False, "metadata": {"k": "v"}, "service_tier": "auto", "parallel_tool_calls": True,
              "user": "u1", "reasoning_effort": "low", "modalities": ["text"]}
    plain = httpx.post(f"{server.url}/v1/chat/completions", json=body).json()
    with caplog.at_level("WARNING", logger="minisrv.server.app"):
        for _ in range(2):
            out = httpx.post(f"{server.url}/v1/chat/completions", json={**body, **extras}).json()
            assert out["choices"][0]["message"] == plain["choices"][0]["message"]
    logged = [r.getMessage() for r in caplog.records if "accepted and ignored" in r.getMessage()]
    assert sorted(m.split("'")[1] for m in logged) == sorted(extras)   # each name once, over two requests
    # Malformed ignored fields and fields that would change the meaning are still a 400 naming them.
    for bad, param in (({"store": "yes"}, "store"), ({"modalities": ["audio"]}, "modalities.0"),
                       ({"tools": [{"type": "function"}]}, "tools.0.function"),
                       ({"logit_bias": {"5": 101}}, "logit_bias")):
        assert_error(httpx.post(f"{server.url}/v1/chat/completions", json={**body, **bad}), 400, param)
    completion = sdk.completions.create(model=MODEL, prompt="x", max_tokens=2, user="u", extra_body={"store": True})
    assert completion.choices[0].text


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(server) -> None:
    body = {"prompt": "hello", "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    content = [e for e in events if e["choices"]]
    assert [e["usage"]["completion_tokens"] for e in content] == list(range(1, len(content) + 1))
    assert all(e["usage"]["total_tokens"] == e["usage"]["prompt_tokens"] + e["usage"]["completion_tokens"]
               for e in events)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == len(content)
    body["stream_options"] = {"continuous_usage_stats": True}   # as vLLM: only with include_usage
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events and not any(e.get("usage") for e in events)


def test_streaming_refusal_keeps_its_status(server) -> None:
    with httpx.stream("POST", f"{server.url}/v1/completions",
                      json={"prompt": "x", "max_tokens": 500, "stream": True}) as r:
        r.read()
        assert_error(r, 400, "prompt")


def test_body_too_large(server) -> None:
    r = httpx.post(f"{server.url}/v1/completions", content=b" " * (MAX_BODY_BYTES + 1),
                   headers={"Content-Type": "application/json"})
    assert_error(r, 413)
    assert r.headers["connection"] == "close"


def raw_exchange(server, head: bytes, body: bytes = b"", shut_write: bool = False, timeout: float = 5.0) -> bytes:
    """Send bytes on a plain socket and read what comes back until the server closes or the timeout."""
    import socket

    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head + body)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
        return received


def test_an_announced_oversized_body_is_refused_before_it_is_sent(server) -> None:
    """Content-Length alone decides: the 413 comes back at once, with Connection: close, though no body came."""
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n").encode()
    start = time.monotonic()
    reply = raw_exchange(server, head)
    assert reply.startswith(b"HTTP/1.1 413") and b"connection: close" in reply.lower()
    assert time.monotonic() - start < 4.0   # answered and closed, not waiting for 32 MB


@pytest.mark.parametrize("head, status_line", [
    (b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"HTTP/1.1 200 OK\r\n"),
    (b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"HTTP/1.1 404 Not Found\r\n"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
     b"Connection: close\r\n\r\n{}", b"HTTP/1.1 400 Bad Request\r\n"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
     b"HTTP/1.1 415 Unsupported Media Type\r\n"),
])
def test_status_lines_carry_the_standard_reason_phrase(server, head: bytes, status_line: bytes) -> None:
    assert raw_exchange(server, head).startswith(status_line)


def test_a_body_sent_too_slowly_is_a_408_and_the_connection_closes() -> None:
    config = ServerConfig(body_read_timeout=0.5)
    with InProcessServer(FakeEngineClient(MODEL), config) as s:
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n")
        start = time.monotonic()
        reply = raw_exchange(s, head, b'{"prompt": "half', timeout=5.0)
        assert reply.startswith(b"HTTP/1.1 408") and b"connection: close" in reply.lower()
        assert b"--body-read-timeout" in reply and time.monotonic() - start < 3.0


def test_access_log_is_off_by_default_and_never_holds_a_body(caplog) -> None:
    secret = "my very private prompt"
    for enabled in (False, True):
        with InProcessServer(FakeEngineClient(MODEL), ServerConfig(enable_access_log=enabled)) as s:
            with caplog.at_level("INFO", logger="minisrv.access"):
                caplog.clear()
                httpx.post(f"{s.url}/v1/completions", json={"prompt": secret, "max_tokens": 2})
                time.sleep(0.1)
            lines = [r.getMessage() for r in caplog.records if r.name == "minisrv.access"]
            assert bool(lines) == enabled and not any(secret in line for line in lines)
            if enabled:
                assert "POST /v1/completions" in lines[0] and " 200 " in lines[0]


def test_a_client_that_drops_its_upload_is_one_quiet_line(server, caplog) -> None:
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")
    with caplog.at_level("DEBUG"):
        for _ in range(5):
            raw_exchange(server, head, b'{"prompt": "hal', shut_write=True, timeout=2.0)
        time.sleep(0.3)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_sdk_raises_typed_errors(sdk) -> None:
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=-1)


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_the_request(server, stream: bool) -> None:
    client = server.client
    client.step_delay = 0.05   # ~3 s for the whole reply: the client leaves long before
    aborted_before = len(client.aborted)
    try:
        body = {"prompt": "x", "max_tokens": 60, "stream": stream}
        if stream:   # read a few events, then hang up
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                assert next(lines) == ""
        else:        # give up waiting for the whole response
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.3)
        assert wait_for(lambda: len(client.aborted) == aborted_before + 1 and not client.running)
    finally:
        client.step_delay = 0.0


def test_metrics(server, sdk) -> None:
    sdk.completions.create(model=MODEL, prompt="abc", max_tokens=4)
    text = httpx.get(f"{server.url}/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and line.startswith("minisrv:"):
            name, value = line.rsplit(" ", 1)
            assert f'model_name="{MODEL}"' in name, line   # every series, as vLLM labels them
            samples[re.sub(r',?model_name="[^"]*"', "", name).replace("{}", "")] = float(value)
    for name in ("minisrv:num_requests_running", "minisrv:num_requests_waiting", "minisrv:kv_cache_usage_perc"):
        assert name in samples
    assert samples["minisrv:prefix_cache_queries_total"] == 7 and samples["minisrv:prefix_cache_hits_total"] == 3
    # Everything else is the scheduler's, as published: the fake's fixed values, rendered as Prometheus wants.
    assert samples["minisrv:prompt_tokens_total"] == 11 and samples["minisrv:generation_tokens_total"] == 13
    assert samples['minisrv:request_success_total{finished_reason="stop"}'] == 2
    assert samples['minisrv:request_success_total{finished_reason="length"}'] == 1
    start = 0
    for index, spec in enumerate(REQUEST_HISTOGRAMS):
        counts = list(range(start, start + len(spec.buckets) + 1))
        start += len(counts)
        name = f"minisrv:{spec.name}"
        assert samples[f"{name}_count"] == sum(counts) and samples[f"{name}_sum"] == 0.5 * index
        assert samples[f'{name}_bucket{{le="{spec.buckets[0]}"}}'] == counts[0]
        assert samples[f'{name}_bucket{{le="+Inf"}}'] == sum(counts)


def test_metrics_prefix_vllm_gives_vllms_names() -> None:
    with InProcessServer(FakeEngineClient(MODEL), ServerConfig(metrics_prefix="vllm")) as s:
        names = {line.split("{")[0] for line in httpx.get(f"{s.url}/metrics").text.splitlines()
                 if line and not line.startswith("#")}
    assert {"vllm:num_requests_running", "vllm:request_success_total", "vllm:time_to_first_token_seconds_bucket",
            "vllm:e2e_request_latency_seconds_count", "vllm:generation_tokens_total"} <= names
    assert not [n for n in names if n.startswith("minisrv:")]


def test_auto_tool_choice_can_be_turned_off_as_vllm_has_it() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "tools": [tool]}
    with InProcessServer(FakeEngineClient(MODEL), ServerConfig(enable_auto_tool_choice=False)) as s:
        url = f"{s.url}/v1/chat/completions"
        assert "--enable-auto-tool-choice" in assert_error(httpx.post(url, json=body), 400, "tool_choice")["message"]
        assert httpx.post(url, json={**body, "tool_choice": "required"}).status_code == 200
        assert httpx.post(url, json={**body, "tool_choice": "none"}).status_code == 200


def test_reasoning_parser_splits_thinking_from_the_answer_and_its_tool_calls(monkeypatch) -> None:
    import tests.server.fake_engine_client as fake
    monkeypatch.setattr(fake, "REPLY", '<think>\nThe user wants the time.\n</think>\n\nChecking. <tool_call>{"name": '
                                       '"get_time", "arguments": {"zone": "UTC"}}</tool_call>')
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    with InProcessServer(FakeEngineClient(MODEL), ServerConfig(reasoning_parser="qwen3")) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "time?"}], tools=[tool], max_tokens=200,
                      **GREEDY)
        whole = client.chat.completions.create(**kwargs).choices[0]
        assert whole.message.reasoning_content == "\nThe user wants the time.\n"
        assert whole.message.content == "Checking. " and whole.finish_reason == "tool_calls"
        assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == \
            [("get_time", '{"zone": "UTC"}')]
        reasoning, content, arguments, order = "", "", "", []
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            delta = chunk.choices[0].delta
            for kind, text in (("reasoning", getattr(delta, "reasoning_content", None)), ("content", delta.content)):
                if text:
                    order.append(kind)
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
            arguments += "".join(c.function.arguments or "" for c in delta.tool_calls or [])
        assert (reasoning, content, arguments) == (whole.message.reasoning_content, "Checking. ", '{"zone": "UTC"}')
        assert order == sorted(order, key=["reasoning", "content"].index)   # all the thinking first
        plain = client.chat.completions.create(**{**kwargs, "tool_choice": "required"}).choices[0].message
        assert plain.model_extra.get("reasoning_content") is None   # a grammar from the first token: no thinking


def test_request_defaults_fill_only_the_options_a_request_leaves_out() -> None:
    client = FakeEngineClient(MODEL)
    with InProcessServer(client, ServerConfig(), request_defaults={"temperature": 0.6, "top_k": 20}) as s:
        sdk = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
        assert (client.inputs[-1].params.temperature, client.inputs[-1].params.top_k) == (0.6, 20)
        sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
        assert (client.inputs[-1].params.temperature, client.inputs[-1].params.top_k) == (0.0, 20)
        sdk.completions.create(model=MODEL, prompt="x", max_tokens=3, extra_body={"top_k": 5})
        assert (client.inputs[-1].params.temperature, client.inputs[-1].params.top_k) == (0.6, 5)
        assert client.inputs[-1].params.max_tokens == 3
        httpx.post(f"{s.url}/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 2}})
        assert (client.inputs[-1].params.temperature, client.inputs[-1].params.max_tokens) == (0.6, 2)


def test_request_id_names_the_response_and_only_priority_zero_is_accepted_first_come_first_served(server) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(f"{server.url}/v1/chat/completions", json={**chat, "request_id": "trace-7"}).json()["id"] \
        == "chatcmpl-trace-7"
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                   headers={"X-Request-Id": "from-header"})
    assert r.json()["id"] == "cmpl-from-header"
    assert httpx.post(f"{server.url}/v1/chat/completions", json={**chat, "priority": 0}).status_code == 200
    assert_error(httpx.post(f"{server.url}/v1/chat/completions", json={**chat, "priority": 3}), 400, "priority")
    assert_error(httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, "input": "hi", "priority": 3}), 400,
                 "priority")
    assert_error(httpx.post(f"{server.url}/v1/chat/completions", json={**chat, "request_id": "x" * 300}), 400,
                 "request_id")


def test_priority_reaches_the_engine_under_the_priority_policy() -> None:
    client = FakeEngineClient(MODEL)
    config = ServerConfig(engine=EngineConfig(scheduling_policy="priority"))
    with InProcessServer(client, config) as s:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(f"{s.url}/v1/chat/completions", json={**chat, "priority": -5}).status_code == 200
        assert client.inputs[-1].priority == -5
        assert httpx.post(f"{s.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2,
                                                          "priority": 7}).status_code == 200
        assert client.inputs[-1].priority == 7
        assert_error(httpx.post(f"{s.url}/v1/chat/completions", json={**chat, "priority": 2**31}), 400, "priority")
        assert httpx.post(f"{s.url}/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 2,
                                                        "priority": 3}).status_code == 200
        assert client.inputs[-1].priority == 3


def test_api_key() -> None:
    key = "s3cret-ключ"
    with InProcessServer(FakeEngineClient(MODEL), ServerConfig(api_key=key)) as s:
        url = f"{s.url}/v1/completions"
        body = {"prompt": "x", "max_tokens": 2}
        assert_error(httpx.post(url, json=body), 401)
        assert_error(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(httpx.get(f"{s.url}/v1/models", headers={"Authorization": f"Basic {key}".encode()}), 401)
        ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}".encode()})
        assert ok.status_code == 200
        assert httpx.get(f"{s.url}/health").status_code == 200   # probes need no key
        sdk = openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            sdk.models.list()


def test_sse_timestamps_precede_each_chunk_as_comments_clients_ignore(server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 6,
            "stream_options": {"include_usage": True}}
    with InProcessServer(FakeEngineClient(MODEL), ServerConfig(sse_timestamps=True)) as s:
        before = time.monotonic_ns()
        lines = httpx.post(f"{s.url}/v1/chat/completions", json=body).text.split("\n")
        after = time.monotonic_ns()
        stamps = [int(line.split()[-1]) for line in lines if line.startswith(": emitted ")]
        events = [line for line in lines if line.startswith("data: ")]
        # Every content chunk has its stamp just before it; the usage event and [DONE] have none.
        assert len(stamps) == 6 and len(events) == 6 + 2
        assert all(lines[lines.index(f": emitted {t}") + 1].startswith("data: {") for t in stamps)
        assert before < stamps[0] <= stamps[-1] < after and stamps == sorted(stamps)
        sdk = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        chunks = list(sdk.chat.completions.create(**{k: v for k, v in body.items() if k != "stream"}, stream=True))
        content = [json.loads(e[len("data: "):])["choices"] for e in events[:-1]]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(
            c[0]["delta"].get("content") or "" for c in content if c)
    assert ": emitted" not in httpx.post(f"{server.url}/v1/chat/completions", json=body).text   # off by default


def test_cors_is_off_by_default_and_follows_the_allowed_origins(server) -> None:
    origin = {"Origin": "https://app.example"}
    r = httpx.get(f"{server.url}/v1/models", headers=origin)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    config = ServerConfig(allowed_origins=("https://app.example",), allowed_methods=("GET", "POST"))
    with InProcessServer(FakeEngineClient(MODEL), config) as s:
        preflight = httpx.options(f"{s.url}/v1/chat/completions", headers={
            **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        other = httpx.options(f"{s.url}/v1/chat/completions", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        r = httpx.get(f"{s.url}/v1/models", headers=origin)
        assert r.headers["access-control-allow-origin"] == "https://app.example"


def test_embeddings_are_a_404_that_says_why(server) -> None:
    r = httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": "hello"})
    error = assert_error(r, 404)
    assert error["code"] == "embeddings_not_supported" and "/v1/embeddings is not served" in error["message"]


def test_version_and_ping(server) -> None:
    import importlib.metadata

    assert httpx.get(f"{server.url}/version").json() == {"version": importlib.metadata.version("minisrv")}
    assert httpx.get(f"{server.url}/ping").json() == httpx.post(f"{server.url}/ping").json() == {"status": "ok"}


def test_models_are_a_503_until_the_engine_is_ready() -> None:
    client = FakeEngineClient(MODEL)
    with InProcessServer(client) as s:
        client.ready = False
        for path in ("/v1/models", f"/v1/models/{MODEL}"):
            r = httpx.get(f"{s.url}{path}")
            assert r.status_code == 503 and r.json()["error"]["message"], path
        client.ready = True
        assert httpx.get(f"{s.url}/v1/models").json()["data"][0]["id"] == MODEL


def test_health_generate_runs_one_token_and_reports_an_unresponsive_worker(server) -> None:
    assert httpx.get(f"{server.url}/health_generate").json() == {"status": "ok"}
    server.client.unresponsive_worker = "scheduler (pid 1) has sent no heartbeat for 12 s"
    try:
        for path in ("/health", "/health_generate"):
            r = httpx.get(f"{server.url}{path}")
            assert r.status_code == 503 and "no heartbeat" in r.json()["error"]["message"], path
    finally:
        server.client.unresponsive_worker = None
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_https_with_a_certificate_and_key(tmp_path) -> None:
    """--ssl-certfile and --ssl-keyfile: the API over TLS, checked against the issuing CA."""
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    config = ServerConfig(ssl_certfile=str(certfile), ssl_keyfile=str(keyfile))
    with httpx.Client(verify=trusted) as http:
        with InProcessServer(FakeEngineClient(MODEL), config, verify=trusted) as s:
            assert s.url.startswith("https://127.0.0.1:")
            sdk = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, http_client=http)
            out = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, **GREEDY)
            assert out.choices[0].message.content == REPLY[:4]
            with pytest.raises(httpx.ConnectError):   # an unknown issuer is refused by the client
                httpx.get(f"{s.url}/health")
        # The client's idle keep-alive connection did not hold the server open past its grace period.
        assert not s._thread.is_alive()
