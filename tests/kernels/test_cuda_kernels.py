"""Every CUDA kernel of csrc/ against its PyTorch reference (minisrv/kernels/reference.py) on fresh random
inputs, over the grid of shapes the engine uses: dtypes, head sizes, GQA ratios, page sizes, lengths across
page and split boundaries. Cache slots a kernel must not read are poisoned with NaN.

Run on a GPU machine: `python -m pytest -m cuda tests/kernels`.
"""
from __future__ import annotations

import ctypes
import math
import random

import pytest
import torch

from minisrv.kernels import reference
from minisrv.kernels.attention_metadata import AttentionMetadata, ExtendSeq

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEVICE = "cuda"
DTYPES = [torch.bfloat16, torch.float16]
# Relative error bounds against the reference, by storage type (one rounding of a 16-bit result, or a few).
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-5}
FP8 = torch.float8_e4m3fn   # --kv-cache-dtype fp8


@pytest.fixture(scope="module")
def cuda():
    from minisrv.kernels import cuda as ops

    problem = ops.unsupported()
    if problem:
        pytest.skip(problem)
    return ops


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in the kernel's output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)


# --- norms and activation --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
# 16384 wide: more than the registers hold (csrc/norm.cuh NORM_VECS), read again; 1001 wide: no whole 16-byte
# vectors, so the wrapper runs the reference.
@pytest.mark.parametrize("rows, hidden", [(1, 576), (7, 2048), (64, 4096), (3, 896), (2, 16384), (3, 1001)])
def test_rms_norm_and_fused_residual_add(cuda, dtype, rows, hidden):
    x, res, w = (randn(rows, hidden, dtype=dtype, seed=s) for s in (1, 2, 3))
    w = w.view(-1)[:hidden].contiguous()
    assert rel_error(cuda.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6)) < TOLERANCE[dtype]
    res_k, res_r = res.clone(), res.clone()
    out_k, sum_k = cuda.add_rms_norm(x, res_k, w, 1e-5)
    out_r, sum_r = reference.add_rms_norm(x, res_r, w, 1e-5)
    assert torch.equal(sum_k, sum_r) and sum_k.data_ptr() == res_k.data_ptr()   # the sum, in place, as stored
    assert rel_error(out_k, out_r) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("rows, inter", [(1, 1536), (5, 8192), (33, 4864), (2, 1001)])
def test_silu_and_mul(cuda, dtype, rows, inter):
    x = randn(rows, 2 * inter, dtype=dtype, seed=4) * 3
    assert rel_error(cuda.silu_and_mul(x), reference.silu_and_mul(x)) < TOLERANCE[dtype]


# --- RoPE and the KV store -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 8, 64), (16, 8, 128), (9, 3, 64), (14, 2, 64)])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("page_size", [1, 16])
def test_rope_store_kv(cuda, dtype, heads, kv_heads, head_dim, qk_norm, page_size):
    from minisrv.layers.rope import RopeConfig, RotaryEmbedding

    tokens, num_pages = 37, 64
    rope = RotaryEmbedding(RopeConfig(theta=10000.0), head_dim, 4096, DEVICE)
    positions = torch.randint(0, 4096, (tokens,), device=DEVICE)
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=5)
    norm = randn(heads + kv_heads, head_dim, dtype=dtype, seed=6) if qk_norm else None
    slots = torch.randperm(num_pages * page_size - 1, device=DEVICE)[:tokens] + 1
    slots[::7] = -1                                             # padding rows store nothing
    caches = [randn(num_pages, page_size, 2, kv_heads, head_dim, dtype=dtype, seed=7) for _ in range(2)]
    caches[1].copy_(caches[0])
    q_k, kv_k = cuda.rope_store_kv(qkv.clone(), cuda.rope_inputs(rope.table, positions), norm, 1e-6, caches[0],
                                   slots, heads, kv_heads, head_dim)
    valid = slots >= 0
    # The reference has no padding rows: they go to slot 0, which the kernel's rows never use.
    q_r, kv_r = reference.rope_store_kv(qkv.clone(), reference.rope_inputs(rope.table, positions), norm, 1e-6,
                                        caches[1], torch.where(valid, slots, 0), heads, kv_heads, head_dim)
    assert rel_error(q_k, q_r) < TOLERANCE[dtype] and rel_error(kv_k, kv_r) < TOLERANCE[dtype]
    flat_k, flat_r = (c.view(-1, 2, kv_heads, head_dim) for c in caches)
    written = slots[valid]
    assert rel_error(flat_k[written], flat_r[written]) < TOLERANCE[dtype]
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[written] = False
    untouched[0] = False   # the reference wrote the padding rows to slot 0
    assert torch.equal(flat_k[untouched], flat_r[untouched])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 8, 64), (16, 8, 128)])
