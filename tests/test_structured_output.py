"""What each API form of structured output becomes, and how invalid ones are refused (no model needed)."""
from __future__ import annotations

import asyncio
import json

import pytest
from llguidance import LLMatcher

from minisrv import structured_output
from minisrv.structured_output import GrammarError, GrammarValidator


def accepts(grammar: str, text: str) -> bool:
    """Whether `text` is a complete output of `grammar` (checked byte-wise, with llguidance's own tokenizer-free
    validation of the grammar first)."""
    from llguidance import LLTokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()} | {"<eos>": 256}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    matcher = LLMatcher(LLTokenizer(tok.to_str(), eos_token=256), grammar)
    return matcher.consume_tokens(list(text.encode())) and matcher.is_accepting()


def test_each_form_accepts_what_it_describes() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert accepts(structured_output.json_schema(schema, "f").text, '{"a": 5}')
    assert accepts(structured_output.json_schema(json.dumps(schema), "f").text, '{"a": -12}')
    assert not accepts(structured_output.json_schema(schema, "f").text, '{"b": 5}')
    assert accepts(structured_output.json_object("f").text, '{"x": [1, 2]}')
    assert accepts(structured_output.regex(r"[0-9]{3}", "f").text, "123")
    choices = ["yes", 'a "quoted" \\ one', "ünïcode\nline"]
    for c in choices:
        assert accepts(structured_output.choice(choices, "f").text, c)
    assert not accepts(structured_output.choice(choices, "f").text, "no")
    assert accepts(structured_output.ebnf('root ::= "x" [0-9]+', "f").text, "x42")
    assert accepts(structured_output.ebnf('start: "x" /[0-9]+/', "f").text, "x42")


@pytest.mark.parametrize("make, value, field", [
    (structured_output.json_schema, "{not json", "guided_json"),
    (structured_output.json_schema, {"type": "integer", "minimum": -2**64}, "guided_json"),   # found by the fuzzer
    (structured_output.json_schema, "[1, 2]", "guided_json"),
    (structured_output.choice, [], "guided_choice"),
])
def test_malformed_values_name_their_field(make, value, field: str) -> None:
    with pytest.raises(GrammarError) as info:
        make(value, field)
    assert info.value.field == field and str(info.value).startswith(field + ": ")


def test_validation_names_the_field_and_is_cached(monkeypatch) -> None:
    validator = GrammarValidator(capacity=2)
    calls = []
    real = structured_output._validate
    monkeypatch.setattr(structured_output, "_validate", lambda g: calls.append(g) or real(g))
    bad = structured_output.json_schema({"type": "bogus"}, "response_format.json_schema.schema")
    for _ in range(2):
        with pytest.raises(GrammarError, match=r"^response_format\.json_schema\.schema: .*bogus"):
            asyncio.run(validator.check(bad))
    good = structured_output.regex("a+", "guided_regex")
    asyncio.run(validator.check(good))
    asyncio.run(validator.check(good))
    assert calls == [bad.text, good.text]
    asyncio.run(validator.check(structured_output.regex("b+", "guided_regex")))   # evicts `bad`
    with pytest.raises(GrammarError):
        asyncio.run(validator.check(bad))
    assert len(calls) == 4


def test_two_constraints_are_refused() -> None:
    with pytest.raises(GrammarError, match="guided_regex"):
        structured_output.one_grammar([structured_output.json_object("response_format"), None,
                                       structured_output.regex("a", "guided_regex")])
    assert structured_output.one_grammar([None, None]) is None
