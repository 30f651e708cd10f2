"""The CUDA kernels of csrc/ side by side with PyTorch, on a GPU, and the engine's decode step with each.

Sections (each prints rows; the summary table comes last). Kernel times are GPU times: each op is captured
in a CUDA graph and replayed, so launch overhead on the host stays out of them.
  copy      device-to-device copy bandwidth (bytes read + written): the ceiling for memory-bound kernels
  decode    paged decode attention: GB/s of K/V read against the copy bandwidth, and against the reference
            (gather + SDPA); 32 query / 8 KV heads, head_dim 128, page size 16, bfloat16
  decode-fp8  the same over an e4m3 cache (--kv-cache-dtype fp8), against the bfloat16 cache
  extend-fp8  extend attention over an e4m3 cache, against the bfloat16 cache
  sample    µs per batch, vocabulary 128256, top-k 50 + top-p 0.9, against a PyTorch sort-based sampler
  sample-parts  the same launch with one feature at a time (greedy, temperature, top-k, top-p, min-p)
  fused     add + RMSNorm, RoPE + KV store, SiLU-and-multiply against their PyTorch sequences
  extend    extend attention: a fresh prefill against SDPA (flash), a chunk on a cached prefix against the
            reference (gather + SDPA)
  gemm      cuBLAS on llama-3.2-1b's projections at batch 1 and 64: GB/s of weights read
  engine    llama-3.2-1b and qwen3-0.6b (dummy weights, bfloat16): GPU kernel time and kernels per decode step (torch profiler)
            and wall ms per step, PyTorch ops against the CUDA kernels, greedy and sampled

    python bench/kernels.py --json bench/results/kernels-h200.json --plot bench/results/kernels-h200.png
    python bench/kernels.py --quick          # fewer sizes and repeats
    python bench/kernels.py --from-json bench/results/kernels-h200.json --plot bench/results/kernels-h200.png
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

from minisrv.kernels import cuda, reference
from minisrv.kernels.attention_metadata import AttentionMetadata, ExtendSeq

DEVICE = "cuda"


@dataclass
class Row:
    section: str
    case: str
    ours_us: float
    peer: str = ""
    peer_us: float | None = None
    note: str = ""

    @property
    def speedup(self) -> float | None:
        return None if self.peer_us is None else self.peer_us / self.ours_us


def time_us(fn, repeats: int, warmup: int = 3, calls_per_graph: int = 10) -> float:
    """GPU time of one fn(): fn is captured `calls_per_graph` times in a CUDA graph, and the median over `repeats`
    replays (CUDA events) is divided by that count, so launch overhead on the host stays out of the figure."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls_per_graph)
    return statistics.median(times)


def copy_bandwidth(repeats: int) -> float:
    """GB/s of a 4 GB device-to-device copy, counting bytes read and written. Timed with events around a plain
    launch: a copy captured in a graph becomes a memcpy node, which runs well below the copy-kernel rate."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return 2 * src.numel() / statistics.median(times) / 1e3


def paged(batch: int, ctx: int, page_size: int = 16, kv_heads: int = 8, head_dim: int = 128,
          dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    pages_per_seq = -(-ctx // page_size)
    cache = torch.randn(batch * pages_per_seq, page_size, 2, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    table = torch.randperm(batch * pages_per_seq, device=DEVICE).view(batch, pages_per_seq)
    return cache, table


def decode_cases(quick: bool):
    """(batch, context) of the decode sections' cases."""
    batches, contexts = ([1, 64], [4096, 32768]) if quick else ([1, 8, 64, 256], [512, 4096, 32768])
    return [(batch, ctx) for batch in batches for ctx in contexts if batch * ctx <= (1 << 23)]


