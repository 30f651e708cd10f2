"""The success bodies of the OpenAI-compatible routes, as pydantic models, for /openapi.json only.

The server builds its responses as plain dicts (responses.py, streams.py, tokenize.py, app.py): a model per chunk
would cost every streamed token a validation. So these models describe those dicts and are never in their way;
tests/server/test_openapi.py validates real responses against them, and `extra="forbid"` makes a key the server
sends but no model declares a failure there. A field without a default is in every body (null where typed so); one
with a default is one the server leaves out unless the request asks for it.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from minisrv.server.protocol import MessageToolCall, TokenIdKey
from minisrv.server.responses import CHAT_CHUNK, COMPLETION
from minisrv.wire.terms import FINISH_API_NAMES

# The engine's reasons, and the chat API's own for an answer that calls tools.
FinishReasonName = Literal[tuple(name for name in FINISH_API_NAMES if name is not None) + ("tool_calls",)]


class Body(BaseModel):
    """Base of every response body model."""

    model_config = ConfigDict(strict=True, extra="forbid")


class PromptTokensDetails(Body):
    cached_tokens: int


class Usage(Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(Body):
    token: str                 # "token_id:<id>" with return_tokens_as_token_ids
    logprob: float | None      # null: not a number (JSON has no NaN)
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Body):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(Body):
    """Parallel lists, one entry per token; an echoed prompt's first token has no logprob (null) nor alternatives."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float | None] | None]
    text_offset: list[int]


class PromptTokenLogprob(Body):
    logprob: float | None
    rank: int
    decoded_token: str


# vLLM's prompt_logprobs: null for the first prompt token, then the token's and its alternatives' by token id.
PromptLogprobs = list[dict[TokenIdKey, PromptTokenLogprob] | None]


class Envelope(Body):
    id: str
    created: int   # Unix seconds
    model: str


class AssistantMessage(Body):
    role: Literal["assistant"]
    content: str | None                        # null when the answer is only tool calls
    reasoning_content: str | None = None       # with --reasoning-parser
    tool_calls: list[MessageToolCall] | None = None


class ChatChoice(Body):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReasonName | None


class ChatCompletion(Envelope):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None   # one list for all choices: they share the prompt


class FunctionDelta(Body):
    name: str | None = None
    arguments: str


class ToolCallDelta(Body):
    """A call's first delta names it (id, type, function.name); the later ones carry more of its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class ChatDelta(Body):
    role: Literal["assistant"] | None = None   # in each choice's first delta, which also has content
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(Body):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReasonName | None


class ChatCompletionChunk(Envelope):
    object: Literal[CHAT_CHUNK]
    choices: list[ChatChunkChoice]   # none in the usage chunk that include_usage adds last
    usage: Usage | None = None       # include_usage: null but in that last chunk; continuous_usage_stats: in each


class CompletionChunkChoice(Body):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReasonName | None


class CompletionChoice(CompletionChunkChoice):
    prompt_logprobs: PromptLogprobs | None = None


class Completion(Envelope):
    object: Literal[COMPLETION]
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(Envelope):
    object: Literal[COMPLETION]
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ModelCard(Body):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str          # --model as given
    max_model_len: int


class ModelList(Body):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(Body):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None   # with return_token_strs


class DetokenizeResponse(Body):
    prompt: str


class ServerVersion(Body):
    version: str


class HealthStatus(Body):
    status: Literal["ok"]
