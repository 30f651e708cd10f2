"""The answer to a Responses API request (responses_api.py) as output items: a reasoning item, a message, function
calls, read from the chat choice's deltas (responses.ChatChoiceReader). Streamed, every item opens with
output_item.added, grows by deltas and closes with its done events, between response.created and
response.completed or response.incomplete (no [DONE], as OpenAI's); whole, the same OutputItems build it, so the
two agree."""
from __future__ import annotations

import itertools
import logging
import uuid
from contextlib import aclosing
from typing import AsyncIterator

from minisrv.server.engine_handle import OutputDelta, RequestError
from minisrv.server.errors import error_body
from minisrv.server.responses import ChatChoiceReader, StreamEvents
from minisrv.server.responses_api import ResponsesRequest
from minisrv.server.streams import ChoiceDelta, ResponseContext, chat_logprobs, sse_event

logger = logging.getLogger(__name__)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputItems(StreamEvents):
    """One choice's output items while its deltas arrive, and the stream events that tell each change (kept
    only when `streaming`)."""

    def __init__(self, ctx: ResponseContext, logprobs: bool, streaming: bool) -> None:
        super().__init__(streaming)
        self.reader = ChatChoiceReader(ctx)
        self.ctx, self.logprobs = ctx, logprobs
        self.items: list[dict] = []
        self.open: int | None = None       # output index of the item being written
        self.calls: dict[int, int] = {}    # tool_calls delta index -> output index
        self.reasoning_tokens = 0
        self.finish_reason: str | None = None

    def feed(self, delta: OutputDelta) -> None:
        reasoning, text, call_deltas, self.finish_reason = self.reader.read(delta)
        if reasoning and not text and not call_deltas:
            self.reasoning_tokens += len(delta.token_ids)
        if reasoning:
            self._append_text("reasoning", reasoning, [])
        if text:
            logprobs = chat_logprobs(delta.logprobs, self.ctx.tokens_as_ids)["content"] \
                if self.logprobs and delta.logprobs else []
            self._append_text("message", text, logprobs)
        for call in call_deltas:
            self._call_delta(call)
        if self.finish_reason is not None:
            if not self.items:   # nothing written: still a message, of no text, as the answer
                self._append_text("message", "", [])
            self._close("incomplete" if self.finish_reason == "length" else "completed")

    def _append_text(self, kind: str, text: str, logprobs: list[dict]) -> None:
        index = self.open
        if index is None or self.items[index]["type"] != kind:
            item = {"id": _new_id("rs" if kind == "reasoning" else "msg"), "type": kind, "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""} if kind == "reasoning" else \
                {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item.update({"summary": [], "content": []} if kind == "reasoning" else {"role": "assistant", "content": []})
            index = self._add(item)
            item["content"].append(part)
            self._event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                        part=dict(part))
        item = self.items[index]
        part = item["content"][0]
        if not text:
            return
        part["text"] += text
        if kind == "reasoning":
            self._event("response.reasoning_text.delta", item_id=item["id"], output_index=index, content_index=0,
                        delta=text)
        else:
            part["logprobs"] += logprobs
            self._event("response.output_text.delta", item_id=item["id"], output_index=index, content_index=0,
                        delta=text, logprobs=logprobs)

    def _call_delta(self, call: dict) -> None:
        if "id" in call:   # a call's first delta: its id and name
            self.calls[call["index"]] = self._add({"id": _new_id("fc"), "type": "function_call",
                                                   "status": "in_progress", "call_id": call["id"],
                                                   "name": call["function"]["name"], "arguments": ""})
        index = self.calls[call["index"]]
        item, arguments = self.items[index], call["function"]["arguments"]
        if arguments:
            item["arguments"] += arguments
            self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                        delta=arguments)

    def _add(self, item: dict) -> int:
        self._close("completed")
        self.items.append(item)
        self.open = len(self.items) - 1
        self._event("response.output_item.added", output_index=self.open, item=dict(item, content=[])
                    if "content" in item else dict(item))
        return self.open

    def _close(self, status: str) -> None:
        """The open item is done."""
        if self.open is None:
            return
        index, self.open = self.open, None
        item = self.items[index]
        item["status"] = status
        if item["type"] == "function_call":
            self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        name=item["name"], arguments=item["arguments"])
        else:
            part = item["content"][0]
            if item["type"] == "reasoning":
                self._event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=part["text"])
            else:
                self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=part["text"], logprobs=part["logprobs"])
            self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                        part=dict(part))
        self._event("response.output_item.done", output_index=index, item=item)



