"""What the process pipeline costs: the same requests through the engine in-process and through the rings.

`engine` rows step an in-process LLMEngine; `pipeline` rows go API-side client -> tokenizer worker ->
scheduler process -> detokenizer -> client (every hop a shared-memory ring, as `minisrv serve` runs it,
without HTTP). Same model, prompts (token ids), greedy, ignore_eos. `pipeline-null` rows run the
pipeline around a model-free engine (one token per request per step, at once or after --null-step-ms):
what is left is the pipeline's own cost per token. Per row: time to first token, mean inter-token time (per stream) and
output tokens/s over all streams.

    python bench/pipeline.py                       # 1 and 16 streams of 64 tokens, embedded model
    python bench/pipeline.py --streams 1,64 --tokens 256 --null-only                   # pipeline capacity
    python bench/pipeline.py --streams 1,16 --tokens 200 --null-only --null-step-ms 10  # latency it adds
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

from minisrv.config import EngineConfig, ServerConfig
from minisrv.models.source import ModelSource, resolve_source
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.request import RequestOutput, SampleResult
from minisrv.wire.records import PromptRequest
from minisrv.wire.terms import FinishReason, SchedulerStats

PROMPT_LEN = 32


@dataclass
class Row:
    name: str
    streams: int
    ttft_ms: float
    itl_ms: float
    tokens_per_s: float


class NullEngine:
    """LLMEngine's interface without a model: every request gets one token per step, at once."""

    TOKEN = 905   # " world" in the embedded model's vocabulary

    def __init__(self, config: EngineConfig, source: ModelSource, step_s: float = 0.0) -> None:
        self.step_s = step_s   # stands in for the model's time per step
        self.loaded = SimpleNamespace(name="null", max_model_len=config.max_model_len or 8192,
                                      model_config=SimpleNamespace(vocab_size=49152))
        self.requests: dict[int, tuple[int, int, list[int]]] = {}

    def add_request(self, rid: int, prompt_ids: list[int], params: SamplingParams) -> None:
        self.requests[rid] = (len(prompt_ids), params.max_tokens, [])

    def abort(self, rid: int) -> RequestOutput | None:
        prompt, _, out = self.requests.pop(rid, (0, 0, None))
        return None if out is None else RequestOutput(rid, [], [], FinishReason.ABORT, prompt, 0, len(out))

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        if self.step_s:
            time.sleep(self.step_s)
        outputs = []
        for rid, (prompt, max_tokens, out) in list(self.requests.items()):
            out.append(self.TOKEN)
            finish = FinishReason.LENGTH if len(out) == max_tokens else FinishReason.NONE
            outputs.append(RequestOutput(rid, [self.TOKEN], [SampleResult(self.TOKEN)], finish, prompt, 0, len(out)))
            if finish:
                del self.requests[rid]
        return outputs

    def stats(self) -> SchedulerStats:
        return SchedulerStats(num_running=len(self.requests))


def prompts(n: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size) for _ in range(PROMPT_LEN)] for _ in range(n)]


def params(tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)


def summarize(name: str, streams: int, start: float, arrivals: list[list[float]]) -> Row:
    ttft = statistics.mean(a[0] - start for a in arrivals)
    itl = statistics.mean(statistics.mean(b - a for a, b in zip(times, times[1:])) for times in arrivals)
    end = max(a[-1] for a in arrivals)
    return Row(name, streams, ttft * 1e3, itl * 1e3, sum(map(len, arrivals)) / (end - start))


def run_engine(config: EngineConfig, streams: int, tokens: int) -> Row:
    from minisrv.engine.llm_engine import LLMEngine

    engine = LLMEngine(config, resolve_source(config))
    vocab = engine.loaded.model_config.vocab_size
    for rid, prompt in enumerate(prompts(4, vocab, seed=1)):   # warm-up
        engine.add_request(rid, prompt, params(4))
    while engine.has_unfinished():
        engine.step()
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    start = time.perf_counter()
    for rid, prompt in enumerate(prompts(streams, vocab)):
        engine.add_request(1000 + rid, prompt, params(tokens))
    while engine.has_unfinished():
        for out in engine.step():
            arrivals[out.rid - 1000] += [time.perf_counter()] * len(out.new_token_ids)
    return summarize("engine", streams, start, arrivals)


