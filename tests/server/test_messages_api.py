"""/v1/messages and /v1/messages/count_tokens: the chat request an Anthropic Messages request stands for, and its
answer as content blocks (message_blocks.py), whole and streamed, through Anthropic's SDK against the app with a
fake engine; errors in Anthropic's shape."""
from __future__ import annotations

import json

import anthropic
import httpx
import pytest
import tests.server.fake_engine_client as fake
from tests.server.conftest import FAKE_MODEL
from tests.server.fake_engine_client import REPLY, FakeEngineClient
from tests.server.inprocess_server import InProcessServer

from minisrv.config import ServerConfig
from minisrv.server.errors import APIError
from minisrv.server.messages_api import MessagesRequest, renamed_error
from minisrv.tokenizer.prompts import PromptTokenizer

MODEL = FAKE_MODEL
TIME_TOOL = {"name": "get_time", "description": "the time", "input_schema": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}
GREEDY = {"extra_body": {"temperature": 0}}   # the SDK no longer takes temperature; the API still does
HERMES_REPLY = ('<think>\nThe user wants the time.\n</think>\n\nChecking. <tool_call>{"name": "get_time", '
                '"arguments": {"zone": "UTC"}}</tool_call>')


@pytest.fixture(scope="module")
def sdk(fake_server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fake_server.url, api_key="unused", max_retries=0)


def texts(blocks: list) -> list[tuple[str, str]]:
    return [(b.type, b.text) for b in blocks]


def chat_of(body: dict) -> dict:
    request = MessagesRequest.model_validate({"model": MODEL, "max_tokens": 8, **body})
    return request.to_chat_request().model_dump(exclude_defaults=True)


def test_system_blocks_tool_uses_and_results_become_the_chat_messages() -> None:
    messages = chat_of({"system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools."}],
                        "tools": [TIME_TOOL], "messages": [
        {"role": "user", "content": [{"type": "text", "text": "time?", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "they want the time", "signature": "s"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {"zone": "UTC"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {"zone": "CET"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "12:00"},
                                     {"type": "tool_result", "tool_use_id": "toolu_2",
                                      "content": [{"type": "text", "text": "13:00"}], "is_error": False},
                                     {"type": "text", "text": "and now?"}]},
        {"role": "assistant", "content": "Noon."}]})["messages"]
    assert [(m["role"], m.get("content")) for m in messages] == [
        ("system", "Be brief.\nUse tools."), ("user", "time?"), ("assistant", "Checking."), ("tool", "12:00"),
        ("tool", "13:00"), ("user", "and now?"), ("assistant", "Noon.")]
    calls = messages[2]["tool_calls"]   # the thinking given back is left out, as chat templates leave it
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("toolu_1", "get_time", {"zone": "UTC"}), ("toolu_2", "get_time", {"zone": "CET"})]
    assert [m.get("tool_call_id") for m in messages[3:5]] == ["toolu_1", "toolu_2"]
    only_uses = chat_of({"tools": [TIME_TOOL], "messages": [{"role": "user", "content": "t"}, {
        "role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_time", "input": {}}]}]})
    assert only_uses["messages"][1].get("content") is None and only_uses["messages"][1]["tool_calls"]


@pytest.mark.parametrize("choice, chat_choice, parallel", [
    ({"type": "auto"}, "auto", None), ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
    ({"type": "tool", "name": "get_time"}, {"type": "function", "function": {"name": "get_time"}}, None),
    ({"type": "none"}, "none", None),
])
def test_tool_choices_and_options_become_the_chat_requests(choice: dict, chat_choice, parallel) -> None:
    chat = chat_of({"messages": [{"role": "user", "content": "t"}], "tools": [TIME_TOOL], "tool_choice": choice,
                    "temperature": 0.5, "top_p": 0.9, "top_k": 5, "stop_sequences": ["\n\n"],
                    "output_format": {"type": "json_schema", "schema": {"type": "object"}}})
    assert chat["tool_choice"] == chat_choice and chat.get("parallel_tool_calls") == parallel
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_time", "description": "the time", "parameters": TIME_TOOL["input_schema"]}}]
    assert (chat["max_tokens"], chat["temperature"], chat["top_p"], chat["top_k"]) == (8, 0.5, 0.9, 5)
    # Kept in the output so that the answer can name the one that ended it (and cut it off).
    assert chat["stop"] == ["\n\n"] and chat["include_stop_str_in_output"] is True
    assert chat["response_format"]["json_schema"]["schema_"] == {"type": "object"}