def test_rope_store_kv_into_an_fp8_cache(cuda, dtype, heads, kv_heads, head_dim):
    """--kv-cache-dtype fp8: the kernel stores what the reference stores, K and V rounded to e4m3."""
    from minisrv.layers.rope import RopeConfig, RotaryEmbedding

    tokens, page_size, num_pages = 41, 16, 8
    rope = RotaryEmbedding(RopeConfig(theta=10000.0), head_dim, 4096, DEVICE)
    positions = torch.randint(0, 4096, (tokens,), device=DEVICE)
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=15) * 4   # some values past 1, 8, ...
    slots = torch.randperm(num_pages * page_size, device=DEVICE)[:tokens]
    caches = [torch.zeros(num_pages, page_size, 2, kv_heads, head_dim, dtype=FP8, device=DEVICE) for _ in range(2)]
    cuda.rope_store_kv(qkv.clone(), cuda.rope_inputs(rope.table, positions), None, 1e-6, caches[0], slots, heads,
                       kv_heads, head_dim)
    reference.rope_store_kv(qkv.clone(), reference.rope_inputs(rope.table, positions), None, 1e-6, caches[1], slots,
                            heads, kv_heads, head_dim)
    stored_k, stored_r = (c.view(-1, 2, kv_heads, head_dim)[slots].float() for c in caches)
    assert torch.equal(stored_k[:, 1], stored_r[:, 1])   # V: one rounding of the same values
    # K: rotated in float by both, rounded to dtype then e4m3; a value at a rounding boundary may go either way.
    assert rel_error(stored_k[:, 0], stored_r[:, 0]) < 1e-2
    assert (stored_k[:, 0] == stored_r[:, 0]).float().mean() > 0.99


# --- attention ---------------------------------------------------------------------------------------------