async def run_pipeline(config: EngineConfig, stream_counts: list[int], tokens: int, null: bool,
                       null_step_s: float = 0.0) -> list[Row]:
    from minisrv.runtime.pipeline import Pipeline
    from minisrv.runtime.engine_client import EngineClient
    from minisrv.runtime.scheduler_process import load_engine

    pipeline = Pipeline(ServerConfig(engine=config, log_level="warning"), resolve_source(config),
                        make_engine=partial(NullEngine, step_s=null_step_s) if null else load_engine)
    client = EngineClient(pipeline.to_tokenizers, pipeline.from_detokenizer, pipeline.status)
    rows = []
    try:
        pipeline.start()
        stopping = False
        client.start(on_failure=lambda reason: None if stopping else print("pipeline failed:", reason))
        while not pipeline.all_ready():
            await asyncio.sleep(0.05)
        pipeline.unlink()
        client.mark_ready(pipeline.status.model())

        async def one(prompt: list[int], n_tokens: int) -> list[float]:
            arrivals = []
            async for delta in client.stream(PromptRequest(prompt_ids=prompt, params=params(n_tokens))):
                arrivals += [time.perf_counter()] * len(delta.token_ids)
            return arrivals

        await asyncio.gather(*(one(p, 4) for p in prompts(4, client.vocab_size, seed=1)))   # warm-up
        for streams in stream_counts:
            start = time.perf_counter()
            arrivals = await asyncio.gather(*(one(p, tokens) for p in prompts(streams, client.vocab_size)))
            rows.append(summarize("pipeline-null" if null else "pipeline", streams, start, list(arrivals)))
    finally:
        stopping = True
        client.end_streams()
        pipeline.stop(graceful=True, timeout=3.0)
        await client.close()
        pipeline.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,16", help="comma-separated numbers of concurrent streams")
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per stream")
    parser.add_argument("--null-only", action="store_true", help="only the pipeline around the model-free engine")
    parser.add_argument("--null-step-ms", type=float, default=0.0,
                        help="the model-free engine's time per step (0: as fast as the pipeline goes)")
    args = parser.parse_args()
    stream_counts = [int(s) for s in args.streams.split(",")]
    config = EngineConfig(max_model_len=1024)

    import uvloop

    # One after the other: each measurement wants the cores to itself.
    rows = uvloop.run(run_pipeline(config, stream_counts, args.tokens, null=True, null_step_s=args.null_step_ms / 1e3))
    if not args.null_only:
        rows += uvloop.run(run_pipeline(config, stream_counts, args.tokens, null=False))
        rows += [run_engine(config, streams, args.tokens) for streams in stream_counts]
    rows.sort(key=lambda r: (r.streams, r.name))
    print(f"{'path':<15}{'streams':>8}{'TTFT ms':>10}{'ITL ms':>10}{'tok/s':>10}")
    for r in rows:
        print(f"{r.name:<15}{r.streams:>8}{r.ttft_ms:>10.2f}{r.itl_ms:>10.3f}{r.tokens_per_s:>10.1f}")
    for streams in stream_counts if not args.null_only else []:
        engine, pipe = (next(r for r in rows if r.streams == streams and r.name == n) for n in ("engine", "pipeline"))
        print(f"{streams} streams: pipeline adds {pipe.itl_ms - engine.itl_ms:+.2f} ms per token "
              f"({pipe.tokens_per_s / engine.tokens_per_s:.2f}x the engine's tokens/s)")


if __name__ == "__main__":
    main()
