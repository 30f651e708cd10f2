"""OpenAI request schemas, and their conversion to PROMPT_REQUEST records (sglang.py has /generate's).

The sampling options a schema takes under their own names are generated from SamplingParams'
table (minisrv/sampling_params.py), so a new option reaches every endpoint without an edit here.
Their ranges are checked once, by SamplingParams; its error is reported under the request's own
field name. The schemas check types, shapes and the API-level limits (n, top_logprobs, stop
strings). Unknown fields are rejected (extra="forbid"), with a 400 naming them, except the ones in
IGNORED_FIELDS: clients (the OpenAI SDK, LangChain, LiteLLM) send them, and they do not change what
this server generates, so they are accepted and ignored, and the server logs each name once.
"""
from __future__ import annotations

import json
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator, create_model
from pydantic_core import PydanticCustomError

from minisrv import structured_output
from minisrv.sampling_params import MAX_TOP_LOGPROBS, OPTIONS, Api, SamplingParams, api_names
from minisrv.server import tools as tool_calls
from minisrv.server.errors import APIError, from_validation_error
from minisrv.structured_output import Grammar, GrammarError
from minisrv.wire.records import PromptRequest
from minisrv.wire.terms import MAX_CHOICES, pack_template_value

COMPLETIONS_DEFAULT_MAX_TOKENS = 16     # OpenAI's default for /v1/completions
MAX_REQUEST_ID_CHARS = 256              # a client's id for its request: request_id, X-Request-Id, SGLang's rid
TokenId = Annotated[int, Field(ge=0)]
TokenIdKey = Annotated[str, Field(pattern=r"^[0-9]{1,10}$")]   # a token id as a JSON object key
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


def one_of(expected: str) -> WrapValidator:
    """For a union field: one plain error saying what is accepted, not one error per union member."""

    def validate(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("union_type", f"must be {expected}") from None

    return WrapValidator(validate)


Stop = Annotated[str | list[str] | None, one_of("a string or a list of strings")]


class Schema(BaseModel):
    """Base of every request schema."""

    # strict: "5" is not a number and 1 is not a bool, as in OpenAI's API; NaN/inf are not valid values.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def sampling_schema(api: Api, name: str) -> type[Schema]:
    """A schema of the sampling options `api` takes under their own names, each optional (None: the default)."""
    hints = typing.get_type_hints(SamplingParams)
    wire = {f.name: f.metadata["wire"] for f in OPTIONS}
    fields: dict[str, Any] = {}
    for api_name, option in api_names(api).items():
        hint = {"ids": list[TokenId], "bias": dict[TokenIdKey, float]}.get(wire[option], hints[option])
        fields[api_name] = (hint | None, None)
    return create_model(name, __base__=Schema, **fields)


def build_sampling_params(request: BaseModel, api: Api, extra: dict[str, Any] | None = None,
                          renames: dict[str, str] | None = None, prefix: str = "",
                          defaults: dict[str, Any] | None = None) -> SamplingParams:
    """SamplingParams from the options `request` gave (plus `extra`, the ones the endpoint declares itself), the
    ones it left out (None) taking `defaults` (--generation-config) where those have them. An out-of-range value
    is a 400 naming the request's own field: `renames` maps option names to the endpoint's where they differ,
    `prefix` is where the options sit in the body."""
    names = api_names(api)
    values = dict(defaults or {})
    values.update((option, getattr(request, name)) for name, option in names.items()
                  if getattr(request, name) is not None)
    if "logit_bias" in values:   # JSON object keys are strings
        values["logit_bias"] = {int(token): bias for token, bias in values["logit_bias"].items()}
    values.update((option, value) for option, value in (extra or {}).items()
                  if value is not None or option not in values)
    try:
        return SamplingParams(**values)
    except ValueError as exc:
        # SamplingParams names the field first in its message ("top_p must be in (0, 1], got 0.0").
        option = str(exc).split(" ", 1)[0]
        own = {option: name for name, option in names.items()} | (renames or {})
        param = prefix + own.get(option, option)
        raise APIError(400, str(exc).replace(option, param, 1), param, "invalid_value") from exc


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


class StreamOptions(Schema):
    include_usage: bool = False
    continuous_usage_stats: bool = False   # vLLM's: the usage so far in every chunk


# Accepted and ignored: bookkeeping for OpenAI's platform (store, metadata, service_tier, user), and options
# that cannot change a text-only reply of a model without tools or reasoning (parallel_tool_calls,
# reasoning_effort; modalities only as ["text"]; SGLang's separate_reasoning and stream_reasoning, which
# sglang-router sets on every request it forwards, and which act only where a reasoning parser runs).
# What the renderer passes to a chat template itself: chat_template_kwargs may not set these.
RESERVED_TEMPLATE_ARGS = frozenset({"messages", "add_generation_prompt", "continue_final_message", "tokenize",
                                    "chat_template", "tools", "documents", "return_dict"})
IGNORED_FIELDS = ("store", "metadata", "service_tier", "parallel_tool_calls", "user", "reasoning_effort",
                  "modalities", "separate_reasoning", "stream_reasoning")


class TextContentPart(Schema):
    type: Literal["text"]
    text: str


FunctionToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]   # OpenAI's rule for a tool's name


