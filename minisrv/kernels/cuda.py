"""The CUDA kernels of csrc/, compiled at run time with NVRTC through CuPy and launched on PyTorch's stream.

Every function has the signature of its PyTorch reference in minisrv/kernels/reference.py, which is its
oracle in the tests. A source is compiled for the device's architecture once per process and template
instantiation, through CuPy's on-disk cache, so a second start compiles nothing. Launches take raw data
pointers and explicitly typed scalars; every per-step value a kernel reads is a device tensor and launch
shapes depend only on tensor shapes and fixed limits, so launches can be captured in a CUDA graph.
Shapes the kernels do not cover (head sizes other than 64 and 128, more than 16 query heads per kv head,
float32 attention) run the reference.
"""
from __future__ import annotations

import ctypes
import functools
import math
import re
from pathlib import Path

import torch

from minisrv.kernels import reference
from minisrv.kernels.attention_metadata import AttentionMetadata

NAME = "cuda"
# minisrv/_csrc is a link to the repository's csrc/ (a wheel carries the files themselves).
CSRC = Path(__file__).resolve().parents[1] / "_csrc"
TYPE_NAMES = {torch.bfloat16: "bf16_t", torch.float16: "f16_t", torch.float32: "float"}
CACHE_TYPE_NAMES = {torch.float8_e4m3fn: "e4m3_t"}   # an 8-bit KV cache (--kv-cache-dtype fp8), beside TYPE_NAMES
ATTENTION_HEAD_DIMS = (64, 128)
MAX_GROUP = 16                # query heads per kv head: the rows of one tensor-core tile
DECODE_SPLIT = 64             # csrc/decode_attention.cu SPLIT
DECODE_MAX_SPLITS = 64        # splits of one sequence at most (the smallest batches)
# (split, kv head, sequence) blocks a decode launch aims at: on the nano-vllm workload (qwen3-0.6b, 256 sequences
# of 200-2048 positions) 8192 gave 21.8k output tokens/s, 2048 19.4k (H200), long sequences' splits balancing better.
DECODE_TARGET_BLOCKS = 8192
DECODE_MERGE_THREADS = 512    # csrc/decode_attention.cu MERGE_THREADS
EXTEND_ROWS = 64              # csrc/extend_attention.cu ROWS
SAMPLE_THREADS = 1024         # csrc/sampling.cu SAMPLE_THREADS
NORM_THREADS = 512            # csrc/norm.cu NORM_THREADS


def unsupported() -> str | None:
    """Why these kernels cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed (install minisrv[cuda12] or minisrv[cuda13])"
    return None


@functools.cache
def _source(file: str) -> str:
    """A source with its csrc/ headers inlined (each once), so CuPy's cache key, the source text, covers them."""
    seen: set[str] = set()

    def inline(match: re.Match) -> str:
        header = match.group(1)
        if header in seen:
            return ""
        seen.add(header)
        return re.sub(r'#include "(\w+\.cuh)"', inline, (CSRC / header).read_text())

    return re.sub(r'#include "(\w+\.cuh)"', inline, (CSRC / file).read_text())


@functools.cache
def _kernel(file: str, name: str) -> int:
    """The CUfunction of template instantiation `name` of `file`, compiled (or read from CuPy's cache) and loaded."""
    import cupy

    module = cupy.RawModule(code=_source(file), options=("--std=c++17",), name_expressions=(name,))
    return module.get_function(name).kernel.ptr


@functools.cache
def _driver() -> ctypes.CDLL:
    """libcuda's cuLaunchKernel: a launch through it costs a few microseconds, through CuPy's Python-level
    argument handling about 40 (measured on an H200), which would dominate the small kernels."""
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    lib.cuLaunchKernel.restype = ctypes.c_int
    return lib


def _launch(file: str, name: str, grid: tuple[int, ...], block: tuple[int, ...], *args: ctypes._SimpleCData) -> None:
    """Launch a kernel on PyTorch's current stream; `args` are ctypes values matching the kernel's parameters."""
    gx, gy, gz = (*grid, 1, 1)[:3]
    bx, by, bz = (*block, 1, 1)[:3]
    params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    # The raw handle, as torch.compile's generated code reads it: torch.cuda.current_stream() builds a Stream
    # object and resolves the device on every call, about 10 us on the H200 machine's host, and an eager prefill
    # step of a small model launches about two hundred kernels.
    stream = torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice())
    err = _driver().cuLaunchKernel(_kernel(file, name), gx, gy, gz, bx, by, bz, 0, stream, params, None)
    if err != 0:
        raise RuntimeError(f"launching {name} ({file}) failed with CUDA driver error {err}")


