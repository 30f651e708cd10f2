"""The engine loop shared by the offline API and the scheduler process: schedule, execute, postprocess."""
from __future__ import annotations

import random

from minisrv.config import EngineConfig
from minisrv.engine.model_runner import ModelRunner
from minisrv.models.loader import LoadedModel, load_model
from minisrv.models.source import ModelSource
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.request import Request, RequestOutput
from minisrv.scheduler.scheduler import Scheduler
from minisrv.wire.terms import SchedulerStats


class LLMEngine:
    def __init__(self, config: EngineConfig, source: ModelSource | None = None,
                 loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.loaded = loaded if loaded is not None else load_model(config, source)
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

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()
