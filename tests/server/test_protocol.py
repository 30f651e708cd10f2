from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minisrv.server.errors import APIError
from minisrv.server.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from minisrv.tokenizer.prompts import PromptTokenizer
from minisrv.wire.records import PromptRequest

VOCAB = 1000
CONTEXT = 512
MAX_CHOICES = 64


def chat(body: dict) -> PromptRequest:
    body = {"messages": [{"role": "user", "content": "hi"}], **body}
    return parse_request(ChatCompletionRequest, json.dumps(body).encode()).to_prompt_request(VOCAB, CONTEXT)


def completions(body: dict) -> list[PromptRequest]:
    body = {"prompt": "hi", **body}
    return parse_request(CompletionRequest, json.dumps(body).encode()).to_prompt_requests(VOCAB, CONTEXT, MAX_CHOICES)


def prompt_of(request: PromptRequest) -> str | list[int]:
    return request.text if request.text is not None else request.prompt_ids


def rejects(fn, body, param: str | None, status: int = 400) -> APIError:
    with pytest.raises(APIError) as exc:
        fn(body)
    assert exc.value.status == status
    assert exc.value.param == param, exc.value.message
    if param:
        assert param in exc.value.message
    return exc.value


def test_chat_fields_reach_sampling_params() -> None:
    rng = random.Random(1)
    for _ in range(20):
        values = {"temperature": round(rng.uniform(0, 2), 3), "top_p": round(rng.uniform(0.01, 1), 3),
                  "top_k": rng.randint(-1, 50), "min_p": round(rng.uniform(0, 1), 3), "seed": rng.randint(0, 2**40),
                  "presence_penalty": round(rng.uniform(-2, 2), 3), "frequency_penalty": round(rng.uniform(-2, 2), 3),
                  "repetition_penalty": round(rng.uniform(0.1, 2), 3), "max_tokens": rng.randint(1, 100),
                  "min_tokens": 0, "stop_token_ids": [rng.randrange(VOCAB) for _ in range(rng.randint(0, 3))],
                  "ignore_eos": rng.random() < 0.5}
        n = rng.randint(1, 16)
        stop = [f"s{rng.randint(0, 99)}" for _ in range(rng.randint(0, 3))]
        inp = chat(dict(values, n=n, stop=stop, logprobs=True, top_logprobs=rng.randint(0, 20)))
        for key, value in values.items():
            assert getattr(inp.params, key) == value, key
        assert inp.n == n and inp.stop == stop and inp.messages is not None
        assert inp.params.logprobs is not None


def test_chat_messages_and_defaults() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    inp = chat({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": parts},
                             {"role": "assistant", "content": "c", "name": "bot"}]})
    assert inp.messages == [("system", "be brief"), ("user", "a\nb"), ("assistant", "c")]
    # OpenAI's chat default: no limit but the context; the scheduler resolves it once it knows the prompt.
    assert inp.params.max_tokens is None
    assert inp.params.temperature == 1.0 and inp.params.logprobs is None and inp.stop == []
    assert chat({"max_completion_tokens": 7, "max_tokens": 3}).params.max_tokens == 7
    assert chat({"stop": "x"}).stop == ["x"]
    assert chat({"user": "someone"}).n == 1   # accepted, ignored


