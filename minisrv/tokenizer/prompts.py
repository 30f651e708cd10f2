"""Prompt rendering and tokenization: chat template (the model's or --chat-template), then token ids."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from jinja2 import TemplateError

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


def load_prompt_tokenizer(source: ModelSource, chat_template: str | None) -> PromptTokenizer:
    """The served model's tokenizer with its chat template (`chat_template`: --chat-template, or None)."""
    from minisrv.tokenizer.loading import load_tokenizer

    tokenizer = load_tokenizer(source)
    return PromptTokenizer(tokenizer, resolve_chat_template(chat_template, tokenizer))
