"""SGLang's native `POST /generate`: its request schema and its response shapes.

Request: exactly one of `text` / `input_ids`, a `sampling_params` object with SGLang's names
(max_new_tokens, min_new_tokens, ...), `stream`, and `return_logprob` / `top_logprobs_num` for output logprobs.
Response: `{"text", "output_ids", "meta_info"}` per choice (a list when n > 1); a stream sends each choice's whole
text (and logprobs) so far in every event, as SGLang does, then `data: [DONE]`.
"""
from __future__ import annotations

from typing import Any, AsyncIterator

from pydantic import Field

from minisrv import structured_output
from minisrv.sampling_params import MAX_TOP_LOGPROBS
from minisrv.server.engine_handle import TokenLogprob
from minisrv.server.errors import APIError
from minisrv.server.protocol import (Schema, Stop, TokenIds, build_sampling_params, check_n, check_token_ids,
                                     checked_request_id, given_grammar, sampling_schema, stop_strings)
from minisrv.server.responses import sse_stream
from minisrv.server.streams import ChoiceDelta, ChoiceResult, ResponseContext
from minisrv.structured_output import Grammar, GrammarError
from minisrv.wire.records import PromptRequest

DEFAULT_MAX_NEW_TOKENS = 128   # SGLang's default


class SGLangSamplingParams(sampling_schema("sglang", "_SGLangSampling")):
    """/generate's `sampling_params`: the sampling options under SGLang's names, plus its request-level ones."""

    stop: Stop = None
    n: int = 1
    # The output text's options, as SGLang names them: no_stop_trim keeps a matched stop string (vLLM's
    # include_stop_str_in_output); spaces_between_special_tokens changes nothing, as on the OpenAI endpoints.
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    spaces_between_special_tokens: bool = True
    json_schema: str | None = None   # structured output, at most one of these three
    regex: str | None = None
    ebnf: str | None = None


class SGLangGenerateRequest(Schema):
    text: str | None = None
    input_ids: TokenIds | None = None
    sampling_params: SGLangSamplingParams = Field(default_factory=SGLangSamplingParams)
    stream: bool = False
    rid: str | None = None                   # meta_info.id
    # Output logprobs in meta_info (output_token_logprobs, output_top_logprobs); a prompt's are not returned,
    # so logprob_start_len stays -1.
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    # What SGLang's clients send along (its bench_serving: lora_path null, image_data, return_routed_experts
    # false): taken as long as they ask for nothing this text-only, adapter-free server lacks.
    lora_path: str | None = None
    image_data: Any = None
    return_routed_experts: bool = False

    def check_unsupported(self) -> None:
        checked_request_id(self.rid, "rid")
        for field, asked in (("lora_path", self.lora_path), ("image_data", self.image_data),
                             ("return_routed_experts", self.return_routed_experts)):
            if asked:
                raise APIError(400, f"{field}: this server serves one text-only model without adapters", field,
                               "unsupported_field")
        if self.return_logprob and self.logprob_start_len != -1:
            raise APIError(400, "logprob_start_len: prompt logprobs are not returned here, so only -1 is accepted",
                           "logprob_start_len", "unsupported_field")
        if not 0 <= self.top_logprobs_num <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs_num}",
                           "top_logprobs_num")

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
        self.check_unsupported()
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if sp.max_new_tokens is None else sp.max_new_tokens
        params = build_sampling_params(sp, "sglang", prefix="sampling_params.",
                                       extra=dict(max_tokens=max_new_tokens, grammar=grammar and grammar.text,
                                                  logprobs=self.top_logprobs_num if self.return_logprob else None),
                                       defaults=defaults)
        options = dict(params=params, n=sp.n, stop=stop_strings(sp.stop, "sampling_params.stop"),
                       skip_special_tokens=sp.skip_special_tokens, include_stop_str_in_output=sp.no_stop_trim)
        if self.text is not None:
            return PromptRequest(text=self.text, **options)
        return PromptRequest(prompt_ids=list(self.input_ids), **options)


def _meta_info(ctx: ResponseContext, finish_reason: str | None, num_prompt_tokens: int, num_cached_tokens: int,
               num_output_tokens: int, logprobs: list[TokenLogprob] | None) -> dict:
    meta = {"id": ctx.id, "finish_reason": None if finish_reason is None else {"type": finish_reason},
            "prompt_tokens": num_prompt_tokens, "completion_tokens": num_output_tokens,
            "cached_tokens": num_cached_tokens}
    if ctx.logprob_text is not None:   # SGLang's (logprob, token id, text or None) triples
        def triple(t: TokenLogprob) -> list:
            return [t.logprob, t.token_id, t.token if ctx.logprob_text else None]
        meta["output_token_logprobs"] = [triple(t) for t in logprobs or []]
        meta["output_top_logprobs"] = [[triple(alt) for alt in t.top_logprobs] for t in logprobs or []]
    return meta


def generate_result(ctx: ResponseContext, results: list[ChoiceResult]) -> dict | list[dict]:
    usage = ctx.usage()
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    outs = [{"text": r.text, "output_ids": r.token_ids,
             "meta_info": _meta_info(ctx, r.finish_reason, usage["prompt_tokens"], cached, len(r.token_ids),
                                     r.logprobs)}
            for r in results]
    return outs[0] if len(outs) == 1 else outs


def generate_stream(ctx: ResponseContext, deltas: AsyncIterator[ChoiceDelta]) -> AsyncIterator[bytes]:
    so_far: dict[int, ChoiceResult] = {}

    def chunk_of(cd: ChoiceDelta) -> dict | None:
        d = cd.delta
        result = so_far.setdefault(cd.choice, ChoiceResult(logprobs=[]))
        result.text_parts.append(d.text)
        result.token_ids += d.token_ids
        result.logprobs += d.logprobs or []
        if not d.token_ids and d.finish_reason is None:
            return None
        return {"text": result.text, "output_ids": list(result.token_ids), "index": cd.choice,
                "meta_info": _meta_info(ctx, d.finish_reason, d.num_prompt_tokens, d.num_cached_tokens,
                                            d.num_output_tokens, result.logprobs)}

    return sse_stream(ctx, deltas, chunk_of, usage_object=None)   # usage is in every event's meta_info
