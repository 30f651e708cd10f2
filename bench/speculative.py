"""What n-gram speculative decoding (--speculative-config) buys: time per output token with drafts against without,
on the same engine weights, in one run.

Two workloads, greedy, one stream (or --streams N): `copy`, a prompt whose answer repeats text of the prompt (the
case drafts are for: quoting, extraction, edits), and `free`, an open continuation. One engine runs each with and
without drafts (its scheduler's drafting switched between runs: engines sharing one model would share its bound KV
cache), in alternation, --repeats times; the table gives median ms per output token, the ratio (drafting / plain:
below 1 is faster), the share of drafted tokens the model accepted, the tokens a drafted step gave, and whether the
tokens were those of the run without drafts (they are up to rounding: see the README on --speculative-config).

    python bench/speculative.py                                     # the embedded model, this machine's defaults
    python bench/speculative.py --quantization none --dtype float32 --json bench/results/speculative-cpu.json
    python bench/speculative.py --model llama-3.2-1b --load-format dummy --device cuda
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

from machine import machine
from serving import COPY_PASSAGES, copy_prompt

from minisrv.config import EngineConfig
from minisrv.engine.llm_engine import LLMEngine
from minisrv.models.source import resolve_source
from minisrv.sampling_params import SamplingParams
from minisrv.tokenizer.loading import load_fast_tokenizer

WORKLOADS = {
    "copy": copy_prompt(COPY_PASSAGES[0]),
    "free": "Once upon a time, in a small village by the sea, there lived an old fisherman who",
}


def run(engine: LLMEngine, prompt: list[int], streams: int, tokens: int, rid: int) -> tuple[float, list[list[int]]]:
    """Seconds per output token (after the first, which prefill gives) and each stream's tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    for i in range(streams):
        engine.add_request(rid + i, list(prompt), params)
    outputs: dict[int, list[int]] = {rid + i: [] for i in range(streams)}
    first = None
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.rid] += out.new_token_ids
        if first is None and all(outputs.values()):
            first = time.perf_counter()
    return (time.perf_counter() - first) / (tokens - 1), list(outputs.values())


def counts(engine: LLMEngine) -> tuple[int, int, int]:
    s = engine.scheduler
    return s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default="auto")
    ap.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 4], help="num_speculative_tokens to try")
    ap.add_argument("--prompt-lookup-min", type=int, default=2)
    ap.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    base = dict(model=args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
                quantization=args.quantization, max_model_len=1024)
    most = json.dumps({"method": "ngram", "num_speculative_tokens": max(args.draft_tokens),
                       "prompt_lookup_min": args.prompt_lookup_min})
    engine = LLMEngine(EngineConfig(**base, speculative_config=most))
    tokenizer = load_fast_tokenizer(resolve_source(engine.config)) if args.load_format != "dummy" else None
    drafting = {0: None, **{k: dataclasses.replace(engine.config.speculative, num_speculative_tokens=k)
                            for k in args.draft_tokens}}
    rows, rid = [], 0
    for workload in args.workloads:
        text = WORKLOADS[workload]
        prompt = (tokenizer.encode(text).ids if tokenizer is not None
                  else [(i * 7919) % 30000 + 100 for i in range(64)] * (2 if workload == "copy" else 1))
        per_token: dict[int, list[float]] = {k: [] for k in drafting}
        counted: dict[int, list[int]] = {k: [0, 0, 0] for k in drafting}
        outputs: dict[int, list[list[int]]] = {}
        for repeat in range(args.repeats + 1):   # the first round warms up
            for k in list(drafting) if repeat % 2 else list(drafting)[::-1]:
                engine.scheduler.speculative = drafting[k]
                before = counts(engine)
                seconds, outputs[k] = run(engine, prompt, args.streams, args.tokens, rid := rid + args.streams)
                counted[k] = [total + now - then for total, now, then in zip(counted[k], counts(engine), before)]
                if repeat:
                    per_token[k].append(seconds * 1e3)
        for k in drafting:
            drafts, drafted, accepted = counted[k]
            rows.append(dict(workload=workload, draft_tokens=k, ms_per_token=statistics.median(per_token[k]),
                             runs_ms=per_token[k], same_tokens=outputs[k] == outputs[0],
                             acceptance=accepted / drafted if drafted else 0.0,
                             tokens_per_draft_step=accepted / drafts + 1 if drafts else 1.0))
            rows[-1]["ratio"] = rows[-1]["ms_per_token"] / statistics.median(per_token[0])
    setup = {**machine(), **base, "streams": args.streams, "tokens": args.tokens, "repeats": args.repeats,
             "prompt_lookup_min": args.prompt_lookup_min}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": setup, "rows": rows}, f, indent=1)
    print(f"\n{args.model} on {args.device}, {args.streams} stream(s), {args.tokens} tokens, greedy "
          f"(dtype {args.dtype}, quantization {args.quantization})")
    print(f"{'workload':<9}{'drafts':>7}{'ms/token':>10}{'vs plain':>10}{'accepted':>10}{'tokens/step':>13}"
          f"{'same tokens':>13}")
    for r in rows:
        print(f"{r['workload']:<9}{r['draft_tokens']:>7}{r['ms_per_token']:>10.2f}{r['ratio']:>9.2f}x"
              f"{r['acceptance']:>9.0%}{r['tokens_per_draft_step']:>13.2f}{str(r['same_tokens']):>13}")


if __name__ == "__main__":
    main()
