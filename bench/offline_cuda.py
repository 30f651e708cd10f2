"""The GPU half of bench/offline.py (`--device cuda`): decode step time and throughput on dummy presets, bfloat16.

Per preset, in one process and on the same weights: minisrv with CUDA graphs and overlap scheduling, minisrv
with both off, and transformers' `generate`. Decode ms/step = (time of 129 output tokens - time of 1) / 128,
with ignore_eos and same-length prompts, at each batch size; the floor is the weight bytes over the device
copy bandwidth measured in the same run. Then a nano-vllm-shaped throughput run: 256 sequences, random input
and output lengths of 100 to 1024 tokens, ignore_eos, output tokens/s.
"""
from __future__ import annotations

import gc
import math
import random
import statistics
import time

import torch
from kernels import copy_bandwidth

from minisrv.config import EngineConfig
from minisrv.engine.llm_engine import LLMEngine
from minisrv.models.config import ModelConfig
from minisrv.models.dummy import LOGIT_STD, load_preset
from minisrv.models.loader import LoadedModel, build_model
from minisrv.models.weights import load_weights
from minisrv.sampling_params import SamplingParams

PROMPT_LEN = 32
SAMPLED = dict(temperature=0.8, top_p=0.9, top_k=50)
ENGINES = {"graphs+overlap": dict(), "eager": dict(enable_cuda_graph=False, overlap_schedule=False)}


def hf_model(preset: str):
    """transformers' model of a preset with the dummy weights' statistics (minisrv/models/dummy.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = load_preset(preset)
    hf_config = AutoConfig.for_model(spec.pop("model_type"), **{k: v for k, v in spec.items() if k != "torch_dtype"})
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(hf_config).to(dtype=torch.bfloat16).eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                std = LOGIT_STD / math.sqrt(hf_config.hidden_size) if ("embed" in name or "lm_head" in name) else 0.02
                p.normal_(0.0, std, generator=gen)
    hf.generation_config.eos_token_id = None
    return hf, load_preset(preset)


def ours_from(hf, spec: dict, max_model_len: int) -> LoadedModel:
    model_config = ModelConfig.from_hf_dict(spec)
    model = build_model(model_config, max_model_len, torch.bfloat16, torch.device("cuda"))
    load_weights(model, ((k, v.float().cpu()) for k, v in hf.state_dict().items()))
    return LoadedModel(model=model, model_config=model_config, eos_token_ids=[], max_model_len=max_model_len,
                       name=spec.get("_name_or_path", "preset"))


def weight_bytes(loaded: LoadedModel) -> int:
    seen, total = set(), 0
    for p in loaded.model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def timed_generate(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams],
                   step_times: list[float] | None = None) -> float:
    """Seconds from adding the requests to the last one finished; each engine step's seconds into `step_times`."""
    first_rid = time.monotonic_ns()   # unique across calls on one engine
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(first_rid + i, prompt, p)
    torch.cuda.synchronize()
    start = time.perf_counter()
    while engine.has_unfinished():
        step_start = time.perf_counter()
        engine.step()
        if step_times is not None:
            step_times.append(time.perf_counter() - step_start)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_ms(engine: LLMEngine, batch: int, vocab: int, repeats: int, sampled: bool = False) -> float:
    """(time of 129 output tokens - time of 1) / 128 at `batch` sequences, median over repeats."""
    rng = random.Random(batch)
    kind = SAMPLED if sampled else dict(temperature=0.0)
    results = []
    for repeat in range(-1, repeats):   # repeat -1 warms up this batch's shapes and is not counted
        # Fresh random prompts per run: the prefix cache must not serve a previous run.
        prompts = [[rng.randrange(vocab) for _ in range(PROMPT_LEN)] for _ in range(batch)]
        one = timed_generate(engine, prompts, [SamplingParams(**kind, max_tokens=1, ignore_eos=True, seed=i)
                                               for i in range(batch)])
        prompts = [[rng.randrange(vocab) for _ in range(PROMPT_LEN)] for _ in range(batch)]
        full = timed_generate(engine, prompts, [SamplingParams(**kind, max_tokens=129, ignore_eos=True, seed=i)
                                                for i in range(batch)])
        if repeat >= 0:
            results.append((full - one) / 128 * 1e3)
    return statistics.median(results)


def hf_decode_ms(hf, batch: int, vocab: int, repeats: int) -> float:
    rng = random.Random(batch)
    results = []
    with torch.inference_mode():
        def run(n: int) -> float:
            x = torch.tensor([[rng.randrange(vocab) for _ in range(PROMPT_LEN)] for _ in range(batch)], device="cuda")
            torch.cuda.synchronize()
            start = time.perf_counter()
            hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0)
            torch.cuda.synchronize()
            return time.perf_counter() - start
        run(2)   # warm-up
        for _ in range(repeats):
            results.append((run(129) - run(1)) / 128 * 1e3)
    return statistics.median(results)


