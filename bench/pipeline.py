"""What the process pipeline costs: the same requests through the engine in-process and through the rings.

`engine` rows step an in-process LLMEngine; `pipeline` rows go API-side client -> tokenizer worker ->
scheduler process -> detokenizer -> client (every hop a shared-memory ring, as `minisrv serve` runs it,
without HTTP). Same model, prompts (token ids), greedy, ignore_eos. Per row: time to first token,
mean inter-token time (per stream) and output tokens/s over all streams.

    python bench/pipeline.py                       # 1 and 16 streams of 64 tokens, embedded model
    python bench/pipeline.py --streams 1 --tokens 32
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass

from minisrv.config import EngineConfig, ServerConfig
from minisrv.sampling_params import SamplingParams

PROMPT_LEN = 32


@dataclass
class Row:
    name: str
    streams: int
    ttft_ms: float
    itl_ms: float
    tokens_per_s: float


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

    engine = LLMEngine(config)
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


async def run_pipeline(config: EngineConfig, stream_counts: list[int], tokens: int) -> list[Row]:
    from minisrv.pipeline import Pipeline
    from minisrv.server.client import EngineClient, GenerateInput

    pipeline = Pipeline(ServerConfig(engine=config, log_level="warning"))
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
            async for delta in client.generate(GenerateInput(prompt, False, params(n_tokens))):
                arrivals += [time.perf_counter()] * len(delta.token_ids)
            return arrivals

        await asyncio.gather(*(one(p, 4) for p in prompts(4, client.vocab_size, seed=1)))   # warm-up
        for streams in stream_counts:
            start = time.perf_counter()
            arrivals = await asyncio.gather(*(one(p, tokens) for p in prompts(streams, client.vocab_size)))
            rows.append(summarize("pipeline", streams, start, list(arrivals)))
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
    args = parser.parse_args()
    stream_counts = [int(s) for s in args.streams.split(",")]
    config = EngineConfig(max_model_len=1024)

    import uvloop

    rows = uvloop.run(run_pipeline(config, stream_counts, args.tokens))   # first: the engine frees its cores after
    rows += [run_engine(config, streams, args.tokens) for streams in stream_counts]
    rows.sort(key=lambda r: (r.streams, r.name))
    print(f"{'path':<10}{'streams':>8}{'TTFT ms':>10}{'ITL ms':>10}{'tok/s':>10}")
    for r in rows:
        print(f"{r.name:<10}{r.streams:>8}{r.ttft_ms:>10.1f}{r.itl_ms:>10.2f}{r.tokens_per_s:>10.1f}")
    for streams in stream_counts:
        engine, pipe = (next(r for r in rows if r.streams == streams and r.name == n) for n in ("engine", "pipeline"))
        print(f"{streams} streams: pipeline adds {pipe.itl_ms - engine.itl_ms:+.2f} ms per token "
              f"({pipe.tokens_per_s / engine.tokens_per_s:.2f}x the engine's tokens/s)")


if __name__ == "__main__":
    main()
