"""Incremental detokenization of one output stream: UTF-8-safe text deltas, stop strings, token texts.

Text comes from the `tokenizers` library's DecodeStream, which buffers tokens until they decode to
whole characters (so a CJK character or an emoji split over byte tokens never yields U+FFFD) and
costs O(1) per token. Stop strings are matched on the decoded text: text that could still turn out to
be the start of a stop string is held back until it cannot, so a stop string spanning several tokens
is never returned, and nothing else is delayed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from tokenizers import Tokenizer
from tokenizers.decoders import ByteLevel, DecodeStream

_BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SENTENCEPIECE_SPACE = "\u2581"


class IncrementalDetokenizer:
    """Turns one choice's token ids, one at a time, into text deltas with stop strings cut out."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], skip_special_tokens: bool = True,
                 include_stop: bool = False) -> None:
        """include_stop: a matched stop string ends the output (vLLM's include_stop_str_in_output)."""
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._stop = list(stop)
        self._include_stop = include_stop
        self._held = ""           # decoded text that may be the beginning of a stop string
        self.stopped = False      # a stop string matched; everything from it on is dropped

    def step(self, token_id: int) -> str:
        """Feed one token; return the text that is now safe to emit ("" while a character is incomplete)."""
        if self.stopped:
            return ""
        chunk = self._stream.step(self._tokenizer, token_id) or ""
        if not self._stop:
            return chunk
        text = self._held + chunk
        hit = _earliest_stop(text, self._stop)
        if hit is not None:
            self.stopped = True
            self._held = ""
            start, matched = hit
            return text[: start + len(matched)] if self._include_stop else text[:start]
        keep = _partial_stop_suffix(text, self._stop)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The request finished without a stop string: release the text held back for matching."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


def _earliest_stop(text: str, stop: list[str]) -> tuple[int, str] | None:
    """(where, which) of the stop string that starts first in `text` (the first listed among equals)."""
    # Every match that could start in already-emitted text was complete (and found) back then, so the
    # whole of `text` (held part + new chunk, both short) is the only place to look.
    hits = [(i, s) for i, s in ((text.find(s), s) for s in stop) if i >= 0]
    return min(hits, key=lambda hit: hit[0]) if hits else None


def _partial_stop_suffix(text: str, stop: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = min(len(text), max(len(s) for s in stop) - 1)
    for k in range(longest, 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stop):
            return k
    return 0


@dataclass(frozen=True)
class TokenText:
    text: str      # the token's text on its own (U+FFFD where it is only part of a character)
    raw: bytes     # the exact bytes it contributes to the output


class TokenTexts:
    """Per-token texts and bytes for logprobs, cached because the same ids recur in every step."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._byte_level = isinstance(tokenizer.decoder, ByteLevel)
        self._unicode_to_byte = {}
        if self._byte_level:   # GPT-2's table of which printable character stands for which byte
            from gguf.vocab import bytes_to_unicode   # the same table as transformers', without importing it

            self._unicode_to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
        self._cache: dict[int, TokenText] = {}

    def __getitem__(self, token_id: int) -> TokenText:
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._lookup(token_id)
        return found

    def _lookup(self, token_id: int) -> TokenText:
        piece = self._tokenizer.id_to_token(token_id) or ""
        if self._byte_level and all(ch in self._unicode_to_byte for ch in piece):
            raw = bytes(self._unicode_to_byte[ch] for ch in piece)
            return TokenText(raw.decode("utf-8", errors="replace"), raw)
        fallback = _BYTE_FALLBACK_TOKEN.fullmatch(piece)
        if fallback:  # SentencePiece byte-fallback token such as <0xE4>
            raw = bytes([int(fallback.group(1), 16)])
            return TokenText(raw.decode("utf-8", errors="replace"), raw)
        # SentencePiece pieces write a leading space as U+2581; decoding the token alone would strip it.
        text = piece.replace(_SENTENCEPIECE_SPACE, " ")
        return TokenText(text, text.encode("utf-8"))
