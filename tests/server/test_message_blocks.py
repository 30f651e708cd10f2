"""A Messages stream that fails after it began ends with Anthropic's error event; a call cut short keeps the
input it has."""
from __future__ import annotations

import asyncio
import json

from minisrv.server.engine_handle import OutputDelta, RequestError
from minisrv.server.message_blocks import ContentBlocks, message_stream
from minisrv.server.messages_api import MessagesRequest
from minisrv.server.streams import ChoiceDelta, ResponseContext

REQUEST = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}


def test_an_error_after_the_stream_began_is_an_error_event() -> None:
    async def deltas():
        yield ChoiceDelta(0, 0, OutputDelta(0, "He", [1, 2], None, None, 3, 0, 2))
        raise RequestError(503, "the scheduler died")

    async def events() -> list[dict]:
        stream = message_stream(MessagesRequest.model_validate(REQUEST), ResponseContext.new("msg", "m"), deltas())
        return [json.loads(chunk.split(b"data: ", 1)[1]) async for chunk in stream]

    sent = asyncio.run(events())
    assert [e["type"] for e in sent] == ["message_start", "content_block_start", "content_block_delta", "error"]
    assert sent[0]["message"]["usage"]["input_tokens"] == 3   # known from the first delta
    assert sent[-1]["error"] == {"type": "overloaded_error", "message": "the scheduler died"}


def test_a_forced_call_cut_short_keeps_an_input_it_can_parse() -> None:
    ctx = ResponseContext.new("msg", "m")
    ctx.tool_choice, ctx.tool_names = "get_time", frozenset({"get_time"})
    blocks = ContentBlocks(ctx, [], streaming=True)
    blocks.feed(OutputDelta(0, '{"zone": "U', [1], None, "length", 3, 0, 1))
    (use,) = blocks.blocks
    assert (use["type"], use["name"], use["input"], blocks.stop_reason) == ("tool_use", "get_time", {}, "max_tokens")
    kinds = [kind for kind, _ in blocks.take_events()]
    assert kinds == ["content_block_start", "content_block_delta", "content_block_stop"]
