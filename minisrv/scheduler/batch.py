"""The contract between the scheduler (what to compute) and the engine (computing it)."""
from __future__ import annotations

from dataclasses import dataclass, field

from minisrv.scheduler.request import Request, SampleResult


@dataclass
class ScheduledSeq:
    """Compute tokens request.token_ids[start:start+num_tokens] this step.

    Their K/V go to positions start.. of the request's page table (pages already allocated by the
    scheduler). `sample` is true when the last of them is the request's newest token, i.e. this step
    ends its prefill or is a decode step, so the engine samples the next token from its logits.
    The engine fills `prompt_logprobs` for a request that wants them: the logprobs of its prompt tokens
    start+1 .. start+num_tokens (those that are prompt tokens), from the logits of the tokens computed.

    A decode step may carry `draft_ids` (speculative decoding, ngram.py): guesses at the tokens after the newest,
    computed after it at positions start+1.., so that the step samples a token after each of them too; the
    scheduler keeps those samples while the guesses hold (Scheduler._accepted).
    """

    request: Request
    start: int
    num_tokens: int                 # the drafts included
    sample: bool
    prompt_logprobs: list[SampleResult] = field(default_factory=list)
    draft_ids: list[int] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        """Tokens sampled from this seq: one after the newest token and one after each draft, or none."""
        return 1 + len(self.draft_ids) if self.sample else 0

    @property
    def is_decode(self) -> bool:
        """Whether this computes only the newest token (and drafts after it), as opposed to prompt tokens."""
        return self.sample and self.num_tokens - len(self.draft_ids) == 1


@dataclass
class ScheduledBatch:
    seqs: list[ScheduledSeq] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    def __bool__(self) -> bool:
        return bool(self.seqs)
