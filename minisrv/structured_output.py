"""Structured output on the API side: what a request asks for, as one llguidance grammar, checked once.

Every way a client can constrain the output (OpenAI's response_format, vLLM's structured_outputs and guided_*
fields, SGLang's json_schema / regex / ebnf) becomes one grammar string in llguidance's format, which travels
in SamplingParams.grammar to the engine (minisrv/engine/grammar.py compiles it against the tokenizer and
masks the logits). llguidance, because it has no dependencies beyond itself (xgrammar needs triton) and both
vLLM and SGLang offer it as a backend; it takes JSON Schema, regular expressions and Lark grammars, and
converts the GBNF that llama.cpp, xgrammar and SGLang's `ebnf` use.

A grammar is validated here, so an invalid one is a 400 naming the field it came from; validations are cached
by grammar, and one not seen before is checked on a worker thread (a large schema takes tens of ms), so the
API server's event loop never waits for it.
"""
from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from dataclasses import dataclass

from llguidance import LLMatcher
from llguidance.gbnf_to_lark import gbnf_to_lark

JSON_OBJECT_SCHEMA = {"type": "object"}   # response_format json_object: any JSON object
# JSON as json.dumps writes it (", " and ": ", no newlines) rather than any whitespace: a small model sampling
# at temperature 1 otherwise wanders into runs of tabs or newlines that only max_tokens ends (measured on the
# embedded model). A schema's own "x-guidance" options still apply on top.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
VALIDATIONS_KEPT = 1024


class GrammarError(ValueError):
    """A grammar the client sent that cannot be used; `field` is the request field it came from."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Grammar:
    """An llguidance grammar (the JSON of its TopLevelGrammar) and the request field it was made from."""

    text: str
    field: str
    fault_field: str | None = None   # what an invalid grammar's error names, where not `field` (a forced call's tools)


def json_schema(schema: dict | str, field: str) -> Grammar:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise GrammarError(field, f"not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise GrammarError(field, f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        return Grammar(LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS), field)
    except (ValueError, TypeError) as exc:   # e.g. an integer beyond 64 bits, which llguidance cannot carry
        raise GrammarError(field, f"not a usable JSON schema: {exc}") from None


def json_object(field: str) -> Grammar:
    return Grammar(LLMatcher.grammar_from_json_schema(JSON_OBJECT_SCHEMA, defaults=JSON_OPTIONS), field)


def regex(pattern: str, field: str) -> Grammar:
    return Grammar(LLMatcher.grammar_from_regex(pattern), field)


def choice(options: list[str], field: str) -> Grammar:
    """Exactly one of `options`: a Lark alternation of string literals (JSON string escapes are Lark's)."""
    if not options:
        raise GrammarError(field, "must list at least one choice")
    return Grammar(LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options)), field)


def token_ids(ids: list[int], field: str) -> Grammar:
    """Only these tokens (vLLM's allowed_token_ids), any number of them; an end of sequence stays allowed, so the
    output can end before max_tokens. llguidance's Lark names a token by id as <[id,...]>."""
    if not ids:
        raise GrammarError(field, "must list at least one token id")
    return Grammar(LLMatcher.grammar_from_lark(f"start: <[{','.join(map(str, sorted(set(ids))))}]>*"), field)


def ebnf(text: str, field: str) -> Grammar:
    """A GBNF grammar (rules written `name ::= ...`, root rule `root`) or a Lark one (`start: ...`)."""
    if "::=" in text:
        try:
            text = gbnf_to_lark(text)
        except Exception as exc:   # the converter raises plain exceptions on malformed input
            raise GrammarError(field, f"not a valid GBNF grammar: {exc}") from None
    return Grammar(LLMatcher.grammar_from_lark(text), field)


def one_grammar(candidates: list[Grammar | None]) -> Grammar | None:
    """The grammar a request asked for, refusing requests that ask for two (each endpoint has several ways)."""
    given = [g for g in candidates if g is not None]
    if len(given) > 1:
        raise GrammarError(given[1].field, f"give one constraint on the output, not both {given[0].field} and "
                                           f"{given[1].field}")
    return given[0] if given else None


class GrammarValidator:
    """Validates grammars against llguidance, remembering the last VALIDATIONS_KEPT verdicts."""

    def __init__(self, capacity: int = VALIDATIONS_KEPT) -> None:
        self.capacity = capacity
        self._verdicts: OrderedDict[str, str] = OrderedDict()   # grammar -> "" or its error

    async def check(self, grammar: Grammar | None) -> None:
        """Raise GrammarError when `grammar` is invalid; a grammar not seen before is checked on a thread."""
        if grammar is None:
            return
        verdict = self._verdicts.get(grammar.text)
        if verdict is None:
            verdict = await asyncio.to_thread(_validate, grammar.text)
            self._verdicts[grammar.text] = verdict
            if len(self._verdicts) > self.capacity:
                self._verdicts.popitem(last=False)
        else:
            self._verdicts.move_to_end(grammar.text)
        if verdict:
            raise GrammarError(grammar.fault_field or grammar.field, verdict)


def _validate(grammar: str) -> str:
    """"" for a valid grammar, else llguidance's message (warnings, such as unsupported formats, are fine)."""
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0].strip() if is_error else ""

