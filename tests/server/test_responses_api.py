"""/v1/responses: the chat request a Responses request stands for, and its answer as output items
(response_items.py), whole and streamed, through the openai SDK against the app with a fake engine."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
import tests.server.fake_engine_client as fake
from tests.server.conftest import FAKE_MODEL
from tests.server.fake_engine_client import REPLY, FakeEngineClient
from tests.server.inprocess_server import InProcessServer

from minisrv.config import ServerConfig
from minisrv.server.errors import APIError
from minisrv.server.responses_api import ResponsesRequest

MODEL = FAKE_MODEL
TIME_TOOL = {"type": "function", "name": "get_time", "parameters": {"type": "object"}}
HERMES_REPLY = ('<think>\nThe user wants the time.\n</think>\n\nChecking. <tool_call>{"name": "get_time", '
                '"arguments": {"zone": "UTC"}}</tool_call>')


@pytest.fixture(scope="module")
def sdk(fake_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fake_server.url}/v1", api_key="unused", max_retries=0)


def chat_of(body: dict) -> dict:
    return ResponsesRequest.model_validate(body).to_chat_request().model_dump(exclude_defaults=True)


def without_ids(items: list) -> list[dict]:
    """Output items as dicts without their fresh ids (two responses never share them) or fields left null."""
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if k not in ("id", "call_id") and v is not None}
        return [plain(v) for v in value] if isinstance(value, list) else value
    return [plain(item.model_dump()) for item in items]


def test_input_and_instructions_become_the_chat_messages() -> None:
    assert chat_of({"input": "hi", "instructions": "Be brief."})["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    items = [{"role": "developer", "content": [{"type": "input_text", "text": "Use tools."}]},
             {"type": "message", "role": "user", "content": "time?"},
             {"type": "reasoning", "id": "rs_1", "summary": []},   # given back: not rendered
             {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
              "content": [{"type": "output_text", "text": "Checking.", "annotations": [], "logprobs": []}]},
             {"type": "function_call", "call_id": "c1", "name": "get_time", "arguments": '{"zone": "UTC"}',
              "id": "fc_1", "status": "completed"},
             {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "12:00"},
             {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "13:00"}]}]
    messages = chat_of({"input": items, "tools": [TIME_TOOL]})["messages"]
    assert [(m["role"], m.get("content")) for m in messages] == [
        ("developer", "Use tools."), ("user", "time?"), ("assistant", "Checking."), ("tool", "12:00"),
        ("tool", "13:00")]
    assert [c["id"] for c in messages[2]["tool_calls"]] == ["c1", "c2"]   # one turn's calls: one message
    assert [m.get("tool_call_id") for m in messages[3:]] == ["c1", "c2"]
    only_calls = chat_of({"input": [{"role": "user", "content": "t"}, items[5]], "tools": [TIME_TOOL]})["messages"]
    assert only_calls[1]["role"] == "assistant" and only_calls[1].get("content") is None and only_calls[1]["tool_calls"]


def test_options_become_the_chat_requests() -> None:
    chat = chat_of({"input": "x", "max_output_tokens": 9, "temperature": 0.5, "top_p": 0.9, "tools": [TIME_TOOL],
                    "tool_choice": {"type": "function", "name": "get_time"}, "parallel_tool_calls": False,
                    "text": {"format": {"type": "json_schema", "name": "t", "schema": {"type": "object"},
                                        "strict": True}}, "top_logprobs": 3})
    assert (chat["max_completion_tokens"], chat["temperature"], chat["top_p"]) == (9, 0.5, 0.9)
    assert chat["tools"] == [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    assert chat["parallel_tool_calls"] is False and (chat["logprobs"], chat["top_logprobs"]) == (True, 3)
    assert chat["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "t", "schema_": {"type": "object"}, "strict": True}}
    assert chat_of({"input": "x", "text": {"format": {"type": "json_object"}}})["response_format"] == \
        {"type": "json_object"}
    assert "response_format" not in chat_of({"input": "x", "text": {"format": {"type": "text"}}})
    assert chat_of({"input": "x", "include": ["message.output_text.logprobs"]})["top_logprobs"] == 0


@pytest.mark.parametrize("body, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"max_tool_calls": 2}, "max_tool_calls"),
    ({"truncation": "auto"}, "truncation"),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [TIME_TOOL]}, "tool_choice.name"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{no"}]}, "input.0.arguments"),
    ({"input": []}, "input"),
])
def test_what_cannot_be_served_is_a_400_naming_the_field(body: dict, param: str) -> None:
    with pytest.raises(APIError) as exc:
        ResponsesRequest.model_validate({"input": "x", **body}).to_chat_request()
    assert exc.value.status == 400 and exc.value.param == param and param in exc.value.message


def test_whole_response(sdk) -> None:
    r = sdk.responses.create(model=MODEL, input="hi", temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.output_text == REPLY and r.incomplete_details is None and r.store is False
    (message,) = r.output
    assert (message.type, message.role, message.status, message.id[:4]) == ("message", "assistant", "completed", "msg_")
    prompt_tokens = len("<user>hi\n")
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == \
        (prompt_tokens, len(REPLY), prompt_tokens + len(REPLY))
    assert r.usage.output_tokens_details.reasoning_tokens == 0 and r.temperature == 0


def test_a_stream_tells_what_the_whole_response_holds(sdk) -> None:
    kwargs = dict(model=MODEL, input="hi", temperature=0, instructions="Be kind.")
    whole = sdk.responses.create(**kwargs)
    events = list(sdk.responses.create(stream=True, **kwargs))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == REPLY
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    assert final.id == events[0].response.id and without_ids(final.output) == without_ids(whole.output)
    assert final.usage == whole.usage and final.instructions == "Be kind."
    with sdk.responses.stream(**kwargs) as stream:   # the SDK's helper rebuilds the response from the events
        assert without_ids(stream.get_final_response().output) == without_ids(whole.output)


def test_max_output_tokens_leaves_the_response_incomplete(sdk) -> None:
    r = sdk.responses.create(model=MODEL, input="hi", max_output_tokens=5, temperature=0)
    assert (r.status, r.incomplete_details.reason, r.output_text) == ("incomplete", "max_output_tokens", REPLY[:5])
    assert r.output[0].status == "incomplete"
    events = list(sdk.responses.create(model=MODEL, input="hi", max_output_tokens=5, temperature=0, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"


def test_an_empty_answer_is_a_message_of_no_text(sdk, monkeypatch) -> None:
    monkeypatch.setattr(fake, "REPLY", "")
    whole = sdk.responses.create(model=MODEL, input="hi", temperature=0)
    assert [(item.type, item.content[0].text, item.status) for item in whole.output] == [("message", "", "completed")]
    events = list(sdk.responses.create(model=MODEL, input="hi", temperature=0, stream=True))
    assert not [e for e in events if e.type == "response.output_text.delta"]
    assert without_ids(events[-1].response.output) == without_ids(whole.output)


def test_logprobs_come_with_the_text_when_included(sdk) -> None:
    r = sdk.responses.create(model=MODEL, input="hi", max_output_tokens=4, temperature=0, top_logprobs=2,
                             include=["message.output_text.logprobs"])
    logprobs = r.output[0].content[0].logprobs
    assert [lp.token for lp in logprobs] == list(REPLY[:4]) and all(len(lp.top_logprobs) == 2 for lp in logprobs)
    streamed = [lp.token for e in sdk.responses.create(model=MODEL, input="hi", max_output_tokens=4, temperature=0,
                                                       top_logprobs=2, stream=True)
                if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert streamed == list(REPLY[:4])
    assert sdk.responses.create(model=MODEL, input="hi", max_output_tokens=4).output[0].content[0].logprobs == []


def test_reasoning_text_and_tool_calls_are_items_streamed_as_written(monkeypatch) -> None:
    monkeypatch.setattr(fake, "REPLY", HERMES_REPLY)
    client = FakeEngineClient(MODEL)
    with InProcessServer(client, ServerConfig(reasoning_parser="qwen3")) as s:
        sdk = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        kwargs = dict(model=MODEL, input="time?", tools=[TIME_TOOL], temperature=0)
        whole = sdk.responses.create(**kwargs)
        reasoning, message, call = whole.output
        assert reasoning.type == "reasoning" and reasoning.content[0].text == "\nThe user wants the time.\n"
        assert message.content[0].text == "Checking. " and whole.output_text == "Checking. "
        assert (call.type, call.name, call.arguments, call.status) == \
            ("function_call", "get_time", '{"zone": "UTC"}', "completed")
        assert call.call_id.startswith("call_") and call.id.startswith("fc_")
        assert 0 < whole.usage.output_tokens_details.reasoning_tokens < whole.usage.output_tokens
        events = list(sdk.responses.create(stream=True, **kwargs))
        added = [e.item.type for e in events if e.type == "response.output_item.added"]
        done = [e.item.type for e in events if e.type == "response.output_item.done"]
        assert added == done == ["reasoning", "message", "function_call"]
        pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
        assert len(pieces) > 3 and "".join(pieces) == call.arguments
        assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == \
            reasoning.content[0].text
        assert without_ids(events[-1].response.output) == without_ids(whole.output)
        assert events[-1].response.usage == whole.usage

        # The calls and their results go back in the input, as the API returned them.
        monkeypatch.setattr(fake, "REPLY", "It is noon.")
        answer = sdk.responses.create(model=MODEL, tools=[TIME_TOOL], temperature=0, input=[
            {"role": "user", "content": "time?"}, *[item.model_dump() for item in whole.output],
            {"type": "function_call_output", "call_id": call.call_id, "output": "12:00"}])
        assert answer.output_text == "It is noon."
        sent = client.inputs[-1]
        assert [role for role, _ in sent.messages] == ["user", "assistant", "tool"]
        assert json.loads(sent.message_tool_calls[1])[0]["id"] == call.call_id


def test_forced_calls_and_structured_text_constrain_the_output(sdk, fake_server) -> None:
    client = fake_server.client
    sdk.responses.create(model=MODEL, input="t", tools=[TIME_TOOL], tool_choice="required", max_output_tokens=4)
    assert client.inputs[-1].params.grammar is not None and client.inputs[-1].tools
    sdk.responses.create(model=MODEL, input="t", max_output_tokens=4, text={"format": {
        "type": "json_schema", "name": "t", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}})
    assert '"a"' in client.inputs[-1].params.grammar


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.message.content"),
    ({"input": [{"type": "message", "role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
     "input.1.message.role"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {"type": "nope"}}}}, "text.format.schema"),
    ({"input": "x", "tools": [TIME_TOOL], "tool_choice": "required", "text": {"format": {"type": "json_object"}}},
     "text.format"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "t"}}}, "text.format"),
    ({"input": "x", "top_logprobs": 99}, "top_logprobs"),
    ({"input": "x", "model": "other"}, "model"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
])
def test_bad_requests_are_400s_or_404s_naming_the_field(fake_server, body: dict, param: str) -> None:
    r = httpx.post(f"{fake_server.url}/v1/responses", json=body)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert httpx.post(f"{fake_server.url}/v1/responses", json={"input": "x", "max_output_tokens": 2}).status_code == 200


def test_stored_responses_are_404s_saying_none_is_stored(sdk) -> None:
    for call in (sdk.responses.retrieve, sdk.responses.delete, sdk.responses.cancel):
        with pytest.raises(openai.NotFoundError) as exc:
            call("resp_123")
        assert exc.value.body["code"] == "response_not_stored" and "stores no responses" in exc.value.body["message"]
