"""Tool calling without a model: forced-call grammars, parsing calls out of text, holding them back in a stream."""
from __future__ import annotations

import json
import random

import pytest

from minisrv.server import tools
from tests.test_structured_output import accepts

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
    "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}


def test_forced_grammars_accept_calls_and_nothing_else() -> None:
    named = tools.call_grammar([WEATHER, TIME], "get_weather", True, "tool_choice", "tools").text
    assert accepts(named, '{"city": "Paris", "unit": "C"}')
    assert not accepts(named, '{"zone": "UTC"}')
    one = tools.call_grammar([WEATHER, TIME], "required", False, "tool_choice", "tools").text
    assert accepts(one, '[{"name": "get_time", "parameters": {"zone": "UTC"}}]')
    assert not accepts(one, '[{"name": "get_time", "parameters": {"zone": "UTC"}}, '
                            '{"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    assert not accepts(one, '[{"name": "get_time", "parameters": {"city": "Oslo"}}]')
    assert not accepts(one, "[]")
    many = tools.call_grammar([WEATHER, TIME], "required", True, "tool_choice", "tools").text
    text = ('[{"name": "get_time", "parameters": {"zone": "UTC"}}, '
            '{"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    assert accepts(many, text)
    calls = tools.forced_calls(text, "required")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"zone": "UTC"}),
                                                                   ("get_weather", {"city": "Oslo"})]
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id


REQUIRED_OUTPUT = ('[{"name": "get_time", "parameters": {"zone": "U,T}C", "n": [1, {"a": "\\"}"}]}}, '
                   '{"name": "get_weather", "parameters": {"city": "Oslo"}}]')


@pytest.mark.parametrize("choice, text", [("required", REQUIRED_OUTPUT),
                                          ("get_weather", ' {"city": "a}b", "unit": "C"} ')])
def test_a_forced_call_streams_its_name_then_its_arguments_as_they_are_written(choice: str, text: str) -> None:
    """Whatever the pieces the text arrives in, the deltas reassemble to the whole output's calls; a call is
    named (id, type, name) in its first delta only, and its arguments come in several."""
    whole = tools.forced_calls(text, choice)
    if choice == "required":
        assert [(c.name, json.loads(c.arguments)) for c in whole] == [
            ("get_time", {"zone": "U,T}C", "n": [1, {"a": '"}'}]}), ("get_weather", {"city": "Oslo"})]
    else:
        assert [(c.name, c.arguments) for c in whole] == [("get_weather", text.strip())]
    for seed in range(50):
        rng = random.Random(seed)
        calls, streamed, pieces, i = tools.ForcedCalls(choice), {}, {}, 0
        while i < len(text):
            step = rng.randint(1, 6)
            deltas = calls.feed(text[i : i + step])
            _collect(streamed, deltas)
            for delta in deltas:
                pieces[delta["index"]] = pieces.get(delta["index"], 0) + 1
            i += step
        assert [(e["id"], e["name"], e["arguments"]) for _, e in sorted(streamed.items())] == \
            [(c.id, c.name, c.arguments) for c in calls.calls()]
        assert [(c.name, c.arguments) for c in calls.calls()] == [(c.name, c.arguments) for c in whole]
        assert min(pieces.values()) > 1


def test_a_forced_call_cut_short_keeps_what_it_has() -> None:
    cut = '[{"name": "get_time", "parameters": {"zone": "UT'
    assert [(c.name, c.arguments) for c in tools.forced_calls(cut, "required")] == [("get_time", '{"zone": "UT')]
    assert tools.forced_calls('[{"name": "get_ti', "required") == []
    assert tools.forced_calls("", "get_time")[0].arguments == ""