def response_body(req: ResponsesRequest, ctx: ResponseContext, output: OutputItems | None) -> dict:
    """The response object; `output` None: one just created, nothing written yet."""
    finish = output.finish_reason if output is not None else None
    status = "in_progress" if finish is None else "incomplete" if finish in ("length", "abort") else "completed"
    usage = None
    if output is not None and finish is not None:
        counts = ctx.usage()
        usage = {"input_tokens": counts["prompt_tokens"], "input_tokens_details": {
                     "cached_tokens": counts["prompt_tokens_details"]["cached_tokens"]},
                 "output_tokens": counts["completion_tokens"],
                 "output_tokens_details": {"reasoning_tokens": output.reasoning_tokens},
                 "total_tokens": counts["total_tokens"]}
    text_format = req.text.format if req.text is not None and req.text.format is not None else None
    tool_choice = req.tool_choice if req.tool_choice is None or isinstance(req.tool_choice, str) else \
        req.tool_choice.model_dump()
    return {"id": ctx.id, "object": "response", "created_at": ctx.created, "status": status, "background": False,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "max_tool_calls": None,
            "model": ctx.model, "output": output.items if output is not None else [],
            "parallel_tool_calls": req.parallel_tool_calls is not False, "previous_response_id": None,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
            "store": False, "temperature": req.temperature, "top_p": req.top_p, "top_logprobs": req.top_logprobs,
            "text": {"format": text_format.model_dump(by_alias=True, exclude_none=True) if text_format
                     else {"type": "text"}},
            "tool_choice": tool_choice or ("auto" if req.tools else "none"),
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []], "truncation": "disabled",
            "usage": usage, "user": req.user, "metadata": req.metadata or {}}


async def whole_response(req: ResponsesRequest, ctx: ResponseContext, deltas: AsyncIterator[ChoiceDelta]) -> dict:
    output = OutputItems(ctx, req.wants_logprobs(), streaming=False)
    async with aclosing(deltas):
        async for cd in deltas:
            ctx.record(cd)
            output.feed(cd.delta)
    return response_body(req, ctx, output)


async def response_stream(req: ResponsesRequest, ctx: ResponseContext, deltas: AsyncIterator[ChoiceDelta]
                          ) -> AsyncIterator[bytes]:
    sequence = itertools.count()

    def event(kind: str, fields: dict) -> bytes:
        return f"event: {kind}\n".encode() + sse_event({"type": kind, "sequence_number": next(sequence), **fields})

    output = OutputItems(ctx, req.wants_logprobs(), streaming=True)
    yield event("response.created", {"response": response_body(req, ctx, None)})
    yield event("response.in_progress", {"response": response_body(req, ctx, None)})
    try:
        async with aclosing(deltas):
            async for cd in deltas:
                ctx.record(cd)
                output.feed(cd.delta)
                for kind, fields in output.take_events():
                    yield event(kind, fields)
    except Exception as exc:   # the status went out already: an error event, then the failed response
        if isinstance(exc, RequestError):
            status, message, param = exc.status, exc.message, exc.param
        else:
            logger.exception("stream %s failed", ctx.id)
            status, message, param = 500, "internal server error", None
        error = error_body(status, message, param)["error"]
        code = error["code"] or error["type"]
        yield event("error", {"code": code, "message": message, "param": param})
        failed = dict(response_body(req, ctx, None), status="failed", error={"code": code, "message": message})
        yield event("response.failed", {"response": failed})
        return
    body = response_body(req, ctx, output)
    yield event("response.incomplete" if body["status"] == "incomplete" else "response.completed", {"response": body})
