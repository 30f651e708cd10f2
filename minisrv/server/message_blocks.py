"""The answer to a Messages API request (messages_api.py) as content blocks: thinking, text, tool use, read from
the chat choice's deltas (responses.ChatChoiceReader). Streamed, the message opens with message_start, every
block with content_block_start, grows by content_block_delta events and closes with content_block_stop, and
message_delta (the stop reason, the output tokens) and message_stop end it; whole, the same ContentBlocks build
it, so the two agree."""
from __future__ import annotations

import dataclasses
import json
import logging
from contextlib import aclosing
from typing import AsyncIterator

from minisrv.server.engine_handle import OutputDelta, RequestError
from minisrv.server.messages_api import AnthropicErrorDetail, MessagesRequest, error_type
from minisrv.server.responses import ChatChoiceReader, StreamEvents
from minisrv.server.streams import ChoiceDelta, ResponseContext, sse_event

logger = logging.getLogger(__name__)

# The chat finish reasons as Anthropic's stop reasons. "abort" (the server stopped the request): pause_turn, a turn
# the client may send back as it is to have it continued.
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "abort": "pause_turn"}


class ContentBlocks(StreamEvents):
    """One answer's content blocks while its deltas arrive, and the stream events that tell each change (kept
    only when `streaming`)."""

    def __init__(self, ctx: ResponseContext, stop_sequences: list[str], streaming: bool) -> None:
        super().__init__(streaming)
        self.reader = ChatChoiceReader(ctx)
        self.stop_sequences = sorted(stop_sequences, key=len, reverse=True)   # the longest that ends the text
        self.blocks: list[dict] = []
        self.open: int | None = None         # index of the block being written
        self.calls: dict[int, int] = {}      # tool_calls delta index -> block index
        self.arguments: dict[int, str] = {}  # block index -> a tool use's input as JSON text so far
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None

    def feed(self, delta: OutputDelta) -> None:
        if delta.finish_reason == "stop":   # a stop sequence ends the text (kept there to learn which): cut it
            matched = next((s for s in self.stop_sequences if delta.text.endswith(s)), None)
            if matched is not None:
                self.stop_sequence = matched
                delta = dataclasses.replace(delta, text=delta.text[: len(delta.text) - len(matched)])
        reasoning, text, call_deltas, finish_reason = self.reader.read(delta)
        if reasoning:
            self._append_text("thinking", reasoning)
        if text:
            self._append_text("text", text)
        for call in call_deltas:
            self._call_delta(call)
        if finish_reason is not None:
            self._close()
            uses_tools = any(b["type"] == "tool_use" for b in self.blocks)
            self.stop_reason = "stop_sequence" if self.stop_sequence is not None else \
                "tool_use" if uses_tools and finish_reason == "stop" else STOP_REASONS.get(finish_reason, "end_turn")

    def _append_text(self, kind: str, text: str) -> None:
        if self.open is None or self.blocks[self.open]["type"] != kind:
            self._add({"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else
                      {"type": "text", "text": ""})
        self.blocks[self.open][kind] += text
        self._event("content_block_delta", index=self.open,
                    delta={"type": "thinking_delta", "thinking": text} if kind == "thinking" else
                    {"type": "text_delta", "text": text})

    def _call_delta(self, call: dict) -> None:
        if "id" in call:   # a call's first delta: its id and name
            self.calls[call["index"]] = self._add({"type": "tool_use", "id": "toolu_" + call["id"].removeprefix(
                "call_"), "name": call["function"]["name"], "input": {}})
            self.arguments[self.open] = ""
        index, partial = self.calls[call["index"]], call["function"]["arguments"]
        if partial:
            self.arguments[index] += partial
            self._event("content_block_delta", index=index, delta={"type": "input_json_delta", "partial_json": partial})

    def _add(self, block: dict) -> int:
        self._close()
        self.blocks.append(block)
        self.open = len(self.blocks) - 1
        self._event("content_block_start", index=self.open, content_block=dict(block))
        return self.open

    def _close(self) -> None:
        if self.open is None:
            return
        index, self.open = self.open, None
        block = self.blocks[index]
        if block["type"] == "tool_use":   # a call cut short (max_tokens) keeps an empty input: it has no JSON yet
            try:
                parsed = json.loads(self.arguments[index] or "{}")
            except json.JSONDecodeError:
                parsed = {}
            block["input"] = parsed if isinstance(parsed, dict) else {}
        self._event("content_block_stop", index=index)


def message_body(ctx: ResponseContext, blocks: ContentBlocks | None) -> dict:
    """The message; `blocks` None: one just started, nothing written yet."""
    counts = ctx.usage()
    cached = counts["prompt_tokens_details"]["cached_tokens"]
    # Anthropic's input_tokens leave out the tokens read from the cache, which are counted on their own.
    usage = {"input_tokens": counts["prompt_tokens"] - cached, "cache_creation_input_tokens": 0,
             "cache_read_input_tokens": cached, "output_tokens": counts["completion_tokens"]}
    return {"id": "msg_" + ctx.id.removeprefix("msg-"), "type": "message", "role": "assistant", "model": ctx.model,
            "content": blocks.blocks if blocks is not None else [],
            "stop_reason": blocks.stop_reason if blocks is not None else None,
            "stop_sequence": blocks.stop_sequence if blocks is not None else None, "usage": usage}


async def whole_message(req: MessagesRequest, ctx: ResponseContext, deltas: AsyncIterator[ChoiceDelta]) -> dict:
    blocks = ContentBlocks(ctx, req.stop_sequences or [], streaming=False)
    async with aclosing(deltas):
        async for cd in deltas:
            ctx.record(cd)
            blocks.feed(cd.delta)
    return message_body(ctx, blocks)


async def message_stream(req: MessagesRequest, ctx: ResponseContext, deltas: AsyncIterator[ChoiceDelta]
                         ) -> AsyncIterator[bytes]:
    def event(kind: str, fields: dict) -> bytes:
        return f"event: {kind}\n".encode() + sse_event({"type": kind, **fields})

    blocks = ContentBlocks(ctx, req.stop_sequences or [], streaming=True)
    started = False
    try:
        async with aclosing(deltas):
            async for cd in deltas:
                ctx.record(cd)
                if not started:   # after the first delta: it carries the prompt's token count
                    started = True
                    yield event("message_start", {"message": message_body(ctx, None)})
                blocks.feed(cd.delta)
                for kind, fields in blocks.take_events():
                    yield event(kind, fields)
    except Exception as exc:   # the status went out already: an error event ends the stream
        if isinstance(exc, RequestError):
            status, message = exc.status, exc.message
        else:
            logger.exception("stream %s failed", ctx.id)
            status, message = 500, "internal server error"
        yield event("error", {"error": AnthropicErrorDetail(type=error_type(status), message=message).model_dump()})
        return
    body = message_body(ctx, blocks)
    yield event("message_delta", {"delta": {"stop_reason": body["stop_reason"], "stop_sequence": body["stop_sequence"]},
                                  "usage": {"output_tokens": body["usage"]["output_tokens"]}})
    yield event("message_stop", {})