def throughput(engine: LLMEngine, vocab: int, num_seqs: int, min_len: int, max_len: int) -> dict:
    """nano-vllm's bench.py workload: output tokens, seconds, and how the steps split into those that prefill
    (eager) and pure decodes (graphs)."""
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(num_seqs)]
    params = [SamplingParams(temperature=0.6, max_tokens=rng.randint(min_len, max_len), ignore_eos=True, seed=i)
              for i in range(num_seqs)]
    timed_generate(engine, [[1, 2, 3]], [SamplingParams(max_tokens=4)])   # warm-up
    kinds: list[bool] = []
    launch = engine.runner.launch

    def classifying_launch(batch, previous=None):
        kinds.append(any(seq.num_tokens > 1 for seq in batch.seqs))
        return launch(batch, previous)

    engine.runner.launch = classifying_launch
    step_times: list[float] = []
    seconds = timed_generate(engine, prompts, params, step_times)
    engine.runner.launch = launch
    # Under overlap a call launches step i and waits for step i - 1: charge each call to the step it launched.
    prefill_s = sum(t for t, k in zip(step_times, kinds) if k)
    tokens = sum(p.max_tokens for p in params)
    return dict(output_tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds, prefill_steps=sum(kinds),
                prefill_step_s=prefill_s, decode_steps=len(kinds) - sum(kinds), decode_step_s=seconds - prefill_s)


def free(*objects) -> None:
    del objects
    gc.collect()
    torch.cuda.empty_cache()


def run(args) -> dict:
    bandwidth = copy_bandwidth(repeats=20) * 1e9   # bench/kernels.py's measure, in bytes/s
    print(f"device copy bandwidth: {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows, tput = [], []
    for preset in args.presets:
        hf, spec = hf_model(preset)
        vocab = spec["vocab_size"]
        loaded = ours_from(hf, spec, args.max_model_len)
        floor_ms = weight_bytes(loaded) / bandwidth * 1e3
        if args.hf:
            for batch in args.hf_batches:
                ms = hf_decode_ms(hf, batch, vocab, args.repeats)
                rows.append(dict(preset=preset, engine="hf-generate", batch=batch, decode_ms=ms, floor_ms=floor_ms))
                print(rows[-1], flush=True)
        free(hf)
        for name, overrides in ENGINES.items():
            config = EngineConfig(device="cuda", max_model_len=args.max_model_len,
                                  max_num_batched_tokens=args.max_num_batched_tokens, **overrides)
            engine = LLMEngine(config, loaded=loaded)
            capture = engine.runner.graph_capture_seconds
            for batch in args.batches:
                ms = decode_ms(engine, batch, vocab, args.repeats)
                rows.append(dict(preset=preset, engine=name, batch=batch, decode_ms=ms, floor_ms=floor_ms,
                                 capture_s=capture, graph_mib=engine.runner.graph_memory_bytes / 2**20))
                print(rows[-1], flush=True)
            if args.sampled_batch:
                ms = decode_ms(engine, args.sampled_batch, vocab, args.repeats, sampled=True)
                rows.append(dict(preset=preset, engine=name + " sampled", batch=args.sampled_batch, decode_ms=ms,
                                 floor_ms=floor_ms))
                print(rows[-1], flush=True)
            if preset in args.throughput_presets:
                tput.append(dict(preset=preset, engine=name,
                                 **throughput(engine, vocab, args.throughput_seqs, 100, 1024)))
                print(tput[-1], flush=True)
            free(engine)
        free(loaded)
    return {"device": torch.cuda.get_device_name(), "copy_bandwidth_tb_s": bandwidth / 1e12,
            "decode": rows, "throughput": tput}


def print_table(result: dict) -> None:
    print(f"\n{result['device']}, copy bandwidth {result['copy_bandwidth_tb_s']:.2f} TB/s, bfloat16, dummy weights")
    print(f"{'preset':<14}{'engine':<24}{'batch':>6}{'ms/step':>9}{'floor':>8}{'vs hf b1':>10}")
    hf_b1 = {r["preset"]: r["decode_ms"] for r in result["decode"] if r["engine"] == "hf-generate" and r["batch"] == 1}
    for r in result["decode"]:
        ratio = hf_b1.get(r["preset"]) if r["batch"] == 1 else None
        vs_hf = f"{ratio / r['decode_ms']:>9.1f}x" if ratio else ""
        print(f"{r['preset']:<14}{r['engine']:<24}{r['batch']:>6}{r['decode_ms']:>9.3f}{r['floor_ms']:>8.3f}{vs_hf}")
    for r in result["throughput"]:
        print(f"{r['preset']:<14}{r['engine']:<24}throughput {r['output_tokens']} tokens in {r['seconds']:.2f} s: "
              f"{r['tokens_per_s']:,.0f} tokens/s ({r['prefill_steps']} prefill steps {r['prefill_step_s']:.2f} s, "
              f"{r['decode_steps']} decode steps {r['decode_step_s']:.2f} s)")
