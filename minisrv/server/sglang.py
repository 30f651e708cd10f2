"""SGLang's native `POST /generate`: its request schema and its response shapes.

Request: exactly one of `text` / `input_ids`, a `sampling_params` object with SGLang's names
(max_new_tokens, min_new_tokens, ...), and `stream`. Response: `{"text", "output_ids", "meta_info"}`
per choice (a list when n > 1); a stream sends each choice's whole text so far in every event, as
SGLang does, then `data: [DONE]`.
"""
from __future__ import annotations

from typing import Any, AsyncIterator

from pydantic import Field

from minisrv import structured_output
from minisrv.server.errors import APIError
from minisrv.server.protocol import (Schema, Stop, TokenIds, build_sampling_params, check_n, check_token_ids,
                                     given_grammar, sampling_schema, stop_strings)
from minisrv.server.responses import sse_stream
from minisrv.server.streams import ChoiceDelta, ChoiceResult, ResponseContext
from minisrv.structured_output import Grammar, GrammarError
from minisrv.wire.records import PromptRequest

DEFAULT_MAX_NEW_TOKENS = 128   # SGLang's default


class SGLangSamplingParams(sampling_schema("sglang", "_SGLangSampling")):
    """/generate's `sampling_params`: the sampling options under SGLang's names, plus its request-level ones."""

    stop: Stop = None
    n: int = 1
    json_schema: str | None = None   # structured output, at most one of these three
    regex: str | None = None
    ebnf: str | None = None


class SGLangGenerateRequest(Schema):
    text: str | None = None
    input_ids: TokenIds | None = None
    sampling_params: SGLangSamplingParams = Field(default_factory=SGLangSamplingParams)
    stream: bool = False

    def grammar(self) -> Grammar | None:
        """The output constraint sampling_params asks for (not yet validated)."""
        sp, where = self.sampling_params, "sampling_params."
        try:
            return structured_output.one_grammar([
                given_grammar(sp.json_schema, structured_output.json_schema, where + "json_schema"),
                given_grammar(sp.regex, structured_output.regex, where + "regex"),
                given_grammar(sp.ebnf, structured_output.ebnf, where + "ebnf")])
        except GrammarError as exc:
            raise APIError(400, str(exc), exc.field, "invalid_grammar") from None

    def to_prompt_request(self, vocab_size: int, grammar: Grammar | None = None,
                          defaults: dict[str, Any] | None = None) -> PromptRequest:
        """`grammar`: self.grammar(), validated; `defaults`: build_sampling_params' (max_new_tokens keeps
        SGLang's own default)."""
        if (self.text is None) == (self.input_ids is None):
            raise APIError(400, "give exactly one of text and input_ids", "text")
        if self.text == "":
            raise APIError(400, "text must not be empty", "text")
        sp = self.sampling_params
        check_token_ids(self.input_ids or [], vocab_size, "input_ids")
        check_token_ids(sp.stop_token_ids or [], vocab_size, "sampling_params.stop_token_ids")
        check_token_ids([int(t) for t in sp.logit_bias or {}], vocab_size, "sampling_params.logit_bias")
        check_n(sp.n, "sampling_params.n")
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if sp.max_new_tokens is None else sp.max_new_tokens
        params = build_sampling_params(sp, "sglang", prefix="sampling_params.",
                                       extra=dict(max_tokens=max_new_tokens, grammar=grammar and grammar.text),
                                       defaults=defaults)
        stop = stop_strings(sp.stop, "sampling_params.stop")
        if self.text is not None:
            return PromptRequest(text=self.text, params=params, n=sp.n, stop=stop)
        return PromptRequest(prompt_ids=list(self.input_ids), params=params, n=sp.n, stop=stop)


def _meta_info(ctx: ResponseContext, finish_reason: str | None, num_prompt_tokens: int, num_cached_tokens: int,
               num_output_tokens: int) -> dict:
    return {"id": ctx.id, "finish_reason": None if finish_reason is None else {"type": finish_reason},
            "prompt_tokens": num_prompt_tokens, "completion_tokens": num_output_tokens,
            "cached_tokens": num_cached_tokens}


def generate_result(ctx: ResponseContext, results: list[ChoiceResult]) -> dict | list[dict]:
    usage = ctx.usage()
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    outs = [{"text": r.text, "output_ids": r.token_ids,
             "meta_info": _meta_info(ctx, r.finish_reason, usage["prompt_tokens"], cached, len(r.token_ids))}
            for r in results]
    return outs[0] if len(outs) == 1 else outs


def generate_stream(ctx: ResponseContext, deltas: AsyncIterator[ChoiceDelta]) -> AsyncIterator[bytes]:
    so_far: dict[int, ChoiceResult] = {}

    def chunk_of(cd: ChoiceDelta) -> dict | None:
        d = cd.delta
        result = so_far.setdefault(cd.choice, ChoiceResult())
        result.text_parts.append(d.text)
        result.token_ids += d.token_ids
        if not d.token_ids and d.finish_reason is None:
            return None
        return {"text": result.text, "output_ids": list(result.token_ids), "index": cd.choice,
                "meta_info": _meta_info(ctx, d.finish_reason, d.num_prompt_tokens, d.num_cached_tokens,
                                            d.num_output_tokens)}

    return sse_stream(ctx, deltas, chunk_of, usage_object=None)   # usage is in every event's meta_info
