"""From OutputDelta streams to response pieces: choice numbering, usage, logprobs, SSE framing.

The endpoint-specific shapes (chat, completions, /generate) live in responses.py; this module holds
what they share. A request's deltas arrive as ChoiceDelta(choice, prompt, delta): `choice` numbers
the response's choices (prompt index * n + the delta's index, as OpenAI numbers the choices of a
completions request with several prompts), `prompt` says which prompt the choice belongs to.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, NamedTuple

from minisrv.server.engine_handle import OutputDelta, TokenLogprob

SSE_DONE = b"data: [DONE]\n\n"
# JSON has no -inf; OpenAI reports a token the sampler could never pick with this logprob.
MIN_LOGPROB = -9999.0


class ChoiceDelta(NamedTuple):
    choice: int
    prompt: int
    delta: OutputDelta


def to_json(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def sse_event(obj: object, emitted_ns: int = 0) -> bytes:
    """One SSE event; with `emitted_ns`, preceded by the comment line `: emitted NS` (--sse-timestamps)."""
    event = b"data: " + to_json(obj) + b"\n\n"
    return b": emitted %d\n" % emitted_ns + event if emitted_ns else event


async def choice_deltas(streams: list[AsyncIterator[OutputDelta]], n: int) -> AsyncIterator[ChoiceDelta]:
    """All prompts' deltas as they come; closing this closes (and so aborts) every stream."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for delta in only:
                yield ChoiceDelta(delta.index, 0, delta)
        return
    queue: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()

    async def pump(prompt: int, stream: AsyncIterator[OutputDelta]) -> None:
        try:
            async with aclosing(stream):
                async for delta in stream:
                    queue.put_nowait(ChoiceDelta(prompt * n + delta.index, prompt, delta))
        except Exception as exc:  # handed to the consumer, which raises it in the request's own task
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(None)

    pumps = [asyncio.create_task(pump(p, s)) for p, s in enumerate(streams)]
    try:
        running = len(pumps)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        # Synchronous on purpose: this may run inside a cancelled scope, where any await would raise.
        for task in pumps:
            task.cancel()


@dataclass
class ResponseContext:
    """What every piece of one response needs: its identity and the usage so far."""

    id: str
    created: int
    model: str
    include_usage: bool = False
    continuous_usage: bool = False    # stream_options.continuous_usage_stats: the usage so far in every chunk
    sse_timestamps: bool = False      # --sse-timestamps: each chunk says when its first token left the scheduler
    tool_choice: str = "none"         # chat: "none", "auto", "required" or a forced function's name
    tool_names: frozenset[str] = frozenset()   # chat: the functions the request offers
    tool_call_parser: str = "auto"    # chat: the call formats tool_choice auto finds (--tool-call-parser)
    reasoning_parser: str | None = None   # chat: how thinking is split from the answer (--reasoning-parser)
    echoed: str = ""                  # chat with vLLM's echo: the text each choice's content starts with
    tokens_as_ids: bool = False       # vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:<id>"
    logprob_text: bool | None = None  # /generate with return_logprob: whether its logprobs carry the token text
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs: alternatives per prompt token, None: not asked
    echo_logprobs: int | None = None    # completions with echo and logprobs: the prompt's tokens lead the logprobs
    _choices: dict[int, ChoiceDelta] = field(default_factory=dict)   # latest delta of each choice

    @classmethod
    def new(cls, id_prefix: str, model: str, include_usage: bool = False,
            continuous_usage: bool = False, sse_timestamps: bool = False,
            request_id: str | None = None) -> ResponseContext:
        return cls(f"{id_prefix}-{request_id or uuid.uuid4().hex}", int(time.time()), model, include_usage,
                   continuous_usage, sse_timestamps)

    def record(self, cd: ChoiceDelta) -> None:
        self._choices[cd.choice] = cd

    def usage(self) -> dict:
        """Prompt tokens count once per prompt however many choices it has; the counts are cumulative."""
        prompt_tokens: dict[int, int] = {}
        cached_tokens: dict[int, int] = {}
        output_tokens = 0
        for cd in self._choices.values():
            prompt_tokens[cd.prompt] = cd.delta.num_prompt_tokens
            # The prompt's choices share its pages; what was cached before the request came is the least.
            cached_tokens[cd.prompt] = min(cached_tokens.get(cd.prompt, cd.delta.num_cached_tokens),
                                           cd.delta.num_cached_tokens)
            output_tokens += cd.delta.num_output_tokens
        prompt = sum(prompt_tokens.values())
        return {"prompt_tokens": prompt, "completion_tokens": output_tokens, "total_tokens": prompt + output_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(cached_tokens.values())}}


