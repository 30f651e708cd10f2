"""A reasoning model's thinking split from its answer, whole or however the output is cut."""
from __future__ import annotations

import random

import pytest

from minisrv.server.reasoning import ReasoningSplitter, split_reasoning


@pytest.mark.parametrize("parser, text, expected", [
    ("qwen3", "<think>\nLet me think.\n</think>\n\nThe answer is 4.", ("\nLet me think.\n", "The answer is 4.")),
    ("qwen3", "No thinking here <think> x", (None, "No thinking here <think> x")),
    ("qwen3", "  <think>x</think>", ("x", "")),
    ("qwen3", "<thin", (None, "<thin")),
    ("qwen3", "<think>cut short </thi", ("cut short </thi", "")),
    ("qwen3", "", (None, "")),
    ("deepseek_r1", "Hmm, 2+2.\n</think>\n\n4", ("Hmm, 2+2.\n", "4")),
    ("deepseek_r1", "<think>a</think>b </think> c", ("a", "b </think> c")),
    ("deepseek_r1", "never closes <thi", ("never closes <thi", "")),
])
def test_thinking_is_split_the_same_whole_and_streamed(parser: str, text: str, expected: tuple) -> None:
    assert split_reasoning(text, parser) == expected
    for seed in range(40):
        rng, splitter, reasoning, content, i = random.Random(seed), ReasoningSplitter(parser), "", "", 0
        while i < len(text):
            step = rng.randint(1, 5)
            more_reasoning, more_content = splitter.feed(text[i : i + step])
            assert "<think>" not in more_reasoning
            if more_content and splitter.thought:   # no answer before the thinking has ended
                assert "</think>" in text[: i + step]
            reasoning, content, i = reasoning + more_reasoning, content + more_content, i + step
        more_reasoning, more_content = splitter.finish()
        assert (reasoning + more_reasoning if splitter.thought else None, content + more_content) == expected


def test_an_unknown_parser_is_refused() -> None:
    with pytest.raises(ValueError, match="qwen3, deepseek_r1"):
        ReasoningSplitter("granite")
