"""ModelRunner: owns the model, the KV page pool, the sampler and the decode graphs; turns a ScheduledBatch into
sampled tokens.

`launch` queues a step on the device and returns at once; `collect` waits for its tokens. Decode-only batches
that fit a graph replay one (minisrv/engine/cuda_graph.py); every other step runs eagerly with the same kernels.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from minisrv.config import EngineConfig, usable_cores
from minisrv.engine.cuda_graph import SAMPLER_ROWS, DecodeGraphs, graph_buckets
from minisrv.engine.grammar import MaskFiller, PendingMasks, host_bitmasks
from minisrv.engine.grammar_process import GrammarProcess, PendingFill
from minisrv.engine.kv_cache import allocate_kv_cache, kv_cache_bytes_per_page, kv_cache_dtype
from minisrv.engine.sampling import INT_PARAMS, DeviceSamples, logprob_results
from minisrv.kernels import select_ops
from minisrv.layers.attention import sdpa_backends
from minisrv.layers.forward_context import AttentionMetadata, ExtendSeq, ForwardContext, forward_context
from minisrv.layers.linear import Linear
from minisrv.models.loader import LoadedModel
from minisrv.scheduler.batch import ScheduledBatch, ScheduledSeq
from minisrv.scheduler.kv_pages import pages_for_tokens
from minisrv.scheduler.request import Request, SampleResult, grammar_failure

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_GIB = 2.0
# Prompt positions whose logits exist at once when computing prompt logprobs: 1024 x 128k vocabulary x 4 bytes
# is 512 MiB.
PROMPT_LOGPROB_SLICE = 1024


def cpu_threads(config: EngineConfig) -> int:
    """Intra-op threads for the CPU engine: EngineConfig.cpu_threads, else every core we may run on (shared
    among tensor-parallel ranks and data-parallel replicas).

    Lower it when other busy processes share the cores: an OpenMP parallel region waits at its barriers
    for every one of its threads, so a thread preempted by another process stalls the whole matmul for a
    scheduler time slice (on a 2-core VM with other heavy jobs running, 2 threads made decode steps 5-10x
    slower than 1). On a quiet 2-core VM, 2 threads decode 1.35x faster than 1 (bench/offline.py).
    """
    if config.cpu_threads is not None:
        return config.cpu_threads
    return max(1, usable_cores() // (config.tp_size * config.dp_size))   # every rank of every replica shares the cores


@dataclass
class StepInputs:
    input_ids: torch.Tensor       # [T] int64 (rows of in-flight tokens hold 0 until resolved on the device)
    positions: torch.Tensor       # [T] int64
    attn: AttentionMetadata
    sample_rows: torch.Tensor     # [S] int64: the row of each sampled sequence's last token, in batch order
    sample_requests: list[Request]
    sample_positions: list[int]   # [S] the output index each sampled token will have
    in_flight_rows: list[tuple[int, int]] = field(default_factory=list)  # (row, row in last_tokens) per unknown id
    prompt_logprob_rows: list[tuple[ScheduledSeq, int]] = field(default_factory=list)   # (seq, its first row)
    num_generated_rows: int = 0   # decode rows, then drafted seqs' rows (ForwardContext.num_generated_rows)


@dataclass
class DeferredSampling:
    """A launched step's sampling left for later (`ModelRunner.sample_deferred`): its logits stay valid until
    the next step is launched, which draws them first."""

    logits: torch.Tensor
    positions: list[int]
    params: tuple[torch.Tensor, torch.Tensor] | None   # the graph's parameter buffers, when it replayed one
    bucket: int | None = None                          # the bucket of the graph it replayed, if any
    masks: PendingMasks | PendingFill | None = None    # its grammar masks, when being filled (fill_masks, launch)


@dataclass
class LaunchedStep:
    """A step queued on the device. Its sampled tokens are in last_tokens[:len(requests)] until the next step
    runs, and on their way to the host (`ModelRunner.collect` waits for them)."""

    batch: ScheduledBatch
    requests: list[Request]                          # the sampled sequences' requests, in batch order
    samples: DeviceSamples | list[SampleResult] | DeferredSampling   # results already, on the CPU; or not drawn
    token_rows: dict[int, int] = field(default_factory=dict)   # rid -> its token's row in last_tokens
    draw: int = 0   # the number its tokens were published under to the grammar process, if they were


def _token_slice(request: Request, start: int, count: int) -> list[int]:
    # Request.token_ids concatenates prompt and output on every call: O(length) per decode step.
    prompt, output = request.prompt_ids, request.output_ids
    end = start + count
    if start >= len(prompt):
        return output[start - len(prompt): end - len(prompt)]
    if end <= len(prompt):
        return prompt[start:end]
    return prompt[start:] + output[: end - len(prompt)]


class ModelRunner:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, sampler: Any | None = None) -> None:
        self.config = config
        self.model = loaded.model
        self.model_config = loaded.model.rank_config   # this rank's heads: the KV pool's shape
        self.tp = loaded.model.tp
        self.max_model_len = loaded.max_model_len
        first_param = next(self.model.parameters())
        self.device, self.dtype = first_param.device, first_param.dtype
        # The GPU engine's host work is single-threaded Python; an intra-op pool would only compete with the
        # other processes for the cores (bench/pipeline.py, issue 9's OMP_NUM_THREADS clue).
        torch.set_num_threads(cpu_threads(config) if self.device.type == "cpu" else config.cpu_threads or 1)
        self.page_size = config.page_size
        self.kv_dtype = kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self.bytes_per_page = kv_cache_bytes_per_page(self.model_config, self.page_size, self.kv_dtype)
        self.quantization = config.resolved_quantization(loaded.checkpoint_bits)
        if self.quantization != "none" and self.device.type != "cpu":
            raise ValueError(f"quantization (--quantization) {self.quantization}: only the CPU engine quantizes")
        if config.speculative is not None and self.device.type != "cpu":
            # A drafted step has several rows a sequence, which the decode graphs do not take. Eager, one stream of
            # llama-3.2-1b took 6.3-7.2 ms a drafted step on the H200 against 1.18 ms replayed: more than the most
            # tokens a step of a few drafts can give.
            raise ValueError("speculative_config (--speculative-config): the CPU engine only, for now: on a GPU "
                             "drafted steps would run without CUDA graphs, slower than the tokens they save")
        self.model.pack_linears(self.quantization)
        if self.device.type == "cpu":
            kinds = Counter(module.describe() for module in self.model.modules() if isinstance(module, Linear))
            chosen = self.quantization if config.quantization != "auto" else f"auto, so {self.quantization}"
            logger.info("CPU linear layers (--quantization %s): %s", chosen,
                        "; ".join(f"{count} {kind}" for kind, count in kinds.items()))
        self.ops = select_ops(config.kernel_backend, self.device)
        self.model.use_ops(self.ops)
        if sampler is None:
            from minisrv.engine.sampling import FusedSampler, Sampler

            vocab_size, eos = self.model_config.vocab_size, loaded.eos_token_ids
            sampler = (FusedSampler(vocab_size, eos, self.device, self.ops) if self.ops.NAME == "cuda"
                       else Sampler(vocab_size, eos, self.device))
        self.sampler = sampler
        self.mask_filler = MaskFiller()
        self.grammar_process: GrammarProcess | None = None   # attach_grammar_process
        graph_bs = self._graph_batch_size()
        # Where every step leaves its sampled tokens: the next step reads in-flight input ids from here. A request
        # with drafts samples a token after each; the largest graph draws a token for each of its rows.
        rows_per_request = 1 + (config.speculative.num_speculative_tokens if config.speculative else 0)
        graph_rows = graph_buckets(graph_bs)[-1] if graph_bs else 0
        self.last_tokens = torch.zeros(max(config.max_running_requests * rows_per_request, graph_rows),
                                       dtype=torch.int64, device=self.device)
        reserve = self._probe_graph_memory(graph_bs) if graph_bs else 0
        self.num_pages = self._num_pages(reserve)
        if self.kv_dtype != self.dtype:
            logger.info("KV cache in %s (--kv-cache-dtype %s): %d pages of %d tokens",
                        str(self.kv_dtype).removeprefix("torch."), config.kv_cache_dtype, self.num_pages,
                        self.page_size)
        self.kv_caches = allocate_kv_cache(self.model_config, self.num_pages, self.page_size, self.kv_dtype,
                                           self.device)
        self.model.bind_kv_cache(self.kv_caches)
        self.graphs: DecodeGraphs | None = None
        self.graph_capture_seconds, self.graph_memory_bytes = 0.0, 0
        if graph_bs:
            self._capture(graph_bs)

    def _graph_batch_size(self) -> int:
        """The largest batch the decode graphs cover, or 0 where graphs cannot run (and why, in the log)."""
        c = self.config
        if not c.enable_cuda_graph or self.device.type != "cuda":
            return 0
        from minisrv.engine.sampling import FusedSampler

        q = torch.empty(1, self.model_config.num_heads, self.model_config.head_dim, dtype=self.dtype)
        kv = torch.empty(1, 1, 2, self.model_config.num_kv_heads, self.model_config.head_dim, dtype=self.kv_dtype)
        if (self.ops.NAME != "cuda" or not isinstance(self.sampler, FusedSampler)
                or not self.ops.attention_supported(q, kv, self.model_config.num_heads)):
            logger.warning("CUDA graphs off: they need the CUDA kernels (kernel_backend), a bfloat16 or float16 "
                           "model and a head size they cover; decode steps run eagerly")
            return 0
        return min(c.cuda_graph_max_bs, c.max_running_requests)

    def _new_graphs(self, graph_bs: int) -> DecodeGraphs:
        return DecodeGraphs(self.model, self.sampler, graph_bs, self.max_model_len, self.page_size, self.last_tokens)

    def _probe_graph_memory(self, graph_bs: int) -> int:
        """Bytes the graphs will take, measured by capturing the largest against a one-page KV cache, so the KV
        pool can be sized from what is free after them (the largest graph's pool holds the smaller ones')."""
        free_before, _ = torch.cuda.mem_get_info(self.device)
        self.model.bind_kv_cache(allocate_kv_cache(self.model_config, 1, self.page_size, self.kv_dtype, self.device))
        probe = self._new_graphs(graph_bs)
        probe.capture([probe.max_bs])
        free_after, _ = torch.cuda.mem_get_info(self.device)
        del probe
        self.model.bind_kv_cache(self._unbound_caches())
        torch.cuda.empty_cache()
        return max(0, free_before - free_after)

    def _unbound_caches(self) -> list[torch.Tensor]:
        # Empty placeholders, so the probe's one-page pool is freed before the real one is allocated.
        shape = (0, self.page_size, 2, self.model_config.num_kv_heads, self.model_config.head_dim)
        return [torch.empty(shape, dtype=self.kv_dtype, device=self.device)] * self.model_config.num_layers

    def _capture(self, graph_bs: int) -> None:
        free_before, _ = torch.cuda.mem_get_info(self.device)
        self.graphs = self._new_graphs(graph_bs)
        self.graph_capture_seconds = self.graphs.capture()
        self.graph_memory_bytes = max(0, free_before - torch.cuda.mem_get_info(self.device)[0])
        buckets = self.graphs.buckets
        logger.info("CUDA graphs: %d batch sizes (%d..%d) captured in %.2f s, %.0f MiB; KV cache: %d pages, %.2f GiB",
                    len(buckets), buckets[0], buckets[-1], self.graph_capture_seconds,
                    self.graph_memory_bytes / 2**20, self.num_pages, self.num_pages * self.bytes_per_page / 2**30)

    def _num_pages(self, reserve: int = 0) -> int:
        c, per_page = self.config, self.bytes_per_page
        if c.num_pages is not None:
            field_name, pages = "num_pages", c.num_pages
        elif c.kv_cache_memory is not None:
            field_name, pages = "kv_cache_memory", int(c.kv_cache_memory * 2**30 // per_page)
        elif self.device.type == "cuda":
            # After the weights (loaded already) and what the decode graphs will take.
            free, _ = torch.cuda.mem_get_info(self.device)
            field_name, pages = "gpu_memory_utilization", int((free - reserve) * c.gpu_memory_utilization // per_page)
        else:
            # Enough for every running request at full length, but never more than a modest share of RAM.
            wanted = c.max_running_requests * pages_for_tokens(self.max_model_len, self.page_size)
            field_name, pages = "kv_cache_memory", min(wanted, int(CPU_DEFAULT_KV_GIB * 2**30 // per_page))
        if pages < 1:
            raise ValueError(f"{field_name}: leaves room for {pages} KV pages of {per_page} bytes; need at least 1")
        # Every rank's scheduler makes the same decisions only over the same pool: the smallest rank's.
        return self.tp.min_int(pages, self.device)

    def attach_grammar_process(self, process: GrammarProcess) -> None:
        """Have the grammar masks filled by `process` (the engine starts it). The decode graphs get masked draws
        that copy its masks in and publish their tokens to it themselves (DecodeGraphs.capture_published_draws)."""
        self.grammar_process = process
        if self.graphs is not None and process.pinned:
            self.graphs.capture_published_draws(process.masks, process.queue_publish)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[SampleResult]:
        """Run one step and wait for it; one SampleResult per seq with sample=True, in batch order."""
        return self.collect(self.launch(batch)) if batch.seqs else []

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, previous: LaunchedStep | None = None,
               defer_sampling: bool = False) -> LaunchedStep:
        """Queue one step on the device without waiting for it. Tokens still in flight (sampled by `previous`,
        not yet recorded) are taken from last_tokens on the device; if `previous` left its draw for later, it is
        queued first, once this step's inputs are ready on the host. With `defer_sampling` the forward is queued
        but the tokens are drawn only by `sample_deferred`, once the caller has recorded what grammars and
        penalties need to see (`previous`'s tokens): the host does that while the device runs this forward."""
        decodes_only = all(seq.num_tokens == 1 and not _computes_prompt_logprobs(seq) for seq in batch.seqs)
        bucket = self.graphs.bucket(len(batch.seqs)) if self.graphs is not None and decodes_only else None
        if bucket is not None:
            requests, samples = self._replay(batch, bucket, previous, defer_sampling)
        else:
            requests, samples = self._run_eagerly(batch, previous, defer_sampling)
        step = LaunchedStep(batch, requests, samples, {r.rid: i for i, r in enumerate(requests)})
        if not isinstance(samples, DeferredSampling):
            self._publish_draw(step)
        elif (self.grammar_process is not None and previous is not None
              and any(r.grammar is not None for r in requests)):
            # previous's tokens are drawn (and published) by now: the grammar process takes them as they reach the
            # host, and fills this step's masks while the device runs its forward.
            samples.masks = self.grammar_process.fill(requests, previous.token_rows, previous.draw)
        return step

    def fill_masks(self, step: LaunchedStep) -> None:
        """Begin filling the grammar masks of a step launched with defer_sampling on the mask thread, once its
        requests' grammars have seen every recorded token, while the caller prepares the next step; a step with
        fewer constrained rows than MaskFiller.min_rows has them filled by its draw. With a grammar process,
        `launch` began them already."""
        deferred = step.samples
        if self.grammar_process is None and isinstance(deferred, DeferredSampling) and deferred.masks is None:
            deferred.masks = self.mask_filler.start(step.requests, self.model_config.vocab_size, self.device)

    @torch.inference_mode()
    def sample_deferred(self, step: LaunchedStep | None) -> None:
        """Draw a step launched with defer_sampling, from its logits adjusted as its requests now stand."""
        deferred = None if step is None else step.samples
        if not isinstance(deferred, DeferredSampling):
            return
        requests, positions = step.requests, deferred.positions
        bitmask = self._bitmask(requests, deferred.masks)
        if deferred.bucket is not None and not self.sampler.needs_adjustment(requests, positions, grammars=False):
            # Nothing but grammars: the graph's draw, under their masks (one replay, not the launches).
            if bitmask is not None and self.graphs.published_draws:   # the masks are the grammar process's
                self.graphs.draw_published(deferred.bucket)
                step.draw = self.grammar_process.count_published()
            elif bitmask is not None:
                self.graphs.draw_masked(deferred.bucket, bitmask)
            else:
                self.graphs.draw(deferred.bucket)
            step.samples = self.sampler.finish(deferred.logits, self.last_tokens[: len(requests)], requests)
        else:
            if bitmask is not None:
                bitmask = bitmask.to(self.device, non_blocking=True)
            step.samples = self._draw(deferred.logits, requests, positions, deferred.params, bitmask)
        self._publish_draw(step)

    def _publish_draw(self, step: LaunchedStep) -> None:
        """Once `step` has drawn, hand its tokens to the grammar process (GrammarProcess.publish), if it has rows
        with a grammar and its draw did not publish them already: the next step's masks are filled from them."""
        if step.draw == 0 and self.grammar_process is not None and any(r.grammar is not None for r in step.requests):
            step.draw = self.grammar_process.publish(self.last_tokens[: len(step.requests)])

    def _bitmask(self, requests: list[Request], pending: PendingMasks | PendingFill | None = None
                 ) -> torch.Tensor | None:
        """The grammar masks of `requests` on the host (None when no row has a grammar): `pending`'s, when
        fill_masks started them, else filled now. From the grammar process, they come with the requests whose
        grammar the tokens recorded so far completed: those end at their next postprocess."""
        if self.grammar_process is None:
            return host_bitmasks(requests, self.model_config.vocab_size, self.device) if pending is None \
                else pending.result()
        if pending is None:
            if not any(r.grammar is not None for r in requests):
                return None
            pending = self.grammar_process.fill(requests)
        filled = pending.result()
        if filled.completed:
            completed, refused = set(filled.completed), set(filled.refused)
            for req in requests:
                if req.rid in completed:
                    req.grammar_complete = True
                if req.rid in refused:
                    req.grammar_error = grammar_failure("its matcher failed; the server log has llguidance's message")
        return filled.masks

    def _draw(self, logits: torch.Tensor, requests: list[Request], positions: list[int],
              params: tuple[torch.Tensor, torch.Tensor] | None = None,
              bitmask: torch.Tensor | None = None) -> DeviceSamples | list[SampleResult]:
        """Sample a token per row into last_tokens: queued on the device (FusedSampler), or drawn at once."""
        if bitmask is None and self.grammar_process is not None:
            # The sampler would fill masks from the requests' own matchers, which live in the grammar process.
            bitmask = self._bitmask(requests)
            if bitmask is not None and hasattr(self.sampler, "launch"):
                bitmask = bitmask.to(self.device, non_blocking=True)
        tokens = self.last_tokens[: len(requests)]
        if hasattr(self.sampler, "launch"):
            return self.sampler.launch(logits, requests, positions, params=params, out=tokens, bitmask=bitmask)
        results = self.sampler(logits, requests, positions, bitmask=bitmask)
        tokens.copy_(torch.tensor([r.token_id for r in results]))
        return results

    def collect(self, step: LaunchedStep) -> list[SampleResult]:
        """The step's results, waiting for the GPU if it is still running."""
        self.sample_deferred(step)
        return step.samples if isinstance(step.samples, list) else step.samples.results()

    def _run_eagerly(self, batch: ScheduledBatch, previous: LaunchedStep | None, defer_sampling: bool = False):
        step = self.prepare(batch, previous)
        self.sample_deferred(previous)   # its tokens go to last_tokens, which this step reads
        input_ids = step.input_ids
        if step.in_flight_rows:
            rows, sources = zip(*step.in_flight_rows)
            input_ids = input_ids.index_copy(0, self._tensor(list(rows)),
                                             self.last_tokens.index_select(0, self._tensor(list(sources))))
        with forward_context(ForwardContext(step.attn, step.num_generated_rows)), sdpa_backends(self.device):
            hidden = self.model(input_ids, step.positions)
        for seq, first_row in step.prompt_logprob_rows:
            self._prompt_logprobs(seq, hidden[first_row: first_row + seq.num_tokens])
        requests = step.sample_requests
        if not requests:
            return requests, []
        logits = self.model.compute_logits(hidden.index_select(0, step.sample_rows))
        if defer_sampling:
            return requests, DeferredSampling(logits, step.sample_positions, None)
        return requests, self._draw(logits, requests, step.sample_positions)

    def _prompt_logprobs(self, seq: ScheduledSeq, hidden: torch.Tensor) -> None:
        """Fill seq.prompt_logprobs from the hidden states of its tokens: the one at position p gives the
        logprobs of prompt token p + 1. In slices, so that a long chunk's logits never all exist at once."""
        request = seq.request
        targets = request.prompt_ids[seq.start + 1: seq.start + 1 + seq.num_tokens]
        for lo in range(0, len(targets), PROMPT_LOGPROB_SLICE):
            chunk = targets[lo: lo + PROMPT_LOGPROB_SLICE]
            logits = self.model.compute_logits(hidden[lo: lo + len(chunk)])
            seq.prompt_logprobs += logprob_results(logits, self._tensor(chunk), [request.params.prompt_logprobs]
                                                   * len(chunk), ranks=True)

    def _replay(self, batch: ScheduledBatch, bucket: int, previous: LaunchedStep | None, defer_sampling: bool):
        graphs, ps = self.graphs, self.page_size
        in_flight = previous.token_rows if previous is not None else {}
        # One list per input row, appended to in one pass: this loop is most of a large batch's host time.
        requests, token_ids, starts, slots, prev_rows, page_tables, positions = [], [], [], [], [], [], []
        for seq in batch.seqs:
            request, pos = seq.request, seq.start
            pages, page = request.pages, pos // ps
            # The usual row computes the token the previous step sampled for it, in its pages and the context:
            # this one test implies what _check and _input_token would find, which explain any other row.
            known = len(request.prompt_ids) + len(request.output_ids)
            prev_row = in_flight.get(request.rid, -1) if pos == known and request.num_in_flight else -1
            if prev_row >= 0 and pos < self.max_model_len and page < len(pages):
                token = 0
            else:
                self._check(seq)
                token, prev_row = self._input_token(request, pos, previous)
            requests.append(request)
            token_ids.append(token)
            starts.append(pos)
            slots.append(pages[page] * ps + pos % ps)
            prev_rows.append(prev_row)
            page_tables.append(pages[: page + 1])
            positions.append(pos + 1 - request.num_prompt_tokens)
        floats, ints = self.sampler.params(requests, positions)
        rows = dict(input_ids=token_ids, positions=starts, slots=slots, seq_lens=[pos + 1 for pos in starts],
                    prev_rows=prev_rows, **dict(zip(INT_PARAMS, ints)))
        inputs = graphs.host_inputs(bucket, rows, floats, page_tables)
        self.sample_deferred(previous)   # before the replay overwrites the buffers it reads
        # The draw graph draws without bans or penalties: a step that needs them draws from the adjusted logits.
        adjusted = not defer_sampling and self.sampler.needs_adjustment(requests, positions)
        logits = graphs.run(inputs, draw=not (defer_sampling or adjusted))[: len(requests)]
        params = (graphs.floats[:, : len(requests)], graphs.ints[SAMPLER_ROWS, : len(requests)])
        if defer_sampling:
            return requests, DeferredSampling(logits, positions, params, bucket)
        if adjusted:
            return requests, self._draw(logits, requests, positions, params)
        return requests, self.sampler.finish(logits, self.last_tokens[: len(requests)], requests)

    @staticmethod
    def _input_token(request: Request, pos: int, previous: LaunchedStep | None) -> tuple[int, int]:
        """(token id, -1) when the host knows the token at `pos`, else (0, its row in last_tokens)."""
        known = request.num_prompt_tokens + len(request.output_ids)
        if pos < known:
            return _token_slice(request, pos, 1)[0], -1
        if previous is None or request.rid not in previous.token_rows or pos != known:
            raise RuntimeError(f"request {request.rid}: token {pos} is neither known nor sampled by the previous step")
        return 0, previous.token_rows[request.rid]

    def prepare(self, batch: ScheduledBatch, previous: LaunchedStep | None = None) -> StepInputs:
        """Flatten the batch: decode rows (one token each) first, then each extending sequence's tokens, those of
        drafted decodes first."""
        decodes = [s for s in batch.seqs if s.num_tokens == 1]
        extends = sorted((s for s in batch.seqs if s.num_tokens != 1), key=lambda s: not s.draft_ids)
        ps = self.page_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        in_flight_rows: list[tuple[int, int]] = []
        for seq in batch.seqs:
            self._check(seq)
        for seq in decodes:
            pos = seq.start
            token, prev_row = self._input_token(seq.request, pos, previous)
            if prev_row >= 0:
                in_flight_rows.append((len(input_ids), prev_row))
            input_ids.append(token)
            positions.append(pos)
            slots.append(seq.request.pages[pos // ps] * ps + pos % ps)
        row_of: dict[int, int] = {id(seq): i for i, seq in enumerate(decodes)}
        query_starts, extend_tables = [], []
        for seq in extends:
            end = seq.start + seq.num_tokens
            query_starts.append(len(input_ids))
            row_of[id(seq)] = len(input_ids) + seq.num_tokens - 1
            input_ids += _token_slice(seq.request, seq.start, seq.num_tokens - len(seq.draft_ids)) + seq.draft_ids
            positions += range(seq.start, end)
            pages = seq.request.pages
            slots += [pages[p // ps] * ps + p % ps for p in range(seq.start, end)]
            extend_tables.append(pages[: pages_for_tokens(end, ps)])
        attn = AttentionMetadata(slot_mapping=self._tensor(slots), num_decodes=len(decodes))
        if decodes:
            self._decode_metadata(attn, decodes)
        if extends:
            table = self._tensor(_padded(extend_tables))
            attn.extends = [ExtendSeq(start, seq.num_tokens, seq.start, table[i, : len(pages)])
                            for i, (seq, start, pages) in enumerate(zip(extends, query_starts, extend_tables))]
            attn.extend_page_table = table
            attn.extend_seq_lens = self._tensor([s.start + s.num_tokens for s in extends], torch.int32)
            attn.extend_query_start_loc = self._tensor(
                [start - len(decodes) for start in query_starts] + [len(input_ids) - len(decodes)], torch.int32)
        # A seq samples after its last token, and a drafted one after each draft as well (its last rows).
        sample_rows, sample_requests, sample_positions = [], [], []
        for seq in batch.seqs:
            last_position = seq.start + seq.num_tokens - seq.request.num_prompt_tokens
            for back in reversed(range(seq.num_samples)):
                sample_rows.append(row_of[id(seq)] - back)
                sample_requests.append(seq.request)
                sample_positions.append(last_position - back)
        prompt_logprob_rows = [(s, row_of[id(s)] - s.num_tokens + 1) for s in batch.seqs
                               if _computes_prompt_logprobs(s)]
        num_generated_rows = len(decodes) + sum(s.num_tokens for s in extends if s.draft_ids)
        return StepInputs(self._tensor(input_ids), self._tensor(positions), attn, self._tensor(sample_rows),
                          sample_requests, sample_positions, in_flight_rows, prompt_logprob_rows, num_generated_rows)

    def _decode_metadata(self, attn: AttentionMetadata, decodes: list[ScheduledSeq]) -> None:
        ps = self.page_size
        seq_lens = [seq.start + 1 for seq in decodes]
        max_len = max(seq_lens)
        tables = [seq.request.pages[: pages_for_tokens(n, ps)] for seq, n in zip(decodes, seq_lens)]
        attn.decode_page_table = self._tensor(_padded(tables))
        attn.decode_seq_lens = self._tensor(seq_lens)
        attn.decode_max_seq_len = max_len
        if min(seq_lens) != max_len:
            key_pos = torch.arange(max_len, device=self.device)
            attn.decode_kv_mask = (key_pos < attn.decode_seq_lens.unsqueeze(1)).view(len(decodes), 1, 1, max_len)

    def _check(self, seq: ScheduledSeq) -> None:
        end = seq.start + seq.num_tokens
        if seq.num_tokens < 1 or seq.start < 0 or end > seq.request.num_tokens:
            raise ValueError(f"request {seq.request.rid}: tokens [{seq.start}, {end}) are not within its "
                             f"{seq.request.num_tokens} tokens")
        if end > self.max_model_len:
            raise ValueError(f"request {seq.request.rid}: position {end - 1} is beyond max_model_len "
                             f"{self.max_model_len}")
        if len(seq.request.pages) * self.page_size < end:
            raise ValueError(f"request {seq.request.rid}: {len(seq.request.pages)} pages cannot hold {end} tokens")

    def _tensor(self, values: list, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)


def _computes_prompt_logprobs(seq: ScheduledSeq) -> bool:
    """Whether `seq` computes tokens whose logits give prompt logprobs its request still needs."""
    return seq.request.wants_prompt_logprobs and seq.start < seq.request.num_prompt_tokens - 1


def _padded(rows: list[list[int]]) -> list[list[int]]:
    """Right-pad page lists with page 0 (any real page: padded slots are masked or sliced away)."""
    width = max(len(r) for r in rows)
    return [r + [0] * (width - len(r)) for r in rows]
