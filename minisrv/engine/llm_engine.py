"""The engine loop shared by the offline API and the scheduler process: schedule, execute, postprocess."""
from __future__ import annotations

import random
from dataclasses import dataclass

from minisrv.config import EngineConfig
from minisrv.engine.model_runner import ModelRunner
from minisrv.models.loader import LoadedModel, load_model
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.request import Request, RequestOutput
from minisrv.scheduler.scheduler import Scheduler


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float        # pages held by requests / all pages; evictable cached pages count as free
    prefix_cache_queries: int    # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int       # of those, tokens found


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.loaded = loaded if loaded is not None else load_model(config)
        self.runner = ModelRunner(config, self.loaded)
        self.scheduler = Scheduler(
            config,
            num_pages=self.runner.num_pages,
            eos_token_ids=self.loaded.eos_token_ids,
            max_model_len=self.loaded.max_model_len,
            vocab_size=self.loaded.model_config.vocab_size,
        )
        # Unseeded requests still get a concrete seed, so every draw is a function of (seed, position).
        self._seed_source = random.Random(config.seed)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.loaded.max_model_len

    def add_request(self, rid: int, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; raises ValueError (with a message fit for a client) when it is invalid."""
        seed = params.seed if params.seed is not None else self._seed_source.getrandbits(63)
        self.scheduler.add_request(Request(rid=rid, prompt_ids=list(prompt_ids), params=params, seed=seed))

    def abort(self, rid: int) -> RequestOutput | None:
        return self.scheduler.abort(rid)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        results = self.runner.execute(batch) if batch else []
        return self.scheduler.postprocess(batch, results)

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(s.num_running, s.num_waiting, s.kv_cache_usage, s.prefix_cache_queries, s.prefix_cache_hits)
