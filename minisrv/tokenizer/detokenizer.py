"""The detokenizer's state: per choice, its text so far. STEP_TOKENS rows in, TEXT_DELTAS rows out.

Per choice it keeps an IncrementalDetokenizer (UTF-8-safe deltas, stop strings). When a stop string
matches, the choice finishes with "stop" here and its id is returned so the scheduler can be told to
free its pages; rows the scheduler sends for it afterwards are dropped. The process loop around it is
minisrv/runtime/detokenizer_process.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from minisrv.tokenizer.incremental import IncrementalDetokenizer, TokenTexts
from minisrv.wire.records import DetokenizeRequest, StepTokens, TextDeltas
from minisrv.wire.terms import FinishReason, choice_rid


@dataclass
class PendingRow:
    """A choice's output not yet sent: with a stream interval above 1, tokens wait here to go as one row."""

    emitted_ns: int               # when the scheduler sent the first of them
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    token_bytes: list[bytes] = field(default_factory=list)
    top_counts: list[int] = field(default_factory=list)
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    top_bytes: list[bytes] = field(default_factory=list)


@dataclass
class ChoiceStream:
    detok: IncrementalDetokenizer
    prefix: str = ""                  # the prompt's text for echo, sent with the choice's first row
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

    def add_request(self, req: DetokenizeRequest) -> None:
        prefix = ""
        if req.echo:
            prefix = self.tokenizer.decode(req.prompt_ids.tolist(), skip_special_tokens=req.skip_special_tokens)
        for index in range(req.n):
            detok = IncrementalDetokenizer(self.tokenizer, req.stop, req.skip_special_tokens)
            self.streams[choice_rid(req.rid, index)] = ChoiceStream(detok, prefix)

    def drop(self, rid: int) -> None:
        self.streams.pop(rid, None)

    def process(self, step: StepTokens, out: TextDeltas) -> list[int]:
        """Append a row to `out` for every choice of `step` with a row due; return the ids of choices a stop
        string just finished (the scheduler must be told to abort them). Every row lists its new token ids;
        token bytes are b"" for tokens of requests that asked for no logprobs."""
        stopped = []
        top_counts = step.top_counts.tolist()
        top_ids, top_logprobs = step.top_ids.tolist(), step.top_logprobs.tolist()
        top_start = 0
        counts = zip(step.num_prompt_tokens.tolist(), step.num_cached_tokens.tolist(),
                     step.num_output_tokens.tolist())
        for row, (rid, token, reason, logprob, (prompt, cached, output)) in enumerate(zip(
                step.rids.tolist(), step.token_ids.tolist(), step.finish_reasons.tolist(), step.logprobs.tolist(),
                counts)):
            tops = slice(top_start, top_start + top_counts[row])
            top_start = tops.stop
            stream = self.streams.get(rid)
            if stream is None:   # finished here by a stop string, or refused: nothing to report
                continue
            text = stream.detok.step(token) if token >= 0 else ""
            if stream.detok.stopped:
                if reason == FinishReason.NONE:
                    stopped.append(rid)
                reason = FinishReason.STOP
            elif reason != FinishReason.NONE:
                text += stream.detok.flush()
            if stream.prefix:
                text, stream.prefix = stream.prefix + text, ""
            pending = stream.pending or PendingRow(step.emitted_ns)
            pending.text += text
            if token >= 0:
                pending.token_ids.append(token)
                pending.logprobs.append(logprob)
                pending.token_bytes.append(self.token_texts[token].raw if not math.isnan(logprob) else b"")
                pending.top_counts.append(top_counts[row])
                pending.top_ids += top_ids[tops]
                pending.top_logprobs += top_logprobs[tops]
                pending.top_bytes += [self.token_texts[t].raw for t in top_ids[tops]]
            if (reason == FinishReason.NONE and stream.started
                    and len(pending.token_ids) < self.stream_interval):
                stream.pending = pending
                continue
            stream.pending, stream.started = None, True
            if reason != FinishReason.NONE:
                del self.streams[rid]
            _append_row(out, rid, reason, prompt, cached, output, pending)
        return stopped


def _append_row(out: TextDeltas, rid: int, reason: int, prompt: int, cached: int, output: int,
                row: PendingRow) -> None:
    out.rids.append(rid)
    out.emitted_ns.append(row.emitted_ns)
    out.finish_reasons.append(reason)
    out.num_prompt_tokens.append(prompt)
    out.num_cached_tokens.append(cached)
    out.num_output_tokens.append(output)
    out.texts.append(row.text)
    out.num_tokens.append(len(row.token_ids))
    out.token_ids += row.token_ids
    out.token_logprobs += row.logprobs
    out.token_bytes += row.token_bytes
    out.top_counts += row.top_counts
    out.top_ids += row.top_ids
    out.top_logprobs += row.top_logprobs
    out.top_bytes += row.top_bytes