class FunctionDefinition(Schema):
    name: FunctionToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None   # a JSON schema of the arguments object
    strict: bool | None = None                 # forced calls always follow the schema, strict or not


class ToolDefinition(Schema):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Schema):
    name: str


class NamedToolChoice(Schema):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Annotated[Literal["none", "auto", "required"] | NamedToolChoice,
                       one_of('"none", "auto", "required" or {"type": "function", "function": {"name": ...}}')]


class CalledFunction(Schema):
    name: str
    arguments: str   # JSON text, as the API returned it


class MessageToolCall(Schema):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | list[TextContentPart] | None,
                       one_of('a string or a list of {"type": "text", "text": ...} parts')] = None
    name: str | None = None     # accepted and ignored: chat templates have no place for it
    tool_calls: list[MessageToolCall] | None = None   # an assistant's calls (its content may then be null)
    tool_call_id: str | None = None                   # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)

    def template_calls(self, where: str) -> str:
        """The tool_calls as the chat template sees them (arguments as objects, as vLLM passes them), as JSON."""
        if not self.tool_calls:
            return ""
        calls = []
        for j, call in enumerate(self.tool_calls):
            try:
                arguments = json.loads(call.function.arguments)
            except json.JSONDecodeError as exc:
                param = f"{where}.tool_calls.{j}.function.arguments"
                raise APIError(400, f"{param}: not valid JSON ({exc})", param) from None
            calls.append({"id": call.id, "type": "function",
                          "function": {"name": call.function.name, "arguments": arguments}})
        return json.dumps(calls, ensure_ascii=False)


def chat_turns(messages: list[ChatMessage], add_generation_prompt: bool, continue_final_message: bool
               ) -> list[tuple[str, str]]:
    """A chat's (role, text) turns, once its two ways of ending the rendered prompt are checked to agree and
    each message has what its role needs."""
    if continue_final_message and add_generation_prompt:
        raise APIError(400, "continue_final_message needs add_generation_prompt false: the output cannot both "
                            "continue the last message and start a new one", "continue_final_message")
    for i, m in enumerate(messages):
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise APIError(400, f"messages.{i}.content may be null only in an assistant message with tool_calls",
                           f"messages.{i}.content")
        if m.role == "tool" and m.tool_call_id is None:
            raise APIError(400, f"messages.{i}.tool_call_id: a tool message names the call it answers",
                           f"messages.{i}.tool_call_id")
        if m.tool_calls and m.role != "assistant":
            raise APIError(400, f"messages.{i}.tool_calls: only an assistant message makes tool calls",
                           f"messages.{i}.tool_calls")
    return [(m.role, m.text()) for m in messages]


JsonSchemaValue = Annotated[dict[str, Any] | str, one_of("a JSON schema: an object, or a string holding one")]


class JsonSchemaFormat(Schema):
    name: str | None = None          # OpenAI requires a name; it changes nothing here, so it is optional
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None       # the output always follows the schema, strict or not


class ResponseFormat(Schema):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(Schema):
    """vLLM's structured_outputs (its guided_* fields, grouped): one of these."""

    json_: JsonSchemaValue | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


def given_grammar(value: Any, make, field: str) -> Grammar | None:
    """make(value, field) for a field the request set, None for one it did not."""
    return None if value is None else make(value, field)


