"""What the attention ops read about a step: where each new token's K/V goes, and what each sequence attends to.

Token rows of a step are ordered: first one row per decoding sequence (a single new token each), then the
new tokens of each extending sequence (prefill, possibly a chunk continuing a cached prefix), sequence by
sequence. Tensors live on the model's device; the decode tensors have fixed meaning per batch slot, so a
CUDA backend can copy them into static buffers and replay a captured graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ExtendSeq:
    """One sequence with several new tokens this step (host-side values for the reference backend's loop)."""

    query_start: int      # first row of its new tokens in the step's flat token order
    query_len: int        # number of new tokens
    context_len: int      # tokens already in its KV pages before this step (0: a fresh prefill)
    pages: torch.Tensor   # [ceil((context_len + query_len) / page_size)] int64 page ids (a row of extend_page_table)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor          # [T] int64: page * page_size + offset for each new token's K/V
    num_decodes: int                    # rows [0, num_decodes) are single-token decodes, one per sequence
    decode_page_table: torch.Tensor | None = None   # [num_decodes, max_pages] int64, padded with page 0
    decode_seq_lens: torch.Tensor | None = None     # [num_decodes] int64, cached tokens incl. the new one
    decode_max_seq_len: int = 0                      # at least max(decode_seq_lens), known on the host
    decode_kv_mask: torch.Tensor | None = None      # [num_decodes, 1, 1, decode_max_seq_len] bool, True =
    #                                                 attend; None when every length equals the maximum
    extends: list[ExtendSeq] = field(default_factory=list)
    # The extend part as tensors, for kernels that take the whole ragged batch at once.
    extend_query_start_loc: torch.Tensor | None = None  # [num_extends + 1] int32, offsets from row num_decodes
    extend_seq_lens: torch.Tensor | None = None         # [num_extends] int32, context_len + query_len
    extend_page_table: torch.Tensor | None = None       # [num_extends, max_pages] int64, padded with page 0
    # Kernels may keep what they derive from the above once per step here (every layer reads the same step).
    derived: dict[str, object] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]