def test_completion_prompt_forms() -> None:
    rng = random.Random(2)
    ids = [rng.randrange(VOCAB) for _ in range(5)]
    assert [prompt_of(i) for i in completions({"prompt": "abc"})] == ["abc"]
    assert [prompt_of(i) for i in completions({"prompt": ["a", "b"]})] == ["a", "b"]
    assert [prompt_of(i) for i in completions({"prompt": ids})] == [ids]
    assert [prompt_of(i) for i in completions({"prompt": [ids, ids[:2]]})] == [ids, ids[:2]]
    inp = completions({"echo": True})[0]
    assert inp.echo and inp.params.max_tokens == 16 and inp.messages is None
    assert completions({"max_tokens": None})[0].params.max_tokens is None
    assert completions({"logprobs": 3})[0].params.logprobs == 3
    # echo with logprobs asks for the prompt's logprobs too, as many alternatives as either field asks
    assert completions({"logprobs": 3})[0].params.prompt_logprobs is None
    assert completions({"echo": True, "logprobs": 3})[0].params.prompt_logprobs == 3
    assert completions({"echo": True, "logprobs": 1, "prompt_logprobs": 4})[0].params.prompt_logprobs == 4
    assert completions({"echo": True, "stream": True, "logprobs": 2})[0].params.prompt_logprobs == 2


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"seed": -1}, "seed"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": 3}, "stop"),
    ({"stop_token_ids": [VOCAB + 5]}, "stop_token_ids"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content"),
    ({"temperature": "0.5"}, "temperature"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"stream": 1}, "stream"),
    ({"tools": []}, "tools"),
    ({"logit_bias": {"5": 1000}}, "logit_bias"),
    ({"logit_bias": {str(VOCAB): 1}}, "logit_bias"),
])
def test_chat_rejects(body: dict, param: str) -> None:
    rejects(chat, body, param)


