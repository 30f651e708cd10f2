from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from minisrv.tokenizer.incremental import IncrementalDetokenizer, TokenTexts
from tests.conftest import random_text

TOKENIZERS = ["byte_level_tokenizer", "byte_fallback_tokenizer"]


def stream(tok: Tokenizer, ids: list[int], stop: list[str],
           include_stop: bool = False) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, stop, include_stop=include_stop)
    deltas = [detok.step(i) for i in ids]
    deltas.append(detok.flush())
    return deltas, detok


def text_with_a_stop_inside(tok: Tokenizer, rng: random.Random) -> tuple[list[int], str, str]:
    """Random text's token ids, its decode, and 2-6 of its characters from anywhere in it (a stop string)."""
    ids = tok.encode(random_text(rng, rng.randint(10, 60))).ids
    text = tok.decode(ids)
    start = rng.randrange(len(text) - 1)
    return ids, text, text[start:start + rng.randint(2, 6)]


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("seed", range(20))
def test_deltas_join_to_the_full_decode_without_replacement_chars(name: str, seed: int, request) -> None:
    tok = request.getfixturevalue(name)
    rng = random.Random(seed)
    ids = tok.encode(random_text(rng, rng.randint(1, 60))).ids
    deltas, _ = stream(tok, ids, stop=[])
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_split_characters_really_occur(byte_level_tokenizer: Tokenizer, byte_fallback_tokenizer: Tokenizer) -> None:
    # Guards the test above: both tokenizers must produce tokens that are only part of a character.
    for tok, text in [(byte_level_tokenizer, "🚀龍🦀"), (byte_fallback_tokenizer, "ü🚀")]:
        ids = tok.encode(text).ids
        assert any("\ufffd" in tok.decode([i]) for i in ids), (tok, text)
        deltas, _ = stream(tok, ids, stop=[])
        assert "" in deltas[:-1] and "".join(deltas) == text


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("seed", range(20))
def test_stop_strings_are_cut_even_across_tokens(name: str, seed: int, request) -> None:
    tok = request.getfixturevalue(name)
    ids, text, inside = text_with_a_stop_inside(tok, random.Random(100 + seed))
    stop = [inside, "never occurs ~~"]
    deltas, detok = stream(tok, ids, stop)
    first = min(i for i in (text.find(s) for s in stop) if i >= 0)
    assert "".join(deltas) == text[:first]
    assert detok.stopped


def test_only_possible_stop_prefixes_are_held_back(byte_level_tokenizer: Tokenizer) -> None:
    tok = byte_level_tokenizer
    detok = IncrementalDetokenizer(tok, ["xyz"])
    emitted = "".join(detok.step(i) for i in tok.encode("abc x").ids)
    assert emitted == "abc "   # "x" may start "xyz"
    emitted += "".join(detok.step(i) for i in tok.encode("ya").ids)
    assert emitted == "abc xya"  # "xya" cannot: released at once
    assert detok.flush() == ""


def test_held_text_is_released_at_the_end(byte_level_tokenizer: Tokenizer) -> None:
    deltas, detok = stream(byte_level_tokenizer, byte_level_tokenizer.encode("hello wor").ids, ["world"])
    assert "".join(deltas) == "hello wor" and not detok.stopped and deltas[-1].endswith("wor")


def test_special_tokens_are_skipped(byte_level_tokenizer: Tokenizer) -> None:
    tok = byte_level_tokenizer
    ids = tok.encode("hi").ids + [tok.token_to_id("<|im_end|>")]
    assert "".join(stream(tok, ids, [])[0]) == "hi"


def test_kept_special_tokens_join_without_added_spaces(byte_level_tokenizer: Tokenizer) -> None:
    """skip_special_tokens false: special tokens read as the decoder joins them, with no space put between them
    (what vLLM's detokenizer does with a fast tokenizer, whatever spaces_between_special_tokens says)."""
    tok = byte_level_tokenizer
    ids = [tok.token_to_id("<|im_end|>")] * 2 + tok.encode("hi").ids
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert "".join([detok.step(i) for i in ids] + [detok.flush()]) == "<|im_end|><|im_end|>hi"


def test_empty_stop_string_is_refused(byte_level_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="stop strings"):
        IncrementalDetokenizer(byte_level_tokenizer, ["ok", ""])


@pytest.mark.parametrize("name", TOKENIZERS)
def test_token_bytes_concatenate_to_the_text(name: str, request) -> None:
    tok = request.getfixturevalue(name)
    texts = TokenTexts(tok)
    rng = random.Random(7)
    for _ in range(20):
        text = random_text(rng, 30).strip()
        ids = tok.encode(text).ids
        # SentencePiece-style decoders drop the leading space of the first word; compare without it.
        assert b"".join(texts[i].raw for i in ids).decode("utf-8").strip() == text
        whole = [i for i in ids if "\ufffd" not in tok.decode([i])]
        assert all(texts[i].text.strip() == tok.decode([i]).strip() for i in whole)


def test_byte_fallback_token_bytes(byte_fallback_tokenizer: Tokenizer) -> None:
    tok = byte_fallback_tokenizer
    texts = TokenTexts(tok)
    assert texts[tok.token_to_id("<0xE4>")].raw == b"\xe4"
    assert texts[tok.token_to_id("<0xE4>")].text == "\ufffd"


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("seed", range(10))
def test_include_stop_str_in_output_ends_the_output_with_the_stop_string(name: str, seed: int, request) -> None:
    tok = request.getfixturevalue(name)
    ids, text, inside = text_with_a_stop_inside(tok, random.Random(300 + seed))
    stop = ["never occurs ~~", inside]
    deltas, detok = stream(tok, ids, stop, include_stop=True)
    first, matched = min((text.find(s), s) for s in stop if text.find(s) >= 0)
    assert "".join(deltas) == text[: first + len(matched)] and detok.stopped
