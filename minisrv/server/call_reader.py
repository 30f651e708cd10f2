"""Tool calls read out of JSON text while the model writes it, one pass over each character: what lets a call
stream the way vLLM streams it, named as soon as its name is written, then its arguments' text as it comes."""
from __future__ import annotations

import json
import secrets

ARGUMENT_KEYS = ("arguments", "parameters")   # OpenAI's and Hermes' name for a call's arguments, Llama 3's


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class CallReader:
    """Calls in growing JSON text: objects `depth` levels deep (1: bare objects one after another, 2: inside an
    array) with a "name" string and an arguments value (ARGUMENT_KEYS). For each, the name once its string is
    complete, and the span of the arguments' raw text, open until the value ends at a "," or "}" of the call's
    level. Text between objects is skipped, so Hermes' tags around each object do no harm."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.text = ""
        self.names: list[str | None] = []
        self.spans: list[list[int]] = []   # per call: [start, end) of its arguments in text, -1 while unknown
        self._level, self._in_string, self._escape = 0, False, False
        self._string_start = -1            # the opening quote of a string at the calls' level, else -1
        self._key: str | None = None       # the key whose value is being read (None: a key comes next)
        self._value_start = -1             # where that value began (-1: not yet)

    def feed(self, delta: str) -> None:
        start = len(self.text)
        self.text += delta
        for i in range(start, len(self.text)):
            self._read(i, self.text[i])

    def arguments(self, j: int) -> str:
        """Call j's arguments as written so far, outer whitespace left out (so that the text only grows)."""
        start, end = self.spans[j]
        return "" if start < 0 else self.text[start : end if end >= 0 else len(self.text)].strip()

    def complete(self, j: int) -> bool:
        """Whether call j's arguments value has ended."""
        return self.spans[j][1] >= 0

    def _read(self, i: int, ch: str) -> None:
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
        at_call_level = self._level == self.depth
        if at_call_level and self._key is not None and self._value_start < 0 and not ch.isspace() and ch != ":":
            self._value_start = i
            if self._key in ARGUMENT_KEYS:
                self.spans[-1][0] = i
        if ch == '"':
            self._in_string = True
            self._string_start = i if at_call_level else -1
        elif ch in "{[":
            self._level += 1
            if ch == "{" and self._level == self.depth:   # a call begins
                self.names.append(None)
                self.spans.append([-1, -1])
                self._key, self._value_start = None, -1
        elif ch in ",}" and at_call_level:
            if self._key in ARGUMENT_KEYS and self.spans[-1][0] >= 0:
                self.spans[-1][1] = i
            self._key, self._value_start = None, -1
            if ch == "}":
                self._level -= 1
        elif ch in "}]":
            self._level = max(0, self._level - 1)

    def _string_read(self, value: str) -> None:
        """A string at the calls' level has ended: a key, or the name's value."""
        if self._key is None:
            self._key = value
        elif self._key == "name" and self._value_start == self._string_start:
            self.names[-1] = value


class CallDeltas:
    """OpenAI's streaming shape for the calls found so far: a call's first delta carries its id, type and name
    (and the arguments written by then), the later ones the rest of its arguments as they come."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._sent: list[int] = []   # per call: characters of arguments streamed

    def update(self, found: list[tuple[str, str]]) -> list[dict]:
        """The deltas since the last update; `found`: (name, arguments so far) of every call found, in order
        (calls are only added at the end, and each one's arguments only grow)."""
        deltas = []
        for j, (name, arguments) in enumerate(found):
            if j == len(self.ids):
                self.ids.append(new_call_id())
                self._sent.append(len(arguments))
                deltas.append({"index": j, "id": self.ids[j], "type": "function",
                               "function": {"name": name, "arguments": arguments}})
            elif len(arguments) > self._sent[j]:
                deltas.append({"index": j, "function": {"arguments": arguments[self._sent[j]:]}})
                self._sent[j] = len(arguments)
        return deltas
