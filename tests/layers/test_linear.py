"""Linear: the oneDNN-packed CPU path computes what F.linear computes, for any batch size and dtype."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minisrv.layers.forward_context import AttentionMetadata, ForwardContext, forward_context
from minisrv.layers.linear import (INT4_GROUP, PACK_MIN_ELEMENTS, WEIGHT_ONLY_MAX_ROWS, Linear,
                                  onednn_packing_available)

pytestmark = pytest.mark.skipif(not onednn_packing_available(), reason="this PyTorch build has no oneDNN packing")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_matches_f_linear(dtype, tol, bias):
    gen = torch.Generator().manual_seed(0)
    out = PACK_MIN_ELEMENTS // 96 + 1
    layer = Linear(96, out, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out, 96, generator=gen))
        if bias:
            layer.bias.copy_(torch.randn(out, generator=gen))
    weight = layer.weight.detach().clone()
    bias_value = layer.bias.detach().clone() if bias else None
    layer.pack()
    assert layer.weight is None and layer.packed is not None
    layer.pack()   # idempotent
    for rows in (1, 3, 16, 41):
        x = torch.randn(rows, 96, generator=gen).to(dtype)
        expected = F.linear(x.float(), weight.float(), None if bias_value is None else bias_value.float())
        got = layer(x)
        assert got.dtype == dtype and got.shape == (rows, out)
        torch.testing.assert_close(got.float(), expected, atol=tol * expected.abs().max().item(), rtol=tol)


def test_tied_head_keeps_the_embedding_weight():
    vocab = PACK_MIN_ELEMENTS // 16
    embedding = torch.nn.Embedding(vocab, 16)
    head = Linear(16, vocab)
    head.weight = embedding.weight
    x = torch.randn(2, 16)
    expected = F.linear(x, embedding.weight).detach()
    head.pack()
    assert head.packed is not None and embedding.weight.shape == (vocab, 16)   # the embedding keeps its weight
    torch.testing.assert_close(head(x), expected, atol=1e-4, rtol=1e-4)


def test_small_weights_stay_plain():
    layer = Linear(8, 8)
    layer.pack()
    assert layer.packed is None and layer.weight is not None


@pytest.mark.parametrize("bias", [False, True])
def test_int8_weight_only_matches_f_linear_on_the_dequantized_weight(bias):
    """Up to WEIGHT_ONLY_MAX_ROWS rows the weight-only int8 path computes F.linear with the per-channel dequantized
    weight, up to the bfloat16 rounding of its activations (the weight is off by at most half a step of its
    channel's scale); larger inputs use the float32 weight as before."""
    gen = torch.Generator().manual_seed(1)
    layer = Linear(64, 48, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 64, generator=gen) * 0.1)
        if bias:
            layer.bias.copy_(torch.randn(48, generator=gen))
    weight = layer.weight.detach().clone()
    bias_value = layer.bias.detach().clone() if bias else None
    layer.quantize_int8_weight_only()
    assert layer.int8_weight.dtype == torch.int8
    scales = layer.int8_scales.float()
    dequantized = layer.int8_weight.float() * scales[:, None]
    assert ((dequantized - weight).abs() <= scales[:, None] * 0.5 + 1e-2 * scales[:, None]).all()
    for rows in (1, WEIGHT_ONLY_MAX_ROWS, WEIGHT_ONLY_MAX_ROWS + 1, 33):
        x = torch.randn(rows, 64, generator=gen)
        expected = F.linear(x, dequantized if rows <= WEIGHT_ONLY_MAX_ROWS else weight, bias_value)
        got = layer(x)
        assert got.dtype == torch.float32 and got.shape == (rows, 48)
        torch.testing.assert_close(got, expected, atol=2e-2 * expected.abs().max().item(), rtol=2e-2)


