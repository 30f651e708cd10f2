"""Structured output in the engine: llguidance matchers that decide which tokens a request may sample.

A request's grammar (SamplingParams.grammar, made by minisrv/structured_output.py) is compiled against the
model's tokenizer once per distinct grammar; each request gets a copy of that compiled matcher (~40 us). Per
step, every constrained row's matcher writes its row of a token bitmask (32 tokens per int32 word: row by row on
the engine's thread, or all rows in one call on MaskFiller's) and the tokens it leaves out are -inf to everything
that chooses (grammar_biases on the CPU; on the GPU the fused sampling kernel reads the bitmask itself, no
masked copy of the logits made), so greedy and sampled rows, logit_bias and penalties all choose among allowed
tokens only. The sampled token then advances the matcher (Scheduler.postprocess); once the grammar is complete
and only an end of sequence may follow, the request finishes with "stop" without spending a step on that token.

The matcher's state follows the request's recorded output, so a preempted request (recomputed from its
tokens) resumes with it unchanged. Under overlap scheduling the mask of step N+1 depends on step N's token:
LLMEngine launches N+1's forward, records N while the device runs it, and as soon as N's tokens have advanced the
matchers MaskFiller fills N+1's masks on a thread of its own, while the engine finishes recording N and schedules
and prepares N+2; N+1's tokens are drawn from the masked logits just before N+2 is launched
(ModelRunner.sample_deferred).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from minisrv.scheduler.request import Request

COMPILED_KEPT = 256   # distinct grammars whose compiled matchers are kept for copying
# Threads of llguidance's pool that fill a step's masks beside the engine thread. More were no faster on the H200
# machine: 64 masks took 0.6-0.7 ms with 1 thread, 0.6-0.9 ms with 2, 4 or 8.
MASK_FILL_THREADS = 1
# Fewer rows with a grammar are filled on the engine thread: handing them over (two thread wake-ups, 0.1-0.2 ms on
# the H200 machine) costs about what filling 16 does there.
MASK_THREAD_MIN_ROWS = 32


class RequestGrammar:
    """One request's matcher (the scheduler's TokenConstraint)."""

    def __init__(self, matcher) -> None:
        self.matcher = matcher     # llguidance.LLMatcher

    def fill_bitmask(self, address: int, num_bytes: int) -> None:
        self.matcher.unsafe_compute_mask_ptr(address, num_bytes)

    def advance(self, token_id: int) -> bool:
        """Consume the sampled token; True when the output is complete (nothing but an end may follow)."""
        # A matcher whose mask failed (llguidance's lexer over its limits) allows only an end, and takes it.
        if not self.matcher.consume_token(token_id) or self.matcher.is_error():
            raise ValueError(f"the grammar refused token {token_id}: {self.matcher.get_error()}")
        return self.matcher.is_stopped()


class GrammarCompiler:
    """Compiles grammars against the model's tokenizer, keeping the last COMPILED_KEPT compiled matchers.

    `load_tokenizer` gives the `tokenizers` Tokenizer; it is read at the first grammar, not at start-up
    (building llguidance's token trie takes about half a second). Thread-safe: the scheduler process compiles
    on a worker thread, and llguidance releases the GIL while it builds a grammar."""

    def __init__(self, load_tokenizer: Callable[[], object], vocab_size: int, eos_token_ids: list[int],
                 capacity: int = COMPILED_KEPT) -> None:
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.capacity = capacity
        self._ll_tokenizer = None
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, grammar: str) -> RequestGrammar:
        """A fresh matcher for `grammar`; ValueError (fit for the client) when llguidance rejects it."""
        return RequestGrammar(self._compiled_matcher(grammar).deep_copy())

    def validate(self, grammar: str) -> None:
        """ValueError (fit for the client) when llguidance rejects `grammar`: compile's check, without a matcher."""
        self._compiled_matcher(grammar)

    def _compiled_matcher(self, grammar: str):
        from llguidance import LLMatcher

        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled
            tokenizer = self._tokenizer()
        compiled = LLMatcher(tokenizer, grammar, log_level=0)   # outside the lock: this is the slow part
        if compiled.is_error():
            raise ValueError(f"grammar: {compiled.get_error()}")
        with self._lock:
            self._compiled[grammar] = compiled
            if len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        return compiled

    def tokenizer_json(self) -> str:
        """The tokenizer as JSON, for a grammar process to compile against."""
        return self._load_tokenizer().to_str()

    def _tokenizer(self):
        if self._ll_tokenizer is None:
            from llguidance import LLTokenizer

            # The model's vocabulary can be wider than the tokenizer's (padded); its EOS ids end a grammar.
            self._ll_tokenizer = LLTokenizer(self._load_tokenizer().to_str(), n_vocab=self.vocab_size,
                                             eos_token=self.eos_token_ids)
        return self._ll_tokenizer


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def grammar_bitmasks(requests: list[Request], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """Every row's allowed tokens as a bitmask on `device` (all allowed for rows without a grammar), or None
    when no row has a grammar. The fused sampling kernel takes it as it is."""
    bitmask = host_bitmasks(requests, vocab_size, device)
    return None if bitmask is None else bitmask.to(device, non_blocking=True)


def host_bitmasks(requests: list[Request], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """grammar_bitmasks still on the host (pinned when `device` is a GPU), for a caller that copies them into a
    buffer of its own (DecodeGraphs.draw_masked): one copy to the device, not two."""
    constrained = _constrained_rows(requests)
    if not constrained:
        return None
    bitmask = _empty_bitmask(requests, constrained, vocab_size, device)
    # Rows by address, not as tensor views: a view per row cost more than llguidance's ~6 us mask at batch 64.
    address, row_bytes = bitmask.data_ptr(), bitmask.shape[1] * 4
    for i in constrained:
        requests[i].grammar.fill_bitmask(address + i * row_bytes, row_bytes)
    return bitmask


def _constrained_rows(requests: list[Request]) -> list[int]:
    return [i for i, r in enumerate(requests) if r.grammar is not None]


def _empty_bitmask(requests: list[Request], constrained: list[int], vocab_size: int,
                   device: torch.device) -> torch.Tensor:
    """A host bitmask for `requests` whose rows without a grammar (not in `constrained`) allow everything."""
    # A fresh pinned buffer per step: the caching host allocator reuses one only once its copy has run.
    bitmask = torch.empty(len(requests), bitmask_words(vocab_size), dtype=torch.int32,
                          pin_memory=device.type == "cuda")
    if len(constrained) < len(requests):
        bitmask[[i for i, r in enumerate(requests) if r.grammar is None]] = -1
    return bitmask


class PendingMasks:
    """A step's bitmasks while MaskFiller's thread fills them."""

    def __init__(self, filled: Future, bitmask: torch.Tensor) -> None:
        self._filled, self._bitmask = filled, bitmask

    def result(self) -> torch.Tensor:
        """The bitmasks, still on the host (as host_bitmasks gives them), once filled (re-raises what the fill
        raised)."""
        self._filled.result()
        return self._bitmask


class MaskFiller:
    """Fills a step's grammar bitmasks on a thread of its own, so the engine thread can prepare the next step
    meanwhile (at batch 64 the masks took 0.4-1.1 ms a step on the H200 machine's host, a third to a half of its
    work).

    One call of llguidance's executor fills every row (RequestGrammar's matchers) with the GIL released; until the
    masks are drawn from (PendingMasks.result), nothing else may touch those matchers. `start` hands the worker the
    GIL until that call has begun: a thread waiting for the GIL gets it only at the holder's next blocking call or
    after the interpreter's switch interval (5 ms), so without the handover the masks would be filled after the
    engine's work, not beside it."""

    def __init__(self, threads: int = MASK_FILL_THREADS, min_rows: int = MASK_THREAD_MIN_ROWS) -> None:
        self.threads = threads
        self.min_rows = max(1, min_rows)   # fewer rows with a grammar: start() leaves them to the draw
        self._worker: ThreadPoolExecutor | None = None
        self._executor = None   # llguidance.LLExecutor

    def start(self, requests: list[Request], vocab_size: int, device: torch.device) -> PendingMasks | None:
        """Begin filling the masks of `requests` (their grammars advanced past every recorded token); None when
        fewer than min_rows rows have a grammar (the draw fills theirs itself)."""
        constrained = _constrained_rows(requests)
        if len(constrained) < self.min_rows:
            return None
        if self._worker is None:
            from llguidance import LLExecutor

            self._executor = LLExecutor(self.threads)
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        bitmask = _empty_bitmask(requests, constrained, vocab_size, device)
        matchers = [(requests[i].grammar.matcher, i) for i in constrained]
        begun = threading.Event()

        def fill() -> None:
            begun.set()
            self._executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), bitmask.shape[1] * 4,
                                                   len(requests))

        filled = self._worker.submit(fill)
        begun.wait()
        return PendingMasks(filled, bitmask)


def grammar_biases(logits: torch.Tensor, requests: list[Request], bitmask: torch.Tensor | None = None
                   ) -> torch.Tensor | None:
    """What added to `logits` makes -inf every logit a row's grammar does not allow (rows without a grammar are
    kept); None when no row has a grammar. The masks are filled here unless `bitmask` holds them already."""
    if bitmask is None:
        bitmask = grammar_bitmasks(requests, logits.shape[1], logits.device)
    return None if bitmask is None else bitmask_biases(bitmask, logits.shape[1], logits.dtype)


def bitmask_biases(bitmask: torch.Tensor, vocab_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[rows, words] int32 -> [rows, vocab_size]: 0 where the mask allows the token, -inf where it does not; bit b
    of word w is token 32 * w + b. Each byte of the mask picks its eight biases from a table of the 256 bytes':
    on the CPU several times cheaper than unpacking the bits to booleans for masked_fill, whose kernel is slow
    (64 rows of a 49,152-token vocabulary alone: 1.1 ms with the add, against 8.3 ms)."""
    device = bitmask.device
    bits = torch.arange(256, device=device).unsqueeze(1).bitwise_right_shift(torch.arange(8, device=device)) & 1
    table = torch.zeros(256, 8, dtype=dtype, device=device).masked_fill_(bits == 0, float("-inf"))
    mask_bytes = bitmask.contiguous().view(torch.uint8).reshape(-1).long()   # little-endian: byte k, bits 8k..8k+7
    return table.index_select(0, mask_bytes).view(bitmask.shape[0], -1)[:, :vocab_size]
