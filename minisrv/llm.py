"""Offline, in-process generation: `LLM(...).generate(prompts, params)` on the same engine the server runs."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

from tqdm import tqdm

from minisrv.config import DEFAULT_MODEL, EngineConfig
from minisrv.engine.llm_engine import LLMEngine
from minisrv.models.source import resolve_source
from minisrv.runtime.tensor_parallel import TensorParallelRanks, TPLeader
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.request import SampleResult
from minisrv.tokenizer.loading import check_vocabulary, load_fast_tokenizer, load_tokenizer
from minisrv.wire.terms import FinishReason

Prompt = str | Sequence[int]


@dataclass
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[SampleResult] = field(default_factory=list)
    # SamplingParams.prompt_logprobs: one per prompt token after the first (vLLM puts None for the first)
    prompt_logprobs: list[SampleResult] = field(default_factory=list)
    error: str | None = None   # why the request failed (finish_reason "abort"), e.g. a grammar llguidance cannot follow


class LLM:
    """`LLM()` serves the embedded default model; keyword arguments are EngineConfig fields."""

    def __init__(self, model: str = DEFAULT_MODEL, **engine_args) -> None:
        self._ranks: TensorParallelRanks | None = None   # first: __del__ runs even when __init__ fails
        self.config = config = EngineConfig(model=model, **engine_args)
        self.source = resolve_source(config)
        check_vocabulary(self.source)
        if config.tp_size > 1:
            self._ranks = TensorParallelRanks(config, self.source)
            self.engine: LLMEngine | TPLeader = self._ranks.leader
        else:
            self.engine = LLMEngine(config, self.source, load_tokenizer=partial(load_fast_tokenizer, self.source))
        self.tokenizer = load_tokenizer(self.source)
        self._next_rid = 0

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (also done when the LLM is collected or the process exits)."""
        ranks = getattr(self, "_ranks", None)   # absent on an LLM made without __init__ (tests do)
        if ranks is not None:
            ranks.close()
            self._ranks = None

    def __del__(self) -> None:
        self.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
    ) -> list[GenerationOutput]:
        """Text prompts are tokenized as they are (no chat template); token-id prompts pass through. `priority`:
        one per prompt, lower first (vLLM's), with scheduling_policy="priority"."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # a single prompt
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} SamplingParams")
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        if len(priorities) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(priorities)} priorities")
        if any(priorities) and self.config.scheduling_policy != "priority":
            raise ValueError("priority: needs scheduling_policy='priority' (the default, fcfs, runs requests in order)")
        outputs: dict[int, GenerationOutput] = {}
        order: list[int] = []
        for prompt, p, rank in zip(prompts, params_list, priorities):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
            rid, self._next_rid = self._next_rid, self._next_rid + 1
            self.engine.add_request(rid, ids, p, priority=rank)
            outputs[rid] = GenerationOutput(prompt_token_ids=ids)
            order.append(rid)
        bar = tqdm(total=len(order), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                gen = outputs[out.rid]
                if out.error:   # what it sampled last is no output
                    gen.finish_reason, gen.error = out.finish_reason.api_name, out.error
                    bar.update(1)
                    continue
                gen.token_ids += out.new_token_ids
                gen.logprobs += [s for s in out.new_samples if s.logprob is not None]
                gen.prompt_logprobs += out.prompt_samples
                gen.num_cached_tokens = out.num_cached_tokens
                if out.finish_reason is not FinishReason.NONE:
                    gen.finish_reason = out.finish_reason.api_name
                    bar.update(1)
        bar.close()
        for gen in outputs.values():
            gen.text = self.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
        return [outputs[rid] for rid in order]
