"""OpenAI's batch file format: lines read, answers written in order, and requests answered by the real app
through ASGI, in process, exactly as over HTTP."""
from __future__ import annotations

import asyncio
import io
import json
import random

import pytest
from tests.server.conftest import FAKE_MODEL
from tests.server.fake_engine_client import FakeEngineClient, expected_text
from tests.server.inprocess_server import byte_prompt_tokenizer

from minisrv.config import ServerConfig
from minisrv.server.app import build_app
from minisrv.server.batch_file import BatchLineError, BatchRequest, OrderedWriter, call_app, output_line, parse_line

CHAT = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}


def line(**fields) -> str:
    return json.dumps({"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": CHAT, **fields})


def test_a_line_is_a_request_or_an_error_naming_the_line_and_the_field() -> None:
    assert parse_line(line(), 3) == BatchRequest("r1", "/v1/chat/completions", CHAT)
    no_method = json.dumps({"custom_id": "r1", "url": "/v1/completions", "body": {}})   # POST, the only method
    assert parse_line(no_method, 1) == BatchRequest("r1", "/v1/completions", {})
    for text, message, custom_id in (
            ("{", "line 7: not JSON", None), ("[1]", "line 7: a JSON object is expected", None),
            ('{"custom_id": "r1", "body": {"model":\n', "line 7: not JSON: Expecting value at its end$", None),
            ('{"custom_id" "r1"}\n', "line 7: not JSON: Expecting ':' delimiter at column 14$", None),
            (line(custom_id=5), "line 7: custom_id: a string is required", None),
            (line(method="GET"), "line 7: method: only POST", "r1"),
            (line(url="/v1/models"), "line 7: url: '/v1/models' is not one of /v1/chat/completions", "r1"),
            (line(body=[1]), "line 7: body: a JSON object is required", "r1"),
            (line(body={**CHAT, "stream": True}), "line 7: body.stream: a batch request is answered whole", "r1")):
        with pytest.raises(BatchLineError, match=message) as raised:
            parse_line(text, 7)
        assert raised.value.custom_id == custom_id


def test_output_lines_carry_the_response_or_the_error() -> None:
    answered = json.loads(output_line("r1", 200, {"id": "chatcmpl-1", "choices": []}))
    assert answered["id"].startswith("batch_req_") and answered["error"] is None
    assert answered["response"] == {"status_code": 200, "request_id": "chatcmpl-1",
                                    "body": {"id": "chatcmpl-1", "choices": []}}
    refused = json.loads(output_line("r2", 400, {"error": {"message": "bad"}}))
    assert refused["response"]["status_code"] == 400 and refused["response"]["request_id"].startswith("req_")
    broken = json.loads(output_line(None, None, None, error="line 1: not JSON"))
    assert broken["response"] is None and broken["error"] == {"code": "invalid_request", "message": "line 1: not JSON"}


def test_answers_go_out_in_the_input_order_whatever_order_they_finish_in() -> None:
    out, order = io.StringIO(), list(range(50))
    random.Random(3).shuffle(order)
    writer = OrderedWriter(out)
    for i in order:
        writer.put(i, f"line {i}")
    assert out.getvalue().splitlines() == [f"line {i}" for i in range(50)] and writer.written == 50


def test_the_app_answers_in_process_as_it_does_over_http() -> None:
    client = FakeEngineClient(FAKE_MODEL, step_delay=0.01)   # slow enough to wait on receive() for a disconnect
    app = build_app(client, ServerConfig(api_key="sk-test"), byte_prompt_tokenizer, {})
    auth = [(b"authorization", b"Bearer sk-test")]

    async def run() -> list:
        return await asyncio.gather(
            call_app(app, "/v1/chat/completions", json.dumps(CHAT).encode(), auth),
            call_app(app, "/v1/completions", json.dumps({"model": FAKE_MODEL, "prompt": "x", "max_tokens": 0}).encode(),
                     auth),
            call_app(app, "/v1/chat/completions", json.dumps(CHAT).encode(), []))

    (ok, body), (refused, error), (unauthorized, _) = asyncio.run(run())
    assert ok == 200 and body["choices"][0]["message"]["content"] == expected_text(client.inputs[0], 0, 5)[0]
    assert body["choices"][0]["finish_reason"] == "length" and client.aborted == []
    assert refused == 400 and error["error"]["param"] == "max_tokens"
    assert unauthorized == 401
