"""Linear: the oneDNN-packed CPU path computes what F.linear computes, for any batch size and dtype."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minisrv.models.linear import Linear, onednn_packing_available

pytestmark = pytest.mark.skipif(not onednn_packing_available(), reason="this PyTorch build has no oneDNN packing")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_matches_f_linear(dtype, tol, bias):
    gen = torch.Generator().manual_seed(0)
    layer = Linear(96, 200, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(200, 96, generator=gen))
        if bias:
            layer.bias.copy_(torch.randn(200, generator=gen))
    weight = layer.weight.detach().clone()
    bias_value = layer.bias.detach().clone() if bias else None
    layer.pack()
    assert layer.weight is None and layer.packed is not None
    layer.pack()   # idempotent
    for rows in (1, 3, 16, 41):
        x = torch.randn(rows, 96, generator=gen).to(dtype)
        expected = F.linear(x.float(), weight.float(), None if bias_value is None else bias_value.float())
        got = layer(x)
        assert got.dtype == dtype and got.shape == (rows, 200)
        torch.testing.assert_close(got.float(), expected, atol=tol * expected.abs().max().item(), rtol=tol)


def test_tied_head_keeps_the_embedding_weight():
    embedding = torch.nn.Embedding(50, 16)
    head = Linear(16, 50)
    head.weight = embedding.weight
    x = torch.randn(2, 16)
    expected = F.linear(x, embedding.weight).detach()
    head.pack()
    assert embedding.weight.shape == (50, 16)      # dropping the head's reference leaves the embedding whole
    torch.testing.assert_close(head(x), expected, atol=1e-4, rtol=1e-4)