def _structured_outputs_grammar(so: StructuredOutputs | None, where: str) -> list[Grammar | None]:
    if so is None:
        return []
    return [given_grammar(so.json_, structured_output.json_schema, f"{where}.json"),
            given_grammar(so.regex, structured_output.regex, f"{where}.regex"),
            given_grammar(so.choice, structured_output.choice, f"{where}.choice"),
            given_grammar(so.grammar, structured_output.ebnf, f"{where}.grammar"),
            structured_output.json_object(f"{where}.json_object") if so.json_object else None]


def _response_format_grammar(rf: ResponseFormat | None) -> Grammar | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return structured_output.json_object("response_format")
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise APIError(400, "response_format: type json_schema needs json_schema.schema", "response_format.json_schema")
    return structured_output.json_schema(rf.json_schema.schema_, "response_format.json_schema.schema")


class _OpenAIFields(sampling_schema("openai", "_OpenAISampling")):
    """What /v1/chat/completions and /v1/completions share beyond the sampling options."""

    model: str | None = None
    stop: Stop = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # IGNORED_FIELDS, typed so that a malformed one is still a 400.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    reasoning_effort: str | None = None
    modalities: list[Literal["text"]] | None = None
    separate_reasoning: bool | None = None
    stream_reasoning: bool | None = None
    # vLLM's extensions for the output text and the prompt. spaces_between_special_tokens is taken and changes
    # nothing, as with vLLM's detokenizer for a fast tokenizer (every model here has one): special tokens read as
    # the tokenizer's decoder joins them (tokenizers' DecodeStream, in minisrv/tokenizer/incremental.py).
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # SGLang's, which sglang-router also sets on every request: no_stop_trim is include_stop_str_in_output;
    # hidden states are not returned (true is a 400).
    no_stop_trim: bool = False
    return_hidden_states: bool = False
    truncate_prompt_tokens: int | None = None   # keep the prompt's last k tokens; -1: the context length
    # vLLM's: the response's id (else the X-Request-Id header's, else a fresh one), and the request's priority
    # under --scheduling-policy priority (lower runs first), which vLLM too refuses unless started for it.
    request_id: str | None = None
    priority: int = 0
    allowed_token_ids: TokenIds | None = None   # vLLM's: a grammar of these tokens (structured_output.token_ids)
    return_tokens_as_token_ids: bool = False    # vLLM's: logprobs name each token "token_id:<id>"
    # Structured output (minisrv/structured_output.py): OpenAI's response_format, vLLM's structured_outputs and
    # its older guided_* fields; at most one of them. guided_decoding_backend names vLLM's engine: ignored.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: JsonSchemaValue | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None

    def ignored_fields(self) -> list[str]:
        """The IGNORED_FIELDS this request set."""
        return [name for name in (*IGNORED_FIELDS, "guided_decoding_backend") if name in self.model_fields_set]

    def grammar(self) -> Grammar | None:
        """The one constraint on the output this request asks for, as a grammar (not yet validated)."""
        try:
            return structured_output.one_grammar([
                *self.tool_grammar(),
                _response_format_grammar(self.response_format),
                *_structured_outputs_grammar(self.structured_outputs, "structured_outputs"),
                given_grammar(self.guided_json, structured_output.json_schema, "guided_json"),
                given_grammar(self.guided_regex, structured_output.regex, "guided_regex"),
                given_grammar(self.guided_choice, structured_output.choice, "guided_choice"),
                given_grammar(self.guided_grammar, structured_output.ebnf, "guided_grammar"),
                given_grammar(self.allowed_token_ids, structured_output.token_ids, "allowed_token_ids")])
        except GrammarError as exc:
            raise APIError(400, str(exc), exc.field, "invalid_grammar") from None

    def tool_grammar(self) -> list[Grammar]:
        return []

    def check_api_limits(self, vocab_size: int) -> None:
        check_token_ids(self.stop_token_ids or [], vocab_size, "stop_token_ids")
        check_token_ids([int(t) for t in self.logit_bias or {}], vocab_size, "logit_bias")
        check_token_ids(self.allowed_token_ids or [], vocab_size, "allowed_token_ids")
        check_n(self.n, "n")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
        if self.stream and self.prompt_logprobs is not None:
            raise APIError(400, "prompt_logprobs: not available when stream is true (as in vLLM); for a "
                                "completion, echo with logprobs streams them", "prompt_logprobs")
        if self.return_hidden_states:
            raise APIError(400, "return_hidden_states: this server does not return hidden states",
                           "return_hidden_states", "unsupported_field")
        if not -2**31 <= self.priority < 2**31:
            raise APIError(400, f"priority must be a 32-bit integer, got {self.priority}", "priority")

    def output_options(self, max_model_len: int) -> dict:
        """The PromptRequest fields of the text and prompt options, checked."""
        k = self.truncate_prompt_tokens
        if k is not None and (k == 0 or k < -1):
            raise APIError(400, f"truncate_prompt_tokens must be -1 (the context length) or >= 1, got {k}",
                           "truncate_prompt_tokens")
        return dict(skip_special_tokens=self.skip_special_tokens, priority=self.priority,
                    include_stop_str_in_output=self.include_stop_str_in_output or self.no_stop_trim,
                    truncate_prompt_tokens=0 if k is None else (max_model_len if k == -1 else min(k, max_model_len)))

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def continuous_usage(self) -> bool:
        """As vLLM: the usage so far in every chunk only when the final usage is asked for too."""
        return self.include_usage() and self.stream_options.continuous_usage_stats


