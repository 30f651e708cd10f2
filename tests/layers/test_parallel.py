"""How a tensor-parallel rank's slice of the model is chosen, and that the slices put together are the model."""
from __future__ import annotations

import pytest
import torch

from minisrv.layers.parallel import TensorParallel, partition
from minisrv.models.config import ModelConfig
from minisrv.models.dummy import dummy_checkpoint, load_preset
from minisrv.models.loader import build_model
from minisrv.models.weights import load_weights


@pytest.mark.parametrize(("total", "parts"), [(9, 2), (1536, 2), (7, 3), (8, 8), (3, 4)])
def test_partition_covers_everything_once_and_evenly(total: int, parts: int) -> None:
    runs = [partition(total, parts, i) for i in range(parts)]
    assert [start for start, _ in runs] == [sum(count for _, count in runs[:i]) for i in range(parts)]
    assert sum(count for _, count in runs) == total
    assert max(c for _, c in runs) - min(c for _, c in runs) <= 1


def test_heads_split_by_whole_gqa_groups() -> None:
    # SmolLM2-135M: 9 heads in 3 groups of 3 over 2 ranks -> 2 groups and 1 group.
    assert [TensorParallel(r, 2).heads(9, 3) for r in range(2)] == [(0, 6, 0, 2), (6, 3, 2, 1)]
    # Llama 3 8B: 32 heads, 8 KV heads.
    assert [TensorParallel(r, 2).heads(32, 8) for r in range(2)] == [(0, 16, 0, 4), (16, 16, 4, 4)]


def test_fewer_kv_heads_than_ranks_replicates_the_kv_head_of_each_rank() -> None:
    assert [TensorParallel(r, 4).heads(16, 2) for r in range(4)] == [(0, 4, 0, 1), (4, 4, 0, 1), (8, 4, 1, 1),
                                                                      (12, 4, 1, 1)]
    with pytest.raises(ValueError, match=r"tp_size \(--tp-size\) 4"):
        TensorParallel(0, 4).heads(9, 3)


def test_vocabulary_parts_are_equal_and_cover_the_vocabulary() -> None:
    parts = [TensorParallel(r, 3).vocab(100) for r in range(3)]
    assert parts == [(0, 34), (34, 34), (68, 34)]


def _model(tp: TensorParallel) -> torch.nn.Module:
    config = ModelConfig.from_hf_dict({**load_preset("smollm2-135m"), "num_hidden_layers": 2})
    model = build_model(config, 64, torch.float32, torch.device("cpu"), tp)
    load_weights(model, dummy_checkpoint(config, seed=1, device=torch.device("cpu")))
    return model


def test_rank_parts_put_together_are_the_whole_model() -> None:
    """Each rank loads its part of every checkpoint tensor; the parts of the fused q/k/v, gate/up, o/down and the
    vocabulary matrices, put back in place, are rank-for-rank what a single rank loads (9 heads over 2 ranks:
    uneven)."""
    whole = dict(_model(TensorParallel()).named_parameters())
    parts = [dict(_model(TensorParallel(r, 2)).named_parameters()) for r in range(2)]
    hd, q, kv = 64, 9 * 64, 3 * 64
    qkv = whole["layers.1.self_attn.qkv_proj.weight"]
    q_heads, kv_heads = [6, 3], [2, 1]
    got_q, got_k, got_v = [], [], []
    for part, qh, kh in zip(parts, q_heads, kv_heads):
        local = part["layers.1.self_attn.qkv_proj.weight"]
        got_q.append(local[: qh * hd])
        got_k.append(local[qh * hd: (qh + kh) * hd])
        got_v.append(local[(qh + kh) * hd:])
    assert torch.equal(torch.cat(got_q), qkv[:q])
    assert torch.equal(torch.cat(got_k), qkv[q: q + kv])
    assert torch.equal(torch.cat(got_v), qkv[q + kv:])
    assert torch.equal(torch.cat([p["layers.0.self_attn.o_proj.weight"] for p in parts], 1),
                       whole["layers.0.self_attn.o_proj.weight"])
    assert torch.equal(torch.cat([p["layers.0.mlp.down_proj.weight"] for p in parts], 1),
                       whole["layers.0.mlp.down_proj.weight"])
    gate_up = [p["layers.0.mlp.gate_up_proj.weight"].chunk(2) for p in parts]
    assert torch.equal(torch.cat([g for g, _ in gate_up] + [u for _, u in gate_up]),
                       whole["layers.0.mlp.gate_up_proj.weight"])
    assert torch.equal(torch.cat([p["embed_tokens.weight"] for p in parts]), whole["embed_tokens.weight"])
    assert torch.equal(parts[1]["norm.weight"], whole["norm.weight"])
