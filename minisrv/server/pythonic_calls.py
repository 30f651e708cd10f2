"""Tool calls written as a Python list of calls, `[get_weather(city="Paris"), get_time(zone="UTC")]`: the
format Llama 3.2's and Llama 4's pythonic chat templates ask for (vLLM's `pythonic` parser).

The text is scanned once as it grows, keeping track of brackets and string literals, so that each call is known
complete at its closing parenthesis; it is then parsed by Python's own `ast` (keyword arguments of literal
values only, JSON's true/false/null taken as well) and its arguments become a JSON object. A call that does not
parse is no call, and the output it is in stays content: so a tool whose name Python cannot call (a keyword such
as `import`, a name with a dash) is never called in this format, as with vLLM's parser, which parses alike. The reader answers as CallReader does (names,
arguments, complete), a call appearing only once whole.
"""
from __future__ import annotations

import ast
import json

JSON_NAMES = {"true": True, "false": False, "null": None}
CLOSING = {"(": ")", "[": "]", "{": "}"}


class PythonicCallReader:
    """The calls of a growing `[f(a=1), g(b="x")]` text; a call is listed once its closing parenthesis is read."""

    def __init__(self) -> None:
        self.text = ""
        self.names: list[str] = []
        self._arguments: list[str] = []
        self._open: list[str] = []          # the brackets open at this point, "[" of the list first
        self._quote = ""                    # the quote of the string literal being read, "" outside one
        self._escape = False
        self._call_start = -1               # where the call being read began, -1 between calls
        self._after_call = False            # a call has ended and no "," followed yet
        self.closed = False                 # the list's "]" was read
        self.broken = False                 # the text stopped being a list of calls

    def feed(self, delta: str) -> None:
        start = len(self.text)
        self.text += delta
        for i in range(start, len(self.text)):
            if self.closed or self.broken:
                return
            self._read(i, self.text[i])

    def arguments(self, j: int) -> str:
        return self._arguments[j]

    def complete(self, j: int) -> bool:
        return True

    def _read(self, i: int, ch: str) -> None:
        if self._quote:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == self._quote:
                self._quote = ""
            return
        if ch.isspace():
            return
        if not self._open:   # before the list
            self._open.append(ch) if ch == "[" else self._break()
        elif len(self._open) == 1:   # between calls
            self._between_calls(i, ch)
        elif ch in "'\"":
            self._quote = ch
        elif ch in CLOSING:
            self._open.append(ch)
        elif ch not in ")]}":
            return
        elif CLOSING[self._open.pop()] != ch:
            self._break()
        elif len(self._open) == 1:   # the call's own ")"
            self._end_call(i + 1)

    def _between_calls(self, i: int, ch: str) -> None:
        if self._call_start >= 0:   # a name being written
            if ch == "(":
                self._open.append(ch)
            elif not (ch.isidentifier() or ch.isdigit()) or self.text[i - 1].isspace():
                self._break()
        elif ch == "," and self._after_call:
            self._after_call = False
        elif ch == "]" and self.names:   # after a call, or a trailing comma
            self.closed = True
        elif ch.isidentifier() and not self._after_call:
            self._call_start = i
        else:
            self._break()

    def _break(self) -> None:
        self.broken = True

    def _end_call(self, end: int) -> None:
        call = parse_call(self.text[self._call_start:end])
        self._call_start, self._after_call = -1, True
        if call is None:
            self.broken = True
            return
        try:
            arguments = json.dumps(call[1], ensure_ascii=False, allow_nan=False)
        except ValueError:   # inf or nan: no JSON for it
            self.broken = True
            return
        self.names.append(call[0])
        self._arguments.append(arguments)


def parse_call(text: str) -> tuple[str, dict] | None:
    """(name, arguments) of `name(key=literal, ...)`, or None when `text` is anything else."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    arguments = {}
    for keyword in node.keywords:
        if keyword.arg is None:   # **kwargs
            return None
        try:
            arguments[keyword.arg] = _literal(keyword.value)
        except (ValueError, TypeError, RecursionError):   # not a literal, an unhashable key, too deep
            return None
    return node.func.id, arguments


def _literal(node: ast.expr) -> object:
    """A literal's value, JSON's names (true, false, null) included; ValueError for anything that is not one."""
    if isinstance(node, ast.Name) and node.id in JSON_NAMES:
        return JSON_NAMES[node.id]
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("a ** inside a dict")
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    value = ast.literal_eval(node)
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, complex | bytes):
        raise ValueError("no JSON value")
    return value
