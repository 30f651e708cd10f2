"""Tool calling: the grammar that forces a call, and the calls parsed back out of a model's text.

tool_choice "required" and a named function are enforced through structured output, so their arguments always
parse: a named function's output is its arguments (a JSON object of its parameters schema, as vLLM does); for
"required" it is a JSON array of {"name", "parameters"} objects, one of the tools each, at least one (only one
unless parallel_tool_calls). A forced call streams the way vLLM streams it (ForcedCalls): a call's id, type and
name as soon as its name is known, then its arguments' text as the model writes it. With "auto" the model writes
calls in its own format, and both formats in use are recognised: Hermes-style
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Qwen2.5, Qwen3, Hermes) and Llama 3.x's bare
JSON object `{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`), or several separated by
semicolons; whether such text is a call is known only once it is complete, so those go out whole.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from minisrv import structured_output
from minisrv.structured_output import Grammar

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_HERMES_BLOCK = re.compile(re.escape(HERMES_START) + r"\s*(.*?)\s*(?:" + re.escape(HERMES_END) + r"|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str            # JSON text, as OpenAI's API returns it
    id: str = ""

    def as_api(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def call_grammar(tools: list[dict], choice: str, parallel: bool, field: str) -> Grammar:
    """The output a forced tool_choice allows: `choice` is "required" or a function's name (one of `tools`,
    OpenAI's {"type": "function", "function": {...}} objects)."""
    functions = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    if choice != "required":
        return structured_output.json_schema(functions[choice], field)
    items = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "parameters": params},
                        "required": ["name", "parameters"], "additionalProperties": False}
                       for name, params in functions.items()]}
    schema = {"type": "array", "items": items, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    return structured_output.json_schema(schema, field)


def forced_calls(text: str, choice: str) -> list[ToolCall]:
    """The calls of an output made under call_grammar: those whose name it reached, their arguments as far as
    it goes (a finished output's always parse)."""
    calls = ForcedCalls(choice)
    calls.feed(text)
    return calls.calls()


class ForcedCalls:
    """The calls of an output made under call_grammar, read as it grows: each call's name once it is complete,
    and its arguments as the raw JSON text written so far (outer whitespace left out, so the text only grows).

    "required" outputs are scanned one character at a time, once each: a call is an object one level inside the
    array, its "name" a string, its "parameters" any JSON value (ended by a "," or "}" at the object's level)."""

    def __init__(self, choice: str) -> None:
        self.choice = choice
        self.text = ""
        self.names: list[str | None] = []     # per call
        self.spans: list[list[int]] = []      # per call: [start, end] of its arguments in self.text, -1 if unknown
        self.ids: list[str] = []              # per call whose name is known
        self.sent: list[int] = []             # per call whose name is known: characters of arguments streamed
        self._depth, self._in_string, self._escape = 0, False, False
        self._string_start = -1    # the opening quote of the string being read at the objects' level
        self._key: str | None = None          # the key whose value is being read (None: a key comes next)
        self._value_start = -1                # where that value began (-1: not yet)

    def feed(self, delta: str) -> list[dict]:
        """Read `delta`; the tool_calls deltas (OpenAI's streaming shape) it adds."""
        start = len(self.text)
        self.text += delta
        if self.choice != "required":
            if not self.names:
                self.names, self.spans = [self.choice], [[0, -1]]
        else:
            for i in range(start, len(self.text)):
                self._scan(i, self.text[i])
        return self._new_deltas()

    def calls(self) -> list[ToolCall]:
        """The calls so far, whole (with the ids their streamed deltas carried)."""
        self._new_deltas()
        return [ToolCall(name, self.arguments(j), self.ids[j]) for j, name in enumerate(self.names) if name]

    def arguments(self, j: int) -> str:
        start, end = self.spans[j]
        if start < 0:
            return ""
        return self.text[start : end if end >= 0 else len(self.text)].strip()

    def _new_deltas(self) -> list[dict]:
        out = []
        for j, name in enumerate(self.names):
            if name is None:
                break   # calls go out in order
            arguments = self.arguments(j)
            if j == len(self.ids):
                self.ids.append(new_call_id())
                self.sent.append(len(arguments))
                out.append({"index": j, "id": self.ids[j], "type": "function",
                            "function": {"name": name, "arguments": arguments}})
            elif len(arguments) > self.sent[j]:
                out.append({"index": j, "function": {"arguments": arguments[self.sent[j]:]}})
                self.sent[j] = len(arguments)
        return out

    def _scan(self, i: int, ch: str) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                if self._string_start >= 0:
                    self._string_read(json.loads(self.text[self._string_start : i + 1]))
            return
        at_call_level = self._depth == 2
        if at_call_level and self._key is not None and self._value_start < 0 and not ch.isspace() and ch != ":":
            self._value_start = i
            if self._key == "parameters":
                self.spans[-1][0] = i
        if ch == '"':
            self._in_string = True
            self._string_start = i if at_call_level else -1
        elif ch in "{[":
            self._depth += 1
            if ch == "{" and self._depth == 2:   # a call begins
                self.names.append(None)
                self.spans.append([-1, -1])
        elif ch in ",}" and at_call_level:
            if self._key == "parameters":
                self.spans[-1][1] = i
            self._key, self._value_start = None, -1
            if ch == "}":
                self._depth -= 1
        elif ch in "}]":
            self._depth -= 1

    def _string_read(self, value: str) -> None:
        """A string at the call's level has ended: a key, or the name's value."""
        if self._key is None:
            self._key = value
        elif self._key == "name" and self._value_start == self._string_start:
            self.names[-1] = value


def parse_calls(text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a model's free output under tool_choice "auto": calls to functions in `names`, in
    the Hermes or the Llama 3 format; text that is not a call stays content. No call: (text, [])."""
    if HERMES_START in text:
        calls = [c for c in (_call_of(block) for block in _HERMES_BLOCK.findall(text)) if c and c.name in names]
        if calls:
            return text[: text.index(HERMES_START)], calls
        return text, []
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    if body.startswith("{"):
        calls = [_call_of(part) for part in body.split(";")]
        if calls and all(c is not None and c.name in names for c in calls):
            return "", calls
    return text, []


def _call_of(blob: str) -> ToolCall | None:
    try:
        obj = json.loads(blob)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):   # some models write the arguments as a JSON string already
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False), new_call_id())


class AutoCallStream:
    """Streams a choice's content under tool_choice "auto" while holding back what may become a call: from a
    Hermes start tag, or the whole output once it opens like a Llama 3 call. `feed` returns the content that
    is safe to send now; `finish` returns the rest as (content, calls)."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.text = ""
        self.sent = 0       # characters of self.text already streamed as content

    def feed(self, delta: str) -> str:
        self.text += delta
        head = self.text.lstrip()
        if not self.sent and (head.startswith("{") or PYTHON_TAG.startswith(head[: len(PYTHON_TAG)]) and head):
            return ""   # may be a Llama 3 call: hold it all until the end
        start = self.text.find(HERMES_START, self.sent)
        if start >= 0:
            safe = start
        else:   # keep back a tail that could be the beginning of a start tag
            safe = len(self.text)
            for k in range(min(len(HERMES_START) - 1, len(self.text) - self.sent), 0, -1):
                if HERMES_START.startswith(self.text[-k:]):
                    safe = len(self.text) - k
                    break
        out, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = parse_calls(self.text, self.names)
        if calls:
            return content[self.sent:] if len(content) > self.sent else "", calls
        return self.text[self.sent:], []