@pytest.mark.parametrize("body, message", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "'image' blocks are not read"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search", "input_schema": {}}]}, "tools.0.type"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),   # as the SDK sends it
    ({"tools": [TIME_TOOL, {"name": "f"}]}, "tools.1.input_schema: field required"),
    ({"mcp_servers": [{"url": "x"}]}, "mcp_servers"),
    ({"tools": [TIME_TOOL], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
])
def test_what_cannot_be_served_is_a_400_naming_the_field(body: dict, message: str) -> None:
    with pytest.raises((APIError, ValueError), match=message.replace(".", r"\.")):
        chat_of({"messages": [{"role": "user", "content": "t"}], **body})


def test_whole_and_streamed_answers_agree(sdk) -> None:
    kwargs = dict(model=MODEL, max_tokens=12, messages=[{"role": "user", "content": "hi"}], **GREEDY)
    whole = sdk.messages.create(**kwargs)
    assert whole.id.startswith("msg_") and whole.type == "message" and whole.role == "assistant"
    assert [(b.type, b.text) for b in whole.content] == [("text", REPLY[:12])]
    assert (whole.stop_reason, whole.stop_sequence) == ("max_tokens", None)
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (len("<user>hi\n"), 12)
    with sdk.messages.stream(**kwargs) as stream:
        events = list(stream)
        streamed = stream.get_final_message()
    assert [e.type for e in events][:2] == ["message_start", "content_block_start"]
    assert events[-1].type == "message_stop"
    assert texts(streamed.content) == texts(whole.content) and streamed.usage == whole.usage
    assert streamed.stop_reason == whole.stop_reason
    everything = sdk.messages.create(model=MODEL, max_tokens=200, messages=[{"role": "user", "content": "hi"}],
                                     **GREEDY)
    assert (everything.content[0].text, everything.stop_reason) == (REPLY, "end_turn")


def test_a_stop_sequence_ends_the_answer_and_is_named(sdk) -> None:
    stop = REPLY[REPLY.index("quick"):][:5]   # "quick": several characters, held back until whole
    kwargs = dict(model=MODEL, max_tokens=200, messages=[{"role": "user", "content": "hi"}],
                  stop_sequences=["zzz", stop], **GREEDY)
    whole = sdk.messages.create(**kwargs)
    assert (whole.content[0].text, whole.stop_reason, whole.stop_sequence) == \
        (REPLY[: REPLY.index(stop)], "stop_sequence", stop)
    with sdk.messages.stream(**kwargs) as stream:
        streamed = stream.get_final_message()
    assert (texts(streamed.content), streamed.stop_reason, streamed.stop_sequence) == \
        (texts(whole.content), "stop_sequence", stop)


def test_thinking_and_tool_use_are_blocks_streamed_as_written(monkeypatch) -> None:
    monkeypatch.setattr(fake, "REPLY", HERMES_REPLY)
    client = FakeEngineClient(MODEL)
    with InProcessServer(client, ServerConfig(reasoning_parser="qwen3", api_key="sk-x")) as s:
        sdk = anthropic.Anthropic(base_url=s.url, api_key="sk-x", max_retries=0)   # sent as X-Api-Key
        kwargs = dict(model=MODEL, max_tokens=200, messages=[{"role": "user", "content": "time?"}],
                      tools=[TIME_TOOL], **GREEDY)
        whole = sdk.messages.create(**kwargs)
        thinking, text, use = whole.content
        assert (thinking.type, thinking.thinking) == ("thinking", "\nThe user wants the time.\n")
        assert (text.type, text.text) == ("text", "Checking. ")
        assert (use.type, use.name, use.input) == ("tool_use", "get_time", {"zone": "UTC"})
        assert use.id.startswith("toolu_") and whole.stop_reason == "tool_use"
        with sdk.messages.stream(**kwargs) as stream:
            events = list(stream)
            streamed = stream.get_final_message()
        pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta"
                  and e.delta.type == "input_json_delta"]
        assert len(pieces) > 3 and json.loads("".join(pieces)) == use.input
        assert [b.model_dump(exclude={"id"}) for b in streamed.content] == \
            [b.model_dump(exclude={"id"}) for b in whole.content] and streamed.stop_reason == "tool_use"

        # The use and its result go back as the API returned them.
        monkeypatch.setattr(fake, "REPLY", "It is noon.")
        answer = sdk.messages.create(model=MODEL, max_tokens=50, tools=[TIME_TOOL], **GREEDY, messages=[
            {"role": "user", "content": "time?"}, {"role": "assistant", "content": whole.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "12:00"}]}])
        assert answer.content[0].text == "It is noon."
        sent = client.inputs[-1]
        assert [role for role, _ in sent.messages] == ["user", "assistant", "tool"]
        assert json.loads(sent.message_tool_calls[1])[0]["id"] == use.id

        forced = sdk.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "t"}],
                                     tools=[TIME_TOOL], tool_choice={"type": "tool", "name": "get_time"})
        assert client.inputs[-1].params.grammar is not None and forced.content[0].type == "tool_use"
        with pytest.raises(anthropic.AuthenticationError) as refused:
            anthropic.Anthropic(base_url=s.url, api_key="wrong", max_retries=0).messages.create(**kwargs)
        assert refused.value.body["error"]["type"] == "authentication_error"


