"""/tokenize and /detokenize in vLLM's shapes, answered by the API process with the served model's tokenizer.

They are lookups, not generation: a round trip through a tokenizer worker would need a reply ring the
pipeline has no other use for, so the API process loads the same tokenizer and chat template (the
PromptTokenizer the workers use) on first use, in a thread, and tokenizes in a thread too, so a long
prompt never stalls the event loop that streams every response.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from minisrv.server.errors import APIError
from minisrv.server.protocol import ChatMessage, Schema, TokenId, chat_turns, check_token_ids
from minisrv.tokenizer.prompts import PromptError, PromptTokenizer
from minisrv.wire.records import PromptRequest


class TokenizeCompletionRequest(Schema):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(Schema):
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    continue_final_message: bool = False


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

    async def tokenize(self, req: TokenizeCompletionRequest | TokenizeChatRequest, max_model_len: int) -> dict:
        prompts = await self.prompts()
        try:
            if isinstance(req, TokenizeChatRequest):
                messages = chat_turns(req.messages, req.add_generation_prompt, req.continue_final_message)
                ids = await asyncio.to_thread(prompts.token_ids, messages, True, req.add_generation_prompt,
                                              req.continue_final_message)
            else:
                tokenizer = prompts.tokenizer
                ids = await asyncio.to_thread(tokenizer.encode, req.prompt, add_special_tokens=req.add_special_tokens)
        except PromptError as exc:
            raise APIError(400, str(exc), "messages") from exc
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": None}

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
