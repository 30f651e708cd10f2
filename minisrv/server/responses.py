"""OpenAI's two response shapes, chat completions and completions (sglang.py has /generate's).

Each endpoint has a whole-response builder (from collected ChoiceResults) and an SSE stream (one
event per delta, an optional usage event, then `data: [DONE]`). An error after the stream has
started cannot change the status any more; it goes out as an OpenAI error event before [DONE].
"""
from __future__ import annotations

import logging
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable

from minisrv.server import tools
from minisrv.server.engine_handle import OutputDelta, RequestError
from minisrv.server.errors import error_body
from minisrv.server.reasoning import ReasoningSplitter, split_reasoning
from minisrv.server.streams import (SSE_DONE, ChoiceDelta, ChoiceResult, ResponseContext, chat_logprobs,
                                    completion_logprobs, echoed_logprobs, prompt_logprobs_of, sse_event)
from minisrv.server.tools import ToolCall

logger = logging.getLogger(__name__)

CHAT_CHUNK = "chat.completion.chunk"
COMPLETION = "text_completion"


def _envelope(ctx: ResponseContext, obj: str, choices: list[dict], streaming: bool = False) -> dict:
    body = {"id": ctx.id, "object": obj, "created": ctx.created, "model": ctx.model, "choices": choices}
    if streaming and ctx.continuous_usage:
        body["usage"] = ctx.usage()   # vLLM's continuous_usage_stats: the counts so far
    elif streaming and ctx.include_usage:
        body["usage"] = None  # OpenAI: with include_usage, every chunk but the last has usage null
    return body


async def sse_stream(ctx: ResponseContext, deltas: AsyncIterator[ChoiceDelta],
                     chunk_of: Callable[[ChoiceDelta], dict | None], usage_object: str | None
                     ) -> AsyncIterator[bytes]:
    """Events from `chunk_of` per delta (None: nothing worth sending), then a usage event with
    `usage_object` as its object when asked for, then [DONE]."""
    try:
        async with aclosing(deltas):
            async for cd in deltas:
                ctx.record(cd)
                chunk = chunk_of(cd)
                if chunk is not None:
                    yield sse_event(chunk, cd.delta.emitted_ns if ctx.sse_timestamps else 0)
        if ctx.include_usage and usage_object is not None:
            yield sse_event(dict(_envelope(ctx, usage_object, []), usage=ctx.usage()))
    except RequestError as exc:
        yield sse_event(error_body(exc.status, exc.message, exc.param))
    except Exception:  # a server bug; the client still gets a well-formed end of stream
        logger.exception("stream %s failed", ctx.id)
        yield sse_event(error_body(500, "internal server error", code="internal_error"))
    yield SSE_DONE


# --- /v1/chat/completions ---------------------------------------------------------------------------

def _calls_of(ctx: ResponseContext, text: str, finish_reason: str | None) -> tuple[str, list[ToolCall], str | None]:
    """(content, tool calls, finish_reason) of a whole chat output under the request's tool_choice."""
    choice = ctx.tool_choice
    if choice == "none":
        return text, [], finish_reason
    # A call cut short keeps the arguments it has, as its stream sent them (vLLM's way).
    if choice == "auto":
        content, calls = tools.parse_calls(text, set(ctx.tool_names), ctx.tool_call_parser)
    else:
        calls = tools.forced_calls(text, choice)
        content = "" if calls else text
    return content, calls, _finish_with_calls(choice, bool(calls), finish_reason)


def _finish_with_calls(choice: str, has_calls: bool, finish_reason: str | None) -> str | None:
    # OpenAI's: a named function forced by tool_choice finishes with "stop", any other call with "tool_calls".
    return "tool_calls" if has_calls and finish_reason == "stop" and choice in ("auto", "required") else finish_reason


def chat_completion(ctx: ResponseContext, results: list[ChoiceResult]) -> dict:
    choices = []
    for i, r in enumerate(results):
        reasoning, text = split_reasoning(r.text, ctx.reasoning_parser) if ctx.reasoning_parser else (None, r.text)
        content, calls, finish_reason = _calls_of(ctx, text, r.finish_reason)
        content = ctx.echoed + content   # vLLM's echo (empty without it), streamed in the first delta
        message = {"role": "assistant", "content": None if calls and not content else content}
        if ctx.reasoning_parser:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [c.as_api() for c in calls]
        choices.append({"index": i, "message": message,
                        "logprobs": chat_logprobs(r.logprobs, ctx.tokens_as_ids) if r.logprobs is not None else None,
                        "finish_reason": finish_reason})
    body = dict(_envelope(ctx, "chat.completion", choices), usage=ctx.usage())
    if ctx.prompt_logprobs is not None:   # vLLM's: one list for the response (its choices share the prompt)
        body["prompt_logprobs"] = prompt_logprobs_of(results[0].prompt_logprobs, ctx.prompt_logprobs)
    return body


class StreamEvents:
    """The events telling each change of an answer built from a choice's deltas, kept only when `streaming` (a
    whole answer needs none): /v1/responses' output items and /v1/messages' content blocks."""

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self.events: list[tuple[str, dict]] = []

    def _event(self, kind: str, **fields: Any) -> None:
        if self.streaming:
            self.events.append((kind, fields))

    def take_events(self) -> list[tuple[str, dict]]:
        events, self.events = self.events, []
        return events