def _ptr(t: torch.Tensor | None) -> ctypes.c_uint64:
    return ctypes.c_uint64(0 if t is None else t.data_ptr())


def _i64(x: int) -> ctypes.c_int64:
    return ctypes.c_int64(x)


def _i32(x: int) -> ctypes.c_int32:
    return ctypes.c_int32(x)


def _f32(x: float) -> ctypes.c_float:
    return ctypes.c_float(x)


def _cache_type(kv_cache: torch.Tensor) -> str:
    return CACHE_TYPE_NAMES.get(kv_cache.dtype) or TYPE_NAMES[kv_cache.dtype]


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x as [rows, last] with a contiguous last dimension, and its row stride."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    return flat, flat.stride(0)


def _vectors(rows: torch.Tensor, width: int) -> bool:
    """Whether csrc's 16-byte vector accesses (common.cuh load_vec) can read `width` elements of each row of `rows`:
    the start, the row stride and the width all whole vectors. Other shapes run the reference."""
    size = rows.element_size()
    return rows.data_ptr() % 16 == 0 and rows.stride(0) * size % 16 == 0 and width * size % 16 == 0


# --- norms and activation --------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows, stride = _rows(x)
    if not _vectors(rows, rows.shape[1]):
        return reference.rms_norm(x, weight, eps)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    _launch("norm.cu", f"rms_norm<{TYPE_NAMES[x.dtype]}>", (rows.shape[0],), (NORM_THREADS,), _ptr(out), _ptr(rows),
            _ptr(weight), _i32(rows.shape[1]), _i64(out.stride(0)), _i64(stride), _f32(eps))
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    rows, stride = _rows(x)
    res, res_stride = _rows(residual)
    if not (_vectors(rows, rows.shape[1]) and _vectors(res, res.shape[1])):
        return reference.add_rms_norm(x, residual, weight, eps)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    _launch("norm.cu", f"add_rms_norm<{TYPE_NAMES[x.dtype]}>", (rows.shape[0],), (NORM_THREADS,), _ptr(out), _ptr(res),
            _ptr(rows), _ptr(weight), _i32(rows.shape[1]), _i64(out.stride(0)), _i64(res_stride), _i64(stride),
            _f32(eps))
    if res.data_ptr() != residual.data_ptr():
        residual.copy_(res.view(residual.shape))
    return out.view(x.shape), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    rows, stride = _rows(x)
    inter = rows.shape[1] // 2
    if not _vectors(rows, inter):
        return reference.silu_and_mul(x)
    out = torch.empty(rows.shape[0], inter, dtype=x.dtype, device=x.device)
    per_block = 256 * (16 // x.element_size())
    _launch("norm.cu", f"silu_and_mul<{TYPE_NAMES[x.dtype]}>", (rows.shape[0], -(-inter // per_block)), (256,),
            _ptr(out), _ptr(rows), _i32(inter), _i64(out.stride(0)), _i64(stride))
    return out.view(*x.shape[:-1], inter)


# --- RoPE and the KV store -------------------------------------------------------------------------------

def rope_inputs(table: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel reads the rotation table itself: (cos, sin) pairs [max_positions, D/2, 2], and the positions."""
    return torch.view_as_real(table), positions


def rope_store_kv(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], qk_norm: torch.Tensor | None,
                  eps: float, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                  head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    table, positions = rope
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    num_tokens = qkv.shape[0]
    if num_tokens:
        _launch("rope_kv.cu", f"rope_store_kv<{TYPE_NAMES[qkv.dtype]}, {_cache_type(kv_cache)}>", (num_tokens,),
                (256,), _ptr(qkv), _i64(qkv.stride(0)), _ptr(positions), _ptr(table), _ptr(qk_norm), _f32(eps),
                _ptr(kv_cache), _ptr(slot_mapping), _i32(num_heads), _i32(num_kv_heads), _i32(head_dim))
    q_size = num_heads * head_dim
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    return q, qkv[:, q_size:].view(num_tokens, 2, num_kv_heads, head_dim)


# --- attention ---------------------------------------------------------------------------------------------

def attention_supported(q: torch.Tensor, kv_cache: torch.Tensor, num_heads: int) -> bool:
    group = num_heads // kv_cache.shape[3]
    return (q.dtype in (torch.bfloat16, torch.float16) and kv_cache.dtype in (q.dtype, *CACHE_TYPE_NAMES)
            and q.shape[-1] in ATTENTION_HEAD_DIMS and 1 <= group <= MAX_GROUP)


def paged_attention(q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                    num_heads: int, head_dim: int) -> torch.Tensor:
    if not attention_supported(q, kv_cache, num_heads):
        return reference.paged_attention(q, kv, kv_cache, meta, num_heads, head_dim)
    num_tokens, num_decodes = q.shape[0], meta.num_decodes
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_decodes:
        max_splits = decode_splits(meta.decode_max_seq_len, num_decodes, kv_cache.shape[3],
                                   narrow=kv_cache.element_size() == 1)
        decode_attention(out[:num_decodes], q[:num_decodes], kv_cache, meta.decode_page_table,
                         meta.decode_seq_lens, max_splits)
    # Every extend, fresh prefills too, in one launch: alone, flash SDPA beats the kernel on a long fresh prefill
    # (164 to 327 us at 2048 tokens, bench/kernels.py), but a step prefills dozens of prompts, and one SDPA call
    # per prompt and layer (which took PyTorch's math path here) made a 15k-token step of qwen3-0.6b 230 ms
    # against 49 ms (H200).
    if meta.extends:
        extend_attention(out[num_decodes:], q[num_decodes:], kv_cache, meta)
    return out.view(num_tokens, num_heads * head_dim)


def decode_splits(max_seq_len: int, batch: int, num_kv_heads: int, narrow: bool = False) -> int:
    """max_splits for decode attention over `batch` sequences of at most `max_seq_len` positions: enough splits
    of DECODE_SPLIT for the longest, within a cap that shrinks as the batch grows (DECODE_TARGET_BLOCKS). A
    sequence's result depends on the cap only when it is longer than DECODE_SPLIT * cap. An 8-bit cache
    (`narrow`) gets twice the cap: a split there spends more of its time widening than reading, so more of them
    pay (H200, one sequence of 32768 positions: 65 -> 46 us with 128 splits against 64, 8 sequences 302 -> 290)."""
    cap = max(1, min(DECODE_MAX_SPLITS, DECODE_TARGET_BLOCKS // max(1, batch * num_kv_heads))) * (2 if narrow else 1)
    return max(1, min(cap, -(-max_seq_len // DECODE_SPLIT)))


def decode_attention(out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor, page_table: torch.Tensor,
                     seq_lens: torch.Tensor, max_splits: int) -> None:
    """out, q: [B, num_heads, D]; seq_lens [B] int64 (0 for a padding row). Sequences longer than
    DECODE_SPLIT * max_splits take longer splits, so any max_splits serves every length (decode_splits)."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    part_out = torch.empty(batch, num_heads, max_splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, num_heads, max_splits, dtype=torch.float32, device=q.device)
    dtype = TYPE_NAMES[q.dtype]
    _launch("decode_attention.cu", f"paged_decode_split<{dtype}, {_cache_type(kv_cache)}, {head_dim}>",
            (max_splits, num_kv_heads, batch),
            (32,), _ptr(out), _i64(out.stride(0)), _ptr(part_out), _ptr(part_lse), _ptr(q), _i64(q.stride(0)),
            _ptr(kv_cache), _ptr(page_table), _i64(page_table.stride(0)), _ptr(seq_lens), _i32(kv_cache.shape[1]),
            _i32(num_kv_heads), _i32(group), _i32(max_splits), _f32(math.log2(math.e) / math.sqrt(head_dim)))
    if max_splits > 1:   # sequences of one split are final already
        _launch("decode_attention.cu", f"paged_decode_merge<{dtype}, {head_dim}>", (num_heads, batch),
                (DECODE_MERGE_THREADS,),
                _ptr(out), _i64(out.stride(0)), _ptr(part_out), _ptr(part_lse), _ptr(seq_lens), _i32(max_splits))


def _extend_tiles(meta: AttentionMetadata, group: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(tile_seq, tile_token, query_start, seq_lens) int32 for the extend kernel, once per step."""
    key = f"extend_tiles/{group}"
    if key not in meta.derived:
        tokens_per_tile = EXTEND_ROWS // group
        tile_seq, tile_token = [], []
        for s, seq in enumerate(meta.extends):
            for token in range(0, seq.query_len, tokens_per_tile):
                tile_seq.append(s)
                tile_token.append(token)
        tiles = torch.tensor([tile_seq, tile_token], dtype=torch.int32).to(device, non_blocking=True)
        meta.derived[key] = (tiles[0], tiles[1], meta.extend_query_start_loc, meta.extend_seq_lens)
    return meta.derived[key]


def extend_attention(out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    """out, q: the extend rows [n, num_heads, D], sequence after sequence as meta.extends lists them."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    tile_seq, tile_token, query_start, seq_lens = _extend_tiles(meta, group, q.device)
    if tile_seq.shape[0] == 0:
        return
    scale_log2 = (1.0 / math.sqrt(head_dim)) * math.log2(math.e)
    _launch("extend_attention.cu", f"paged_extend<{TYPE_NAMES[q.dtype]}, {_cache_type(kv_cache)}, {head_dim}>",
            (tile_seq.shape[0], num_kv_heads), (128,), _ptr(out), _i64(out.stride(0)), _ptr(q), _i64(q.stride(0)),
            _ptr(kv_cache), _ptr(meta.extend_page_table), _i64(meta.extend_page_table.stride(0)), _ptr(tile_seq),
            _ptr(tile_token), _ptr(query_start), _ptr(seq_lens), _i32(kv_cache.shape[1]), _i32(num_kv_heads),
            _i32(group), _f32(scale_log2))


# --- sampling ----------------------------------------------------------------------------------------------

def sample(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
           min_ps: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int,
           out: torch.Tensor | None = None, bitmasks: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids [rows] int64 (into `out` when given) from float32 logits [rows, >= vocab_size]; per-row
    parameters as device tensors: temperatures f32 (< 1e-5: greedy), top_ks i64 (<= 0: off), top_ps f32,
    min_ps f32, seeds u64 (as int64), positions i64 (the output index the token will have). `bitmasks`: int32
    [rows, >= ceil(vocab_size / 32)], bit b of word w allowing token 32 * w + b (structured output)."""
    rows = logits.shape[0]
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device) if out is None else out
    if bitmasks is not None and (bitmasks.dtype != torch.int32 or bitmasks.shape[0] != rows
                                 or bitmasks.shape[1] * 32 < vocab_size or bitmasks.stride(1) != 1):
        raise ValueError(f"bitmasks: need int32 [{rows}, >= {(vocab_size + 31) // 32}] with unit column stride, got "
                         f"{bitmasks.dtype} {list(bitmasks.shape)}")
    if rows:
        _launch("sampling.cu", "sample_tokens", (rows,), (SAMPLE_THREADS,), _ptr(tokens), _ptr(logits),
                _i64(logits.stride(0)), _i32(vocab_size), _ptr(temperatures), _ptr(top_ks), _ptr(top_ps),
                _ptr(min_ps), _ptr(seeds), _ptr(positions), _ptr(bitmasks),
                _i64(0 if bitmasks is None else bitmasks.stride(0)))
    return tokens


def logprobs(logits: torch.Tensor, tokens: torch.Tensor, num_top: torch.Tensor, max_top: int, vocab_size: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From raw float32 logits: (chosen token's logprob [rows], top ids [rows, max_top] int32, their logprobs)
    for rows with num_top (i32) >= 0; other rows' entries are left unwritten."""
    rows = logits.shape[0]
    chosen = torch.empty(rows, dtype=torch.float32, device=logits.device)
    top_ids = torch.empty(rows, max(max_top, 1), dtype=torch.int32, device=logits.device)
    top_values = torch.empty(rows, max(max_top, 1), dtype=torch.float32, device=logits.device)
    if rows:
        _launch("sampling.cu", "token_logprobs", (rows,), (SAMPLE_THREADS,), _ptr(chosen), _ptr(top_ids),
                _ptr(top_values), _i32(top_ids.shape[1]), _ptr(logits), _i64(logits.stride(0)), _i32(vocab_size),
                _ptr(tokens), _ptr(num_top))
    return chosen, top_ids, top_values
