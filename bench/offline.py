"""Offline throughput: our engine against transformers' `generate` on the same model, in one run.

A nano-vllm-shaped workload (N sequences, random input and output lengths, ignore_eos), scaled to a CPU:

    python bench/offline.py                 # embedded model, float32, on this machine
    python bench/offline.py --quick --json bench/results/offline.json
    python bench/offline.py --device cuda --json bench/results/offline-h200.json   # see bench/offline_cuda.py

Rows: `hf-generate` (transformers, one sequence), `minisrv-1` (our engine, one sequence),
`minisrv-N` (N concurrent sequences). Ratios are against hf-generate's single-stream tokens/s.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from minisrv.llm import LLM
from minisrv.sampling_params import SamplingParams


@dataclass
class Row:
    name: str
    num_seqs: int
    output_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def random_prompts(vocab_size: int, n: int, min_len: int, max_len: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(100, vocab_size) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def run_hf(path: str, prompt: list[int], out_len: int, repeats: int) -> Row:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # ignore_eos, as our rows do
    x = torch.tensor([prompt])
    times = []
    with torch.inference_mode():
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=out_len, do_sample=False, pad_token_id=0)
            times.append(time.perf_counter() - t)
    return Row("hf-generate", 1, out_len, statistics.median(times))


def run_ours(llm: LLM, prompts: list[list[int]], out_lens: list[int], name: str, repeats: int) -> Row:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
    llm.generate([prompts[0][:8]], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    times = []
    for _ in range(repeats):
        # Different first tokens per repeat so the prefix cache cannot serve a previous repeat's prompts.
        shifted = [[(p[0] + len(times) + 1) % 40000 + 100] + p[1:] for p in prompts]
        t = time.perf_counter()
        outs = llm.generate(shifted, params)
        times.append(time.perf_counter() - t)
        assert [len(o.token_ids) for o in outs] == out_lens
    return Row(name, len(prompts), sum(out_lens), statistics.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--num-seqs", type=int, default=16)
    ap.add_argument("--min-input-len", type=int, default=32)
    ap.add_argument("--max-input-len", type=int, default=256)
    ap.add_argument("--min-output-len", type=int, default=64)
    ap.add_argument("--max-output-len", type=int, default=256)
    ap.add_argument("--single-input-len", type=int, default=64)
    ap.add_argument("--single-output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantization", default="none", help="the engine's --quantization (CPU)")
    ap.add_argument("--dtype", default="auto",
                    help="the engine's --dtype (auto: bfloat16 on a CPU with AMX or AVX512-BF16, else float32)")
    ap.add_argument("--cpu-threads", type=int, default=None,
                    help="PyTorch threads for both engines (default: the engine's own choice)")
    ap.add_argument("--quick", action="store_true", help="shorter outputs and one repeat")
    ap.add_argument("--json", help="write results to this path")
    gpu = ap.add_argument_group("--device cuda (bench/offline_cuda.py)")
    gpu.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    gpu.add_argument("--presets", nargs="+", default=["llama-3.2-1b", "qwen3-0.6b"])
    gpu.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    gpu.add_argument("--hf-batches", nargs="+", type=int, default=[1])
    gpu.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers' generate")
    gpu.add_argument("--sampled-batch", type=int, default=64, help="also time a sampled decode at this batch (0: no)")
    gpu.add_argument("--throughput-presets", nargs="*", default=["qwen3-0.6b"])
    gpu.add_argument("--throughput-seqs", type=int, default=256)
    gpu.add_argument("--max-model-len", type=int, default=4096)
    gpu.add_argument("--max-num-batched-tokens", type=int, default=16384)
    args = ap.parse_args()
    if args.device == "cuda":
        from offline_cuda import print_table, run

        if args.quick:
            args.repeats = 1
        result = run(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        print_table(result)
        return
    if args.quick:
        args.repeats, args.single_output_len, args.max_output_len, args.min_output_len = 1, 64, 96, 32

    rng = random.Random(0)
    llm = LLM(model=args.model, cpu_threads=args.cpu_threads, quantization=args.quantization, dtype=args.dtype)
    vocab = llm.engine.loaded.model_config.vocab_size
    single = random_prompts(vocab, 1, args.single_input_len, args.single_input_len, rng)
    many = random_prompts(vocab, args.num_seqs, args.min_input_len, args.max_input_len, rng)
    many_out = [rng.randint(args.min_output_len, args.max_output_len) for _ in many]

    rows = [
        run_hf(llm.source.path, single[0], args.single_output_len, args.repeats),
        run_ours(llm, single, [args.single_output_len], "minisrv-1", args.repeats),
        run_ours(llm, many, many_out, f"minisrv-{args.num_seqs}", args.repeats),
    ]
    base = rows[0].tokens_per_s
    machine = f"{platform.node()} {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"
    runner = llm.engine.runner
    weights = f"{str(runner.dtype).removeprefix('torch.')}, --quantization {runner.quantization}"
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "model": args.model, "weights": weights,
                       "results": [asdict(r) | {"tokens_per_s": r.tokens_per_s, "ratio_vs_hf": r.tokens_per_s / base}
                                   for r in rows]}, f, indent=1)
    print(f"\n{machine}; model {args.model}, {weights}")
    print(f"{'engine':<14}{'seqs':>6}{'out tokens':>12}{'seconds':>10}{'tok/s':>10}{'vs hf':>8}")
    for r in rows:
        print(f"{r.name:<14}{r.num_seqs:>6}{r.output_tokens:>12}{r.seconds:>10.2f}{r.tokens_per_s:>10.1f}"
              f"{r.tokens_per_s / base:>7.2f}x")


if __name__ == "__main__":
    main()
