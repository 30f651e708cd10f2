"""Paged attention (kernels/reference.py through layers/attention.py) against a naive dense implementation."""
from __future__ import annotations

import math
import random

import pytest
import torch

from minisrv.kernels import reference
from minisrv.layers.attention import PagedAttention
from minisrv.layers.forward_context import AttentionMetadata, ExtendSeq, ForwardContext, forward_context

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 6, 2, 16


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int) -> torch.Tensor:
    """q: [n, H, D] at positions first_pos.., k/v: [L, KV, D] for positions 0..L-1; loops, no SDPA."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        visible = first_pos + i + 1
        for h in range(q.shape[1]):
            kh, vh = k[:visible, h // group], v[:visible, h // group]
            weights = torch.softmax(kh @ q[i, h] / math.sqrt(q.shape[2]), dim=0)
            out[i, h] = weights @ vh
    return out


class PagedSequences:
    """Random sequences with K/V written into shuffled pages of a random cache."""

    def __init__(self, lengths: list[int], page_size: int, seed: int) -> None:
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        self.page_size = page_size
        need = [-(-n // page_size) for n in lengths]
        pool = list(range(sum(need) + 3))
        rng.shuffle(pool)
        self.cache = torch.randn(len(pool), page_size, 2, NUM_KV_HEADS, HEAD_DIM, generator=gen)
        self.kv = [torch.randn(n, 2, NUM_KV_HEADS, HEAD_DIM, generator=gen) for n in lengths]
        self.pages = []
        for n, count in zip(lengths, need):
            self.pages.append([pool.pop() for _ in range(count)])
        for kv, pages in zip(self.kv, self.pages):
            reference.store_kv(self.cache, kv, self.slots(pages, 0, len(kv)))

    def slots(self, pages: list[int], start: int, end: int) -> torch.Tensor:
        ps = self.page_size
        return torch.tensor([pages[p // ps] * ps + p % ps for p in range(start, end)])


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_store_kv_places_each_token_in_its_slot(page_size):
    seqs = PagedSequences([7, 20], page_size, seed=page_size)
    for kv, pages in zip(seqs.kv, seqs.pages):
        for pos in range(len(kv)):
            assert torch.equal(seqs.cache[pages[pos // page_size], pos % page_size], kv[pos])


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_decode_attention_matches_naive(page_size):
    lengths = [1, 9, 33, 16]
    seqs = PagedSequences(lengths, page_size, seed=10 + page_size)
    q = torch.randn(len(lengths), NUM_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    width = max(len(p) for p in seqs.pages)
    table = torch.tensor([p + [0] * (width - len(p)) for p in seqs.pages])
    lens = torch.tensor(lengths)
    mask = (torch.arange(max(lengths)) < lens[:, None]).view(len(lengths), 1, 1, -1)
    out = reference.decode_attention(q, seqs.cache, table, max(lengths), mask)
    for b, kv in enumerate(seqs.kv):
        expected = naive_attention(q[b:b + 1], kv[:, 0], kv[:, 1], first_pos=len(kv) - 1)
        torch.testing.assert_close(out[b:b + 1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("context_len", [0, 5, 16])
def test_extend_attention_over_cached_prefix(context_len, dtype):
    page_size, n = 4, 11
    seqs = PagedSequences([context_len + n], page_size, seed=context_len)
    cache, kv = seqs.cache.to(dtype), seqs.kv[0].to(dtype)
    pages = torch.tensor(seqs.pages[0])
    q = torch.randn(n, NUM_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = reference.extend_attention(q, kv[context_len:], cache, pages, context_len)
    expected = naive_attention(q.float(), kv[:, 0].float(), kv[:, 1].float(), first_pos=context_len)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


FP8 = torch.float8_e4m3fn


def test_an_fp8_cache_stores_rounded_values_and_attention_reads_them_back():
    """--kv-cache-dtype fp8: what is stored is the value rounded to e4m3, and attention over the 8-bit cache is
    attention over those rounded values (exactly, in the model's dtype): here against a bfloat16 cache holding
    them."""
    lengths, page_size = [5, 19, 32], 4
    seqs = PagedSequences(lengths, page_size, seed=3)
    wide = torch.zeros_like(seqs.cache, dtype=torch.bfloat16)
    narrow = torch.zeros_like(seqs.cache, dtype=FP8)
    for kv, pages in zip(seqs.kv, seqs.pages):
        slots = seqs.slots(pages, 0, len(kv))
        reference.store_kv(wide, kv.to(torch.bfloat16).to(FP8).to(torch.bfloat16), slots)
        reference.store_kv(narrow, kv.to(torch.bfloat16), slots)
    assert torch.equal(narrow.to(torch.bfloat16), wide)
    q = torch.randn(len(lengths), NUM_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    width = max(len(p) for p in seqs.pages)
    table = torch.tensor([p + [p[0]] * (width - len(p)) for p in seqs.pages])
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).view(len(lengths), 1, 1, -1)
    assert torch.equal(reference.decode_attention(q, narrow, table, max(lengths), mask),
                       reference.decode_attention(q, wide, table, max(lengths), mask))
    for context_len in (0, 12):   # a fresh prefill's own K/V are taken as the cache rounds them, too
        pages = torch.tensor(seqs.pages[2])
        new = seqs.kv[2][context_len:].to(torch.bfloat16)
        rounded = new.to(FP8).to(torch.bfloat16)
        assert torch.equal(reference.extend_attention(q[:1].expand(len(new), -1, -1), new, narrow, pages, context_len),
                           reference.extend_attention(q[:1].expand(len(new), -1, -1), rounded, wide, pages,
                                                      context_len))


@pytest.mark.parametrize("context_len", [0, 16])
def test_extend_attention_takes_the_cpu_flash_kernel(context_len):
    """Not SDPA's math fallback, which materializes every score: it made a 2000-token prefill 3-10x slower."""
    page_size, n = 4, 11
    seqs = PagedSequences([context_len + n], page_size, seed=context_len)
    q = torch.randn(n, NUM_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        reference.extend_attention(q, seqs.kv[0][context_len:], seqs.cache, torch.tensor(seqs.pages[0]), context_len)
    ops = {event.key for event in profile.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops


def test_paged_attention_layer_mixed_step():
    """Stores the step's new K/V through the slot mapping, then attends: 2 decodes then 2 extends."""
    page_size = 4
    totals = [13, 6, 9, 20]           # tokens per sequence after this step
    new = [1, 1, 9, 7]                # new tokens this step (decode, decode, fresh prefill, chunk on a prefix)
    seqs = PagedSequences(totals, page_size, seed=3)
    layer = PagedAttention(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)
    cache = seqs.cache.clone()
    for kv, pages, t, n in zip(seqs.kv, seqs.pages, totals, new):   # wipe what this step must write
        cache.view(-1, 2, NUM_KV_HEADS, HEAD_DIM)[seqs.slots(pages, t - n, t)] = float("nan")
    layer.bind(cache)
    q = torch.randn(sum(new), NUM_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(4))
    kv_new = torch.cat([kv[t - n:] for kv, t, n in zip(seqs.kv, totals, new)])
    slots = torch.cat([seqs.slots(p, t - n, t) for p, t, n in zip(seqs.pages, totals, new)])
    table = torch.tensor([p + [0] * (max(map(len, seqs.pages[:2])) - len(p)) for p in seqs.pages[:2]])
    extends = [ExtendSeq(2, 9, 0, torch.tensor(seqs.pages[2])), ExtendSeq(11, 7, 13, torch.tensor(seqs.pages[3]))]
    mask = (torch.arange(13) < torch.tensor([13, 6])[:, None]).view(2, 1, 1, 13)
    meta = AttentionMetadata(slot_mapping=slots, num_decodes=2, decode_page_table=table,
                             decode_seq_lens=torch.tensor([13, 6]), decode_max_seq_len=13, decode_kv_mask=mask,
                             extends=extends)
    # The layer takes the qkv projection's output; an identity rotation leaves q and k as they are.
    qkv = torch.cat([q.flatten(1), kv_new.flatten(1)], dim=1)
    identity = torch.ones(64, HEAD_DIM // 2, dtype=torch.complex64)
    rope = reference.rope_inputs(identity, torch.arange(sum(new)))
    with forward_context(ForwardContext(meta)):
        out = layer(qkv, rope, None, 1e-6).view(-1, NUM_HEADS, HEAD_DIM)
    assert torch.equal(cache, seqs.cache)    # every NaN was overwritten with the right K/V
    row = 0
    for kv, t, n in zip(seqs.kv, totals, new):
        expected = naive_attention(q[row:row + n], kv[:, 0], kv[:, 1], first_pos=t - n)
        torch.testing.assert_close(out[row:row + n], expected, atol=1e-5, rtol=1e-5)
        row += n


def test_binding_checks_the_pool_shape_and_running_needs_a_forward_context():
    layer = PagedAttention(6, 2, 8)
    with pytest.raises(ValueError, match="kv_cache"):
        layer.bind(torch.zeros(5, 4, 2, 3, 8))
    with pytest.raises(RuntimeError, match="no forward context"):
        layer.bind(torch.zeros(5, 4, 2, 2, 8))
        layer(torch.randn(1, 10 * 8), None, None, 1e-6)