class ChatCompletionRequest(_OpenAIFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True     # vLLM's extensions: end with the assistant's header, or
    continue_final_message: bool = False   # leave the last message open for the output to continue it
    chat_template_kwargs: dict[str, bool | int | float | str] | None = None   # e.g. {"enable_thinking": false}
    tools: Annotated[list[ToolDefinition], Field(min_length=1)] | None = None
    tool_choice: ToolChoice | None = None     # default: "auto" with tools, "none" without
    echo: bool = False   # vLLM's: an answer continuing the last message (an assistant's) starts with its text

    def echoed_text(self) -> str:
        """What the answer's content starts with under `echo`: the last message's text when it is the
        assistant's, else nothing."""
        return self.messages[-1].text() if self.echo and self.messages and self.messages[-1].role == "assistant" \
            else ""

    def ignored_fields(self) -> list[str]:
        ignored = super().ignored_fields()
        return [name for name in ignored if name != "parallel_tool_calls"] if self.tools else ignored

    def resolved_tool_choice(self) -> str:
        """"none", "auto", "required" or the name of the function the request forces."""
        choice = self.tool_choice
        if choice is None:
            return "auto" if self.tools else "none"
        if choice != "none" and not self.tools:
            raise APIError(400, "tool_choice needs tools: there is no function to call", "tool_choice")
        if isinstance(choice, NamedToolChoice):
            names = [t.function.name for t in self.tools]
            if choice.function.name not in names:
                raise APIError(400, f"tool_choice.function.name: {choice.function.name!r} is not one of the "
                                    f"tools ({', '.join(names)})", "tool_choice.function.name")
            return choice.function.name
        return choice

    def tool_dicts(self) -> list[dict]:
        """The tools as OpenAI's JSON objects, for the grammar of a forced call and for the chat template."""
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def tool_grammar(self) -> list[Grammar]:
        choice = self.resolved_tool_choice()
        if choice in ("none", "auto"):
            return []
        # An invalid grammar's fault: the forced function's parameters, or the tools' for "required"
        names = [t.function.name for t in self.tools]
        fault = "tools" if choice == "required" else f"tools.{names.index(choice)}.function.parameters"
        return [tool_calls.call_grammar(self.tool_dicts(), choice, self.parallel_tool_calls is not False, "tool_choice",
                                        fault)]

    def to_prompt_request(self, vocab_size: int, max_model_len: int, grammar: Grammar | None = None,
                          defaults: dict[str, Any] | None = None) -> PromptRequest:
        """`grammar`: self.grammar(), validated; `defaults`: build_sampling_params'."""
        self.check_api_limits(vocab_size)
        if not self.messages:
            raise APIError(400, "messages must be a non-empty list", "messages")
        messages = chat_turns(self.messages, self.add_generation_prompt, self.continue_final_message)
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise APIError(400, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}",
                               "top_logprobs")
        limit_name = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        # No limit given: OpenAI's chat default, up to the context length (max_tokens None).
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        params = build_sampling_params(
            self, "openai", extra=dict(max_tokens=limit, logprobs=(self.top_logprobs or 0) if self.logprobs else None,
                                       grammar=grammar and grammar.text),
            renames={"max_tokens": limit_name, "logprobs": "top_logprobs"}, defaults=defaults)
        kwargs = self.chat_template_kwargs or {}
        reserved = sorted(set(kwargs) & RESERVED_TEMPLATE_ARGS)
        if reserved:
            raise APIError(400, f"chat_template_kwargs.{reserved[0]} is set by the request itself, not here",
                           f"chat_template_kwargs.{reserved[0]}")
        choice = self.resolved_tool_choice()
        tools = None if choice == "none" else json.dumps(self.tool_dicts(), ensure_ascii=False)
        calls = [m.template_calls(f"messages.{i}") for i, m in enumerate(self.messages)]
        call_ids = [m.tool_call_id or "" for m in self.messages]
        has_extras = any(calls) or any(call_ids)
        return PromptRequest(messages=messages, params=params, n=self.n, tools=tools,
                             message_tool_calls=calls if has_extras else [],
                             message_tool_call_ids=call_ids if has_extras else [],
                             stop=stop_strings(self.stop, "stop"), add_generation_prompt=self.add_generation_prompt,
                             continue_final_message=self.continue_final_message,
                             template_kwarg_names=list(kwargs),
                             template_kwarg_values=[pack_template_value(v) for v in kwargs.values()],
                             **self.output_options(max_model_len))


