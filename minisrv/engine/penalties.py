"""Logit adjustments that can change the greedy choice: grammar masks, min_tokens bans, logit_bias and
repetition/presence/frequency penalties.

Semantics and order follow vLLM V1 (the structured-output bitmask first; then its logits processors: min-tokens,
logit bias; then penalties):
- grammar: tokens a request's grammar does not allow get -inf (minisrv/engine/grammar.py).
- min_tokens: while a request has fewer than params.min_tokens output tokens, its stop_token_ids and
  (unless ignore_eos) the EOS ids get -inf, so it cannot stop early.
- logit_bias: each listed token's logit gets its bias added.
- repetition_penalty (the CTRL paper's, as transformers and vLLM apply it) over prompt AND output
  tokens: a seen token's positive logit is divided by the penalty, a negative one multiplied.
- frequency_penalty and presence_penalty (OpenAI's definition) over OUTPUT tokens only:
  logit -= frequency * count + presence * (count > 0).
Rows that use none of these cost nothing; the input tensor is never modified.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from minisrv.engine.grammar import grammar_biases
from minisrv.scheduler.request import Request


def uses_penalties(request: Request) -> bool:
    return request.params.penalised


def output_positions(requests: Sequence[Request]) -> list[int]:
    """The output index of each request's next token when nothing is in flight: len(output_ids)."""
    return [len(r.output_ids) for r in requests]


def banned_stop_ids(request: Request, eos_token_ids: Sequence[int], position: int) -> list[int]:
    """Token ids this request may not sample at output index `position` because min_tokens is not reached."""
    params = request.params
    if position >= params.min_tokens:
        return []
    eos = [] if params.ignore_eos else list(eos_token_ids)
    return eos + list(params.stop_token_ids)


def apply_logit_adjustments(logits: torch.Tensor, requests: Sequence[Request], eos_token_ids: Sequence[int],
                            positions: Sequence[int] | None = None, grammars: bool = True,
                            bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """logits [rows, vocab] (row i is requests[i], whose token will have output index positions[i]) with
    grammar masks (filled here unless `bitmask` holds them; none if `grammars` is False: the fused kernel takes
    them itself), min_tokens bans and penalties applied; grammars and penalties see output_ids, so such a
    request has no token in flight. Returns `logits` itself when no row needs anything, else a new contiguous
    tensor.
    """
    vocab_size = logits.shape[1]
    positions = output_positions(requests) if positions is None else positions
    bans = [banned_stop_ids(request, eos_token_ids, pos) for request, pos in zip(requests, positions)]
    penalised = [uses_penalties(request) for request in requests]
    biased = [request.params.logit_bias for request in requests]
    constrained = grammars and any(request.grammar is not None for request in requests)
    if not any(penalised) and not any(bans) and not any(biased) and not constrained:
        return logits
    masks = grammar_biases(logits, requests, bitmask) if constrained else None
    # A new tensor for the steps below to adjust in place; with masks, their sum (one pass over the logits, not two).
    adjusted = logits.clone(memory_format=torch.contiguous_format) if masks is None else logits + masks
    if any(bans):
        rows, ids = _flatten_token_lists(bans, "stop_token_ids", requests, vocab_size, logits.device)
        adjusted[rows, ids] = float("-inf")
    if any(biased):
        rows, ids = _flatten_token_lists([list(b) for b in biased], "logit_bias", requests, vocab_size, logits.device)
        bias = torch.tensor([v for b in biased for v in b.values()], dtype=logits.dtype).to(logits.device)
        adjusted[rows, ids] += bias
    if any(penalised):
        _penalise(adjusted, requests, penalised)
    return adjusted


def _penalise(logits: torch.Tensor, requests: Sequence[Request], penalised: list[bool]) -> None:
    """vLLM's apply_penalties, in place, touching only the (row, token) entries that were seen.

    A row sees a few thousand tokens at most, so working on flat (row * vocab + token) keys costs far
    less than vLLM's dense [rows, vocab] count and mask tensors.
    """
    vocab_size = logits.shape[1]
    device = logits.device
    flat_logits = logits.view(-1)

    def row_values(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=logits.dtype, device=device)

    outputs = [r.output_ids if use else [] for r, use in zip(requests, penalised)]
    rows, ids = _flatten_token_lists(outputs, "output_ids", requests, vocab_size, device)
    output_keys, output_counts = torch.unique(rows * vocab_size + ids, return_counts=True)

    repetition = row_values([r.params.repetition_penalty for r in requests])
    if bool((repetition != 1.0).any()):
        # Prompts are only scanned for rows that use a repetition penalty: they can be long.
        prompts = [r.prompt_ids if r.params.repetition_penalty != 1.0 else [] for r in requests]
        rows, ids = _flatten_token_lists(prompts, "prompt_ids", requests, vocab_size, device)
        seen_keys = torch.unique(torch.cat([rows * vocab_size + ids, output_keys]))
        seen = flat_logits[seen_keys]
        factor = repetition[seen_keys // vocab_size]
        flat_logits[seen_keys] = torch.where(seen > 0, seen / factor, seen * factor)

    output_rows = output_keys // vocab_size
    frequency = row_values([r.params.frequency_penalty for r in requests])[output_rows]
    presence = row_values([r.params.presence_penalty for r in requests])[output_rows]
    # Two subtractions in vLLM's order, so results match its formula to the last bit.
    flat_logits[output_keys] = flat_logits[output_keys] - frequency * output_counts.to(logits.dtype) - presence


def _flatten_token_lists(lists: Sequence[Sequence[int]], field_name: str, requests: Sequence[Request],
                         vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) tensors for a ragged list of token lists, ids checked against the vocabulary."""
    lengths = np.fromiter((len(ids) for ids in lists), dtype=np.int64, count=len(lists))
    # np.fromiter is ~10x faster than torch.tensor on long Python lists (prompts run to thousands of ids).
    ids = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(lengths.sum()))
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad_row = next(i for i, row in enumerate(lists) if any(not 0 <= t < vocab_size for t in row))
        raise ValueError(f"request {requests[bad_row].rid}: {field_name} holds a token id outside "
                         f"[0, {vocab_size}): {[t for t in lists[bad_row] if not 0 <= t < vocab_size][:5]}")
    rows = np.repeat(np.arange(len(lists), dtype=np.int64), lengths)
    return torch.from_numpy(rows).to(device), torch.from_numpy(ids).to(device)