def decode_inputs(batch: int, ctx: int) -> tuple[torch.Tensor, ...]:
    """(cache, page table, q, out, lengths) of a decode case: 32 query / 8 KV heads, head_dim 128, page size 16,
    bfloat16. The caller deletes them before the next case's (the largest cache is 32 GiB)."""
    cache, table = paged(batch, ctx)
    q = torch.randn(batch, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    return cache, table, q, torch.empty_like(q), torch.full((batch,), ctx, device=DEVICE)


def bench_decode(copy_gbs: float, quick: bool, repeats: int) -> list[Row]:
    rows = []
    for batch, ctx in decode_cases(quick):
        cache, table, q, out, lens = decode_inputs(batch, ctx)
        splits = cuda.decode_splits(ctx, batch, 8)
        us = time_us(lambda: cuda.decode_attention(out, q, cache, table, lens, splits), repeats)
        gbs = batch * ctx * 2 * 8 * 128 * 2 / us / 1e3
        peer_us = None
        if batch * ctx <= (1 << 19):
            peer_us = time_us(lambda: reference.decode_attention(q, cache, table, ctx, None), repeats)
        rows.append(Row("decode", f"batch {batch}, context {ctx}", us, "gather+SDPA", peer_us,
                        f"{gbs:.0f} GB/s = {100 * gbs / copy_gbs:.0f}% of copy"))
        del cache, table
        torch.cuda.empty_cache()
    return rows


def bench_decode_fp8(copy_gbs: float, quick: bool, repeats: int) -> list[Row]:
    """--kv-cache-dtype fp8: decode attention over an e4m3 cache against the same kernel over a bfloat16 one."""
    rows = []
    for batch, ctx in decode_cases(quick):
        cache, table, q, out, lens = decode_inputs(batch, ctx)
        narrow = cache.to(torch.float8_e4m3fn)
        splits, narrow_splits = cuda.decode_splits(ctx, batch, 8), cuda.decode_splits(ctx, batch, 8, narrow=True)
        us = time_us(lambda: cuda.decode_attention(out, q, narrow, table, lens, narrow_splits), repeats)
        wide_us = time_us(lambda: cuda.decode_attention(out, q, cache, table, lens, splits), repeats)
        gbs = batch * ctx * 2 * 8 * 128 / us / 1e3
        rows.append(Row("decode-fp8", f"batch {batch}, context {ctx}", us, "bfloat16 cache", wide_us,
                        f"{gbs:.0f} GB/s of e4m3 = {100 * gbs / copy_gbs:.0f}% of copy"))
        del cache, narrow, table
        torch.cuda.empty_cache()
    return rows


def sort_based_sample(logits: torch.Tensor, top_k: int, top_p: float, temperature: float) -> torch.Tensor:
    """The usual PyTorch sampler: sort, mask top-k and top-p, renormalize, inverse transform."""
    probs_sorted, ids = torch.sort(torch.softmax(logits / temperature, dim=-1), dim=-1, descending=True)
    probs_sorted[:, top_k:] = 0
    cumulative = probs_sorted.cumsum(dim=-1)
    probs_sorted[(cumulative - probs_sorted) > top_p * cumulative[:, -1:]] = 0
    cumulative = probs_sorted.cumsum(dim=-1)
    u = torch.rand(logits.shape[0], 1, device=logits.device) * cumulative[:, -1:]
    return ids.gather(1, torch.searchsorted(cumulative, u).clamp(max=logits.shape[1] - 1)).squeeze(1)


def bench_sample(repeats: int) -> list[Row]:
    rows, vocab = [], 128256
    for batch in (1, 32, 256):
        logits = torch.randn(batch, vocab, device=DEVICE) * 3
        temps = torch.full((batch,), 1.0, device=DEVICE)
        top_ks = torch.full((batch,), 50, dtype=torch.int64, device=DEVICE)
        top_ps = torch.full((batch,), 0.9, device=DEVICE)
        min_ps = torch.zeros(batch, device=DEVICE)
        seeds = torch.randint(0, 1 << 62, (batch,), device=DEVICE)
        positions = torch.randint(0, 1000, (batch,), device=DEVICE)
        us = time_us(lambda: cuda.sample(logits, temps, top_ks, top_ps, min_ps, seeds, positions, vocab), repeats)
        peer = time_us(lambda: sort_based_sample(logits, 50, 0.9, 1.0), repeats)
        rows.append(Row("sample", f"batch {batch}, top-k 50 + top-p 0.9", us, "sort-based", peer))
    return rows


def bench_sample_parts(repeats: int) -> list[Row]:
    """Where the fused sampler's time goes: the same launch with one feature at a time."""
    rows, vocab = [], 128256
    kinds = {"greedy": (0.0, -1, 1.0, 0.0), "temperature only": (1.0, -1, 1.0, 0.0), "top-k 50": (1.0, 50, 1.0, 0.0),
             "top-p 0.9": (1.0, -1, 0.9, 0.0), "top-k 50 + top-p 0.9": (1.0, 50, 0.9, 0.0),
             "min-p 0.05": (1.0, -1, 1.0, 0.05)}
    for batch in (1, 256):
        logits = torch.randn(batch, vocab, device=DEVICE) * 3
        seeds = torch.randint(0, 1 << 62, (batch,), device=DEVICE)
        positions = torch.randint(0, 1000, (batch,), device=DEVICE)
        for name, (t, k, p, m) in kinds.items():
            args = [torch.full((batch,), v, dtype=dt, device=DEVICE)
                    for v, dt in ((t, torch.float32), (k, torch.int64), (p, torch.float32), (m, torch.float32))]
            us = time_us(lambda: cuda.sample(logits, *args, seeds, positions, vocab), repeats)
            rows.append(Row("sample", f"batch {batch}, {name}", us))
    return rows


def bench_fused(repeats: int) -> list[Row]:
    rows = []
    x, res = (torch.randn(64, 2048, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(2048, device=DEVICE, dtype=torch.bfloat16)
    rows.append(Row("fused", "add + RMSNorm, 64 x 2048", time_us(lambda: cuda.add_rms_norm(x, res, w, 1e-5), repeats),
                    "torch", time_us(lambda: reference.add_rms_norm(x, res, w, 1e-5), repeats)))
    gate_up = torch.randn(64, 16384, device=DEVICE, dtype=torch.bfloat16)
    rows.append(Row("fused", "SiLU-and-multiply, 64 x 8192", time_us(lambda: cuda.silu_and_mul(gate_up), repeats),
                    "torch", time_us(lambda: reference.silu_and_mul(gate_up), repeats)))
    from minisrv.layers.rope import RopeConfig, RotaryEmbedding

    rope = RotaryEmbedding(RopeConfig(theta=500000.0), 64, 8192, DEVICE)
    for tokens in (1, 64):
        qkv = torch.randn(tokens, 48 * 64, device=DEVICE, dtype=torch.bfloat16)
        cache = torch.randn(4096, 16, 2, 8, 64, device=DEVICE, dtype=torch.bfloat16)
        positions = torch.randint(0, 8192, (tokens,), device=DEVICE)
        slots = torch.randperm(4096 * 16, device=DEVICE)[:tokens]
        ours = time_us(lambda: cuda.rope_store_kv(qkv, cuda.rope_inputs(rope.table, positions), None, 1e-6, cache,
                                                  slots, 32, 8, 64), repeats)
        peer = time_us(lambda: reference.rope_store_kv(qkv, reference.rope_inputs(rope.table, positions), None, 1e-6,
                                                       cache, slots, 32, 8, 64), repeats)
        rows.append(Row("fused", f"RoPE + KV store, {tokens} tokens (32/8 heads, 64)", ours, "torch", peer))
    return rows


def bench_extend(repeats: int) -> list[Row]:
    rows = []
    for ctx, new in ((0, 128), (0, 256), (0, 2048), (4096, 512)):
        cache, table = paged(1, ctx + new)
        q = torch.randn(new, 32, 128, device=DEVICE, dtype=torch.bfloat16)
        slots = (table[0].repeat_interleave(16) * 16 + torch.arange(16, device=DEVICE).repeat(table.shape[1]))
        slots = slots[ctx:ctx + new]
        meta = AttentionMetadata(
            slot_mapping=slots, num_decodes=0, extends=[ExtendSeq(0, new, ctx, table[0])],
            extend_query_start_loc=torch.tensor([0, new], dtype=torch.int32, device=DEVICE),
            extend_seq_lens=torch.tensor([ctx + new], dtype=torch.int32, device=DEVICE), extend_page_table=table)
        out = torch.empty_like(q)
        ours = time_us(lambda: cuda.extend_attention(out, q, cache, meta), repeats)
        kv = reference.gather_kv(cache, table, ctx + new)[0]          # [L, 2, 8, 128]
        if ctx == 0:
            # PyTorch's best for a fresh prefill: flash attention, K/V repeated to the query heads.
            q4 = q.transpose(0, 1)[None]
            k4, v4 = (kv[:, i].repeat_interleave(4, dim=1).transpose(0, 1)[None] for i in (0, 1))
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                peer = time_us(lambda: torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=True),
                               repeats)
        else:
            peer = time_us(lambda: reference.extend_attention(q, kv[ctx:], cache, table[0], ctx), repeats)
        flops = 4 * 32 * 128 * new * (ctx + (new + 1) / 2)
        name = "fresh prefill" if ctx == 0 else f"chunk on a {ctx}-token prefix"
        rows.append(Row("extend", f"{name}, {new} new tokens", ours, "flash SDPA" if ctx == 0 else "gather+SDPA", peer,
                        f"{flops / ours / 1e6:.0f} TFLOP/s"))
    return rows


def bench_extend_fp8(repeats: int) -> list[Row]:
    """--kv-cache-dtype fp8: extend attention over an e4m3 cache against the same kernel over a bfloat16 one."""
    rows = []
    for ctx, new in ((0, 2048), (4096, 512), (16384, 256)):
        cache, table = paged(1, ctx + new)
        narrow = cache.to(torch.float8_e4m3fn)
        q = torch.randn(new, 32, 128, device=DEVICE, dtype=torch.bfloat16)
        slots = (table[0].repeat_interleave(16) * 16 + torch.arange(16, device=DEVICE).repeat(table.shape[1]))
        meta = AttentionMetadata(
            slot_mapping=slots[ctx:ctx + new], num_decodes=0, extends=[ExtendSeq(0, new, ctx, table[0])],
            extend_query_start_loc=torch.tensor([0, new], dtype=torch.int32, device=DEVICE),
            extend_seq_lens=torch.tensor([ctx + new], dtype=torch.int32, device=DEVICE), extend_page_table=table)
        out = torch.empty_like(q)
        ours = time_us(lambda: cuda.extend_attention(out, q, narrow, meta), repeats)
        wide = time_us(lambda: cuda.extend_attention(out, q, cache, meta), repeats)
        name = "fresh prefill" if ctx == 0 else f"chunk on a {ctx}-token prefix"
        rows.append(Row("extend-fp8", f"{name}, {new} new tokens", ours, "bfloat16 cache", wide))
    return rows


LLAMA_1B_PROJECTIONS = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
                        "lm_head": (128256, 2048)}


def bench_gemm(copy_gbs: float, repeats: int) -> list[Row]:
    """cuBLAS (F.linear) on llama-3.2-1b's projections at batch 1 and 64: the weight-read rate that bounds a
    decode step, since these are most of its GPU time."""
    rows = []
    for batch in (1, 64):
        for name, (out_features, in_features) in LLAMA_1B_PROJECTIONS.items():
            weight = torch.randn(out_features, in_features, device=DEVICE, dtype=torch.bfloat16)
            x = torch.randn(batch, in_features, device=DEVICE, dtype=torch.bfloat16)
            us = time_us(lambda: torch.nn.functional.linear(x, weight), repeats)
            gbs = weight.numel() * 2 / us / 1e3
            rows.append(Row("gemm", f"{name} {out_features}x{in_features}, batch {batch}", us,
                            note=f"{gbs:.0f} GB/s of weights = {100 * gbs / copy_gbs:.0f}% of copy"))
    return rows


def engine_step(model: str, backend: str, batch: int, sampled: bool, steps: int) -> Row:
    """GPU kernel time and kernels per decode step (profiler), and wall ms per step: (129 tokens - 1 token) / 128."""
    from minisrv.config import EngineConfig
    from minisrv.engine.llm_engine import LLMEngine
    from minisrv.sampling_params import SamplingParams

    engine = ENGINES.get((model, backend))
    if engine is None:
        ENGINES.clear()
        torch.cuda.empty_cache()
        engine = ENGINES[(model, backend)] = LLMEngine(EngineConfig(
            model=model, load_format="dummy", device="cuda", kernel_backend=backend, kv_cache_memory=8.0,
            max_model_len=4096))
    params = (SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=steps + 1, ignore_eos=True) if sampled
              else SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True))
    rng = random.Random(batch)

    def submit(max_tokens: int) -> None:
        for _ in range(batch):
            ENGINE_RIDS[0] += 1
            engine.add_request(ENGINE_RIDS[0], [rng.randrange(1000, 100000) for _ in range(32)],
                               SamplingParams(**{**params.__dict__, "max_tokens": max_tokens}))

    def drain() -> None:
        while engine.has_unfinished():
            engine.step()

    submit(steps + 1)
    engine.step()   # prefill
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    drain()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time for e in kernels) / 1e3 / steps
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name[:60]] = by_name.get(e.name[:60], 0.0) + e.device_time / steps
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    print(f"  {model} {backend} batch {batch} {'sampled' if sampled else 'greedy'}: " +
          "; ".join(f"{name} {us:.0f} us" for name, us in top), flush=True)
    walls = {}
    for tokens in (1, 129):
        submit(tokens)
        torch.cuda.synchronize()
        start = time.perf_counter()
        drain()
        torch.cuda.synchronize()
        walls[tokens] = time.perf_counter() - start
    wall_ms = (walls[129] - walls[1]) / 128 * 1e3
    mode = "sampled T 0.8 p 0.9 k 50" if sampled else "greedy"
    return Row("engine", f"{model} {backend}: batch {batch}, {mode}", gpu_ms * 1e3, note=(
        f"GPU {gpu_ms:.3f} ms/step, {len(kernels) / steps:.0f} kernels/step, wall {wall_ms:.2f} ms/step"))


