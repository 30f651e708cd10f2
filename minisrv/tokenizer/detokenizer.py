"""The detokenizer's state: per choice, its text so far. STEP_TOKENS rows in, TEXT_DELTAS rows out.

Per choice it keeps an IncrementalDetokenizer (UTF-8-safe deltas, stop strings). When a stop string
matches, the choice finishes with "stop" here and its id is returned so the scheduler can be told to
free its pages; rows the scheduler sends for it afterwards are dropped. The process loop around it is
minisrv/runtime/detokenizer_process.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tokenizers import Tokenizer

from minisrv.tokenizer.incremental import IncrementalDetokenizer, TokenTexts
from minisrv.wire.records import DetokenizeRequest, StepTokens, TextDeltas
from minisrv.wire.terms import FinishReason, choice_rid


@dataclass
class ChoiceStream:
    detok: IncrementalDetokenizer
    prefix: str = ""      # the prompt's text for echo, sent with the choice's first row


class Detokenizer:
    """The per-choice state machine, free of rings (the process loop feeds it)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_texts = TokenTexts(tokenizer)
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
        """Append a row to `out` for every row of `step` that belongs to a live choice; return the ids
        of choices a stop string just finished (the scheduler must be told to abort them). Every row lists
        its new token ids; token bytes are b"" for rows that asked for no logprobs."""
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
            if reason != FinishReason.NONE:
                del self.streams[rid]
            out.rids.append(rid)
            out.finish_reasons.append(reason)
            out.num_prompt_tokens.append(prompt)
            out.num_cached_tokens.append(cached)
            out.num_output_tokens.append(output)
            out.texts.append(text)
            if token < 0:
                out.num_tokens.append(0)
                continue
            out.num_tokens.append(1)
            out.token_ids.append(token)
            out.token_logprobs.append(logprob)
            out.token_bytes.append(self.token_texts[token].raw if not math.isnan(logprob) else b"")
            out.top_counts.append(top_counts[row])
            out.top_ids += top_ids[tops]
            out.top_logprobs += top_logprobs[tops]
            out.top_bytes += [self.token_texts[t].raw for t in top_ids[tops]]
        return stopped
