"""The detokenizer's state: per choice, its text so far. STEP_TOKENS rows in, TEXT_DELTAS rows out.

Per choice it keeps an IncrementalDetokenizer (UTF-8-safe deltas, stop strings). When a stop string
matches, the choice finishes with "stop" here and its id is returned so the scheduler can be told to
free its pages; rows the scheduler sends for it afterwards are dropped. The process loop around it is
minisrv/runtime/detokenizer_process.py.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from minisrv.tokenizer.incremental import IncrementalDetokenizer, TokenTexts
from minisrv.wire.records import DetokenizeRequest, StepTokens, TextDeltas
from minisrv.wire.terms import FinishReason, api_server_of, choice_rid


@dataclass
class PendingRow:
    """A choice's output held back (a stream interval above 1): its token columns are named as TEXT_DELTAS'
    so one function adds a token to either."""

    emitted_ns: int               # when the scheduler sent the first of them
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    token_bytes: list[bytes] = field(default_factory=list)
    top_counts: list[int] = field(default_factory=list)
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    top_bytes: list[bytes] = field(default_factory=list)
    token_in_prompt: list[bool] = field(default_factory=list)
    token_ranks: list[int] = field(default_factory=list)


@dataclass
class ChoiceStream:
    detok: IncrementalDetokenizer
    # Ids whose text is left out when they stop the output, as vLLM does: the request's stop_token_ids and the
    # special tokens (EOS among them); none with include_stop_str_in_output.
    unrendered_stops: frozenset[int]
    prefix: str = ""                  # the prompt's text for echo, sent with the choice's first row
    prompt_tokens: PendingRow | None = None   # prompt logprobs, sent with the choice's first row
    pending: PendingRow | None = None
    started: bool = False             # its first row went out (that one is never held back)


class Detokenizer:
    """The per-choice state machine, free of rings (the process loop feeds it). A choice's rows go out
    every `stream_interval` tokens, the first and the last at once."""

    def __init__(self, tokenizer: Tokenizer, stream_interval: int = 1) -> None:
        self.tokenizer = tokenizer
        self.token_texts = TokenTexts(tokenizer)
        self.stream_interval = stream_interval
        self.streams: dict[int, ChoiceStream] = {}
        self.special_ids = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)

    def add_request(self, req: DetokenizeRequest) -> None:
        prefix = ""
        if req.echo:
            prefix = self.tokenizer.decode(req.prompt_ids.tolist(), skip_special_tokens=req.skip_special_tokens)
        unrendered = (frozenset() if req.include_stop_str_in_output
                      else self.special_ids.union(map(int, req.stop_token_ids)))
        for index in range(req.n):
            detok = IncrementalDetokenizer(self.tokenizer, req.stop, req.skip_special_tokens,
                                           req.include_stop_str_in_output)
            stream = self.streams[choice_rid(req.rid, index)] = ChoiceStream(detok, unrendered, prefix)
            if req.echo_logprobs:   # the prompt's first token has no logprob, but an echo shows it
                stream.prompt_tokens = PendingRow(0)
                self._add_token(stream.prompt_tokens, int(req.prompt_ids[0]), math.nan, 0, [], [], True)

    def drop(self, rid: int) -> None:
        self.streams.pop(rid, None)

    def process(self, step: StepTokens, outs: list[TextDeltas]) -> list[int]:
        """Append a row for every choice of `step` with a row due, to the batch of `outs` of the API server
        process it came from (api_server_of); return the ids of choices a stop string just finished (the
        scheduler must be told to abort them). Every row lists its new token ids; token bytes are b"" for
        tokens of requests that asked for no logprobs."""
        stopped = []
        top_counts = step.top_counts.tolist()
        top_ids, top_logprobs = step.top_ids.tolist(), step.top_logprobs.tolist()
        top_start = 0
        counts = zip(step.num_prompt_tokens.tolist(), step.num_cached_tokens.tolist(),
                     step.num_output_tokens.tolist())
        in_prompt, ranks = step.in_prompt.tolist(), step.ranks.tolist()
        for row, (rid, token, reason, logprob, (prompt, cached, output)) in enumerate(zip(
                step.rids.tolist(), step.token_ids.tolist(), step.finish_reasons.tolist(), step.logprobs.tolist(),
                counts)):
            tops = slice(top_start, top_start + top_counts[row])
            top_start = tops.stop
            stream = self.streams.get(rid)
            if stream is None:   # finished here by a stop string, or refused: nothing to report
                continue
            if in_prompt[row]:
                stream.prompt_tokens = stream.prompt_tokens or PendingRow(step.emitted_ns)
                self._add_token(stream.prompt_tokens, token, logprob, top_counts[row], top_ids[tops],
                                top_logprobs[tops], True, ranks[row])
                continue
            # The token that stopped the output (EOS, a stop token id) counts and has its logprob, but no text.
            unrendered = reason == FinishReason.STOP and token in stream.unrendered_stops
            text = stream.detok.step(token) if token >= 0 and not unrendered else ""
            if stream.detok.stopped:
                if reason == FinishReason.NONE:
                    stopped.append(rid)
                reason = FinishReason.STOP
            elif reason != FinishReason.NONE:
                text += stream.detok.flush()
            if stream.prefix:
                text, stream.prefix = stream.prefix + text, ""
            held = stream.pending
            has_token = token >= 0
            tops_of_token = (top_counts[row], top_ids[tops], top_logprobs[tops])
            if (reason == FinishReason.NONE and stream.started
                    and (len(held.token_ids) if held else 0) + has_token < self.stream_interval):
                held = stream.pending = held or PendingRow(step.emitted_ns)
                held.text += text
                if has_token:
                    self._add_token(held, token, logprob, *tops_of_token)
                continue
            # Due: one row of what was held and this token. Rows that go out at once (a stream interval of
            # 1, a first token) build nothing on the side: this runs once per token of every stream.
            stream.pending, stream.started = None, True
            if reason != FinishReason.NONE:
                del self.streams[rid]
            out = outs[api_server_of(rid, len(outs))]
            out.rids.append(rid)
            out.finish_reasons.append(reason)
            out.num_prompt_tokens.append(prompt)
            out.num_cached_tokens.append(cached)
            out.num_output_tokens.append(output)
            before = [part for part in (stream.prompt_tokens, held) if part]
            stream.prompt_tokens = None
            out.num_tokens.append(sum(len(part.token_ids) for part in before) + has_token)
            out.emitted_ns.append(held.emitted_ns if held else step.emitted_ns)
            out.texts.append(held.text + text if held else text)
            for part in before:
                for name in TOKEN_COLUMNS:
                    getattr(out, name).extend(getattr(part, name))
            if has_token:
                self._add_token(out, token, logprob, *tops_of_token)
        return stopped

    def _add_token(self, dst: TextDeltas | PendingRow, token: int, logprob: float, top_count: int,
                   top_ids: list[int], top_logprobs: list[float], in_prompt: bool = False, rank: int = 0) -> None:
        """Append one token to `dst`'s token columns; its bytes only when logprobs were asked for (prompt
        tokens come only then)."""
        dst.token_in_prompt.append(in_prompt)
        dst.token_ranks.append(rank)
        dst.token_ids.append(token)
        dst.token_logprobs.append(logprob)
        dst.token_bytes.append(self.token_texts[token].raw if in_prompt or not math.isnan(logprob) else b"")
        dst.top_counts.append(top_count)
        dst.top_ids += top_ids
        dst.top_logprobs += top_logprobs
        dst.top_bytes += [self.token_texts[t].raw for t in top_ids]


TOKEN_COLUMNS = tuple(f.name for f in dataclasses.fields(PendingRow) if f.name not in ("emitted_ns", "text"))
