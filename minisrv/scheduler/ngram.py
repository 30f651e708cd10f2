"""N-gram drafts (--speculative-config's "ngram", prompt lookup decoding): guesses at a request's next tokens,
found in its own prompt and output.

The longest suffix of the sequence, of prompt_lookup_max tokens down to prompt_lookup_min, that occurred before
is looked up, and the tokens that followed its latest earlier occurrence are the draft: text that quotes or
repeats itself (code edits, extraction, summaries that cite) is drafted right. The model checks a draft in the
step that computes the next token (Scheduler._accepted), so a wrong guess costs only the rows it added.

Each request keeps one table per n-gram size: n tokens -> the position after their latest occurrence, kept up to
date as tokens are appended, so a lookup is one dict probe per size instead of a scan of the sequence. Indexing
costs about 1 us a token for four sizes, once (16 ms for a 16,000-token prompt on the 2-vCPU VM, whose prefill
takes minutes there); a later lookup 4-10 us.
"""
from __future__ import annotations

# The most steps a request goes without drafts after one-token drafts kept missing: text that starts to repeat itself
# is drafted again within this many tokens.
MAX_PAUSE = 16


class NgramDrafter:
    """One request's n-gram tables, and how many tokens its drafts may have.

    That length follows how the last draft fared (`checked`): after a miss it is one more than the tokens that were
    right, back to the most after a draft that was right throughout. A one-token draft that misses pauses drafting
    for a number of steps that doubles with each such miss in a row (up to MAX_PAUSE). Text that copies keeps long
    drafts; text that does not drafts now and then, a token at a time, so its wrong guesses cost little."""

    def __init__(self, min_n: int, max_n: int, max_tokens: int) -> None:
        self.sizes = range(max_n, min_n - 1, -1)   # longest first: a longer match predicts better
        self.max_tokens = max_tokens
        self.length = max_tokens   # of the next draft
        self.pause = 0             # steps to go without a draft
        self._next_pause = 1
        self._next: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self._indexed = 0   # n-grams ending before tokens[:_indexed] are in the tables

    def checked(self, num_drafted: int, num_right: int) -> None:
        """The model agreed with the first num_right of the last draft's num_drafted tokens."""
        self.length = self.max_tokens if num_right == num_drafted else num_right + 1
        if num_drafted == 1 and num_right == 0:
            self.pause, self._next_pause = self._next_pause, min(2 * self._next_pause, MAX_PAUSE)
        elif num_right:
            self._next_pause = 1

    def propose(self, tokens: list[int], room: int) -> list[int]:
        """Up to `length` (and `room`) tokens guessed to follow `tokens` (the request's prompt and recorded output,
        which only ever grows); [] when no suffix occurred before."""
        max_tokens = min(room, self.length)
        if self.pause:
            self.pause -= 1
            return []
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