class CompletionRequest(_OpenAIFields):
    prompt: Annotated[str | list[str] | TokenIds | list[TokenIds],
                      one_of("a string, a list of strings, a list of token ids (integers >= 0) "
                              "or a list of such lists")]
    max_tokens: int | None = COMPLETIONS_DEFAULT_MAX_TOKENS   # null: up to the context length
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None   # fill-in-the-middle: no served model's template has it, so a clear 400

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def to_prompt_requests(self, vocab_size: int, max_model_len: int, max_choices: int,
                           grammar: Grammar | None = None, defaults: dict[str, Any] | None = None
                           ) -> list[PromptRequest]:
        """`grammar`: self.grammar(), validated; `defaults`: build_sampling_params'."""
        self.check_api_limits(vocab_size)
        prompts = self.prompts()
        if not prompts:
            raise APIError(400, "prompt must not be empty", "prompt")
        if len(prompts) * self.n > max_choices:
            raise APIError(400, f"{len(prompts)} prompts x n={self.n} asks for {len(prompts) * self.n} choices; this "
                                f"server takes at most {max_choices} per request (--max-choices-per-request)",
                           "prompt")
        for p in prompts:
            if isinstance(p, str) and not p:
                raise APIError(400, "prompt must not be an empty string", "prompt")
            if isinstance(p, list):
                check_token_ids(p, vocab_size, "prompt")
        if self.suffix:
            raise APIError(400, "suffix: fill-in-the-middle needs a model whose template defines it, and this "
                                "server has none for the served model; put the text in the prompt instead", "suffix",
                           "unsupported_field")
        # echo with logprobs shows the prompt's tokens with theirs first (the legacy OpenAI API, vLLM).
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            prompt_logprobs = max(self.logprobs, prompt_logprobs or 0)
        params = build_sampling_params(self, "openai", extra=dict(max_tokens=self.max_tokens, logprobs=self.logprobs,
                                                                  prompt_logprobs=prompt_logprobs,
                                                                  grammar=grammar and grammar.text),
                                       defaults=defaults)
        common = dict(params=params, n=self.n, stop=stop_strings(self.stop, "stop"), echo=self.echo,
                      **self.output_options(max_model_len))
        return [PromptRequest(text=p, **common) if isinstance(p, str) else PromptRequest(prompt_ids=p, **common)
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


def checked_request_id(given: str | None, field: str) -> str | None:
    """A client's id for its request (None: it gave none), refused when empty or longer than
    MAX_REQUEST_ID_CHARS: it becomes the response's id and goes into the logs."""
    if given is not None and not 0 < len(given) <= MAX_REQUEST_ID_CHARS:
        raise APIError(400, f"{field}: 1 to {MAX_REQUEST_ID_CHARS} characters, got {len(given)}", field)
    return given
