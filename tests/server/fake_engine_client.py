"""An in-process EngineHandle standing in for the ring-backed EngineClient, so the HTTP layer is tested alone.

Its "model" is a pure function of the prompt (and of the seed when sampling): each output token is
one character of a reply text, so the expected text, token count and finish reason of any request
are computable in the test. It honours n, stop strings, max_tokens (None: up to the context length),
the context length, logprobs and echo, and it records which requests were aborted.
"""
from __future__ import annotations

import asyncio
import time
import itertools
from typing import AsyncIterator

from minisrv.server.engine_handle import OutputDelta, RequestError, TokenLogprob
from minisrv.wire.records import PromptRequest
from minisrv.wire.terms import NUM_HISTOGRAM_COUNTS, REQUEST_HISTOGRAMS, HistogramValues, SchedulerStats

REPLY = "Hello, world! 你好 🙂 The quick brown fox jumps over the lazy dog."
MAX_MODEL_LEN = 256
VOCAB_SIZE = 0x20000   # every character above is its own token (token id = code point)


def render_prompt(inp: PromptRequest) -> str:
    if inp.messages is not None:
        return "".join(f"<{role}>{content}\n" for role, content in inp.messages)
    if inp.text is not None:
        return inp.text
    return "".join(chr(t) for t in inp.prompt_ids)


def reply_for(inp: PromptRequest, choice: int) -> str:
    """The text a choice generates before its "EOS": the reply, rotated by a seed-derived amount."""
    p = inp.params
    shift = 0 if p.temperature == 0.0 else ((p.seed if p.seed is not None else 7) * 31 + choice * 17) % len(REPLY)
    return REPLY[shift:] + REPLY[:shift]


def expected_text(inp: PromptRequest, choice: int, max_tokens: int) -> tuple[str, str]:
    """A choice's whole output text and finish reason."""
    text, reason = reply_for(inp, choice), "stop"
    matched = _matched_stop(inp, text)
    if matched is not None:
        start, stop = matched
        text = text[: start + len(stop)] if inp.include_stop_str_in_output else text[:start]
    if len(text) > max_tokens:
        text, reason = text[:max_tokens], "length"
    return text, reason


def _matched_stop(inp: PromptRequest, text: str) -> tuple[int, str] | None:
    """(where, which) of the stop string that starts first in `text`, as the detokenizer finds it."""
    hits = [(i, s) for i, s in ((text.find(s), s) for s in inp.stop) if i >= 0]
    return min(hits, key=lambda hit: hit[0]) if hits else None


class FakeEngineClient:
    def __init__(self, model_name: str = "fake-model", step_delay: float = 0.0) -> None:
        self.ready = True
        self.unresponsive_worker: str | None = None
        self.dead_worker: str | None = None
        self.model_name = model_name
        self.max_model_len = MAX_MODEL_LEN
        self.vocab_size = VOCAB_SIZE
        self.step_delay = step_delay
        self.inputs: list[PromptRequest] = []
        self.running: set[int] = set()
        self.aborted: list[int] = []
        self.flushes = 0
        self._ids = itertools.count()

    def stats(self) -> SchedulerStats:
        return SchedulerStats(num_running=len(self.running), num_waiting=0, kv_cache_usage=len(self.running) / 100,
                              prefix_cache_queries=7, prefix_cache_hits=3, prompt_tokens=11, generation_tokens=13,
                              finished_stop=2, finished_length=1)

    def histograms(self) -> HistogramValues:
        """Fixed values: bucket i of the flat array holds i observations, so the test can check the rendering."""
        return HistogramValues(list(range(NUM_HISTOGRAM_COUNTS)), [0.5 * i for i in range(len(REQUEST_HISTOGRAMS))])

    async def flush_cache(self) -> None:
        if not self.ready:
            raise RequestError(503, "not ready")
        self.flushes += 1

    async def stream(self, inp: PromptRequest) -> AsyncIterator[OutputDelta]:
        if not self.ready:
            raise RequestError(503, "not ready")
        prompt = render_prompt(inp)
        if any(ord(c) >= VOCAB_SIZE for c in prompt):
            raise RequestError(400, "token id outside the vocabulary", "prompt")
        params = inp.params
        max_tokens = MAX_MODEL_LEN - len(prompt) if params.max_tokens is None else params.max_tokens
        if len(prompt) + max_tokens > MAX_MODEL_LEN:
            raise RequestError(400, f"prompt has {len(prompt)} tokens and max_tokens is {max_tokens}, "
                                    f"but the context length is {MAX_MODEL_LEN}", "prompt")
        rid = next(self._ids)
        self.inputs.append(inp)
        self.running.add(rid)
        finished = False
        try:
            outputs = [self._choice_output(inp, c, max_tokens) for c in range(inp.n)]
            longest = max(len(text) for text, _ in outputs)
            for step in range(longest):
                await asyncio.sleep(self.step_delay)
                for c, (text, reason) in enumerate(outputs):
                    if step >= len(text):
                        continue
                    last = step == len(text) - 1
                    echo = prompt if (inp.echo and step == 0) else ""
                    piece = text[step]
                    token = piece[-1:] or " "   # a whole stop string: its last character's token
                    yield OutputDelta(
                        index=c, text=echo + piece, token_ids=[ord(token)],
                        logprobs=self._logprobs(token, params.logprobs),
                        finish_reason=reason if last else None, num_prompt_tokens=len(prompt),
                        num_cached_tokens=len(prompt) // 2 if c else 0, num_output_tokens=step + 1,
                        emitted_ns=time.monotonic_ns(),
                    )
            finished = True
        finally:
            self.running.discard(rid)
            if not finished:
                self.aborted.append(rid)

    @staticmethod
    def _choice_output(inp: PromptRequest, choice: int, max_tokens: int) -> tuple[list[str], str]:
        """One character per step; a stop string at the very start still costs one (textless) token. A stop string
        kept in the output comes whole in the last step, as the detokenizer holds back what may begin one."""
        text, reason = expected_text(inp, choice, max_tokens)
        pieces = list(text) or [""]
        matched = _matched_stop(inp, text) if inp.include_stop_str_in_output and reason == "stop" else None
        if matched is not None and len(matched[1]) > 1:
            pieces = pieces[: -len(matched[1])] + [matched[1]]
        return pieces, reason

    @staticmethod
    def _logprobs(char: str, top: int | None) -> list[TokenLogprob] | None:
        if top is None:
            return None
        alternatives = [TokenLogprob(chr(ord("a") + k), ord("a") + k, -1.0 - k, chr(ord("a") + k).encode())
                        for k in range(top)]
        return [TokenLogprob(char, ord(char), -0.25, char.encode(), alternatives)]