class ChatChoiceReader:
    """One chat choice's deltas as what goes out: (reasoning, content, tool_calls deltas, finish_reason) per delta.
    A reasoning model's thinking is split from the answer (ReasoningSplitter), calls stream as tool_calls deltas
    while they are written (tools.ForcedCalls, tools.AutoCallStream); under "auto", text that may be a call is
    held back until that is known. /v1/chat/completions and /v1/responses (responses_api.py) both read so."""

    def __init__(self, ctx: ResponseContext) -> None:
        self.ctx = ctx
        self.thinking = ReasoningSplitter(ctx.reasoning_parser) if ctx.reasoning_parser else None
        self.auto = tools.AutoCallStream(set(ctx.tool_names), ctx.tool_call_parser) \
            if ctx.tool_choice == "auto" else None
        self.forced = tools.ForcedCalls(ctx.tool_choice) if ctx.tool_choice not in ("none", "auto") else None

    def read(self, delta: OutputDelta) -> tuple[str, str, list[dict], str | None]:
        reasoning, answer = self._split(delta)
        text, call_deltas, finish_reason = self._content(answer, delta.finish_reason)
        return reasoning, text, call_deltas, finish_reason

    def _split(self, delta: OutputDelta) -> tuple[str, str]:
        """(reasoning, answer text) of the delta."""
        if self.thinking is None:
            return "", delta.text
        reasoning, text = self.thinking.feed(delta.text)
        if delta.finish_reason is not None:
            more_reasoning, more_text = self.thinking.finish()
            reasoning, text = reasoning + more_reasoning, text + more_text
        return reasoning, text

    def _content(self, text: str, finish_reason: str | None) -> tuple[str, list[dict], str | None]:
        if self.auto is not None:
            text, call_deltas = self.auto.feed(text)
            if finish_reason is None:
                return text, call_deltas, None
            rest, last_deltas, calls = self.auto.finish()
            return text + rest, call_deltas + last_deltas, _finish_with_calls("auto", bool(calls), finish_reason)
        if self.forced is None:
            return text, [], finish_reason
        call_deltas = self.forced.feed(text)
        if finish_reason is not None and not self.forced.deltas.ids:   # cut before a call was named: the text
            return self.forced.text, [], finish_reason
        return "", call_deltas, _finish_with_calls(self.ctx.tool_choice, True, finish_reason)


def chat_stream(ctx: ResponseContext, deltas: AsyncIterator[ChoiceDelta]) -> AsyncIterator[bytes]:
    """Each choice's deltas as ChatChoiceReader reads them, the first naming the role."""
    readers: dict[int, ChatChoiceReader] = {}

    def chunk_of(cd: ChoiceDelta) -> dict | None:
        d = cd.delta
        first = cd.choice not in readers
        if first:
            readers[cd.choice] = ChatChoiceReader(ctx)
        reasoning, text, call_deltas, finish_reason = readers[cd.choice].read(d)
        delta: dict = {}
        if first:  # the first delta of every choice names the role
            delta["role"] = "assistant"
            delta["content"] = ctx.echoed + text
        elif text:
            delta["content"] = text
        if reasoning:
            delta["reasoning_content"] = reasoning
        if call_deltas:
            delta["tool_calls"] = call_deltas
        if not delta and finish_reason is None and not d.logprobs:
            return None  # nothing new yet (e.g. half of a multi-byte character, or text held back)
        choice = {"index": cd.choice, "delta": delta,
                  "logprobs": chat_logprobs(d.logprobs, ctx.tokens_as_ids) if d.logprobs else None,
                  "finish_reason": finish_reason}
        return _envelope(ctx, CHAT_CHUNK, [choice], streaming=True)

    return sse_stream(ctx, deltas, chunk_of, CHAT_CHUNK)


# --- /v1/completions --------------------------------------------------------------------------------

def completion(ctx: ResponseContext, results: list[ChoiceResult]) -> dict:
    choices = []
    for i, r in enumerate(results):
        logprobs = echoed_logprobs(ctx, r.prompt_logprobs, r.logprobs)
        choice = {"index": i, "text": r.text,
                  "logprobs": completion_logprobs(logprobs, 0, ctx.echo_logprobs, ctx.tokens_as_ids)
                  if logprobs is not None else None,
                  "finish_reason": r.finish_reason}
        if ctx.prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprobs_of(r.prompt_logprobs, ctx.prompt_logprobs)
        choices.append(choice)
    return dict(_envelope(ctx, COMPLETION, choices), usage=ctx.usage())


def completion_stream(ctx: ResponseContext, deltas: AsyncIterator[ChoiceDelta]) -> AsyncIterator[bytes]:
    text_offset: dict[int, int] = {}   # choice -> characters of text already sent, for logprobs' text_offset

    def chunk_of(cd: ChoiceDelta) -> dict | None:
        d = cd.delta
        logprobs = echoed_logprobs(ctx, d.prompt_logprobs, d.logprobs)
        if not d.text and d.finish_reason is None and not logprobs:
            return None
        offset = text_offset.get(cd.choice, 0)
        text_offset[cd.choice] = offset + len(d.text)
        choice = {"index": cd.choice, "text": d.text,
                  "logprobs": completion_logprobs(logprobs, offset, ctx.echo_logprobs, ctx.tokens_as_ids)
                  if logprobs else None,
                  "finish_reason": d.finish_reason}
        return _envelope(ctx, COMPLETION, [choice], streaming=True)

    return sse_stream(ctx, deltas, chunk_of, COMPLETION)