@dataclass
class ChoiceResult:
    """One choice of a whole (non-streaming) response."""

    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


async def collect(ctx: ResponseContext, deltas: AsyncIterator[ChoiceDelta], num_choices: int) -> list[ChoiceResult]:
    results = [ChoiceResult() for _ in range(num_choices)]
    async with aclosing(deltas):
        async for cd in deltas:
            ctx.record(cd)
            result, delta = results[cd.choice], cd.delta
            result.text_parts.append(delta.text)
            result.token_ids += delta.token_ids
            if delta.logprobs is not None:
                if result.logprobs is None:
                    result.logprobs = []
                result.logprobs.extend(delta.logprobs)
            if delta.prompt_logprobs is not None:
                result.prompt_logprobs = delta.prompt_logprobs
            if delta.finish_reason is not None:
                result.finish_reason = delta.finish_reason
    return results


def _logprob(value: float) -> float | None:
    return None if math.isnan(value) else max(value, MIN_LOGPROB)


def chat_logprobs(logprobs: list[TokenLogprob], as_ids: bool = False) -> dict:
    """OpenAI chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]};
    `as_ids`: vLLM's return_tokens_as_token_ids (each token named "token_id:<id>")."""
    return {"content": [
        {"token": _name(lp, as_ids), "logprob": _logprob(lp.logprob), "bytes": list(lp.token_bytes),
         "top_logprobs": [{"token": _name(t, as_ids), "logprob": _logprob(t.logprob), "bytes": list(t.token_bytes)}
                          for t in lp.top_logprobs]}
        for lp in logprobs]}


def completion_logprobs(logprobs: list[TokenLogprob], text_offset: int, top: int | None = None,
                        as_ids: bool = False) -> dict:
    """OpenAI completions shape: parallel lists; `text_offset` is where the first token's text starts. A token
    without a logprob (an echoed prompt's first) has null for it and its alternatives; `top` trims those;
    `as_ids` as chat_logprobs' (the offsets stay those of the text)."""
    offsets = []
    for lp in logprobs:
        offsets.append(text_offset)
        text_offset += len(lp.token)
    return {"tokens": [_name(lp, as_ids) for lp in logprobs],
            "token_logprobs": [_logprob(lp.logprob) for lp in logprobs],
            "top_logprobs": [None if math.isnan(lp.logprob) else
                             {_name(t, as_ids): _logprob(t.logprob) for t in lp.top_logprobs[:top]}
                             for lp in logprobs],
            "text_offset": offsets}


def _name(lp: TokenLogprob, as_id: bool) -> str:
    return f"token_id:{lp.token_id}" if as_id else lp.token


def echoed_logprobs(ctx: ResponseContext, prompt: list[TokenLogprob] | None,
                    output: list[TokenLogprob] | None) -> list[TokenLogprob] | None:
    """A completion's logprobs: with echo, its prompt's first."""
    if ctx.echo_logprobs is None or prompt is None:
        return output
    return prompt + (output or [])


def prompt_logprobs_of(prompt: list[TokenLogprob] | None, top: int) -> list[dict | None] | None:
    """vLLM's prompt_logprobs: per prompt token, null for the first, then {token id: {logprob, rank,
    decoded_token}} for the token and its `top` likeliest alternatives."""
    if prompt is None:
        return None
    entries: list[dict | None] = [None]
    for lp in prompt:
        if math.isnan(lp.logprob):
            continue   # the first token, echoed
        entry = {str(t.token_id): {"logprob": _logprob(t.logprob), "rank": t.rank, "decoded_token": t.token}
                 for t in lp.top_logprobs[:top]}
        entry[str(lp.token_id)] = {"logprob": _logprob(lp.logprob), "rank": lp.rank, "decoded_token": lp.token}
        entries.append(entry)
    return entries


def before_partial_tag(text: str, start: int, tag: str) -> int:
    """Where text[start:] may be cut for sending without splitting what could still become `tag`."""
    for k in range(min(len(tag) - 1, len(text) - start), 0, -1):
        if tag.startswith(text[-k:]):
            return len(text) - k
    return len(text)
