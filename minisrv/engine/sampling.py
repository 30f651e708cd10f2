"""Batched next-token sampling: greedy or random per row, with vLLM V1's semantics and order.

Per step, for rows with mixed parameters:
  1. grammar masks, min_tokens bans, logit_bias and repetition/presence/frequency penalties (penalties.py);
  2. greedy rows (temperature < 1e-5, vLLM's cut-off) take the argmax and stop there;
  3. random rows: logits / temperature, then min-p, top-k, top-p, each masking tokens to -inf;
  4. one draw per row by inverse transform over the kept tokens in vocabulary order, with the uniform
     from Philox keyed by (seed, output position) (philox.py).
Logprobs come from log_softmax of the RAW logits (vLLM V1's default "raw_logprobs"), so greedy and
sampled rows report the model's own distribution; rows that ask for none pay nothing.
NaN logits count as -inf, and a row whose largest logit is not finite is sampled greedily: all -inf gives
token 0, +inf the first +inf, so no row can produce an out-of-range id.

`Sampler` is the PyTorch implementation (the CPU path and the oracle); `FusedSampler` runs the same
semantics on the CUDA kernels of csrc/sampling.cu, one launch for every row's token (and one for logprobs).

Why inverse transform and not an exponential race (argmax(p / E)): it needs one random number per row
instead of one per vocabulary entry, which is what makes the CPU path cheap, and a CUDA kernel can do
the same scan (as FlashInfer's samplers do). Every per-row quantity below (softmax, cumsum, top-k
values, thresholds) is computed row by row, so a row's token depends only on its own logits, seed and
position, never on the batch around it.

Top-k and top-p are thresholds on the row's logits, so ties at the cut are kept (vLLM does the same
for top-k). Top-p sorts only a candidate prefix (torch.topk) and falls back to a full sort for rows
whose nucleus does not fit in it (16x wider each time): a full sort of a 49k vocabulary costs ~3 ms a
row on a CPU core, a top-256 ~0.1 ms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minisrv.engine.grammar import grammar_bitmasks
from minisrv.engine.penalties import apply_logit_adjustments, banned_stop_ids, output_positions
from minisrv.engine.philox import uniform_draws
from minisrv.scheduler.request import Request, SampleResult

GREEDY_TEMPERATURE = 1e-5          # below this a row is greedy (vLLM's _SAMPLING_EPS); also avoids logits / 0
NUCLEUS_CANDIDATES = 256           # top-p first looks for its nucleus among this many most likely tokens


class Sampler:
    """Chooses one token per logits row; see the module docstring for the semantics."""

    def __init__(self, vocab_size: int, eos_token_ids: list[int], device: torch.device | str = "cpu"):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if any(not 0 <= t < vocab_size for t in eos_token_ids):
            raise ValueError(f"eos_token_ids must lie in [0, vocab_size={vocab_size}), got {eos_token_ids}")
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = torch.device(device)

    def check(self, logits: torch.Tensor, requests: list[Request]) -> None:
        if logits.dim() != 2 or logits.shape[0] != len(requests) or logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits must be [len(requests)={len(requests)}, >= vocab_size={self.vocab_size}], "
                             f"got {tuple(logits.shape)}")

    def __call__(self, logits: torch.Tensor, requests: list[Request], positions: list[int] | None = None,
                 bitmask: torch.Tensor | None = None) -> list[SampleResult]:
        """positions: the output index each row's token will have (default: len(output_ids)); it keys the
        random draw and the min_tokens bans. bitmask: the rows' grammar masks when filled already (MaskFiller)."""
        self.check(logits, requests)
        if not requests:
            return []
        positions = output_positions(requests) if positions is None else positions
        # A padded vocabulary's tail is not part of the model's distribution: drop it before anything else.
        raw_logits = logits[:, : self.vocab_size].to(self.device, torch.float32)
        adjusted = apply_logit_adjustments(raw_logits, requests, self.eos_token_ids, positions, bitmask=bitmask)
        # A NaN anywhere in a row makes its max NaN: one reduction finds them (isnan() over every logit took
        # 0.3 ms a step for 16 rows on the CPU).
        row_max = adjusted.amax(dim=-1)
        if bool(row_max.isnan().any()):
            adjusted = torch.where(adjusted.isnan(), -math.inf, adjusted)
            row_max = adjusted.amax(dim=-1)
        finite_max = torch.isfinite(row_max).tolist()

        greedy_rows = [i for i, r in enumerate(requests) if r.params.temperature < GREEDY_TEMPERATURE
                       or not finite_max[i]]
        random_rows = [i for i, r in enumerate(requests) if r.params.temperature >= GREEDY_TEMPERATURE
                       and finite_max[i]]
        if not random_rows:
            token_ids = greedy_tokens(adjusted)
        elif not greedy_rows:
            # The sampling path works in place; the raw logits must survive for logprobs.
            owned = adjusted if adjusted is not raw_logits else adjusted.clone(memory_format=torch.contiguous_format)
            token_ids = self._sample_random(owned, requests, positions)
        else:
            token_ids = torch.empty(len(requests), dtype=torch.long, device=self.device)
            greedy_index = self._index(greedy_rows)
            token_ids[greedy_index] = greedy_tokens(adjusted[greedy_index])
            random_index = self._index(random_rows)
            token_ids[random_index] = self._sample_random(adjusted[random_index], [requests[i] for i in random_rows],
                                                          [positions[i] for i in random_rows])
        return self._results(raw_logits, token_ids, requests)

    def _index(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _floats(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def _sample_random(self, logits: torch.Tensor, requests: list[Request], positions: list[int]) -> torch.Tensor:
        """Token ids for rows that sample; `logits` is a private copy, modified in place."""
        logits.div_(self._floats([r.params.temperature for r in requests])[:, None])

        min_p = [r.params.min_p for r in requests]
        if any(m > 0.0 for m in min_p):
            # p < min_p * p_max  <=>  logit < max_logit + log(min_p): no softmax needed.
            log_min_p = self._floats([math.log(m) if m > 0.0 else -math.inf for m in min_p])
            floor = logits.amax(dim=-1, keepdim=True) + log_min_p[:, None]
            logits.masked_fill_(logits < floor, -math.inf)

        truncated_rows = [i for i, r in enumerate(requests) if _top_k(r, self.vocab_size) < self.vocab_size
                          or r.params.top_p < 1.0]
        if truncated_rows:
            index = self._index(truncated_rows)
            top_k = torch.tensor([_top_k(requests[i], self.vocab_size) for i in truncated_rows],
                                 dtype=torch.long, device=self.device)
            top_p = self._floats([requests[i].params.top_p for i in truncated_rows])
            if len(truncated_rows) == len(requests):
                _apply_top_k_top_p(logits, top_k, top_p)
            else:
                truncated = logits[index]
                _apply_top_k_top_p(truncated, top_k, top_p)
                logits[index] = truncated

        # Inverse transform in vocabulary order; masked tokens add exactly 0, so the cumulative sum is flat
        # there and they can never be the first entry above the target. softmax, not exp: torch.exp takes a
        # scalar slow path on -inf or underflowing inputs (measured 5-20x slower on masked rows).
        cumulative = torch.softmax(logits, dim=-1).cumsum_(dim=-1)
        total = cumulative[:, -1:].contiguous()
        uniforms = uniform_draws([r.seed for r in requests], positions)
        target = torch.from_numpy(uniforms).to(self.device)[:, None] * total
        chosen = torch.searchsorted(cumulative, target, right=True)
        # u can be exactly 1 (cuRAND's range is (0, 1]): then take the last token with mass, i.e. the
        # first index where the cumulative sum reaches its total.
        last_kept = torch.searchsorted(cumulative, total, right=False)
        return torch.minimum(chosen, last_kept).squeeze(1)

    def _results(self, raw_logits: torch.Tensor, token_ids: torch.Tensor,
                 requests: list[Request]) -> list[SampleResult]:
        """One SampleResult per row, with logprobs (of the raw logits) for the rows that ask for them."""
        results = [SampleResult(token_id=t) for t in token_ids.tolist()]
        logprob_rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        if logprob_rows:
            index = self._index(logprob_rows)
            tops = [requests[i].params.logprobs for i in logprob_rows]
            for row, result in zip(logprob_rows, logprob_results(raw_logits[index], token_ids[index], tops)):
                results[row] = result
        return results


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first largest logit, as argmax. max(dim) finds the same index, and on the CPU in a third of
    argmax's time (16 rows of 49152: 0.21 against 0.58 ms, 2 threads)."""
    return logits.max(dim=-1).indices


def logprob_results(logits: torch.Tensor, token_ids: torch.Tensor, tops: list[int],
                    ranks: bool = False) -> list[SampleResult]:
    """Per row: the log-softmax of `logits` at its token, and its `tops` likeliest tokens with theirs; with
    `ranks`, also the token's rank (1 + the tokens strictly likelier)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids[:, None])
    rank = ((logprobs > chosen).sum(dim=-1) + 1).tolist() if ranks else [0] * len(tops)
    max_top = max(tops, default=0)
    top_values, top_ids = logprobs.topk(max_top, dim=-1) if max_top else (None, None)
    top_values_list = top_values.tolist() if max_top else [[]] * len(tops)
    top_ids_list = top_ids.tolist() if max_top else [[]] * len(tops)
    return [SampleResult(token, logprob, top_ids_list[j][:n], top_values_list[j][:n], rank[j])
            for j, (token, logprob, n) in enumerate(zip(token_ids.tolist(), chosen.squeeze(1).tolist(), tops))]


@dataclass
class DeviceSamples:
    """A step's tokens (and logprobs) on their way from the GPU: the copies to pinned host memory are queued
    behind the step, so reading them is the one wait on the GPU an engine step needs."""

    tokens: torch.Tensor                           # [rows] int64, pinned host memory
    logprobs: tuple[torch.Tensor, ...] | None      # (chosen, top ids, top values), pinned host memory
    tops: list[int]                                # logprobs asked per row, -1 for none
    ready: torch.cuda.Event

    def results(self) -> list[SampleResult]:
        self.ready.synchronize()
        results = [SampleResult(token_id=t) for t in self.tokens.tolist()]
        if self.logprobs is None:
            return results
        chosen, top_ids, top_values = (t.tolist() for t in self.logprobs)
        for row, n in enumerate(self.tops):
            if n >= 0:
                result = results[row]
                result.logprob = chosen[row]
                result.top_ids, result.top_logprobs = top_ids[row][:n], top_values[row][:n]
        return results


# The per-row parameters of the sampling kernel, in the order of its two parameter tensors.
FLOAT_PARAMS = ("temperature", "top_p", "min_p")
INT_PARAMS = ("top_k", "seed", "position")


class FusedSampler(Sampler):
    """Sampler's semantics on the CUDA kernels: min_tokens bans and penalties with the same PyTorch ops on the
    device, then one kernel launch picks every row's token and, when some row asks, one more computes
    logprobs. Per-row parameters travel in two small tensors ([FLOAT_PARAMS] float32, [INT_PARAMS] int64);
    the decode graphs (minisrv/engine/cuda_graph.py) keep them in static buffers and run `draw` inside."""

    def __init__(self, vocab_size: int, eos_token_ids: list[int], device: torch.device | str, ops) -> None:
        super().__init__(vocab_size, eos_token_ids, device)
        self.ops = ops   # minisrv.kernels.cuda

    def __call__(self, logits: torch.Tensor, requests: list[Request], positions: list[int] | None = None,
                 bitmask: torch.Tensor | None = None) -> list[SampleResult]:
        self.check(logits, requests)
        if not requests:
            return []
        positions = output_positions(requests) if positions is None else positions
        return self.launch(logits, requests, positions, bitmask=bitmask).results()

    @staticmethod
    def params(requests: list[Request], positions: list[int]) -> tuple[list[list[float]], list[list[int]]]:
        """The rows of the two parameter tensors for these requests."""
        floats = [[r.params.temperature for r in requests], [r.params.top_p for r in requests],
                  [r.params.min_p for r in requests]]
        return floats, [[r.params.top_k for r in requests], [r.seed for r in requests], list(positions)]

    def draw(self, logits: torch.Tensor, floats: torch.Tensor, ints: torch.Tensor,
             out: torch.Tensor | None = None, bitmasks: torch.Tensor | None = None) -> torch.Tensor:
        """One launch: a token per row of float32 logits, parameters as device tensors [3, rows], grammar
        bitmasks (engine/grammar.py) if any."""
        return self.ops.sample(logits, floats[0], ints[0], floats[1], floats[2], ints[1], ints[2], self.vocab_size,
                               out=out, bitmasks=bitmasks)

    def needs_adjustment(self, requests: list[Request], positions: list[int], grammars: bool = True) -> bool:
        """Whether some row has min_tokens bans, logit_bias, penalties or (unless `grammars` is False) a grammar:
        what `draw` alone does not apply (it takes grammar bitmasks, but does not fill them)."""
        # The cheap tests first: this runs for every row of every step.
        return any((grammars and r.grammar is not None) or r.params.penalised or r.params.logit_bias
                   or (pos < r.params.min_tokens and banned_stop_ids(r, self.eos_token_ids, pos))
                   for r, pos in zip(requests, positions))

    def launch(self, logits: torch.Tensor, requests: list[Request], positions: list[int],
               params: tuple[torch.Tensor, torch.Tensor] | None = None,
               out: torch.Tensor | None = None, bitmask: torch.Tensor | None = None) -> DeviceSamples:
        """Queue the whole sampling of a step; `params` are the parameter tensors when already on the device,
        `bitmask` the grammar masks when filled already (else filled here)."""
        raw_logits = logits if logits.dtype == torch.float32 else logits.float()   # kernels read vocab_size columns
        adjusted = apply_logit_adjustments(raw_logits[:, : self.vocab_size], requests, self.eos_token_ids, positions,
                                           grammars=False)
        if params is None:
            floats, ints = self.params(requests, positions)
            params = (torch.tensor(floats, dtype=torch.float32).to(self.device, non_blocking=True),
                      torch.tensor(ints, dtype=torch.int64).to(self.device, non_blocking=True))
        if bitmask is None:
            bitmask = grammar_bitmasks(requests, self.vocab_size, self.device)
        tokens = self.draw(adjusted, *params, out=out, bitmasks=bitmask)
        return self.finish(raw_logits, tokens, requests)

    def finish(self, raw_logits: torch.Tensor, tokens: torch.Tensor, requests: list[Request]) -> DeviceSamples:
        """Queue the logprobs some rows ask for and the copies of everything to the host."""
        tops = [-1 if r.params.logprobs is None else r.params.logprobs for r in requests]
        host_logprobs = None
        if max(tops) >= 0:
            num_top = torch.tensor(tops, dtype=torch.int32).to(self.device, non_blocking=True)
            found = self.ops.logprobs(raw_logits, tokens, num_top, max(tops), self.vocab_size)
            host_logprobs = tuple(_to_pinned(t) for t in found)
        host_tokens = _to_pinned(tokens)
        ready = torch.cuda.Event()
        ready.record()
        return DeviceSamples(host_tokens, host_logprobs, tops, ready)


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _top_k(request: Request, vocab_size: int) -> int:
    k = request.params.top_k
    return vocab_size if k <= 0 else min(k, vocab_size)


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       num_candidates: int = NUCLEUS_CANDIDATES) -> None:
    """Mask to -inf, in place, what top-k and then top-p over the top-k survivors remove (vLLM's order).

    top_k [rows] (vocab_size when off), top_p [rows] (1.0 when off). Top-p keeps the smallest prefix of the
    descending order whose mass reaches top_p (at least one token): token j stays iff the mass strictly
    before it is < top_p. Both cuts become logit thresholds, so tokens tied with the last kept one stay.
    The nucleus is searched among the `num_candidates` most likely tokens, 16x more for rows where it
    does not fit, up to the whole vocabulary (a full sort).
    """
    vocab_size = logits.shape[1]
    needs_top_k = top_k < vocab_size
    needs_top_p = top_p < 1.0
    largest_k = int(top_k[needs_top_k].max()) if bool(needs_top_k.any()) else 0
    width = min(vocab_size, max(largest_k, num_candidates if bool(needs_top_p.any()) else 0))
    values, ids = logits.topk(width, dim=-1)

    k_floor = values.gather(1, (top_k.clamp(max=width) - 1)[:, None])
    logits.masked_fill_(logits < torch.where(needs_top_k[:, None], k_floor, -math.inf), -math.inf)
    if not bool(needs_top_p.any()):
        return

    # Probabilities after top-k (softmax of the masked row), in descending order.
    sorted_probs = logits.softmax(dim=-1).gather(1, ids)
    mass_through = sorted_probs.cumsum(dim=-1)
    num_kept = 1 + (mass_through[:, :-1] < top_p[:, None]).sum(dim=-1)
    # The nucleus is known when the candidates reach top_p, or hold every token top-k left.
    resolved = (mass_through[:, -1] >= top_p) | (top_k <= width) | ~needs_top_p
    p_floor = values.gather(1, (num_kept - 1)[:, None])
    logits.masked_fill_(logits < torch.where((needs_top_p & resolved)[:, None], p_floor, -math.inf), -math.inf)
    if bool(resolved.all()):
        return
    # Flat distributions: look again, among more candidates, in the rows not resolved (only top-k applied).
    unresolved = (~resolved).nonzero().squeeze(1)
    retry = logits[unresolved]
    _apply_top_k_top_p(retry, top_k[unresolved], top_p[unresolved], num_candidates=num_candidates * 16)
    logits[unresolved] = retry
