"""ModelRunner: owns the model, the KV page pool and the sampler; turns a ScheduledBatch into sampled tokens."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from minisrv.config import EngineConfig
from minisrv.engine.kv_cache import allocate_kv_cache, kv_cache_bytes_per_page
from minisrv.kernels import select_ops
from minisrv.layers.attention import sdpa_backends
from minisrv.layers.forward_context import AttentionMetadata, ExtendSeq, ForwardContext, forward_context
from minisrv.models.loader import LoadedModel
from minisrv.scheduler.batch import ScheduledBatch, ScheduledSeq
from minisrv.scheduler.kv_pages import pages_for_tokens
from minisrv.scheduler.request import Request, SampleResult

CPU_DEFAULT_KV_GIB = 2.0


def cpu_threads(config: EngineConfig) -> int:
    """Intra-op threads for the CPU engine: EngineConfig.cpu_threads, else every core we may run on.

    Lower it when other busy processes share the cores: an OpenMP parallel region waits at its barriers
    for every one of its threads, so a thread preempted by another process stalls the whole matmul for a
    scheduler time slice (on a 2-core VM with other heavy jobs running, 2 threads made decode steps 5-10x
    slower than 1). On a quiet 2-core VM, 2 threads decode 1.35x faster than 1 (bench/offline.py).
    """
    if config.cpu_threads is not None:
        return config.cpu_threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class StepInputs:
    input_ids: torch.Tensor       # [T] int64
    positions: torch.Tensor       # [T] int64
    attn: AttentionMetadata
    sample_rows: torch.Tensor     # [S] int64: the row of each sampled sequence's last token, in batch order
    sample_requests: list[Request]


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
        self.model_config = loaded.model_config
        self.max_model_len = loaded.max_model_len
        first_param = next(self.model.parameters())
        self.device, self.dtype = first_param.device, first_param.dtype
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(config))
        self.page_size = config.page_size
        self.bytes_per_page = kv_cache_bytes_per_page(self.model_config, self.page_size, self.dtype)
        self.num_pages = self._num_pages()
        self.model.pack_linears()
        self.kv_caches = allocate_kv_cache(self.model_config, self.num_pages, self.page_size, self.dtype, self.device)
        self.model.bind_kv_cache(self.kv_caches)
        self.ops = select_ops(config.kernel_backend, self.device)
        self.model.use_ops(self.ops)
        if sampler is None:
            from minisrv.engine.sampling import FusedSampler, Sampler

            vocab_size, eos = self.model_config.vocab_size, loaded.eos_token_ids
            sampler = (FusedSampler(vocab_size, eos, self.device, self.ops) if self.ops.NAME == "cuda"
                       else Sampler(vocab_size, eos, self.device))
        self.sampler = sampler

    def _num_pages(self) -> int:
        c, per_page = self.config, self.bytes_per_page
        if c.num_pages is not None:
            field, pages = "num_pages", c.num_pages
        elif c.kv_cache_memory is not None:
            field, pages = "kv_cache_memory", int(c.kv_cache_memory * 2**30 // per_page)
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)   # after the weights, which are already loaded
            field, pages = "gpu_memory_utilization", int(free * c.gpu_memory_utilization // per_page)
        else:
            # Enough for every running request at full length, but never more than a modest share of RAM.
            wanted = c.max_running_requests * pages_for_tokens(self.max_model_len, self.page_size)
            field, pages = "kv_cache_memory", min(wanted, int(CPU_DEFAULT_KV_GIB * 2**30 // per_page))
        if pages < 1:
            raise ValueError(f"{field}: leaves room for {pages} KV pages of {per_page} bytes; need at least 1")
        return pages

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[SampleResult]:
        """Run one step; one SampleResult per seq with sample=True, in batch order."""
        if not batch.seqs:
            return []
        step = self.prepare(batch)
        with forward_context(ForwardContext(step.attn)), sdpa_backends(self.device):
            hidden = self.model(step.input_ids, step.positions)
        if not step.sample_requests:
            return []
        logits = self.model.compute_logits(hidden.index_select(0, step.sample_rows))
        return self.sampler(logits, step.sample_requests)

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """Flatten the batch: decode rows (one token each) first, then each extending sequence's tokens."""
        decodes = [s for s in batch.seqs if s.num_tokens == 1]
        extends = [s for s in batch.seqs if s.num_tokens != 1]
        ps = self.page_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for seq in batch.seqs:
            self._check(seq)
        for seq in decodes:
            pos = seq.start
            input_ids += _token_slice(seq.request, pos, 1)
            positions.append(pos)
            slots.append(seq.request.pages[pos // ps] * ps + pos % ps)
        row_of: dict[int, int] = {id(seq): i for i, seq in enumerate(decodes)}
        query_starts, extend_tables = [], []
        for seq in extends:
            end = seq.start + seq.num_tokens
            query_starts.append(len(input_ids))
            row_of[id(seq)] = len(input_ids) + seq.num_tokens - 1
            input_ids += _token_slice(seq.request, seq.start, seq.num_tokens)
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
        sampled = [s for s in batch.seqs if s.sample]
        return StepInputs(self._tensor(input_ids), self._tensor(positions), attn,
                          self._tensor([row_of[id(s)] for s in sampled]), [s.request for s in sampled])

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


def _padded(rows: list[list[int]]) -> list[list[int]]:
    """Right-pad page lists with page 0 (any real page: padded slots are masked or sliced away)."""
    width = max(len(r) for r in rows)
    return [r + [0] * (width - len(r)) for r in rows]
