"""OpenAI request schemas, and their conversion to the engine's GenerateInput (sglang.py has /generate's).

Ranges of sampling values are defined once, in SamplingParams.validate(); the schemas here check
types, shapes and the API-level limits (n, top_logprobs, stop strings), then SamplingParams checks
the values and its error is reported under the request's own field name. Unknown fields are
rejected (extra="forbid") except `user`, which OpenAI clients send for abuse tracking and which
this server explicitly ignores.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

from minisrv.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from minisrv.server.client import MAX_CHOICES, GenerateInput
from minisrv.server.errors import APIError, from_validation_error

COMPLETIONS_DEFAULT_MAX_TOKENS = 16     # OpenAI's default for /v1/completions
TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


def _one_of(expected: str) -> WrapValidator:
    """For a union field: one plain error saying what is accepted, not one error per union member."""

    def validate(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("union_type", f"must be {expected}") from None

    return WrapValidator(validate)


Stop = Annotated[str | list[str] | None, _one_of("a string or a list of strings")]


class Schema(BaseModel):
    """Base of every request schema."""

    # strict: "5" is not a number and 1 is not a bool, as in OpenAI's API; NaN/inf are not valid values.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(Schema):
    include_usage: bool = False


class TextContentPart(Schema):
    type: Literal["text"]
    text: str


class ChatMessage(Schema):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[TextContentPart],
                       _one_of('a string or a list of {"type": "text", "text": ...} parts')]
    name: str | None = None     # accepted and ignored: chat templates have no place for it

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class _SamplingFields(Schema):
    """Fields /v1/chat/completions and /v1/completions share; None means "the default"."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: Stop = None
    stop_token_ids: list[TokenId] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None     # explicitly ignored

    def check_api_limits(self, vocab_size: int) -> None:
        check_token_ids(self.stop_token_ids or [], vocab_size, "stop_token_ids")
        check_n(self.n, "n")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")

    def stop_strings(self) -> list[str]:
        return stop_strings(self.stop, "stop")

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int, logprobs: int | None, renames: dict[str, str]) -> SamplingParams:
        """Build (and so validate) SamplingParams; `renames` maps its fields to this request's names."""
        values = dict(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
        )
        given = {k: v for k, v in values.items() if v is not None}
        return build_sampling_params(dict(given, max_tokens=max_tokens, logprobs=logprobs), renames)


def build_sampling_params(values: dict, renames: dict[str, str], prefix: str = "") -> SamplingParams:
    try:
        return SamplingParams(**values)
    except ValueError as exc:
        # SamplingParams names the field first in its message ("top_p must be in (0, 1], got 0.0").
        name = str(exc).split(" ", 1)[0]
        param = prefix + renames.get(name, name)
        raise APIError(400, str(exc).replace(name, param, 1), param, "invalid_value") from exc


def check_n(n: int, param: str) -> None:
    if not 1 <= n <= MAX_CHOICES:
        raise APIError(400, f"{param} must be in [1, {MAX_CHOICES}], got {n}", param)


def stop_strings(stop: str | list[str] | None, param: str) -> list[str]:
    stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    if any(not s for s in stops):
        raise APIError(400, f"{param}: stop strings must not be empty", param)
    return stops


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    # Checked here as well as in the scheduler: an id past int32 could not even travel in a record.
    bad = next((t for t in ids if t >= vocab_size), None)
    if bad is not None:
        raise APIError(400, f"{param}: token id {bad} is outside the vocabulary [0, {vocab_size})", param,
                       "invalid_value")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True     # vLLM's extension: False continues the last message instead

    def to_generate_input(self, max_model_len: int, vocab_size: int) -> GenerateInput:
        self.check_api_limits(vocab_size)
        if not self.messages:
            raise APIError(400, "messages must be a non-empty list", "messages")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise APIError(400, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}",
                               "top_logprobs")
        limit_name = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        params = self.sampling_params(
            max_tokens=max_model_len if limit is None else limit,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            renames={"max_tokens": limit_name, "logprobs": "top_logprobs"},
        )
        return GenerateInput(
            prompt=[(m.role, m.text()) for m in self.messages], is_chat=True, params=params, n=self.n,
            stop=self.stop_strings(), add_generation_prompt=self.add_generation_prompt,
            max_tokens_from_context=limit is None,
        )


class CompletionRequest(_SamplingFields):
    prompt: Annotated[str | list[str] | TokenIds | list[TokenIds],
                      _one_of("a string, a list of strings, a list of token ids (integers >= 0) "
                              "or a list of such lists")]
    max_tokens: int | None = COMPLETIONS_DEFAULT_MAX_TOKENS   # null: up to the context length
    logprobs: int | None = None
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def to_generate_inputs(self, max_model_len: int, vocab_size: int) -> list[GenerateInput]:
        self.check_api_limits(vocab_size)
        prompts = self.prompts()
        if not prompts:
            raise APIError(400, "prompt must not be empty", "prompt")
        for p in prompts:
            if isinstance(p, str) and not p:
                raise APIError(400, "prompt must not be an empty string", "prompt")
            if isinstance(p, list):
                check_token_ids(p, vocab_size, "prompt")
        if self.echo and self.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported (no prompt logprobs)", "echo")
        params = self.sampling_params(
            max_tokens=max_model_len if self.max_tokens is None else self.max_tokens,
            logprobs=self.logprobs, renames={},
        )
        return [GenerateInput(prompt=p, is_chat=False, params=params, n=self.n, stop=self.stop_strings(),
                              echo=self.echo, max_tokens_from_context=self.max_tokens is None)
                for p in prompts]


def parse_request(model: type[Schema], body: bytes) -> Schema:
    """Decode and validate a JSON body; every failure is a 400 APIError naming the field."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_utf8") from exc
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc
