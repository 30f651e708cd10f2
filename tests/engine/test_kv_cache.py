"""The KV page pool: one zeroed tensor per layer, and the bytes a page takes."""
from __future__ import annotations

import torch

from minisrv.engine.kv_cache import allocate_kv_cache, kv_cache_bytes_per_page
from minisrv.models.config import ModelConfig


def test_pool_allocation_and_page_bytes():
    config = ModelConfig.from_hf_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=50, hidden_size=48,
                                           intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
                                           num_key_value_heads=2))
    caches = allocate_kv_cache(config, num_pages=5, page_size=4, dtype=torch.bfloat16, device="cpu")
    assert len(caches) == 3 and all(c.shape == (5, 4, 2, 2, 8) and c.dtype == torch.bfloat16 for c in caches)
    assert all(not c.any() for c in caches)
    assert kv_cache_bytes_per_page(config, 4, torch.bfloat16) == sum(c[0].numel() * 2 for c in caches)