def paged_cache(lengths: list[int], page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    """(clean cache, cache with every unwritten slot NaN, page table [B, max_pages] int64, per-seq pages)."""
    rng = random.Random(seed)
    need = [max(1, -(-n // page_size)) for n in lengths]
    pool = list(range(sum(need) + 5))
    rng.shuffle(pool)
    clean = randn(len(pool), page_size, 2, kv_heads, head_dim, dtype=dtype, seed=seed)
    poisoned = torch.full_like(clean, float("nan"))
    pages = [[pool.pop() for _ in range(count)] for count in need]
    for n, seq_pages in zip(lengths, pages):
        for pos in range(n):
            page, offset = seq_pages[pos // page_size], pos % page_size
            poisoned[page, offset] = clean[page, offset]
    width = max(need)
    table = torch.tensor([p + [p[0]] * (width - len(p)) for p in pages], device=DEVICE)
    return clean, poisoned, table, pages


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 7, 8, 16])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_decode_attention(cuda, dtype, head_dim, group, page_size):
    lengths = [1, 15, 16, 17, 63, 64, 65, 255, 256, 257, 1000, 4096, 8192]
    kv_heads = 2
    clean, poisoned, table, _ = paged_cache(lengths, page_size, kv_heads, head_dim, dtype, seed=head_dim + group)
    q = randn(len(lengths), kv_heads * group, head_dim, dtype=dtype, seed=9)
    check_decode(cuda, q, clean, poisoned, table, lengths, TOLERANCE[dtype])


def check_decode(cuda, q: torch.Tensor, clean: torch.Tensor, poisoned: torch.Tensor, table: torch.Tensor,
                 lengths: list[int], tolerance: float) -> None:
    """Decode attention over `poisoned` against the reference over `clean`, under the engine's split count for
    this batch and a small one under which long sequences take long splits."""
    kv_heads = clean.shape[3]
    seq_lens = torch.tensor(lengths, device=DEVICE)
    out = torch.empty_like(q)
    mask = (torch.arange(max(lengths), device=DEVICE) < seq_lens[:, None]).view(len(lengths), 1, 1, -1)
    ref = reference.decode_attention(q, clean, table, max(lengths), mask)
    for max_splits in (cuda.decode_splits(max(lengths), len(lengths), kv_heads), 3):
        cuda.decode_attention(out, q, poisoned, table, seq_lens, max_splits=max_splits)
        for b, n in enumerate(lengths):
            assert rel_error(out[b], ref[b]) < tolerance, f"decode, length {n}, {max_splits} splits"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("page_size", [1, 16])
def test_attention_over_an_fp8_cache(cuda, dtype, head_dim, group, page_size):
    """Decode and extend attention reading an e4m3 cache (widened to dtype in shared memory) against the reference
    over the same cache: only the arithmetic differs, as with a 16-bit cache."""
    kv_heads = 2
    heads = kv_heads * group
    lengths = [1, 17, 64, 65, 257, 1000, 4096]
    clean, poisoned, table, _ = paged_cache(lengths, page_size, kv_heads, head_dim, dtype, seed=head_dim + group + 1)
    q = randn(len(lengths), heads, head_dim, dtype=dtype, seed=19)
    check_decode(cuda, q, clean.to(FP8), poisoned.to(FP8), table, lengths, TOLERANCE[dtype])

    chunks = [(0, 1), (0, 37), (16, 17), (100, 64), (1000, 130)]
    clean, poisoned, table, pages = paged_cache([c + n for c, n in chunks], page_size, kv_heads, head_dim, dtype,
                                                seed=head_dim * group + 2)
    q = randn(sum(n for _, n in chunks), heads, head_dim, dtype=dtype, seed=23)
    check_extend(cuda, q, clean.to(FP8), poisoned.to(FP8), table, pages, chunks, page_size, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_fp8_cache_widens_every_e4m3_value_exactly(cuda, dtype):
    """A sequence of one position attends to it alone: decode attention returns its V row, so each of the 254
    e4m3 values (all but the NaNs, which the cache never holds), subnormals included, must come back exactly."""
    values = torch.arange(256, dtype=torch.int32, device=DEVICE)
    values[(values & 0x7F) == 0x7F] = 0
    cache = torch.zeros(2, 1, 2, 1, 128, dtype=torch.uint8, device=DEVICE)
    cache[:, 0, 1, 0] = values.to(torch.uint8).view(2, 128)   # V rows: bytes 0..127, then 128..255
    cache = cache.view(FP8)
    q = randn(2, 1, 128, dtype=dtype, seed=31)
    out = torch.empty_like(q)
    cuda.decode_attention(out, q, cache, torch.tensor([[0], [1]], device=DEVICE), torch.tensor([1, 1], device=DEVICE),
                          max_splits=1)
    assert torch.equal(out[:, 0], cache[:, 0, 1, 0].to(dtype))


def test_decode_attention_does_not_depend_on_the_batch(cuda):
    """A sequence's output is bitwise the same alone and in a batch under one split count, and under any split
    count that gives it splits of DECODE_SPLIT."""
    lengths = [3000, 17, 700, 5000]
    clean, _, table, _ = paged_cache(lengths, 16, 8, 128, torch.bfloat16, seed=11)
    q = randn(len(lengths), 32, 128, dtype=torch.bfloat16, seed=12)
    seq_lens = torch.tensor(lengths, device=DEVICE)
    for max_splits in (128, 7):
        together = torch.empty_like(q)
        cuda.decode_attention(together, q, clean, table, seq_lens, max_splits=max_splits)
        for b in range(len(lengths)):
            alone = torch.empty_like(q[b:b + 1])
            own = -(-lengths[b] // cuda.DECODE_SPLIT) if max_splits == 128 else max_splits
            cuda.decode_attention(alone, q[b:b + 1], clean, table[b:b + 1], seq_lens[b:b + 1], max_splits=own)
            assert torch.equal(alone[0], together[b]), (lengths[b], max_splits)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_attention_of_sequences_longer_than_every_split(cuda, head_dim):
    """Past DECODE_SPLIT * max_splits positions a split covers several runs of DECODE_SPLIT; results match the
    reference, and a short sequence's equal its result alone in a launch of one split."""
    longest = cuda.DECODE_SPLIT * cuda.DECODE_MAX_SPLITS
    lengths = [longest + 1, 2 * longest + 300, longest - 5, 40]
    clean, poisoned, table, _ = paged_cache(lengths, 16, 2, head_dim, torch.bfloat16, seed=21)
    q = randn(len(lengths), 8, head_dim, dtype=torch.bfloat16, seed=22)
    seq_lens = torch.tensor(lengths, device=DEVICE)
    out = torch.empty_like(q)
    assert cuda.decode_splits(max(lengths), len(lengths), 2) == cuda.DECODE_MAX_SPLITS
    cuda.decode_attention(out, q, poisoned, table, seq_lens, max_splits=cuda.DECODE_MAX_SPLITS)
    mask = (torch.arange(max(lengths), device=DEVICE) < seq_lens[:, None]).view(len(lengths), 1, 1, -1)
    ref = reference.decode_attention(q, clean, table, max(lengths), mask)
    for b, n in enumerate(lengths):
        assert rel_error(out[b], ref[b]) < TOLERANCE[torch.bfloat16], f"length {n}"
    alone = torch.empty_like(q[3:])
    cuda.decode_attention(alone, q[3:], clean, table[3:], seq_lens[3:], max_splits=1)
    assert torch.equal(alone[0], out[3])


def extend_metadata(chunks: list[tuple[int, int]], table: torch.Tensor, pages: list[list[int]], page_size: int,
                    num_decodes: int = 0) -> AttentionMetadata:
    """chunks: (context_len, new tokens) per sequence."""
    starts = [sum(n for _, n in chunks[:i]) for i in range(len(chunks) + 1)]
    extends = [ExtendSeq(num_decodes + starts[i], n, ctx, table[i]) for i, (ctx, n) in enumerate(chunks)]
    slots = [pages[i][p // page_size] * page_size + p % page_size for i, (ctx, n) in enumerate(chunks)
             for p in range(ctx, ctx + n)]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=DEVICE), num_decodes=num_decodes, extends=extends,
        extend_query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        extend_seq_lens=torch.tensor([ctx + n for ctx, n in chunks], dtype=torch.int32, device=DEVICE),
        extend_page_table=table)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_extend_attention(cuda, dtype, head_dim, group, page_size):
    chunks = [(0, 1), (0, 37), (15, 1), (16, 17), (100, 64), (0, 200), (1000, 130), (63, 65)]
    kv_heads = 2
    lengths = [ctx + n for ctx, n in chunks]
    clean, poisoned, table, pages = paged_cache(lengths, page_size, kv_heads, head_dim, dtype, seed=head_dim * group)
    q = randn(sum(n for _, n in chunks), kv_heads * group, head_dim, dtype=dtype, seed=13)
    check_extend(cuda, q, clean, poisoned, table, pages, chunks, page_size, TOLERANCE[dtype])


def check_extend(cuda, q: torch.Tensor, clean: torch.Tensor, poisoned: torch.Tensor, table: torch.Tensor,
                 pages: list[list[int]], chunks: list[tuple[int, int]], page_size: int, tolerance: float) -> None:
    """Extend attention of `chunks` (context, new tokens) over `poisoned` against the reference over `clean`, each
    chunk's own K/V read from the cache in q's dtype, as the engine hands them to the reference."""
    kv_heads, head_dim = clean.shape[3], clean.shape[4]
    meta = extend_metadata(chunks, table, pages, page_size)
    out = torch.full_like(q, float("nan"))
    cuda.extend_attention(out, q, poisoned, meta)
    row = 0
    for i, (ctx, n) in enumerate(chunks):
        kv_new = clean.view(-1, 2, kv_heads, head_dim)[meta.slot_mapping[row:row + n]].to(q.dtype)
        ref = reference.extend_attention(q[row:row + n], kv_new, clean, table[i], ctx)
        assert rel_error(out[row:row + n], ref) < tolerance, f"extend, chunk {(ctx, n)}"
        row += n


def test_paged_attention_mixed_step(cuda):
    """Decode rows and a ragged batch of extends (fresh prefills, a chunk on a cached prefix) in one step, as the
    model runs it."""
    dtype, page_size, kv_heads, head_dim, heads = torch.bfloat16, 16, 8, 128, 32
    decodes, chunks = [40, 513, 7], [(0, 90), (0, 300), (300, 33)]
    lengths = decodes + [ctx + n for ctx, n in chunks]
    clean, poisoned, table, pages = paged_cache(lengths, page_size, kv_heads, head_dim, dtype, seed=21)
    meta = extend_metadata(chunks, table[len(decodes):], pages[len(decodes):], page_size, num_decodes=len(decodes))
    meta.decode_page_table, meta.decode_seq_lens = table[:len(decodes)], torch.tensor(decodes, device=DEVICE)
    meta.decode_max_seq_len = max(decodes)
    meta.decode_kv_mask = (torch.arange(max(decodes), device=DEVICE) < meta.decode_seq_lens[:, None]).view(3, 1, 1, -1)
    dec_slots = [pages[i][(n - 1) // page_size] * page_size + (n - 1) % page_size for i, n in enumerate(decodes)]
    meta.slot_mapping = torch.cat([torch.tensor(dec_slots, device=DEVICE), meta.slot_mapping])
    q = randn(len(decodes) + sum(n for _, n in chunks), heads, head_dim, dtype=dtype, seed=22)
    kv = clean.view(-1, 2, kv_heads, head_dim)[meta.slot_mapping]
    out = cuda.paged_attention(q, kv, poisoned, meta, heads, head_dim)
    ref = reference.paged_attention(q, kv, clean, meta, heads, head_dim)
    assert rel_error(out, ref) < TOLERANCE[dtype]


# --- sampling ----------------------------------------------------------------------------------------------

def sampler_requests(params: list[dict], seed: int):
    from minisrv.sampling_params import SamplingParams
    from minisrv.scheduler.request import Request

    rng = random.Random(seed)
    requests = []
    for i, p in enumerate(params):
        request = Request(rid=i, prompt_ids=[1, 2, 3], params=SamplingParams(**p), seed=rng.getrandbits(63))
        request.output_ids = [5] * rng.randrange(0, 40)
        requests.append(request)
    return requests


def fused_and_reference(vocab: int):
    from minisrv.engine.sampling import FusedSampler, Sampler
    from minisrv.kernels import cuda as ops

    return FusedSampler(vocab, [], DEVICE, ops), Sampler(vocab, [], DEVICE)


KINDS = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=50, top_p=0.9),
         dict(temperature=0.7, top_p=0.95), dict(temperature=1.3, top_k=7), dict(temperature=0.9, min_p=0.05),
         dict(temperature=1.0, top_k=2000, top_p=0.5), dict(temperature=2.0, top_p=0.99, min_p=0.01)]


@pytest.mark.parametrize("vocab", [1000, 49152, 128256])
def test_sampling_equals_the_reference_sampler(cuda, vocab):
    rows = 96
    logits = randn(rows, vocab, dtype=torch.float32, seed=vocab) * 3
    requests = sampler_requests([KINDS[i % len(KINDS)] for i in range(rows)], seed=vocab)
    fused, ref = fused_and_reference(vocab)
    got = [r.token_id for r in fused(logits, requests)]
    want = [r.token_id for r in ref(logits, requests)]
    # Masses summed in another order can tip a draw that lands within rounding of a boundary: rare.
    agree = sum(g == w for g, w in zip(got, want)) / rows
    print(f"vocab {vocab}: {agree:.3f} of rows agree with the reference sampler")
    assert agree >= 0.97
    greedy = [i for i in range(rows) if requests[i].params.temperature == 0.0]
    assert all(got[i] == want[i] for i in greedy)


class BitmaskRow:
    """A grammar stand-in that allows a fixed set of tokens (a TokenConstraint)."""

    def __init__(self, words: torch.Tensor) -> None:
        self.words = words

    def fill_bitmask(self, address: int, num_bytes: int) -> None:
        ctypes.memmove(address, self.words.data_ptr(), num_bytes)


@pytest.mark.parametrize("vocab", [1000, 49152, 128256])
def test_grammar_bitmasks_inside_the_kernel_equal_masking_the_logits(cuda, vocab):
    """Rows with random grammar bitmasks (some allowing a handful of tokens, some none but one, some without a
    grammar) drawn by the kernel with the mask agree with the reference sampler on -inf-masked logits."""
    from minisrv.engine.grammar import bitmask_biases, bitmask_words

    rows, words = 64, bitmask_words(vocab)
    logits = randn(rows, vocab, dtype=torch.float32, seed=vocab + 7) * 3
    requests = sampler_requests([KINDS[i % len(KINDS)] for i in range(rows)], seed=vocab + 7)
    gen = torch.Generator().manual_seed(vocab)
    allowed = torch.zeros(rows, words * 32, dtype=torch.bool)
    for i, request in enumerate(requests):
        if i % 4 == 3:
            allowed[i, :vocab] = True
            continue   # no grammar
        density = [0.5, 0.01, 0.0][i % 3]
        allowed[i, :vocab] = torch.rand(vocab, generator=gen) < density
        allowed[i, torch.randint(vocab, (1,), generator=gen)] = True   # never an empty set
        bits = allowed[i].view(words, 32).int() << torch.arange(32, dtype=torch.int32)
        request.grammar = BitmaskRow(bits.sum(dim=1, dtype=torch.int64).to(torch.int32))
    biases = bitmask_biases(torch.stack([r.grammar.words if r.grammar else torch.full((words,), -1, dtype=torch.int32)
                                         for r in requests]), vocab)
    assert torch.equal(biases == 0, allowed[:, :vocab])
    fused, ref = fused_and_reference(vocab)
    got = [r.token_id for r in fused(logits, requests)]
    want = [r.token_id for r in ref(logits, requests)]   # the reference masks the logits (grammar_biases)
    assert all(allowed[i, t] for i, t in enumerate(got)), "the kernel drew a token the grammar refuses"
    agree = sum(g == w for g, w in zip(got, want)) / rows
    print(f"vocab {vocab}: {agree:.3f} of masked rows agree with the reference sampler")
    assert agree >= 0.97
    assert all(got[i] == want[i] for i in range(rows) if requests[i].params.temperature == 0.0)


def test_seeded_sampling_does_not_depend_on_the_batch(cuda):
    vocab = 32000
    logits = randn(40, vocab, dtype=torch.float32, seed=31) * 2
    requests = sampler_requests([KINDS[i % len(KINDS)] for i in range(40)], seed=31)
    fused, _ = fused_and_reference(vocab)
    together = [r.token_id for r in fused(logits, requests)]
    order = list(range(40))
    random.Random(5).shuffle(order)
    shuffled = [r.token_id for r in fused(logits[order], [requests[i] for i in order])]
    assert [shuffled[order.index(i)] for i in range(40)] == together
    assert [fused(logits[i:i + 1], [requests[i]])[0].token_id for i in range(0, 40, 7)] == together[::7]


def test_nan_and_infinite_rows_give_ids_in_range(cuda):
    vocab = 5000
    logits = randn(6, vocab, dtype=torch.float32, seed=41)
    logits[0] = float("nan")
    logits[1] = -float("inf")
    logits[2, ::2] = float("nan")
    logits[3, 1234] = float("inf")
    logits[4, :] = -float("inf")
    logits[4, 77] = 1.0
    requests = sampler_requests([dict(temperature=0.8, top_k=50, top_p=0.9)] * 3 + [dict(temperature=1.0)] * 3, 41)
    fused, ref = fused_and_reference(vocab)
    got = [r.token_id for r in fused(logits, requests)]
    assert all(0 <= t < vocab for t in got)
    assert got[0] == 0 and got[1] == 0 and got[2] % 2 == 1 and got[3] == 1234 and got[4] == 77
    assert got[:2] + got[3:5] == [r.token_id for r in ref(logits, requests)][:2] + [1234, 77]


def test_sampled_frequencies_follow_the_filtered_distribution(cuda):
    """Chi-square of 40,000 draws (different seeds) from one row against the top-k/top-p/min-p filtered softmax."""
    vocab, draws = 2000, 40_000
    row = randn(1, vocab, dtype=torch.float32, seed=51) * 2
    params = dict(temperature=0.8, top_k=100, top_p=0.9, min_p=0.01)
    requests = sampler_requests([params] * draws, seed=51)
    fused, ref = fused_and_reference(vocab)
    tokens = torch.tensor([r.token_id for r in fused(row.expand(draws, vocab), requests)])
    # The filtered distribution, in float64, from the reference's own masking.
    masked = row.clone() / 0.8
    floor = masked.max() + math.log(0.01)
    masked[masked < floor] = -math.inf
    from minisrv.engine.sampling import _apply_top_k_top_p
    _apply_top_k_top_p(masked, torch.tensor([100], device=DEVICE), torch.tensor([0.9], device=DEVICE))
    probs = torch.softmax(masked.double(), dim=-1)[0].cpu()
    kept = probs > 0
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[~kept].sum() == 0, "a token outside the filtered set was drawn"
    expected_counts = probs[kept] * draws
    statistic = ((counts[kept] - expected_counts) ** 2 / expected_counts).sum()
    # The chi-square survival function with kept - 1 degrees of freedom.
    pvalue = torch.special.gammaincc(torch.tensor((int(kept.sum()) - 1) / 2, dtype=torch.float64), statistic / 2)
    print(f"chi-square over {int(kept.sum())} kept tokens: {statistic:.1f}, p = {pvalue:.3f}")
    assert pvalue > 1e-3


@pytest.mark.parametrize("vocab", [1000, 128256])
def test_logprobs_equal_log_softmax(cuda, vocab):
    logits = randn(9, vocab, dtype=torch.float32, seed=61) * 3
    tops = [None, 0, 1, 5, 20, None, 3, 20, 2]
    requests = sampler_requests([dict(temperature=0.0 if i % 2 else 1.0, logprobs=n) for i, n in enumerate(tops)], 61)
    fused, _ = fused_and_reference(vocab)
    results = fused(logits, requests)
    expected = torch.log_softmax(logits, dim=-1)
    for i, (n, result) in enumerate(zip(tops, results)):
        if n is None:
            assert result.logprob is None
            continue
        assert abs(result.logprob - expected[i, result.token_id].item()) < 1e-4
        values, ids = expected[i].topk(n) if n else (expected[i][:0], expected[i][:0].long())
        assert result.top_ids == ids.tolist()
        assert max([abs(a - b) for a, b in zip(result.top_logprobs, values.tolist())], default=0) < 1e-4
