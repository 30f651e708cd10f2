"""Prompt rendering and tokenization: chat template (the model's or --chat-template), then token ids."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from jinja2 import TemplateError

from minisrv.wire.records import PromptRequest
from minisrv.wire.terms import unpack_template_value

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from minisrv.models.source import ModelSource


class PromptError(ValueError):
    """A prompt that cannot be rendered or tokenized; the message is fit for the client."""


def resolve_chat_template(option: str | None, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """`--chat-template` is a path to a Jinja file or the template itself; without it, the model's."""
    if option is None:
        return tokenizer.chat_template
    path = Path(option).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in option or "{%" in option:
        return option
    raise ValueError(f"--chat-template (chat_template): {option!r} is neither a file nor a Jinja template")


class PromptTokenizer:
    """Turns a request's prompt (text, token ids, or chat messages) into the token ids the engine runs."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    def render_chat(self, messages: list[tuple[str, str]], add_generation_prompt: bool,
                    continue_final_message: bool = False, template_kwargs: dict | None = None,
                    tools: list[dict] | None = None, message_extras: list[dict] | None = None) -> str:
        """`tools`: OpenAI function definitions for templates that render them; `message_extras`: per message,
        keys added to it (an assistant's tool_calls, a tool message's tool_call_id)."""
        if self.chat_template is None:
            raise PromptError("this model has no chat template; start the server with --chat-template")
        if not messages:
            raise PromptError("messages must not be empty")
        try:
            extras = message_extras or [{}] * len(messages)
            return self.tokenizer.apply_chat_template(
                [{"role": role, "content": content, **extra} for (role, content), extra in zip(messages, extras)],
                tools=tools,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
                **(template_kwargs or {}),
            )
        except TemplateError as exc:  # templates raise to reject e.g. roles they do not support
            raise PromptError(f"the chat template rejected these messages: {exc}") from exc
        except ValueError as exc:     # continue_final_message: the template did not render the last message
            raise PromptError(f"continue_final_message: {exc}") from exc

    def encode_text(self, text: str, rendered_chat: bool) -> list[int]:
        # A rendered chat already holds the template's BOS; a plain completion prompt gets the tokenizer's
        # special tokens, as vLLM does, so Llama-2-style models see their BOS.
        return self.tokenizer.encode(text, add_special_tokens=not rendered_chat)

    def token_ids(self, prompt: str | list[int] | list[tuple[str, str]], is_chat: bool,
                  add_generation_prompt: bool = True, continue_final_message: bool = False,
                  template_kwargs: dict | None = None, tools: list[dict] | None = None,
                  message_extras: list[dict] | None = None) -> list[int]:
        if is_chat:
            rendered = self.render_chat(prompt, add_generation_prompt, continue_final_message, template_kwargs,
                                        tools, message_extras)
            return self.encode_text(rendered, rendered_chat=True)
        if isinstance(prompt, str):
            return self.encode_text(prompt, rendered_chat=False)
        return list(prompt)

    def request_token_ids(self, req: PromptRequest) -> list[int]:
        """The token ids of a request's prompt, as it came from the API server (chat messages with their tools,
        template arguments and tool calls, text, or ids)."""
        if req.messages is not None:
            kwargs = {name: unpack_template_value(value)
                      for name, value in zip(req.template_kwarg_names, req.template_kwarg_values)}
            return self.token_ids(req.messages, is_chat=True, add_generation_prompt=req.add_generation_prompt,
                                  continue_final_message=req.continue_final_message, template_kwargs=kwargs,
                                  tools=json.loads(req.tools) if req.tools else None,
                                  message_extras=message_extras(req))
        if req.prompt_ids is not None:
            return req.prompt_ids.tolist()
        return self.token_ids(req.text, is_chat=False)


def message_extras(req: PromptRequest) -> list[dict] | None:
    """What each chat message adds for the template beyond role and content: tool_calls, tool_call_id."""
    if not req.message_tool_calls:
        return None
    if len(req.message_tool_calls) != len(req.messages):
        raise PromptError(f"{len(req.message_tool_calls)} tool-call entries for {len(req.messages)} messages")
    extras = []
    for calls, call_id in zip(req.message_tool_calls, req.message_tool_call_ids):
        extra: dict = {}
        if calls:
            extra["tool_calls"] = json.loads(calls)
        if call_id:
            extra["tool_call_id"] = call_id
        extras.append(extra)
    return extras


def load_prompt_tokenizer(source: ModelSource, chat_template: str | None) -> PromptTokenizer:
    """The served model's tokenizer with its chat template (`chat_template`: --chat-template, or None)."""
    from minisrv.tokenizer.loading import load_tokenizer

    tokenizer = load_tokenizer(source)
    return PromptTokenizer(tokenizer, resolve_chat_template(chat_template, tokenizer))