@pytest.mark.parametrize("bias", [False, True])
def test_int4_weight_only_matches_f_linear_on_the_dequantized_weight(bias):
    """Up to WEIGHT_ONLY_MAX_ROWS rows the weight-only int4 path computes F.linear with the weight dequantized from
    its levels, scales and zeros (each value within half a step of its group's scale, plus the bfloat16 rounding of
    the zero); larger inputs use the float32 weight. Widths the kernel cannot take are left alone."""
    gen = torch.Generator().manual_seed(2)
    layer = Linear(3 * INT4_GROUP, 48, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 3 * INT4_GROUP, generator=gen) * 0.1 + 0.05)
        if bias:
            layer.bias.copy_(torch.randn(48, generator=gen))
    weight = layer.weight.detach().clone()
    bias_value = layer.bias.detach().clone() if bias else None
    layer.quantize_int4_weight_only()
    assert layer.describe() == f"int4 up to {WEIGHT_ONLY_MAX_ROWS} rows, else float32"   # the start-up log's words
    scales, zeros = layer.int4_scales_zeros.float().unbind(-1)            # [groups, out] each
    groups = weight.view(48, 3, INT4_GROUP)
    levels = ((groups - zeros.t()[..., None]) / scales.t()[..., None]).round().add(8).clamp(0, 15)
    dequantized = ((levels - 8) * scales.t()[..., None] + zeros.t()[..., None]).view(48, -1)
    step = scales.t().repeat_interleave(INT4_GROUP, dim=1)
    assert ((dequantized - weight).abs() <= step * 0.5 + 4e-3 * weight.abs().amax()).all()
    for rows in (1, WEIGHT_ONLY_MAX_ROWS, WEIGHT_ONLY_MAX_ROWS + 1, 33):
        x = torch.randn(rows, 3 * INT4_GROUP, generator=gen)
        expected = F.linear(x, dequantized if rows <= WEIGHT_ONLY_MAX_ROWS else weight, bias_value)
        got = layer(x)
        assert got.dtype == torch.float32 and got.shape == (rows, 48)
        torch.testing.assert_close(got, expected, atol=2e-2 * expected.abs().max().item(), rtol=2e-2)

    for columns, rows in ((INT4_GROUP + 8, 16), (INT4_GROUP, 20)):
        odd = Linear(columns, rows)
        with torch.no_grad():
            odd.weight.copy_(torch.randn(rows, columns, generator=gen))
        odd.quantize_int4_weight_only()
        assert odd.int4_weight is None and odd.weight is not None


def test_prompt_rows_always_meet_the_full_weight_and_decode_rows_the_weight_only_kernel():
    """Inside a step, only its decode rows (at most WEIGHT_ONLY_MAX_ROWS) take the int4 kernel: a prompt's rows
    compute the same whether decodes share their step or not, and however few of them there are (a prompt whose
    prefix was cached leaves a few rows), so a seeded request samples alike with and without the prefix cache."""
    gen = torch.Generator().manual_seed(3)
    layer = Linear(4 * INT4_GROUP, 64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(64, 4 * INT4_GROUP, generator=gen) * 0.1)
    weight = layer.weight.detach().clone()
    layer.quantize_int4_weight_only()
    x = torch.randn(2 + 3, 4 * INT4_GROUP, generator=gen)
    alone = layer(x[:2])                                       # no step: the row count decides
    assert not torch.allclose(alone, F.linear(x[:2], weight), atol=1e-5)   # the int4 kernel's own numbers
    with forward_context(ForwardContext(AttentionMetadata(slot_mapping=torch.zeros(5, dtype=torch.long),
                                                          num_decodes=2))):
        mixed = layer(x)
    with forward_context(ForwardContext(AttentionMetadata(slot_mapping=torch.zeros(3, dtype=torch.long),
                                                          num_decodes=0))):
        prompt_only = layer(x[2:])
    torch.testing.assert_close(mixed[:2], alone)
    torch.testing.assert_close(mixed[2:], F.linear(x[2:], weight), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prompt_only, F.linear(x[2:], weight), atol=1e-5, rtol=1e-5)
