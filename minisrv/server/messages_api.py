"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens), as vLLM serves it for Anthropic's SDK and
the tools built on it: a request becomes the chat request it stands for, which the chat path serves;
message_blocks.py makes its answer. Errors take Anthropic's shape, `{"type": "error", "error": {"type",
"message"}}`, the message naming the field as the client sent it.

Text, tool use and tool results go both ways; a reasoning model's thinking (--reasoning-parser) comes back as
thinking blocks, and thinking given back is left out of the prompt, as chat templates leave out earlier
thinking. Images, documents, Anthropic's hosted tools and MCP servers are a 400 naming the field."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      model_validator)
from pydantic_core import PydanticCustomError
from starlette.responses import Response

from minisrv.server.errors import APIError, from_validation_error
from minisrv.server.protocol import ChatCompletionRequest, FunctionToolName, Schema, one_of
from minisrv.server.responses_api import renamed_param

# Anthropic's error types by HTTP status; other 4xx are invalid requests, other 5xx api errors.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "overloaded_error", 529: "overloaded_error"}
IGNORED_FIELDS = ("metadata", "service_tier", "cache_control", "diagnostics", "inference_geo", "speed",
                  "user_profile_id", "workspace_id", "thinking")
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}   # Anthropic's name -> chat's; "tool": named


class _Block(Schema):
    """A content block. Blocks come back as the API returned them, with fields (cache_control, citations,
    signatures) that change nothing here: unknown fields are dropped, not refused."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextBlock(_Block):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Annotated[str | list[TextBlock], one_of('a string or a list of {"type": "text"} blocks (this server '
                                                     "reads text only)")] = ""
    is_error: bool | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(b.text for b in self.content)


class ThinkingBlock(_Block):
    type: Literal["thinking", "redacted_thinking"]


class OtherBlock(_Block):
    """Images, documents, search results, server tool results: not read here."""

    type: str

    @model_validator(mode="after")
    def refuse(self) -> OtherBlock:
        raise PydanticCustomError("unsupported_block", f"{self.type!r} blocks are not read by this server (it reads "
                                                       "text, tool_use, tool_result and thinking blocks)")


BLOCK_KINDS = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")


def _block_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in BLOCK_KINDS else "other"


Block = Annotated[Annotated[TextBlock, Tag("text")] | Annotated[ToolUseBlock, Tag("tool_use")]
                  | Annotated[ToolResultBlock, Tag("tool_result")] | Annotated[ThinkingBlock, Tag("thinking")]
                  | Annotated[ThinkingBlock, Tag("redacted_thinking")] | Annotated[OtherBlock, Tag("other")],
                  Discriminator(_block_kind)]


def _as_blocks(value: Any) -> Any:
    """A bare string content is one text block."""
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


class Message(Schema):
    role: Literal["user", "assistant"]
    # One list type, not a union with str: an invalid block's error then names it (messages.0.content.1...).
    content: Annotated[list[Block], BeforeValidator(_as_blocks, json_schema_input_type=str | list[Block])]


class Tool(Schema):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)   # cache_control and the like
    type: str | None = None   # "custom"; hosted tools (bash_..., web_search_...) are other types, refused by name
    name: FunctionToolName
    description: str | None = None
    input_schema: dict[str, Any] | None = None   # required of custom tools (_tools): a hosted tool has none


class ToolChoice(Schema):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class OutputFormat(Schema):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Schema):
    format: OutputFormat | None = None
    effort: str | None = None   # ignored: a hint for Anthropic's own models


class Conversation(Schema):
    """What a Messages request and a count_tokens request share: the prompt."""

    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: dict[str, Any] | None = None   # accepted and ignored: a reasoning model thinks or not

    def to_chat_request(self) -> ChatCompletionRequest:
        """The chat request this stands for."""
        chat = {"model": self.model, "messages": self._messages(), **self._tools(), **self._generation()}
        try:
            return ChatCompletionRequest.model_validate(chat)
        except ValidationError as exc:
            raise from_validation_error(exc) from exc

    def _generation(self) -> dict[str, Any]:
        return {"max_tokens": 1}   # the prompt alone is of interest

    def _tools(self) -> dict[str, Any]:
        for i, tool in enumerate(self.tools or []):
            if tool.type not in (None, "custom"):
                raise APIError(400, f"tools.{i}.type: {tool.type!r} is a tool Anthropic's servers run; this server "
                                    "takes custom tools (name, input_schema) only", f"tools.{i}.type")
            if tool.input_schema is None:
                raise APIError(400, f"tools.{i}.input_schema: field required", f"tools.{i}.input_schema",
                               "missing_field")
        chat: dict[str, Any] = {}
        if self.tools:
            chat["tools"] = [{"type": "function", "function": {
                "name": t.name, "parameters": t.input_schema,
                **({"description": t.description} if t.description is not None else {})}} for t in self.tools]
        choice = self.tool_choice
        if choice is None:
            return chat
        if choice.type == "tool":
            if choice.name not in {t.name for t in self.tools or []}:
                raise APIError(400, f"tool_choice.name: {choice.name!r} is not one of the tools", "tool_choice.name")
            chat["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        elif self.tools or choice.type == "none":
            chat["tool_choice"] = TOOL_CHOICES[choice.type]
        if choice.disable_parallel_tool_use is not None and self.tools:
            chat["parallel_tool_calls"] = not choice.disable_parallel_tool_use
        return chat

    def _messages(self) -> list[dict]:
        messages: list[dict] = []
        if self.system:
            system = self.system if isinstance(self.system, str) else "\n".join(b.text for b in self.system)
            messages.append({"role": "system", "content": system})
        for message in self.messages:
            texts = [b.text for b in message.content if isinstance(b, TextBlock)]
            calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(
                b.input, ensure_ascii=False)}} for b in message.content if isinstance(b, ToolUseBlock)]
            # Results answer the calls of the turn before: as tool messages, ahead of what the user adds.
            messages += [{"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
                         for b in message.content if isinstance(b, ToolResultBlock)]
            if calls:
                messages.append({"role": "assistant", "content": "\n".join(texts) or None, "tool_calls": calls})
            elif texts or not any(isinstance(b, ToolResultBlock) for b in message.content):
                messages.append({"role": message.role, "content": "\n".join(texts)})
        return messages


class CountTokensRequest(Conversation):
    """/v1/messages/count_tokens: the prompt's length in tokens, tools included."""


class MessagesRequest(Conversation):
    max_tokens: int
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    output_format: OutputFormat | None = None    # the structured-outputs beta's name
    output_config: OutputConfig | None = None
    # Accepted and ignored: bookkeeping and routing of Anthropic's platform (the SDK sends them as given).
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None   # the prefix cache works without being asked
    diagnostics: Any = None
    inference_geo: Any = None
    speed: Any = None
    user_profile_id: Any = None
    workspace_id: Any = None
    # Refused when set: servers and containers run tools this server does not have.
    mcp_servers: list[dict[str, Any]] | None = None
    container: str | dict[str, Any] | None = None

    def ignored_fields(self) -> list[str]:
        return [name for name in IGNORED_FIELDS if name in self.model_fields_set]

    def _generation(self) -> dict[str, Any]:
        """Stop sequences are kept in the output, so that the answer can say which one ended it
        (message_blocks.py cuts it off again)."""
        for field in ("mcp_servers", "container"):
            if getattr(self, field) is not None:
                raise APIError(400, f"{field}: this server runs no tools itself; give the tools as tools and run "
                                    "them in the client", field)
        chat: dict[str, Any] = {"stream": self.stream, "max_tokens": self.max_tokens}
        for field in ("temperature", "top_p", "top_k"):
            if getattr(self, field) is not None:
                chat[field] = getattr(self, field)
        if self.stop_sequences:
            chat.update(stop=self.stop_sequences, include_stop_str_in_output=True)
        output_format = self.output_format or (self.output_config.format if self.output_config else None)
        if output_format is not None:
            chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output",
                                                                             "schema": output_format.schema_}}
        return chat


# The chat request's fields that name a field of the Messages request otherwise.
_CHAT_FIELDS = (("response_format.json_schema.schema", "output_format.schema"),
                ("response_format", "output_format"), ("tool_choice.function.name", "tool_choice.name"),
                ("stop", "stop_sequences"))


def renamed_error(exc: APIError) -> APIError:
    """`exc` naming the field of the Messages request that a field of its chat request came from."""
    return renamed_param(exc, "messages", _CHAT_FIELDS, {"parameters": "input_schema"})


class AnthropicErrorDetail(BaseModel):
    type: str        # ERROR_TYPES of the status
    message: str     # naming the field at fault, as the client sent it


class AnthropicErrorBody(BaseModel):
    """The body of every error of the Messages routes (also its schema in /openapi.json)."""

    type: Literal["error"] = "error"
    error: AnthropicErrorDetail


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_response(exc: APIError) -> Response:
    """`exc` in Anthropic's shape."""
    body = AnthropicErrorBody(error=AnthropicErrorDetail(type=error_type(exc.status), message=exc.message)).model_dump()
    return Response(json.dumps(body, ensure_ascii=False).encode(), status_code=exc.status,
                    media_type="application/json", headers=exc.headers)
