"""OpenAI's Responses API (/v1/responses), as vLLM serves it: a request becomes the chat request it stands for,
which the chat path serves; response_items.py makes its answer.

Nothing is stored (vLLM's default too): `previous_response_id` and the other features that need a stored response
or OpenAI's hosted tools are a 400 naming the field; a conversation goes back whole in `input`, output items
included as the API returned them."""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError

from minisrv.server.errors import APIError, from_validation_error
from minisrv.server.protocol import ChatCompletionRequest, FunctionToolName, Schema, one_of

LOGPROBS_INCLUDE = "message.output_text.logprobs"   # the `include` entry that asks for the text's logprobs


class _GivenBack(Schema):
    """An input item or part. Output items go back into `input` as the API returned them, with bookkeeping
    (ids, status, annotations) that changes nothing here: unknown fields are dropped, not refused."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(_GivenBack):
    type: Literal["input_text", "output_text"]
    text: str


Text = Annotated[str | list[TextPart], one_of('a string or a list of {"type": "input_text", "text": ...} parts '
                                              "(this server reads text only)")]


class MessageItem(_GivenBack):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Text

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class FunctionCallItem(_GivenBack):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_GivenBack):
    type: Literal["function_call_output"]
    call_id: str
    output: Text

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "\n".join(p.text for p in self.output)


class ReasoningItem(_GivenBack):
    """A reasoning item given back: left out of the prompt, as chat templates leave out earlier thinking."""

    type: Literal["reasoning"]


def _item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return kind if isinstance(kind, str) else "message"


InputItem = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
                      | Annotated[ReasoningItem, Tag("reasoning")], Discriminator(_item_kind)]


def _as_items(value: Any) -> Any:
    """A bare string input is one user message."""
    return [{"role": "user", "content": value}] if isinstance(value, str) else value


# One list type, not a union with str: an invalid item's error then names it (input.2.message.content).
Input = Annotated[list[InputItem], BeforeValidator(_as_items, json_schema_input_type=str | list[InputItem])]


class FunctionTool(Schema):
    type: Literal["function"]
    name: FunctionToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(Schema):
    type: Literal["function"]
    name: str


class TextFormat(Schema):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(Schema):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None   # ignored: a hint for OpenAI's own models


class ReasoningConfig(Schema):
    effort: str | None = None      # ignored, as chat's reasoning_effort
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(Schema):
    model: str | None = None
    input: Input
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    stream: bool = False
    tools: Annotated[list[FunctionTool], Field(min_length=1)] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    priority: int | None = None   # vLLM's, under --scheduling-policy priority
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # Accepted and ignored, as on the chat endpoint: bookkeeping of OpenAI's platform.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    stream_options: dict[str, bool] | None = None
    # Refused when set: each needs a stored response, a stored prompt, or server-side work this server lacks.
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    background: bool | None = None
    max_tool_calls: int | None = None

    def check_unsupported(self) -> None:
        for field in ("previous_response_id", "conversation", "prompt", "max_tool_calls"):
            if getattr(self, field) is not None:
                raise APIError(400, f"{field}: this server stores no responses or prompts and runs no tools "
                                    "itself; send the whole conversation in input", field, "unsupported_field")
        if self.background:
            raise APIError(400, "background: responses are not run in the background here (nothing is stored "
                                "to poll)", "background", "unsupported_field")
        if self.truncation == "auto":
            raise APIError(400, 'truncation: only "disabled" (an input longer than the context is a 400)',
                           "truncation", "unsupported_field")

    def ignored_fields(self) -> list[str]:
        ignored = ("store", "metadata", "user", "service_tier", "safety_identifier", "prompt_cache_key",
                   "stream_options", "reasoning")
        return [name for name in ignored if name in self.model_fields_set]

    def wants_logprobs(self) -> bool:
        return self.top_logprobs is not None or LOGPROBS_INCLUDE in (self.include or [])

    def to_chat_request(self) -> ChatCompletionRequest:
        """The chat request this stands for: instructions as the first system message, items as messages."""
        self.check_unsupported()
        chat: dict[str, Any] = {"model": self.model, "messages": self._messages(), "stream": self.stream}
        for ours, theirs in (("max_output_tokens", "max_completion_tokens"), ("temperature", "temperature"),
                             ("top_p", "top_p"), ("parallel_tool_calls", "parallel_tool_calls"),
                             ("priority", "priority")):
            if getattr(self, ours) is not None:
                chat[theirs] = getattr(self, ours)
        if self.wants_logprobs():
            chat["logprobs"] = True
            chat["top_logprobs"] = self.top_logprobs or 0
        if self.tools:
            chat["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]
        named = self.tool_choice.name if isinstance(self.tool_choice, FunctionChoice) else None
        if named is not None and named not in {t.name for t in self.tools or []}:
            raise APIError(400, f"tool_choice.name: {named!r} is not one of the tools", "tool_choice.name")
        if self.tool_choice is not None:
            chat["tool_choice"] = self.tool_choice if isinstance(self.tool_choice, str) else \
                {"type": "function", "function": {"name": self.tool_choice.name}}
        text_format = self.text.format if self.text is not None else None
        if text_format is not None and text_format.type != "text":
            chat["response_format"] = {"type": text_format.type} if text_format.type == "json_object" else \
                {"type": "json_schema", "json_schema": text_format.model_dump(include={"name", "schema_", "strict"},
                                                                              by_alias=True, exclude_none=True)}
        try:
            return ChatCompletionRequest.model_validate(chat)
        except ValidationError as exc:
            raise from_validation_error(exc) from exc

    def _messages(self) -> list[dict]:
        messages: list[dict] = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
        for i, item in enumerate(self.input):
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                try:
                    json.loads(item.arguments)
                except json.JSONDecodeError as exc:
                    param = f"input.{i}.arguments"
                    raise APIError(400, f"{param}: not valid JSON ({exc})", param) from None
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":   # calls of one turn: one message
                    last.setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutputItem):
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
        if not messages:
            raise APIError(400, "input: no message to answer", "input")
        return messages


# The chat request's fields that name a field of the Responses request otherwise (messages: the input, whose
# items do not map one to one to messages).
_CHAT_FIELDS = (("max_completion_tokens", "max_output_tokens"),
                ("response_format.json_schema.schema", "text.format.schema"),
                ("response_format.json_schema", "text.format"), ("response_format", "text.format"),
                ("tool_choice.function.name", "tool_choice.name"))


def renamed_error(exc: APIError) -> APIError:
    """`exc` naming the field of the Responses request that a field of its chat request came from."""
    return renamed_param(exc, "input", _CHAT_FIELDS)


def renamed_param(exc: APIError, messages: str, fields: tuple[tuple[str, str], ...],
                  tool_fields: dict[str, str] | None = None) -> APIError:
    """`exc` naming, instead of a field of the chat request that a request of another API became, the field it
    came from (errors name what was sent): `messages` for any message (the other API's items or messages do not
    map one to one to chat messages), a tool's function fields as the tool's own (renamed by `tool_fields`), and
    `fields`' (chat, theirs) prefixes."""
    chat, theirs = exc.param, _their_param(exc.param, messages, fields, tool_fields or {})
    if chat is not None and theirs != chat:
        exc.param = theirs
        if exc.message.startswith(chat):
            exc.message = theirs + exc.message[len(chat):]
    return exc


def _their_param(param: str | None, messages: str, fields: tuple[tuple[str, str], ...],
                 tool_fields: dict[str, str]) -> str | None:
    if param is None:
        return None
    if param == "messages" or param.startswith("messages."):
        return messages
    if match := re.fullmatch(r"tools\.(\d+)\.function\.([^.]+)(.*)", param):
        return f"tools.{match[1]}.{tool_fields.get(match[2], match[2])}{match[3]}"
    for chat, theirs in fields:
        if param == chat or param.startswith(chat + "."):
            return theirs + param[len(chat):]
    return param