ENGINES: dict[tuple[str, str], object] = {}   # one engine at a time, kept across its cases
ENGINE_RIDS = [0]


def bench_engine(quick: bool) -> list[Row]:
    rows = []
    cases = [(1, False), (64, False), (64, True)] if quick else [(1, False), (1, True), (64, False), (64, True)]
    for model, model_cases in (("llama-3.2-1b", cases), ("qwen3-0.6b", [(1, False)])):
        for backend in ("torch", "cuda"):
            for batch, sampled in model_cases:
                rows.append(engine_step(model, backend, batch, sampled, steps=20))
    return rows


def table(rows: list[Row], copy_gbs: float, machine: str) -> str:
    lines = [f"{machine}; copy bandwidth {copy_gbs:.0f} GB/s",
             f"{'section':8} {'case':48} {'ours us':>10} {'peer':>12} {'peer us':>10} {'speedup':>8}  note"]
    for r in rows:
        peer_us = f"{r.peer_us:10.1f}" if r.peer_us is not None else " " * 10
        speedup = f"{r.speedup:7.2f}x" if r.speedup is not None else " " * 8
        lines.append(f"{r.section:8} {r.case:48} {r.ours_us:10.1f} {r.peer:>12} {peer_us} {speedup}  {r.note}")
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    decode = [r for r in rows if r.section == "decode"]
    left.barh([r.case for r in decode], [float(r.note.split(" GB/s")[0]) for r in decode], color="tab:green")
    left.set_xlabel("decode attention, GB/s of K/V read")
    other = [r for r in rows if r.peer_us is not None and r.section != "decode"]
    right.barh([f"{r.section}: {r.case}" for r in other], [r.speedup for r in other], color="tab:blue")
    right.axvline(1.0, color="gray", lw=1)
    right.set_xlabel("speedup over the PyTorch peer (x)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--only",
                        default="copy,decode,decode-fp8,sample,sample-parts,fused,extend,extend-fp8,gemm,engine",
                        help="comma-separated sections")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG plot")
    parser.add_argument("--from-json", metavar="PATH",
                        help="print the table and write --plot from a saved run, without a GPU (the GPU machine "
                             "may lack matplotlib)")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        rows = [Row(**{k: v for k, v in r.items() if k != "speedup"}) for r in saved["rows"]]
        if args.plot:
            plot(rows, args.plot)
        print(table(rows, saved["machine"]["copy_gbs"], saved["machine"]["gpu"] + ", torch " + saved["machine"]["torch"]))
        return
    problem = cuda.unsupported()
    if problem:
        raise SystemExit(f"bench/kernels.py needs the CUDA kernels: {problem}")
    torch.manual_seed(0)   # the same logits every run: the sampler's time depends on how many values crowd the top
    repeats = 10 if args.quick else 30
    sections = args.only.split(",")
    copy_gbs = copy_bandwidth(repeats)
    rows: list[Row] = []
    for name, fn in (("decode", lambda: bench_decode(copy_gbs, args.quick, repeats)),
                     ("decode-fp8", lambda: bench_decode_fp8(copy_gbs, args.quick, repeats)),
                     ("sample", lambda: bench_sample(repeats)), ("sample-parts", lambda: bench_sample_parts(repeats)),
                     ("fused", lambda: bench_fused(repeats)),
                     ("extend", lambda: bench_extend(repeats)), ("extend-fp8", lambda: bench_extend_fp8(repeats)),
                     ("gemm", lambda: bench_gemm(copy_gbs, repeats)),
                     ("engine", lambda: bench_engine(args.quick))):
        if name in sections:
            new = fn()
            for r in new:
                print(f"{r.section:8} {r.case:48} {r.ours_us:10.1f} us  {r.note}", flush=True)
            rows += new
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                   "platform": platform.platform(), "copy_gbs": copy_gbs},
                       "rows": [dict(asdict(r), speedup=r.speedup) for r in rows]}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    print()
    print(table(rows, copy_gbs, f"{torch.cuda.get_device_name()}, torch {torch.__version__}"))


if __name__ == "__main__":
    main()
