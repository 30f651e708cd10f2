from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from minisrv.scheduler.ngram import NgramDrafter


def brute_force(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The longest suffix (max_n down to min_n) seen before, and what followed its latest earlier occurrence."""
    for n in range(max_n, min_n - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for end in range(len(tokens) - 1, n - 1, -1):   # end: the position after an occurrence, latest first
            if tokens[end - n: end] == suffix:
                return tokens[end: end + k]
    return []


def test_the_tokens_after_the_latest_earlier_occurrence_of_the_longest_suffix():
    drafter = NgramDrafter(1, 3, 8)
    #         0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 9, 5, 6, 7, 1, 5, 6, 7]
    # "5 6 7" occurred at 0 and 5; the latest is followed by 1, 5, 6
    assert drafter.propose(tokens, 3) == [1, 5, 6]
    assert drafter.propose(tokens, 1) == [1]


def test_a_longer_match_wins_over_a_later_shorter_one():
    drafter = NgramDrafter(1, 2, 8)
    tokens = [3, 4, 9, 4, 8, 3, 4]
    # "3 4" occurred at 0 (then 9); "4" alone occurred later, at 3 (then 8)
    assert drafter.propose(tokens, 2) == [9, 4]


def test_nothing_when_no_suffix_occurred_before_or_no_room():
    drafter = NgramDrafter(2, 3, 8)
    assert drafter.propose([1, 2, 3, 4], 4) == []
    assert drafter.propose([1, 2, 1, 2], 0) == []
    assert NgramDrafter(1, 1, 0).propose([1, 2, 1, 2], 3) == []
    assert NgramDrafter(1, 1, 8).propose([7], 2) == []


def test_a_draft_stops_at_the_end_of_the_sequence():
    assert NgramDrafter(1, 1, 8).propose([1, 1, 1], 5) == [1]


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=40),
       sizes=st.tuples(st.integers(1, 4), st.integers(0, 3)), k=st.integers(1, 6),
       cuts=st.lists(st.integers(1, 40), max_size=4))
def test_growing_a_sequence_step_by_step_proposes_what_a_scan_finds(tokens, sizes, k, cuts):
    min_n, max_n = sizes[0], sizes[0] + sizes[1]
    drafter = NgramDrafter(min_n, max_n, 8)
    for cut in sorted(c for c in cuts if c < len(tokens)) + [len(tokens)]:   # the tables follow as tokens arrive
        assert drafter.propose(tokens[:cut], k) == brute_force(tokens[:cut], min_n, max_n, k)


def test_a_draft_after_a_miss_is_one_longer_than_what_was_right_and_full_again_after_a_hit():
    drafter = NgramDrafter(1, 1, 4)
    tokens = [1, 2, 3, 4, 5, 6, 1]
    assert drafter.propose(tokens, 10) == [2, 3, 4, 5]
    drafter.checked(4, 1)
    assert drafter.propose(tokens, 10) == [2, 3]
    drafter.checked(2, 0)
    assert drafter.propose(tokens, 10) == [2]
    drafter.checked(1, 1)
    assert drafter.propose(tokens, 10) == [2, 3, 4, 5]


def test_one_token_drafts_that_keep_missing_pause_drafting_for_longer_and_longer():
    drafter = NgramDrafter(1, 1, 4)
    tokens = [1, 2, 1]
    drafted = []
    for _ in range(40):
        draft = drafter.propose(tokens, 10)
        drafted.append(len(draft))
        if draft:
            drafter.checked(len(draft), 0)
    assert drafted[:8] == [2, 1, 0, 1, 0, 0, 1, 0]   # 1 step off, then 2, then 4...
    gaps = [i for i, n in enumerate(drafted) if n]
    assert max(b - a for a, b in zip(gaps, gaps[1:])) == 17   # at most MAX_PAUSE steps without
    while not drafter.propose(tokens, 10):
        pass
    drafter.checked(1, 1)   # a hit: full length again, and the next pause is short again
    assert drafter.propose(tokens, 10) == [2, 1]
    drafter.checked(2, 0)   # a longer draft's miss shortens it without a pause
    assert drafter.propose(tokens, 10) == [2]
    drafter.checked(1, 0)
    assert drafter.propose(tokens, 10) == [] and drafter.propose(tokens, 10) == [2]
