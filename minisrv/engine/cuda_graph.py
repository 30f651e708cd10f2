"""Decode steps replayed as CUDA graphs: one graph per batch-size bucket, all in one memory pool.

A decode step of a small model is a few hundred kernel launches of a few microseconds of GPU work each;
launched one by one from Python the GPU waits on the host. A graph replays the whole forward (input ids, the
model and the LM head) in one launch, and a second, small one the sampling kernel's draw. Everything a step varies
lives in static device buffers the graphs read: one [len(INT_ROWS), max_bs] int64 buffer, one
[len(FLOAT_PARAMS), max_bs] float32 buffer and the page table, each filled by a single host-to-device copy per
step. A batch runs in the smallest bucket that holds it; padding rows have sequence length 0 and slot -1, so they
write nothing (the KV store skips negative slots, the decode kernel writes zeros) and their tokens are discarded.
The draw is a graph of its own so that a step whose rows have grammars draws only once, after its masks are filled,
from the same logits and parameters: a third graph per bucket draws reading the masks from one more static buffer.
With grammar processes a fourth holds the copy of their masks into that buffer, the draw, and the copies that
publish its tokens back to them: one launch between the masks' arrival and the next step's forward, where the host
would queue five.

Decode attention is launched for the longest length a sequence may reach (max_model_len), with the split count
kernels.cuda.decode_splits gives the bucket: one graph serves every sequence length.
Input ids of tokens still in flight (overlap scheduling) are read on the device from `last_tokens`, where
every step leaves its sampled tokens, through `prev_rows` (-1 where the host knows the id).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from minisrv.engine.grammar import bitmask_words
from minisrv.engine.sampling import FLOAT_PARAMS, INT_PARAMS, FusedSampler
from minisrv.layers.forward_context import AttentionMetadata, ForwardContext, forward_context

logger = logging.getLogger(__name__)

# The per-row integer inputs of a decode step, rows of one buffer; the sampler's parameters come last.
INT_ROWS = ("input_ids", "positions", "slots", "seq_lens", "prev_rows") + INT_PARAMS
ROW = {name: i for i, name in enumerate(INT_ROWS)}
SAMPLER_ROWS = slice(ROW[INT_PARAMS[0]], ROW[INT_PARAMS[-1]] + 1)
# A padding row: no token to store, nothing to attend to, greedy (the cheapest draw).
PADDING = dict(input_ids=0, positions=0, slots=-1, seq_lens=0, prev_rows=-1, top_k=0, seed=0, position=0)
PADDING_COLUMN = np.array([[PADDING[name]] for name in INT_ROWS], dtype=np.int64)


def graph_buckets(max_bs: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, then every multiple of 8 up to max_bs rounded up (the spacing SGLang
    and vLLM use: a batch pads by at most 7 rows)."""
    small = [b for b in (1, 2, 4) if b < max_bs]
    return small + ([max_bs] if max_bs <= 4 else list(range(8, -(-max_bs // 8) * 8 + 1, 8)))


@contextmanager
def _side_stream() -> Iterator[torch.cuda.Stream]:
    """A stream to capture on (graphs are captured off the default stream), in step with the current one before
    and after; every capture is finished when it exits."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield stream
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()


def resolve_input_ids(input_ids: torch.Tensor, prev_rows: torch.Tensor, last_tokens: torch.Tensor) -> torch.Tensor:
    """input_ids with each row whose prev_rows >= 0 replaced by last_tokens[prev_rows] (a token in flight)."""
    from_previous = last_tokens.index_select(0, prev_rows.clamp(min=0))
    return torch.where(prev_rows >= 0, from_previous, input_ids)


@dataclass
class DecodeInputs:
    """A decode batch's rows as host tensors, padded to its bucket."""

    ints: torch.Tensor      # [len(INT_ROWS), bucket] int64, pinned
    floats: torch.Tensor    # [len(FLOAT_PARAMS), bucket] float32, pinned
    page_table: torch.Tensor  # [bucket, pages] int64, pinned
    copied: torch.cuda.Event  # recorded once their copies to the device are queued (DecodeGraphs.run)


class _Staging:
    """Pinned host memory one step's inputs are written to (by numpy, which reads nested lists ~2.5x faster than
    torch.tensor), kept for the engine's life rather than allocated every step; DecodeInputs views it."""

    def __init__(self, max_bs: int, max_pages: int) -> None:
        self.ints = torch.empty(len(INT_ROWS) * max_bs, dtype=torch.int64, pin_memory=True)
        self.floats = torch.empty(len(FLOAT_PARAMS) * max_bs, dtype=torch.float32, pin_memory=True)
        self.page_table = torch.empty(max_bs * max_pages, dtype=torch.int64, pin_memory=True)
        self.copied = torch.cuda.Event()

    def inputs(self, bucket: int, rows: list[list[int]], floats: list[list[float]],
               page_table: list[list[int]]) -> DecodeInputs:
        """The rows written in, each padded to the bucket (and each page list to the longest)."""
        n, width = len(floats[0]), max(len(p) for p in page_table)
        ints = self.ints[: len(INT_ROWS) * bucket].view(len(INT_ROWS), bucket)
        floats_t = self.floats[: len(FLOAT_PARAMS) * bucket].view(len(FLOAT_PARAMS), bucket)
        pages = self.page_table[: bucket * width].view(bucket, width)
        ints_array, floats_array, pages_array = ints.numpy(), floats_t.numpy(), pages.numpy()
        ints_array[:, :n] = rows
        ints_array[:, n:] = PADDING_COLUMN
        floats_array[:, :n] = floats
        floats_array[:, n:] = 0.0
        pages_array[:n] = [p + [0] * (width - len(p)) for p in page_table]
        pages_array[n:] = 0
        return DecodeInputs(ints, floats_t, pages, self.copied)


class DecodeGraphs:
    """The captured decode steps of a model; `run` replays the one for a batch's bucket."""

    def __init__(self, model, sampler: FusedSampler, max_bs: int, max_seq_len: int, page_size: int,
                 last_tokens: torch.Tensor) -> None:
        self.model, self.sampler = model, sampler
        self.buckets = graph_buckets(max_bs)
        self.max_bs = self.buckets[-1]
        self.max_seq_len = max_seq_len
        device = last_tokens.device
        self.ints = torch.tensor([[PADDING[name]] * self.max_bs for name in INT_ROWS], dtype=torch.int64,
                                 device=device)
        self.floats = torch.zeros(len(FLOAT_PARAMS), self.max_bs, dtype=torch.float32, device=device)
        self.page_table = torch.zeros(self.max_bs, -(-max_seq_len // page_size), dtype=torch.int64, device=device)
        self._staging = [_Staging(self.max_bs, self.page_table.shape[1]) for _ in range(2)]
        self._steps = 0
        self.last_tokens = last_tokens
        # One logits buffer for every bucket: a graph's own output would live on in the pool, bucket by bucket.
        self.logits = torch.empty(self.max_bs, model.config.vocab_size, dtype=torch.float32, device=device)
        # A step with grammars draws after its forward, once its masks are filled (model_runner.sample_deferred):
        # from these logits and parameters, in a graph of its own that reads the masks from here.
        self.bitmask = torch.full((self.max_bs, bitmask_words(model.config.vocab_size)), -1, dtype=torch.int32,
                                  device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}   # the forwards
        # Apart from the forwards, so that a step drawing later (grammars, penalties) does not draw twice: over
        # the logits of a batch-64 step of a 128k vocabulary a draw is device time between two forwards.
        self.draws: dict[int, torch.cuda.CUDAGraph] = {}
        self.masked_draws: dict[int, torch.cuda.CUDAGraph] = {}
        self.published_draws: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def bucket(self, batch_size: int) -> int | None:
        """The smallest bucket holding batch_size rows; None when it is too large for any graph."""
        return next((b for b in self.buckets if b >= batch_size), None)

    def forward(self, bs: int) -> torch.Tensor:
        """The decode step's forward on the static buffers' first bs rows: float32 logits."""
        ints = self.ints[:, :bs]
        input_ids = resolve_input_ids(ints[ROW["input_ids"]], ints[ROW["prev_rows"]], self.last_tokens)
        attn = AttentionMetadata(slot_mapping=ints[ROW["slots"]], num_decodes=bs,
                                 decode_page_table=self.page_table[:bs], decode_seq_lens=ints[ROW["seq_lens"]],
                                 decode_max_seq_len=self.max_seq_len)
        with forward_context(ForwardContext(attn)):
            hidden = self.model(input_ids, ints[ROW["positions"]])
        return self.model.compute_logits(hidden, out=self.logits[:bs])

    def _draw(self, bs: int, bitmasks: torch.Tensor | None = None) -> None:
        """Tokens drawn from the logits of the first bs rows into last_tokens[:bs]."""
        self.sampler.draw(self.logits[:bs], self.floats[:, :bs], self.ints[SAMPLER_ROWS, :bs],
                          out=self.last_tokens[:bs], bitmasks=bitmasks)

    @torch.inference_mode()
    def capture(self, buckets: list[int] | None = None) -> float:
        """Capture a graph per bucket, largest first so the smaller ones reuse its pool; returns seconds taken."""
        start = time.perf_counter()
        with _side_stream() as stream:
            for bs in sorted(buckets or self.buckets, reverse=True):
                self.forward(bs)   # warm-up: kernels compiled and loaded, cuBLAS workspaces made, outside the graph
                self._draw(bs)
                self.graphs[bs] = self._captured(stream, partial(self.forward, bs))
                self.pool = self.graphs[bs].pool()
                self.draws[bs] = self._captured(stream, partial(self._draw, bs))
                self.masked_draws[bs] = self._captured(stream, partial(self._draw, bs, self.bitmask[:bs]))
        return time.perf_counter() - start

    def _captured(self, stream: torch.cuda.Stream, work: Callable[[], object]) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            work()
        return graph

    @torch.inference_mode()
    def capture_published_draws(self, masks: torch.Tensor, publish: Callable[[torch.Tensor], None]) -> None:
        """Capture, per bucket, the masked draw between two copies: first the bucket's rows of `masks` (pinned host
        memory the grammar processes fill) into the mask buffer, then, after the draw, `publish` of the tokens
        drawn (queues their copies back to the processes: GrammarProcess.queue_publish)."""
        if masks.shape[0] < self.max_bs:
            raise ValueError(f"{masks.shape[0]} rows of masks for graphs of up to {self.max_bs} rows")

        def published_draw(bs: int) -> None:
            self.bitmask[:bs].copy_(masks[:bs], non_blocking=True)
            self._draw(bs, self.bitmask[:bs])
            publish(self.last_tokens[:bs])

        with _side_stream() as stream:
            for bs in sorted(self.graphs, reverse=True):
                self.published_draws[bs] = self._captured(stream, partial(published_draw, bs))

    def host_inputs(self, bucket: int, rows: dict[str, list[int]], floats: list[list[float]],
                    page_table: list[list[int]]) -> DecodeInputs:
        """One step's inputs in pinned host memory: `rows` holds each INT_ROWS row for the real rows, in order.
        Two staging buffers take turns: when a step's inputs are written, the copies of the step before may still
        wait on the device, but those of the step before that have run (or are waited for here)."""
        staging = self._staging[self._steps % len(self._staging)]
        self._steps += 1
        staging.copied.synchronize()
        return staging.inputs(bucket, [rows[name] for name in INT_ROWS], floats, page_table)

    def run(self, inputs: DecodeInputs, draw: bool = True) -> torch.Tensor:
        """Copy the inputs in and replay the forward, then the draw into last_tokens unless not `draw` (the tokens
        are left for draw, draw_masked or draw_published); returns the bucket's float32 logits (valid until the next
        step)."""
        bucket = inputs.ints.shape[1]
        self.ints[:, :bucket].copy_(inputs.ints, non_blocking=True)
        self.floats[:, :bucket].copy_(inputs.floats, non_blocking=True)
        self.page_table[:bucket, : inputs.page_table.shape[1]].copy_(inputs.page_table, non_blocking=True)
        inputs.copied.record()
        self.graphs[bucket].replay()
        if draw:
            self.draw(bucket)
        return self.logits[:bucket]

    def draw(self, bucket: int) -> None:
        """Draw the tokens of the step last replayed in `bucket` (by run without `draw`) into last_tokens."""
        self.draws[bucket].replay()

    def draw_masked(self, bucket: int, bitmask: torch.Tensor) -> None:
        """Draw the tokens of the step last replayed in `bucket` into last_tokens, allowing only what
        `bitmask` ([rows, words] int32, rows <= bucket; best pinned on the host) allows; the step's logits and
        parameters must still be in the buffers (no step run since). Rows past `bitmask`'s are padding: whatever
        they draw is discarded."""
        self.bitmask[: bitmask.shape[0]].copy_(bitmask, non_blocking=True)
        self.masked_draws[bucket].replay()

    def draw_published(self, bucket: int) -> None:
        """draw_masked with the masks copied in from, and the tokens published to, the grammar processes, as
        capture_published_draws captured it, once the masks of the step's rows are filled (padding rows draw under
        whatever masks their rows hold, and their tokens are discarded)."""
        self.published_draws[bucket].replay()
