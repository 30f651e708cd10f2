"""What structured output costs: decode time per token with a grammar against without, on the same engine.

At each batch size, the same prompts run twice through one LLMEngine: free (ignore_eos), and constrained by a
grammar of 500 comma-separated numbers, which cannot end (nor allow an EOS) within max_tokens, so both runs emit
the same number of tokens (checked). Two figures for each: ms/token, the wall time of the whole generation (prefill
and the last steps included) over its output tokens per sequence; and the median decode step, over the steps
whose batch holds every sequence with one token each (the issue's "per decode step", steadier against a noisy
host's outliers). Free and constrained runs alternate in order from repeat to repeat. Then grammar compilation:
a first compile of a schema with many properties, and a cached copy.

    python bench/structured.py                                   # the embedded model on the CPU
    python bench/structured.py --model smollm2-135m --load-format dummy --device cuda --batches 1,16,64 \
        --tokenizer tokenizer.json

A preset's own tokenizer has bytes for tokens: `--tokenizer` names a tokenizer.json (the embedded model's, from
its cache folder) to compile grammars against, so that the matchers walk a real vocabulary.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

from machine import machine
from tokenizers import Tokenizer

from minisrv import structured_output
from minisrv.config import EngineConfig
from minisrv.engine.llm_engine import LLMEngine
from minisrv.models.source import resolve_source
from minisrv.sampling_params import SamplingParams
from minisrv.tokenizer.loading import load_fast_tokenizer

NUMBERS = r"([0-9]{1,3}, ){500}"
BIG_SCHEMA = {"type": "object", "properties": {f"field_{i}": {"type": ["string", "integer", "boolean", "null"]}
                                               for i in range(200)}, "required": [f"field_{i}" for i in range(20)]}


def timed(engine: LLMEngine, batch: int, tokens: int, grammar: str | None, seed: int) -> tuple[float, float]:
    """(seconds, median decode step ms) to generate `tokens` tokens for each of `batch` prompts (fresh prompts: no
    prefix-cache hits)."""
    for i in range(batch):
        prompt = list(f"[{seed}-{i}] Numbers: ".encode())
        engine.add_request(seed * 10_000 + i, prompt, SamplingParams(temperature=0.0, max_tokens=tokens,
                                                                     ignore_eos=True, grammar=grammar))
    emitted, decode_steps = 0, []
    start = time.perf_counter()
    while engine.has_unfinished():
        step_start = time.perf_counter()
        emitted += sum(len(out.new_token_ids) for out in engine.step())
        seqs = engine.last_batch.seqs
        if len(seqs) == batch and all(seq.num_tokens == 1 for seq in seqs):
            decode_steps.append((time.perf_counter() - step_start) * 1e3)
    seconds = time.perf_counter() - start
    if emitted != batch * tokens:
        raise SystemExit(f"batch {batch}: {emitted} tokens, expected {batch * tokens}")
    return seconds, statistics.median(decode_steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,64", help="comma-separated batch sizes (issue #11 asks for 1 and 64)")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokenizer", metavar="TOKENIZER_JSON",
                    help="compile grammars against this vocabulary (default: the model's own)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    config = EngineConfig(model=args.model, load_format=args.load_format, device=args.device, max_model_len=1024)
    source = resolve_source(config)
    load_tokenizer = (partial(Tokenizer.from_file, args.tokenizer) if args.tokenizer
                      else partial(load_fast_tokenizer, source))
    engine = LLMEngine(config, source, load_tokenizer=load_tokenizer)
    grammar = structured_output.regex(NUMBERS, "bench").text
    engine.compile_grammar(grammar)   # the tokenizer's token trie is built once, outside the timings
    rows = []
    seed = 0
    for batch in [int(b) for b in args.batches.split(",")]:
        timed(engine, batch, 4, grammar, seed := seed + 1)   # warm-up of this batch's shapes
        per_token, step = {"free": [], "grammar": []}, {"free": [], "grammar": []}
        for repeat in range(args.repeats):
            kinds = (("free", None), ("grammar", grammar))
            for kind, g in kinds if repeat % 2 == 0 else kinds[::-1]:
                seconds, step_ms = timed(engine, batch, args.tokens, g, seed := seed + 1)
                per_token[kind].append(seconds / args.tokens * 1e3)
                step[kind].append(step_ms)
        free_ms, grammar_ms = statistics.median(per_token["free"]), statistics.median(per_token["grammar"])
        free_step, grammar_step = statistics.median(step["free"]), statistics.median(step["grammar"])
        rows.append(dict(batch=batch, free_ms_per_token=free_ms, grammar_ms_per_token=grammar_ms,
                         ratio=grammar_ms / free_ms, free_step_ms=free_step, grammar_step_ms=grammar_step,
                         step_ratio=grammar_step / free_step,
                         step_ratios=[g / f for f, g in zip(step["free"], step["grammar"])]))
        print(rows[-1], flush=True)
    big = structured_output.json_schema(BIG_SCHEMA, "bench").text
    start = time.perf_counter()
    engine.compile_grammar(big)
    first_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    engine.compile_grammar(big)
    cached_ms = (time.perf_counter() - start) * 1e3
    setup = {**machine(), "model": args.model, "device": args.device, "tokens": args.tokens,
             "tokenizer": args.tokenizer or "the model's"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": setup, "decode": rows, "compile_first_ms": first_ms, "compile_cached_ms": cached_ms},
                      f, indent=1)
    print(f"\n{setup['cpu']}, {args.device}, {args.model} ({setup['tokenizer']} tokenizer); {args.tokens} tokens "
          f"a sequence, greedy, median of {args.repeats}")
    print(f"{'batch':>5} | {'free ms/tok':>11} {'grammar':>9} {'ratio':>6} | {'free step ms':>12} {'grammar':>9} "
          f"{'ratio':>6}  {'per repeat':>10}")
    for r in rows:
        spread = f"{min(r['step_ratios']):.2f}-{max(r['step_ratios']):.2f}x"
        print(f"{r['batch']:>5} | {r['free_ms_per_token']:>11.2f} {r['grammar_ms_per_token']:>9.2f} "
              f"{r['ratio']:>5.2f}x | {r['free_step_ms']:>12.2f} {r['grammar_step_ms']:>9.2f} "
              f"{r['step_ratio']:>5.2f}x  {spread:>10}")
    print(f"compile a {len(json.dumps(BIG_SCHEMA))}-byte schema: first {first_ms:.1f} ms, cached {cached_ms:.2f} ms")


if __name__ == "__main__":
    main()