@pytest.mark.parametrize("body, param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, -1]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [5, VOCAB]}, "prompt"),
    ({"prompt": [[5], [VOCAB + 1]]}, "prompt"),
    ({"prompt": 7}, "prompt"),
    ({"stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"suffix": "x"}, "suffix"),
    ({"best_of": 2}, "best_of"),
])
def test_completion_rejects(body: dict, param: str) -> None:
    rejects(completions, body, param)


@pytest.mark.parametrize("raw, code", [
    (b"{", "invalid_json"),
    (b"not json", "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "invalid_utf8"),
    (b'[1, 2]', "invalid_type"),
    (b'{"messages": [{"role": "user", "content": "a"}], "temperature": NaN}', "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "invalid_json"),   # a lone surrogate
    (b"", "invalid_json"),
])
def test_malformed_bodies(raw: bytes, code: str) -> None:
    with pytest.raises(APIError) as exc:
        parse_request(ChatCompletionRequest, raw)
    assert exc.value.status == 400 and exc.value.code == code


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=8)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)   # the same examples every CI run
@given(st.dictionaries(st.sampled_from(["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "n",
                                        "stop", "logprobs", "top_logprobs", "stream", "stream_options", "seed",
                                        "echo", "top_k", "min_tokens", "stop_token_ids", "unknown",
                                        "truncate_prompt_tokens", "include_stop_str_in_output",
                                        "continue_final_message", "skip_special_tokens",
                                        "spaces_between_special_tokens"]),
                       json_values, max_size=6))
def test_any_json_is_accepted_or_a_400(body: dict) -> None:
    """Whatever a client sends, parsing and conversion end in PROMPT_REQUEST records or a 400: never anything else."""
    raw = json.dumps(body).encode()
    for schema, convert in ((ChatCompletionRequest, lambda r: [r.to_prompt_request(VOCAB, CONTEXT)]),
                            (CompletionRequest, lambda r: r.to_prompt_requests(VOCAB, CONTEXT, MAX_CHOICES))):
        try:
            convert(parse_request(schema, raw))
        except APIError as exc:
            assert exc.status == 400 and exc.message


def test_output_and_prompt_options_reach_the_prompt_request() -> None:
    """vLLM's skip_special_tokens, include_stop_str_in_output, truncate_prompt_tokens and continue_final_message."""
    defaults = chat({})
    assert defaults.skip_special_tokens and not defaults.include_stop_str_in_output
    assert defaults.truncate_prompt_tokens == 0 and not defaults.continue_final_message
    got = chat({"skip_special_tokens": False, "include_stop_str_in_output": True, "truncate_prompt_tokens": 7,
                "add_generation_prompt": False, "continue_final_message": True})
    assert (not got.skip_special_tokens and got.include_stop_str_in_output and got.truncate_prompt_tokens == 7
            and got.continue_final_message and not got.add_generation_prompt)
    [whole] = completions({"truncate_prompt_tokens": -1})
    assert whole.truncate_prompt_tokens == CONTEXT
    [capped] = completions({"truncate_prompt_tokens": 10 * CONTEXT, "include_stop_str_in_output": True})
    assert capped.truncate_prompt_tokens == CONTEXT and capped.include_stop_str_in_output


def test_spaces_between_special_tokens_is_taken_as_vllm_takes_it() -> None:
    """A flag of vLLM's slow detokenizer only: accepted either way (clients send it), a bool or a 400."""
    assert chat({"spaces_between_special_tokens": False}) == chat({"spaces_between_special_tokens": True})
    with pytest.raises(APIError) as exc:
        chat({"spaces_between_special_tokens": "no"})
    assert exc.value.param == "spaces_between_special_tokens"


def test_what_sglang_router_adds_to_every_request_is_accepted() -> None:
    """sglang-router 0.3 forwards requests with SGLang's defaults filled in (captured from the router)."""
    router = {"no_stop_trim": False, "ignore_eos": False, "skip_special_tokens": True, "separate_reasoning": True,
              "stream_reasoning": True, "return_hidden_states": False}
    assert not chat(router).include_stop_str_in_output
    [kept] = completions({**router, "echo": False, "no_stop_trim": True})
    assert kept.include_stop_str_in_output   # SGLang's name for keeping the stop string
    with pytest.raises(APIError, match="return_hidden_states: this server does not return hidden states"):
        chat({"return_hidden_states": True})


@pytest.mark.parametrize("body, field", [
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": "3"}, "truncate_prompt_tokens"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
    ({"continue_final_message": True}, "continue_final_message"),   # add_generation_prompt is true by default
])
def test_bad_output_and_prompt_options_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(APIError) as info:
        chat(body)
    assert info.value.status == 400 and info.value.param == field


def test_prompts_times_n_is_capped_with_a_clear_400() -> None:
    assert len(completions({"prompt": ["x"] * 16, "n": 4})) == 16            # 64 choices: the limit
    with pytest.raises(APIError) as info:
        completions({"prompt": ["x"] * 1000, "n": 16})
    assert info.value.status == 400 and info.value.param == "prompt"
    assert "16000 choices" in info.value.message and "--max-choices-per-request" in info.value.message


def test_chat_template_kwargs_travel_typed() -> None:
    from minisrv.wire.terms import unpack_template_value

    got = chat({"chat_template_kwargs": {"enable_thinking": False, "depth": 3, "temperature_hint": 0.5, "who": "x"}})
    assert dict(zip(got.template_kwarg_names, map(unpack_template_value, got.template_kwarg_values))) == {
        "enable_thinking": False, "depth": 3, "temperature_hint": 0.5, "who": "x"}
    for body, param in (({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize"),
                        ({"chat_template_kwargs": {"x": [1, 2]}}, "chat_template_kwargs.x"),
                        ({"chat_template_kwargs": {"x": None}}, "chat_template_kwargs.x")):
        with pytest.raises(APIError) as info:
            chat(body)
        assert info.value.status == 400 and info.value.param.startswith(param), (body, info.value.param)


# Renders what a tool-calling template reads of each message: its role and content, an assistant's calls (their
# arguments as objects, as vLLM passes them) and the call a tool message answers.
TOOL_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% for c in m.tool_calls or [] %}"
                 "[{{ c.id }} {{ c.function.name }}{{ c.function.arguments | tojson }}]{% endfor %}"
                 "{% if m.tool_call_id %}[answers {{ m.tool_call_id }}]{% endif %}{% endfor %}")


def test_a_tool_round_trip_reaches_the_chat_template(hf_tokenizer) -> None:
    """An assistant's tool_calls (content null) and a tool message's tool_call_id travel through the wire record
    to the tokenizer worker's chat template, each with its own message."""
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
             {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]
    request = chat({"messages": [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"}]})
    ids = PromptTokenizer(hf_tokenizer, TOOL_TEMPLATE).request_token_ids(PromptRequest.decode(request.encode()))
    assert hf_tokenizer.decode(ids) == ('<user>Weather and time in Paris?<assistant>'
                                        '[call_1 get_weather{"city": "Paris"}][call_2 get_time{}]'
                                        '<tool>21 C[answers call_1]<tool>noon[answers call_2]')
