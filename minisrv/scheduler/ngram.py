"""N-gram drafts (--speculative-config's "ngram", prompt lookup decoding): guesses at a request's next tokens,
found in its own prompt and output.

The longest suffix of the sequence, of prompt_lookup_max tokens down to prompt_lookup_min, that occurred before
is looked up, and the tokens that followed its latest earlier occurrence are the draft: text that quotes or
repeats itself (code edits, extraction, summaries that cite) is drafted right. The model checks a draft in the
step that computes the next token (Scheduler._accepted), so a wrong guess costs only the rows it added.

Each request keeps one table per n-gram size: n tokens -> the position after their latest occurrence, kept up to
date as tokens are appended, so a lookup is one dict probe per size instead of a scan of the sequence.
"""
from __future__ import annotations


class NgramDrafter:
    """One request's n-gram tables."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.sizes = range(max_n, min_n - 1, -1)   # longest first: a longer match predicts better
        self._next: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self._indexed = 0   # n-grams ending before tokens[:_indexed] are in the tables

    def propose(self, tokens: list[int], max_tokens: int) -> list[int]:
        """Up to max_tokens tokens guessed to follow `tokens` (the request's prompt and recorded output, which only
        ever grows); [] when no suffix occurred before."""
        if max_tokens <= 0:
            return []
        self._index(tokens)
        length = len(tokens)
        for n in self.sizes:
            if n >= length:
                continue
            follower = self._next[n].get(tuple(tokens[length - n:]))
            if follower is not None:
                return tokens[follower: follower + max_tokens]
        return []

    def _index(self, tokens: list[int]) -> None:
        # An n-gram enters its table once a token follows it, so the suffix being looked up is never its own match.
        for end in range(max(self._indexed, 1), len(tokens)):
            for n, table in self._next.items():
                if end >= n:
                    table[tuple(tokens[end - n: end])] = end
        self._indexed = len(tokens)
