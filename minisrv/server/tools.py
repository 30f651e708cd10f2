"""Tool calling: the grammar that forces a call, and the calls parsed back out of a model's text.

tool_choice "required" and a named function are enforced through structured output, so their arguments always
parse: a named function's output is its arguments (a JSON object of its parameters schema, as vLLM does); for
"required" it is a JSON array of {"name", "parameters"} objects, one of the tools each, at least one (only one
unless parallel_tool_calls). With "auto" the model writes calls in its own format, and the formats in use are
recognised (vLLM's parser names): Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks
(hermes: Qwen2.5, Qwen3, Hermes), anywhere in the output; and, opening it, Llama 3.x's bare JSON object
`{"name": ..., "parameters": {...}}` (llama3_json; optionally after `<|python_tag|>`, several separated by
semicolons), Mistral's JSON array `[{"name": ..., "arguments": {...}}, ...]` (mistral; after `[TOOL_CALLS]`
when special tokens are kept) and a Python list of calls `[name(key=value, ...), ...]` (pythonic: Llama 3.2's
and Llama 4's pythonic templates; pythonic_calls.py).

Calls stream the way vLLM streams them (call_reader.py): a call's id, type and name as soon as its name is
written, then its arguments' text as the model writes it. An object naming a function that is not a tool, or
with no arguments, is no call. The whole response takes its calls from the same readers, so a stream's deltas
reassemble to it exactly.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

from minisrv import structured_output
from minisrv.config import TOOL_CALL_FORMATS
from minisrv.server.call_reader import CallDeltas, CallReader
from minisrv.server.pythonic_calls import PythonicCallReader
from minisrv.server.streams import before_partial_tag
from minisrv.structured_output import Grammar

HERMES, LLAMA3_JSON, MISTRAL, PYTHONIC = TOOL_CALL_FORMATS
LEADING_FORMATS = (LLAMA3_JSON, MISTRAL, PYTHONIC)   # calls that only open an output, not follow text
HERMES_START = "<tool_call>"   # each call a JSON object in <tool_call>...</tool_call>
PYTHON_TAG = "<|python_tag|>"
# The special tokens that open some models' calls (Llama 3's, Mistral's, Llama 4's), seen when the detokenizer
# keeps special tokens (skip_special_tokens false); by default they are left out and the calls open the output.
LEADING_TAGS = (PYTHON_TAG, "[TOOL_CALLS]", "<|python_start|>")
TOO_EARLY = "too early"   # leading_call: the output so far could still open a call or not
IDENTIFIER = re.compile(r"[^\W\d]\w*")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str            # JSON text, as OpenAI's API returns it
    id: str = ""

    def as_api(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_grammar(tools: list[dict], choice: str, parallel: bool, field: str, fault_field: str) -> Grammar:
    """The output a forced tool_choice allows: `choice` is "required" or a function's name (one of `tools`,
    OpenAI's {"type": "function", "function": {...}} objects). `fault_field`: what an invalid one's error names,
    the tools' parameters it is made of."""
    functions = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    if choice != "required":
        schema = functions[choice]
    else:
        items = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "parameters": params},
                            "required": ["name", "parameters"], "additionalProperties": False}
                           for name, params in functions.items()]}
        schema = {"type": "array", "items": items, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    # json_schema's own refusals name the parameters too
    return Grammar(structured_output.json_schema(schema, fault_field).text, field, fault_field)


def forced_calls(text: str, choice: str) -> list[ToolCall]:
    """The calls of an output made under call_grammar: those whose name it reached, their arguments as far as
    it goes (a finished output's always parse)."""
    calls = ForcedCalls(choice)
    calls.feed(text)
    return calls.calls()


def parse_calls(text: str, names: set[str], parser: str = "auto") -> tuple[str, list[ToolCall]]:
    """(content, calls) of a model's free output under tool_choice "auto": calls to functions in `names`, in
    the formats `parser` names (--tool-call-parser); text that is not a call stays content. No call: (text, [])."""
    stream = AutoCallStream(names, parser)
    content, _ = stream.feed(text)
    rest, _, calls = stream.finish()
    return content + rest, calls


class ForcedCalls:
    """A forced output's calls while it grows, and the tool_calls deltas that stream them: a "required" array's
    calls through CallReader, a named function's output being its arguments."""

    def __init__(self, choice: str) -> None:
        self.choice = choice
        self.text = ""
        self.reader = CallReader(depth=2) if choice == "required" else None
        self.deltas = CallDeltas()

    def feed(self, delta: str) -> list[dict]:
        self.text += delta
        if self.reader is not None:
            self.reader.feed(delta)
        return self.deltas.update(self._found())

    def calls(self) -> list[ToolCall]:
        """The calls so far, whole, with the ids their deltas carried."""
        found = self._found()
        self.deltas.update(found)
        return _tool_calls(found, self.deltas)

    def _found(self) -> list[tuple[str, str]]:
        if self.reader is None:
            return [(self.choice, self.text.strip())]
        return _calls_read(self.reader, lambda name: True, arguments_in_strings=False)


class AutoCallStream:
    """A choice's output under tool_choice "auto": content streams as it comes, calls as tool_calls deltas. From
    a Hermes start tag on, or from the start of an output that opens like a call of a leading format (a Llama 3
    JSON object, Mistral's JSON array, a pythonic list of calls; see leading_call), the text is read as it grows
    (CallReader, PythonicCallReader) and a call to one of `names` streams as a forced one does; text that may be a
    call is never streamed as content, and an output whose calls call no tool is content after all. `feed` gives
    what may go out now, `finish` the rest and the calls."""

    def __init__(self, names: set[str], parser: str = "auto") -> None:
        self.names = names
        self.formats = TOOL_CALL_FORMATS if parser == "auto" else (parser,)
        self.leading = any(f in self.formats for f in LEADING_FORMATS)
        self.text = ""
        self.sent = 0                             # characters of self.text streamed as content
        self.reader: CallReader | PythonicCallReader | None = None   # the text from where calls may begin
        self.tag_at = -1                          # where that is
        self.deltas = CallDeltas()

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        """(content, tool_calls deltas) that `delta` lets go out."""
        self.text += delta
        if self.reader is not None:
            self.reader.feed(delta)
            return "", self.deltas.update(self._found())
        if self.leading and not self.sent:   # only until content goes out: no copy of the whole text per delta after
            head = self.text.lstrip()
            opening = leading_call(head, self.formats)
            if opening == TOO_EARLY:
                return "", []
            if opening is not None:
                call_format, at = opening
                self._read_from(0, len(self.text) - len(head) + at, call_format)
                return "", self.deltas.update(self._found())
        if HERMES not in self.formats:
            content, self.sent = self.text[self.sent:], len(self.text)
            return content, []
        start = self.text.find(HERMES_START, self.sent)
        if start >= 0:
            content, self.sent = self.text[self.sent : start], start
            self._read_from(start, len(HERMES_START), HERMES)
            return content, self.deltas.update(self._found())
        safe = before_partial_tag(self.text, self.sent, HERMES_START)
        content, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return content, []

    def finish(self) -> tuple[str, list[dict], list[ToolCall]]:
        """(the content not sent yet, the tool_calls deltas not sent yet, every call) of the complete output."""
        found = self._found() if self.reader is not None else []
        if not found:
            return self.text[self.sent:], [], []
        deltas = self.deltas.update(found)
        rest = self.text[self.sent : self.tag_at] if self.tag_at > self.sent else ""
        return rest, deltas, _tool_calls(found, self.deltas)

    def _read_from(self, start: int, skip: int, call_format: str) -> None:
        """Read calls of `call_format` from text[start + skip:]; text[start:] is no content if calls are found."""
        self.tag_at = start
        self.reader = PythonicCallReader() if call_format == PYTHONIC else \
            CallReader(depth=2 if call_format == MISTRAL else 1)
        self.reader.feed(self.text[start + skip:])

    def _found(self) -> list[tuple[str, str]]:
        return _calls_read(self.reader, self.names.__contains__, arguments_in_strings=True)


def leading_call(head: str, formats: tuple[str, ...]) -> tuple[str, int] | str | None:
    """How an output that begins with `head` (leading whitespace left out) opens: (the format of its calls, where
    in `head` they begin) when like a call of one of `formats`, after one of LEADING_TAGS or not: a JSON object
    (llama3_json), a JSON array of objects (mistral), a list of `name(` (pythonic); TOO_EARLY while it could
    still become one; None when it cannot."""
    tag = next((t for t in LEADING_TAGS if head.startswith(t)), "")
    if not tag and any(t.startswith(head) for t in LEADING_TAGS):
        return TOO_EARLY   # nothing yet, or a tag being written
    body = head[len(tag):].lstrip()
    at = len(head) - len(body)
    if not body:
        return TOO_EARLY
    if body[0] == "{":
        return (LLAMA3_JSON, at) if LLAMA3_JSON in formats else None
    inner = body[1:].lstrip()
    if body[0] != "[" or (inner and inner[0] != "{" and not inner[0].isidentifier()):
        return None
    if not inner:
        return TOO_EARLY
    if inner[0] == "{":
        return (MISTRAL, at) if MISTRAL in formats else None
    if PYTHONIC not in formats:
        return None
    after = inner[IDENTIFIER.match(inner).end():].lstrip()
    if not after:
        return TOO_EARLY
    return (PYTHONIC, at) if after[0] == "(" else None


def _tool_calls(found: list[tuple[str, str]], deltas: CallDeltas) -> list[ToolCall]:
    """The calls `found`, whole, with the ids their deltas carried (`deltas` updated with `found`)."""
    return [ToolCall(name, arguments, call_id) for (name, arguments), call_id in zip(found, deltas.ids)]


def _calls_read(reader: CallReader, allowed: Callable[[str], bool],
                arguments_in_strings: bool) -> list[tuple[str, str]]:
    """(name, arguments so far) of the reader's calls to allowed names, in order, up to the first that cannot go
    out yet: its name, or the first character of its arguments, still being written. With arguments_in_strings,
    arguments written as a JSON string (as some models do) are taken once whole, as the text they hold."""
    found = []
    for j, name in enumerate(reader.names):
        if name is None:
            break
        if not allowed(name):
            continue
        arguments = reader.arguments(j)
        if not arguments and not reader.complete(j):
            break
        if arguments_in_strings and arguments.startswith('"'):
            if not reader.complete(j):
                break
            arguments = _string_text(arguments)
        found.append((name, arguments))
    return found


def _string_text(literal: str) -> str:
    try:
        value = json.loads(literal)
    except json.JSONDecodeError:
        return literal
    return value.strip() if isinstance(value, str) else literal
