"""A reasoning model's thinking apart from its answer (vLLM's --reasoning-parser): chat responses carry the text
inside <think> ... </think> as `reasoning_content` and the rest as `content`, streamed as it comes.

Two parsers, named as vLLM names them. qwen3: thinking only when the output opens with <think> (a template's
enable_thinking=False leaves none). deepseek_r1: the output starts inside the thinking (its template opens the
tag in the prompt; a <think> written anyway is dropped) up to </think>; an output that never closes it is all
thinking. Tool calls under "auto" are read from the answer only; a request constrained by a grammar from its
first token (structured output, a forced call) is not split, as its output is the grammar's.
"""
from __future__ import annotations

from minisrv.config import REASONING_PARSERS
from minisrv.server.streams import before_partial_tag

THINK_START, THINK_END = "<think>", "</think>"


class ReasoningSplitter:
    """Splits one choice's output as it grows: `feed` gives the (reasoning, content) text that may go out now,
    holding back what could still be the start of a tag; `finish` gives the rest. The answer starts at its first
    character that is not whitespace after </think>."""

    def __init__(self, parser: str) -> None:
        if parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning parser must be one of {', '.join(REASONING_PARSERS)}, got {parser!r}")
        self.parser = parser
        self.text = ""
        self.done = 0                 # characters of text already given out (or skipped)
        self.state = "opening"        # -> "thinking" -> "after_thinking" -> "answer"
        self.thought = False          # whether the output has a thinking part

    def feed(self, delta: str) -> tuple[str, str]:
        self.text += delta
        return self._split(final=False)

    def finish(self) -> tuple[str, str]:
        return self._split(final=True)

    def _split(self, final: bool) -> tuple[str, str]:
        reasoning = ""
        if self.state == "opening":
            head = self.text.lstrip()
            if head.startswith(THINK_START):
                self.done, self.state = len(self.text) - len(head) + len(THINK_START), "thinking"
            elif not final and THINK_START.startswith(head):   # could still become <think>
                return "", ""
            else:
                self.state = "thinking" if self.parser == "deepseek_r1" else "answer"
            self.thought = self.state == "thinking"
        if self.state == "thinking":
            end = self.text.find(THINK_END, self.done)
            if end < 0:
                cut = len(self.text) if final else before_partial_tag(self.text, self.done, THINK_END)
                reasoning, self.done = self.text[self.done : cut], cut
                return reasoning, ""
            reasoning, self.done, self.state = self.text[self.done : end], end + len(THINK_END), "after_thinking"
        if self.state == "after_thinking":
            rest = self.text[self.done:]
            self.done += len(rest) - len(rest.lstrip())
            if self.done == len(self.text):
                return reasoning, ""
            self.state = "answer"
        content, self.done = self.text[self.done:], len(self.text)
        return reasoning, content


def split_reasoning(text: str, parser: str) -> tuple[str | None, str]:
    """(reasoning, or None when the output has no thinking part; content) of a whole output."""
    splitter = ReasoningSplitter(parser)
    reasoning, content = splitter.feed(text)
    more_reasoning, more_content = splitter.finish()
    return (reasoning + more_reasoning if splitter.thought else None), content + more_content
