"""The engine's KV page pool: how many bytes a page takes, and one zeroed tensor per layer.

The layout of a layer's pool ([num_pages, page_size, 2, num_kv_heads, head_dim]) is the attention
kernels' (minisrv/kernels/reference.py); the scheduler's page allocator hands out its page ids.
"""
from __future__ import annotations

import torch

from minisrv.config import FP8_KV_CACHE_DTYPES
from minisrv.models.config import ModelConfig


# --kv-cache-dtype's 8-bit choices; "auto" keeps the model's dtype. e4m3 keeps 3 bits of mantissa (a value within
# 6% of its own) up to +-448, where keys and values of the models here stay.
FP8_KV_DTYPES = dict.fromkeys(FP8_KV_CACHE_DTYPES, torch.float8_e4m3fn)


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype --kv-cache-dtype `name` gives a model computing in `model_dtype`."""
    return FP8_KV_DTYPES.get(name, model_dtype)


def kv_cache_bytes_per_page(model_config: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    """Bytes one page takes across all layers (K and V)."""
    per_token = model_config.num_layers * 2 * model_config.num_kv_heads * model_config.head_dim
    return per_token * page_size * torch.empty((), dtype=dtype).element_size()


def allocate_kv_cache(model_config: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype,
                      device: torch.device | str) -> list[torch.Tensor]:
    """One tensor per layer, [num_pages, page_size, 2, num_kv_heads, head_dim], carved from one allocation.

    Zero-filled, not empty: padded slots are masked out of the scores, but a masked V still meets a zero
    probability, and 0 * NaN from uninitialized memory would poison the output.
    """
    pool = torch.zeros(model_config.num_layers, num_pages, page_size, 2, model_config.num_kv_heads,
                       model_config.head_dim, dtype=dtype, device=device)
    return list(pool.unbind(0))
