"""Quality of a quantized engine: perplexity on a fixed text, each --quantization side by side in one run.

    python bench/perplexity.py                       # the embedded model: none against int8
    python bench/perplexity.py --quantizations none int8-weight-only int8-lm-head --chunk 4
    python bench/perplexity.py --json bench/results/perplexity.json
    python bench/perplexity.py --quantizations none --kv-cache-dtypes auto fp8 --chunk 16   # an 8-bit KV cache

The text (below, written for this benchmark) is scored in one teacher-forced pass per setting through the
engine's own model, so the figure is what the served model computes; `--chunk N` feeds it N tokens a step
instead, as decoding does (int8-weight-only's int8 kernel serves inputs of up to 4 rows). A quantization
may become a default only within 2% of the unquantized perplexity.
"""
from __future__ import annotations

import argparse
import json
import math
import warnings

import torch

from machine import machine
from minisrv.config import EngineConfig
from minisrv.engine.model_runner import ModelRunner
from minisrv.layers.forward_context import ForwardContext, forward_context
from minisrv.llm import LLM
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.batch import ScheduledBatch, ScheduledSeq
from minisrv.scheduler.request import Request

TEXT = (
    "The lighthouse keeper climbed the narrow stairs every evening at dusk. He carried a small can of oil, a "
    "rag, and a notebook in which he recorded the weather, the ships he had seen, and anything unusual about "
    "the sea. Most nights were quiet. The beam turned slowly above the rocks, and the waves broke against the "
    "cliffs with a steady rhythm that he had long ago stopped hearing. In the winter the storms came from the "
    "north, and the wind pressed against the glass so hard that the whole tower seemed to lean. On those nights "
    "he stayed awake until morning, checking the lamp every hour and writing short notes in careful handwriting. "
    "When spring arrived, the fishing boats returned to the harbour, and the village below woke up again. "
    "Children ran along the beach looking for shells, and the baker opened his shop before sunrise. The keeper "
    "walked down to buy bread twice a week. He spoke little, but everyone knew him, and the baker always saved "
    "the best loaf for him. Years later, when the lighthouse was automated and the keeper retired, the village "
    "held a small celebration in his honour. They read aloud from his notebooks, which described forty years of "
    "tides, storms, and passing ships. It turned out that he had noticed far more than anyone had guessed: the "
    "return of a particular seabird every April, the slow erosion of the northern cliff, and the names of every "
    "captain who had waved to him from the deck. The notebooks were given to the town library, where they remain "
    "today, a quiet record of a life spent watching the sea."
)


@torch.inference_mode()
def perplexity(llm: LLM, ids: list[int], chunk: int | None = None) -> float:
    """Teacher-forced perplexity of `ids`, fed `chunk` tokens a step (default all at once), each chunk attending
    to the KV cache of those before it: small chunks take the paths decoding takes (int8-weight-only's int8
    kernel runs only for inputs of a few rows)."""
    runner: ModelRunner = llm.engine.runner
    chunk = chunk or len(ids)
    request = Request(rid=0, prompt_ids=ids, params=SamplingParams(), seed=0)
    request.pages = list(range(-(-len(ids) // runner.page_size)))
    logits = []
    for start in range(0, len(ids), chunk):
        step = runner.prepare(ScheduledBatch([ScheduledSeq(request, start, min(chunk, len(ids) - start), True)]))
        with forward_context(ForwardContext(step.attn)):
            hidden = runner.model(step.input_ids, step.positions)
        logits.append(runner.model.compute_logits(hidden).float())
    logprobs = torch.log_softmax(torch.cat(logits)[:-1], dim=-1)
    chosen = logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return math.exp(-chosen.mean().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--quantizations", nargs="+", default=["none", "int8"])
    ap.add_argument("--chunk", type=int, help="tokens per step (default: the whole text in one step)")
    ap.add_argument("--dtype", default="auto", help="the engine's --dtype for every row")
    ap.add_argument("--kv-cache-dtypes", nargs="+", default=["auto"],
                    help="the engine's --kv-cache-dtype: a row for each, after each quantization")
    ap.add_argument("--json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*quantize.*deprecated.*")
    rows = []
    for quantization in args.quantizations:
        for kv_cache_dtype in args.kv_cache_dtypes:
            llm = LLM(model=args.model, quantization=quantization, num_pages=128, dtype=args.dtype,
                      kv_cache_dtype=kv_cache_dtype)
            ids = llm.tokenizer.encode(TEXT, add_special_tokens=False)
            rows.append({"quantization": quantization, "kv_cache_dtype": kv_cache_dtype, "tokens": len(ids),
                         "chunk": args.chunk, "perplexity": perplexity(llm, ids, args.chunk)})
    base = rows[0]["perplexity"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "model": args.model, "results": rows}, f, indent=1)
    def label(row: dict) -> str:
        return row["quantization"] + (f", kv {row['kv_cache_dtype']}" if len(args.kv_cache_dtypes) > 1 else "")

    print(f"\n{args.model}: {rows[0]['tokens']} tokens of fixed text")
    print(f"{'setting':<20}{'perplexity':>12}{'vs ' + label(rows[0]):>18}")
    for r in rows:
        print(f"{label(r):<20}{r['perplexity']:>12.3f}{100 * (r['perplexity'] / base - 1):>+17.2f}%")


if __name__ == "__main__":
    EngineConfig()   # fail early on a broken install, before loading anything
    main()