@pytest.mark.parametrize("text, content, expected", [
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.\n", [("get_weather", {"city": "Paris"})]),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>\n<tool_call>{"name": "get_time", '
     '"arguments": "{\\"zone\\": \\"UTC\\"}"}</tool_call>', "",
     [("get_weather", {"city": "A"}), ("get_time", {"zone": "UTC"})]),
    ('{"name": "get_time", "parameters": {"zone": "CET"}}', "", [("get_time", {"zone": "CET"})]),
    ('<|python_tag|>{"name": "get_time", "parameters": {"zone": "X"}}; '
     '{"name": "get_weather", "parameters": {"city": "Y"}}', "",
     [("get_time", {"zone": "X"}), ("get_weather", {"city": "Y"})]),
    ('[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "get_time", "arguments": {"zone": "B"}}]', "",
     [("get_weather", {"city": "A"}), ("get_time", {"zone": "B"})]),
    ('[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": "B"}}]', "", [("get_time", {"zone": "B"})]),
    ('[get_weather(city="Pa)ris", unit=\'C\'), get_time(zone="UTC")]', "",
     [("get_weather", {"city": "Pa)ris", "unit": "C"}), ("get_time", {"zone": "UTC"})]),
    ('<|python_start|>[get_time(zone="X")]<|python_end|>', "", [("get_time", {"zone": "X"})]),
    ("[1, 2, 3] are the first numbers.", "[1, 2, 3] are the first numbers.", []),
    ("[see below] for the answer", "[see below] for the answer", []),
    ('[not_a_tool(x=1)]', '[not_a_tool(x=1)]', []),
    ('[get_time(zone=unquoted)]', '[get_time(zone=unquoted)]', []),
    ('{"name": "not_a_tool", "parameters": {}}', '{"name": "not_a_tool", "parameters": {}}', []),
    ('<tool_call>{broken json</tool_call>', '<tool_call>{broken json</tool_call>', []),
    ("Just text, no call.", "Just text, no call.", []),
])
def test_auto_calls_are_parsed_in_every_format(text: str, content: str, expected: list) -> None:
    got_content, calls = tools.parse_calls(text, {"get_weather", "get_time"})
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected


HERMES_TWO = ('Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa,ri}s", "unit": "C"}}\n'
              '</tool_call>\n'
              '<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>{"name": "get_time", '
              '"arguments": "{\\"zone\\": \\"UTC\\"}"}</tool_call>')


@pytest.mark.parametrize("text", [
    HERMES_TWO,
    'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Par',      # cut short: a call with what it has
    '{"name": "get_time", "parameters": {"zone": "CET"}}',
    '  <|python_tag|>{"name": "get_time", "parameters": {"zone": "X"}}',
    "Plain text with a < sign and <tool_ not a call.",
    "<tool_call>{broken json</tool_call>",
    '{"not": "a call"}',
    '[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "get_time", "arguments": {"zone": "B"}}]',
    '[get_weather(city="Pa)ris", unit=\'C\'), get_time(zone="UTC")]',
    '[get_weather(city="Paris"), get_time(zone=',   # cut short: the whole calls only
    "[see below] for the answer",
    "[TOOL_CALLS",
])
def test_a_stream_sends_the_same_content_and_calls_as_the_whole_text(text: str) -> None:
    names = {"get_weather", "get_time"}
    content, expected = tools.parse_calls(text, names)
    for seed in range(30):
        rng = random.Random(seed)
        stream = tools.AutoCallStream(names)
        sent, streamed, i = [], {}, 0
        while i < len(text):
            step = rng.randint(1, 6)
            piece, deltas = stream.feed(text[i : i + step])
            sent.append(piece)
            assert "<tool_call>" not in "".join(sent)   # never streams a call as content
            i += step
            _collect(streamed, deltas)
        rest, deltas, calls = stream.finish()
        _collect(streamed, deltas)
        assert "".join(sent) + rest == content
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in expected]
        assert [(e["id"], e["name"], e["arguments"]) for _, e in sorted(streamed.items())] == \
            [(c.id, c.name, c.arguments) for c in calls]


def test_hermes_calls_stream_their_arguments_as_they_are_written() -> None:
    content, calls = tools.parse_calls(HERMES_TWO, {"get_weather", "get_time"})
    assert content == "Sure. "
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Pa,ri}s", "unit": "C"}),
                                                                   ("get_time", {"zone": "UTC"})]
    stream, pieces = tools.AutoCallStream({"get_weather", "get_time"}), []
    for ch in HERMES_TWO:
        pieces += [d for d in stream.feed(ch)[1] if d["index"] == 0]
    assert pieces[0]["function"] == {"name": "get_weather", "arguments": "{"}   # named at its arguments' first "{"
    arguments = '{"city": "Pa,ri}s", "unit": "C"}'   # then a character at a time (a space with the next one)
    assert len(pieces) == len(arguments) - arguments.count(" ")
    assert tools.parse_calls('<tool_call>{"name": "get_weather", "arguments": {"city": "Par', {"get_weather"})[1][0] \
        .arguments == '{"city": "Par'


