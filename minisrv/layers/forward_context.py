"""The one piece of global mutable state in minisrv: the attention metadata of the step being computed.

The model runner builds an `AttentionMetadata` (minisrv/kernels/attention_metadata.py) per step and installs
it around the model's forward with `forward_context(...)`; every attention layer reads it through
`get_forward_context()`. Passing it down through each module's forward would thread a parameter through code
that never looks at it.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from minisrv.kernels.attention_metadata import AttentionMetadata, ExtendSeq

__all__ = ["AttentionMetadata", "ExtendSeq", "ForwardContext", "decode_rows", "forward_context", "get_forward_context"]


@dataclass
class ForwardContext:
    attn: AttentionMetadata
    # Leading rows of generated tokens: the decodes, then the rows of drafted sequences (speculative decoding),
    # which the CPU's weight-only kernels take as they take decodes (None: the decodes alone).
    num_generated_rows: int | None = None


_FORWARD_CONTEXT: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _FORWARD_CONTEXT is None:
        raise RuntimeError("no forward context: run the model inside `with forward_context(...)`")
    return _FORWARD_CONTEXT


def decode_rows(rows: int) -> int:
    """How many of the `rows` leading rows of a layer's input are generated tokens (decodes, and drafts after
    them): the step's count inside a forward context (they come first, prompt rows after), all of them outside one
    (the LM head's rows)."""
    if _FORWARD_CONTEXT is None:
        return rows
    generated = _FORWARD_CONTEXT.num_generated_rows
    return min(rows, _FORWARD_CONTEXT.attn.num_decodes if generated is None else generated)


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _FORWARD_CONTEXT
    previous, _FORWARD_CONTEXT = _FORWARD_CONTEXT, ctx
    try:
        yield ctx
    finally:
        _FORWARD_CONTEXT = previous
