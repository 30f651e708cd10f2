"""A request's life inside the engine, and the records the engine hands back per step."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

from minisrv.sampling_params import SamplingParams
from minisrv.wire.terms import FinishReason


class RequestStatus(enum.Enum):
    WAITING = enum.auto()    # queued, or preempted and waiting to recompute
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class TokenConstraint(Protocol):
    """What limits a request's next token (structured output: minisrv/engine/grammar.py's RequestGrammar)."""

    def fill_bitmask(self, address: int, num_bytes: int) -> None:
        """Write the allowed next tokens as a bitmask of num_bytes at host memory `address` (bit b of int32 word w:
        token 32 * w + b)."""

    def advance(self, token_id: int) -> bool:
        """Record the sampled token; True once the output is complete. ValueError for a refused token."""


def grammar_failure(detail: str, num_tokens: int | None = None) -> str:
    """What a client is told when its grammar could not go on (after `num_tokens` output tokens, where known):
    llguidance's message's first line, the rest being its parser's state, for the log."""
    after = "" if num_tokens is None else f" after {num_tokens} output tokens"
    return (f"grammar: llguidance could not follow it{after} ({detail.splitlines()[0]}); a simpler grammar (fewer "
            "nested repetitions) may work")


@dataclass
class RequestTimes:
    """time.monotonic() seconds (minisrv/scheduler/metrics.py): arrival at the API server, then the scheduler."""

    arrival: float
    queued: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float = 0.0


@dataclass(eq=False)
class Request:
    rid: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int                                   # params.seed, or one drawn at admission
    output_ids: list[int] = field(default_factory=list)
    # Tokens sampled by scheduled steps whose results are not in output_ids yet: one from the moment a step
    # that samples is scheduled until the scheduler records its result, two under overlap scheduling (the next
    # step is scheduled before the previous one's tokens are read). They count in num_tokens.
    num_in_flight: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_computed: int = 0                       # leading tokens whose K/V sit in `pages`
    pages: list[int] = field(default_factory=list)   # page table: KV page ids, in order
    num_cached_tokens: int = 0                  # prompt tokens served by the prefix cache (first admission)
    max_tokens: int = 0                         # params.max_tokens, or the room the context leaves (add_request)
    finish_reason: FinishReason = FinishReason.NONE
    grammar: TokenConstraint | None = None      # params.grammar, compiled: its state follows output_ids
    # Set when a grammar process (minisrv/engine/grammar_process.py) finds the grammar complete after output_ids:
    # the request then ends at its next postprocess, whatever that step sampled for it.
    grammar_complete: bool = False
    grammar_error: str | None = None   # the grammar could not go on (it refused the token sampled): the request fails
    times: RequestTimes = field(default_factory=lambda: RequestTimes(time.monotonic()))
    num_prompt_logprobs: int = 0                # prompt tokens whose logprobs went out (params.prompt_logprobs)
    priority: int = 0                           # --scheduling-policy priority: lower values run first
    arrival_order: int = 0                      # set by Scheduler.add_request: ties of priority go by it

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether prompt tokens still need their logprobs: every one after the first gets them once."""
        return self.params.prompt_logprobs is not None and self.num_prompt_logprobs < len(self.prompt_ids) - 1

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence, in-flight ones included (their ids are not known on the host yet)."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_in_flight

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids) + self.num_in_flight

    @property
    def token_ids(self) -> list[int]:
        """The known tokens: prompt and recorded output."""
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass
class SampleResult:
    """What the sampler chose for one sequence in one step."""

    token_id: int
    logprob: float | None = None                # log-softmax of the RAW model logits at token_id (vLLM V1 raw_logprobs)
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    rank: int = 0                               # token_id's rank among all tokens (1: the likeliest), 0: not computed


@dataclass
class RequestOutput:
    """One step's news about one request, as the scheduler process turns it into STEP_TOKENS rows."""

    rid: int
    new_token_ids: list[int]
    new_samples: list[SampleResult]
    finish_reason: FinishReason
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    # Logprobs of prompt tokens computed this step (params.prompt_logprobs), in order: they come before the
    # first output token, the first of them for the prompt's second token.
    prompt_samples: list[SampleResult] = field(default_factory=list)
    error: str | None = None   # the request failed (its finish_reason ABORT): the client gets this, not its tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not FinishReason.NONE
