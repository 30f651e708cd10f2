"""/tokenize and /detokenize in vLLM's shapes, answered by the API process with the served model's tokenizer.

They are lookups, not generation: a round trip through a tokenizer worker would need a reply ring the
pipeline has no other use for, so the API process loads the same tokenizer and chat template (the
PromptTokenizer the workers use) on first use, in a thread, and tokenizes in a thread too, so a long
prompt never stalls the event loop that streams every response.
"""
from __future__ import annotations

import asyncio
from typing import Annotated, Callable

from pydantic import Field

from minisrv.server.errors import APIError
from minisrv.server.protocol import (ChatCompletionRequest, ChatMessage, Schema, TokenId, ToolDefinition,
                                     check_token_ids)
from minisrv.tokenizer.prompts import PromptError, PromptTokenizer
from minisrv.wire.records import PromptRequest


class TokenizeCompletionRequest(Schema):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(Schema):
    """vLLM's: the chat rendered as a chat request's prompt would be, tools and template arguments included."""

    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: Annotated[list[ToolDefinition], Field(min_length=1)] | None = None
    chat_template_kwargs: dict[str, bool | int | float | str] | None = None
    return_token_strs: bool = False

    def to_chat_request(self) -> ChatCompletionRequest:
        """The chat request whose prompt this is (its fields validated already, as the same types)."""
        return ChatCompletionRequest.model_construct(
            model=self.model, messages=self.messages, tools=self.tools, chat_template_kwargs=self.chat_template_kwargs,
            add_generation_prompt=self.add_generation_prompt, continue_final_message=self.continue_final_message,
            max_tokens=1)


class DetokenizeRequest(Schema):
    model: str | None = None
    tokens: list[TokenId]


class Tokenization:
    """The served tokenizer in the API process, loaded by `load` (a blocking call) the first time it is needed."""

    def __init__(self, load: Callable[[], PromptTokenizer]) -> None:
        self._load = load
        self._prompts: PromptTokenizer | None = None
        self._loading = asyncio.Lock()

    async def prompts(self) -> PromptTokenizer:
        async with self._loading:
            if self._prompts is None:
                self._prompts = await asyncio.to_thread(self._load)
        return self._prompts

    async def tokenize(self, req: TokenizeCompletionRequest | TokenizeChatRequest, vocab_size: int,
                       max_model_len: int) -> dict:
        prompts = await self.prompts()
        if isinstance(req, TokenizeChatRequest):
            prompt = req.to_chat_request().to_prompt_request(vocab_size, max_model_len, None, {})
            ids = await self.request_token_ids(prompt)
        else:
            ids = await asyncio.to_thread(prompts.tokenizer.encode, req.prompt,
                                          add_special_tokens=req.add_special_tokens)
        strs = prompts.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs}

    async def request_token_ids(self, req: PromptRequest) -> list[int]:
        """The token ids a tokenizer worker would make of `req`'s prompt (tools and tool calls included)."""
        prompts = await self.prompts()
        try:
            return await asyncio.to_thread(prompts.request_token_ids, req)
        except PromptError as exc:
            raise APIError(400, str(exc), "messages") from exc

    async def detokenize(self, req: DetokenizeRequest, vocab_size: int) -> dict:
        check_token_ids(req.tokens, vocab_size, "tokens")
        prompts = await self.prompts()
        return {"prompt": await asyncio.to_thread(prompts.tokenizer.decode, req.tokens)}