@pytest.mark.parametrize("text, calls", [
    ('<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}; {"name": "get_weather", "parameters": '
     '{"city": "Oslo"}}', [("get_time", {"zone": "CET"}), ("get_weather", {"city": "Oslo"})]),
    ('{"name": "get_time", "parameters": {"zone": "CET"}}', [("get_time", {"zone": "CET"})]),
    ('{"answer": 42, "name": "get_time"}', []),   # a JSON answer: content, once it is clear that it calls nothing
])
def test_llama_calls_stream_as_they_are_written_and_other_json_is_content(text: str, calls: list) -> None:
    stream, content, streamed = tools.AutoCallStream({"get_weather", "get_time"}), "", {}
    for ch in text:
        piece, deltas = stream.feed(ch)
        content += piece
        _collect(streamed, deltas)
        if not calls:
            assert not deltas
    before_the_end = {i: e["arguments"] for i, e in streamed.items()}
    rest, deltas, found = stream.finish()
    _collect(streamed, deltas)
    assert [(c.name, json.loads(c.arguments)) for c in found] == calls
    assert content + rest == ("" if calls else text)
    if calls:   # every call was whole before the end of the output
        assert [json.loads(a) for _, a in sorted(before_the_end.items())] == [args for _, args in calls]


def test_tool_call_parser_limits_the_formats_found() -> None:
    names = {"get_time"}
    llama = '{"name": "get_time", "parameters": {"zone": "CET"}}'
    hermes = 'Sure. <tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
    mistral = '[{"name": "get_time", "arguments": {"zone": "CET"}}]'
    pythonic = '[get_time(zone="CET")]'
    for parser, text, is_call in (("hermes", llama, False), ("hermes", hermes, True),
                                  ("llama3_json", hermes, False), ("llama3_json", llama, True),
                                  ("llama3_json", mistral, False), ("mistral", mistral, True),
                                  ("mistral", pythonic, False), ("pythonic", pythonic, True),
                                  ("pythonic", llama, False)):
        content, calls = tools.parse_calls(text, names, parser)
        assert (content, [c.name for c in calls]) == (("Sure. " if parser == "hermes" else "", ["get_time"]) if is_call
                                                      else (text, [])), parser
    stream = tools.AutoCallStream(names, "hermes")   # not a Llama call: streams as content at once
    assert stream.feed(llama[:10]) == (llama[:10], [])


def test_a_pythonic_call_goes_out_whole_at_its_closing_parenthesis() -> None:
    text = '[get_weather(city="Paris", unit="C"), get_time(zone="UTC")]'
    stream, streamed = tools.AutoCallStream({"get_weather", "get_time"}, "pythonic"), {}
    for i, ch in enumerate(text):
        content, deltas = stream.feed(ch)
        assert content == ""
        _collect(streamed, deltas)
        assert len(streamed) == (i >= text.index(")")) + (i >= text.rindex(")")), text[: i + 1]
    assert [json.loads(e["arguments"]) for _, e in sorted(streamed.items())] == \
        [json.loads(c.arguments) for c in stream.finish()[2]] == [{"city": "Paris", "unit": "C"}, {"zone": "UTC"}]


@pytest.mark.parametrize("head, opening", [
    ("", tools.TOO_EARLY), ("<|pyth", tools.TOO_EARLY), ("<|python_tag|>", tools.TOO_EARLY),
    ("<|python_tag|>{", ("llama3_json", 14)), ("{", ("llama3_json", 0)),
    ("[", tools.TOO_EARLY), ("[TOOL", tools.TOO_EARLY), ("[TOOL_CALLS] [ {", ("mistral", 13)),
    ("[ {", ("mistral", 0)), ("[get_weather", tools.TOO_EARLY), ("[get_weather (", ("pythonic", 0)),
    ("[get weather(", None), ("[1", None), ("Hello", None), ("<tool_call>", None),
])
def test_how_an_output_opens_decides_the_format_of_its_calls(head: str, opening) -> None:
    assert tools.leading_call(head, tools.TOOL_CALL_FORMATS) == opening


def _collect(streamed: dict, deltas: list[dict]) -> None:
    for delta in deltas:
        if delta["index"] not in streamed:
            assert delta["type"] == "function" and delta["id"].startswith("call_")
            streamed[delta["index"]] = {"id": delta["id"], "name": delta["function"]["name"], "arguments": ""}
        else:
            assert set(delta) == {"index", "function"} and set(delta["function"]) == {"arguments"}
        streamed[delta["index"]]["arguments"] += delta["function"]["arguments"]
