"""OpenAI's two response shapes, chat completions and completions (sglang.py has /generate's).

Each endpoint has a whole-response builder (from collected ChoiceResults) and an SSE stream (one
event per delta, an optional usage event, then `data: [DONE]`). An error after the stream has
started cannot change the status any more; it goes out as an OpenAI error event before [DONE].
"""
from __future__ import annotations

import logging
from contextlib import aclosing
from typing import AsyncIterator, Callable

from minisrv.server.engine_handle import RequestError
from minisrv.server.errors import error_body
from minisrv.server.streams import (SSE_DONE, ChoiceDelta, ChoiceResult, ResponseContext, chat_logprobs,
                                    completion_logprobs, sse_event)

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
        ctx.timer.on_finish()
        if ctx.include_usage and usage_object is not None:
            yield sse_event(dict(_envelope(ctx, usage_object, []), usage=ctx.usage()))
    except RequestError as exc:
        yield sse_event(error_body(exc.status, exc.message, exc.param))
    except Exception:  # a server bug; the client still gets a well-formed end of stream
        logger.exception("stream %s failed", ctx.id)
        yield sse_event(error_body(500, "internal server error", code="internal_error"))
    yield SSE_DONE


# --- /v1/chat/completions ---------------------------------------------------------------------------

def chat_completion(ctx: ResponseContext, results: list[ChoiceResult]) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                "logprobs": chat_logprobs(r.logprobs) if r.logprobs is not None else None,
                "finish_reason": r.finish_reason}
               for i, r in enumerate(results)]
    return dict(_envelope(ctx, "chat.completion", choices), usage=ctx.usage())


def chat_stream(ctx: ResponseContext, deltas: AsyncIterator[ChoiceDelta]) -> AsyncIterator[bytes]:
    role_sent: set[int] = set()

    def chunk_of(cd: ChoiceDelta) -> dict | None:
        d = cd.delta
        delta: dict = {}
        if cd.choice not in role_sent:  # the first delta of every choice names the role
            role_sent.add(cd.choice)
            delta["role"] = "assistant"
            delta["content"] = d.text
        elif d.text:
            delta["content"] = d.text
        if not delta and d.finish_reason is None and not d.logprobs:
            return None  # nothing new yet (e.g. half of a multi-byte character)
        choice = {"index": cd.choice, "delta": delta,
                  "logprobs": chat_logprobs(d.logprobs) if d.logprobs else None, "finish_reason": d.finish_reason}
        return _envelope(ctx, CHAT_CHUNK, [choice], streaming=True)

    return sse_stream(ctx, deltas, chunk_of, CHAT_CHUNK)


# --- /v1/completions --------------------------------------------------------------------------------

def completion(ctx: ResponseContext, results: list[ChoiceResult]) -> dict:
    choices = [{"index": i, "text": r.text,
                "logprobs": completion_logprobs(r.logprobs, 0) if r.logprobs is not None else None,
                "finish_reason": r.finish_reason}
               for i, r in enumerate(results)]
    return dict(_envelope(ctx, COMPLETION, choices), usage=ctx.usage())


def completion_stream(ctx: ResponseContext, deltas: AsyncIterator[ChoiceDelta]) -> AsyncIterator[bytes]:
    text_offset: dict[int, int] = {}   # choice -> characters of text already sent, for logprobs' text_offset

    def chunk_of(cd: ChoiceDelta) -> dict | None:
        d = cd.delta
        if not d.text and d.finish_reason is None and not d.logprobs:
            return None
        offset = text_offset.get(cd.choice, 0)
        text_offset[cd.choice] = offset + len(d.text)
        choice = {"index": cd.choice, "text": d.text,
                  "logprobs": completion_logprobs(d.logprobs, offset) if d.logprobs else None,
                  "finish_reason": d.finish_reason}
        return _envelope(ctx, COMPLETION, [choice], streaming=True)

    return sse_stream(ctx, deltas, chunk_of, COMPLETION)