def test_count_tokens_renders_the_prompt_as_the_workers_do(monkeypatch) -> None:
    import tests.server.inprocess_server as inprocess

    plain = inprocess.byte_prompt_tokenizer()
    template = plain.chat_template + "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}"
    monkeypatch.setattr(inprocess, "byte_prompt_tokenizer", lambda: PromptTokenizer(plain.tokenizer, template))
    with InProcessServer(FakeEngineClient(MODEL)) as s:
        sdk = anthropic.Anthropic(base_url=s.url, api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "What time is it in Paris?"}]
        bare = sdk.messages.count_tokens(model=MODEL, messages=messages).input_tokens
        with_tools = sdk.messages.count_tokens(model=MODEL, messages=messages, tools=[TIME_TOOL]).input_tokens
        tokenized = httpx.post(f"{s.url}/tokenize", json={"model": MODEL, "messages": messages}).json()
    rendered_tools = json.dumps([{"type": "function", "function": {
        "name": "get_time", "description": "the time", "parameters": TIME_TOOL["input_schema"]}}])
    assert bare == tokenized["count"]
    assert with_tools - bare == len(plain.tokenizer.encode(f"<tools>{rendered_tools}</tools>",
                                                           add_special_tokens=False))


def test_chat_fields_in_errors_are_renamed_as_the_messages_request_has_them() -> None:
    for chat, theirs in (("tools.0.function.parameters", "tools.0.input_schema"), ("messages.3.content", "messages"),
                         ("response_format.json_schema.schema", "output_format.schema"), ("stop", "stop_sequences")):
        renamed = renamed_error(APIError(400, f"{chat}: bad", chat))
        assert (renamed.param, renamed.message) == (theirs, f"{theirs}: bad")


@pytest.mark.parametrize("body, status, kind, message", [
    ({"max_tokens": 0}, 400, "invalid_request_error", "max_tokens must be in"),
    ({"model": "other"}, 404, "not_found_error", "other"),
    ({"tools": [{"name": "f", "input_schema": {"type": "nope"}}], "tool_choice": {"type": "any"}}, 400,
     "invalid_request_error", "tools: Invalid type: nope"),
    ({"tools": [TIME_TOOL, {"name": "f", "input_schema": {"type": "nope"}}], "tool_choice": {"type": "tool", "name": "f"}},
     400, "invalid_request_error", "tools.1.input_schema: Invalid type: nope"),
    ({"stop_sequences": [""]}, 400, "invalid_request_error", "stop_sequences"),
    ({"extra": 1}, 400, "invalid_request_error", "extra"),
])
def test_errors_take_anthropics_shape_and_name_the_field(fake_server, body, status, kind, message) -> None:
    request = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "t"}], **body}
    r = httpx.post(f"{fake_server.url}/v1/messages", json=request)
    assert r.status_code == status, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == kind and message in r.json()["error"]["message"]
