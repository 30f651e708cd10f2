"""Tensor parallelism across processes: rank 0 leads, every other rank repeats its engine calls.

Each rank runs an LLMEngine over its part of the model (minisrv/layers/parallel.py). Rank 0's engine (in the
scheduler process, or in the offline `LLM`) is wrapped in a `TPLeader`: every request, abort and step it is
given is first written to a broadcast ring (one producer, a reader per other rank), then applied. The other
ranks (`FollowerLoop`) apply the same records in the same order, so their schedulers make the same decisions,
their models meet rank 0's in every collective, and their sampled tokens (drawn from the same gathered
logits with the same seeds) are the same. Only rank 0's results leave. Each STEP record carries a digest
of rank 0's previous step (the batch it scheduled and the tokens it drew); a rank whose own differs stops
the server instead of computing garbage in lockstep.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import signal
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from minisrv.config import EngineConfig
from minisrv.models.source import ModelSource
from minisrv.runtime.channels import ChannelSpec, RecordReader, RecordWriter
from minisrv.runtime.status_block import StatusBlock
from minisrv.runtime.worker import (IDLE_WAIT_S, ParentWatch, WorkerInfo, exit_quickly, run_until_peers_leave,
                                    serve_worker, start_process)
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.request import RequestOutput
from minisrv.tokenizer.loading import load_fast_tokenizer
from minisrv.wire.records import Abort, Record, Shutdown, Step, TokenizedRequest
from minisrv.wire.terms import SchedulerStats

if TYPE_CHECKING:
    from minisrv.engine.grammar import RequestGrammar
    from minisrv.scheduler.metrics import RequestMetrics
    from minisrv.engine.llm_engine import LLMEngine
    from minisrv.runtime.remote_ranks import RemoteRanks

logger = logging.getLogger(__name__)

DIGEST_MASK = (1 << 64) - 1


def step_digest(engine: LLMEngine, outputs: Sequence[RequestOutput]) -> int:
    """A 64-bit summary of one step: the batch it scheduled (each sequence's request, first position, token count
    and drafts) and its results (which requests got which tokens, which finished)."""
    batch = engine.last_batch
    scheduled = tuple((s.request.rid, s.start, s.num_tokens, *s.draft_ids) for s in batch.seqs) if batch else ()
    return hash((scheduled, tuple((o.rid, *o.new_token_ids, int(o.finish_reason)) for o in outputs))) & DIGEST_MASK


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TPGroup:
    """Where rank `rank` of `size` meets the others (torch.distributed's init_method), `ranks_per_node` a host."""

    size: int
    init_method: str
    ranks_per_node: int
    rank: int = 0
    first_gpu: int = 0   # a data-parallel replica's: its ranks take the GPUs from here

    def of_rank(self, rank: int) -> TPGroup:
        return dataclasses.replace(self, rank=rank)

    @classmethod
    def for_config(cls, config: EngineConfig, first_gpu: int = 0) -> TPGroup:
        """--dist-init-addr across hosts; on one host, a free local port."""
        address = config.dist_init_addr if config.nnodes > 1 else f"127.0.0.1:{free_tcp_port()}"
        return cls(config.tp_size, f"tcp://{address}", config.ranks_per_node, first_gpu=first_gpu)


def load_rank_engine(config: EngineConfig, source: ModelSource, group: TPGroup) -> LLMEngine:
    """Join the group, then load this rank's part of the model into an engine of its own."""
    from minisrv.engine.llm_engine import LLMEngine
    from minisrv.layers.parallel import init_tensor_parallel

    tp = init_tensor_parallel(group.rank, group.size, group.init_method, config.resolved_device(),
                              group.ranks_per_node, config.custom_all_reduce, group.first_gpu)
    # --dtype auto depends on the CPU (native bfloat16 or not): compared resolved, nodes of different CPUs are refused.
    config = dataclasses.replace(config, dtype=config.resolved_dtype())
    if group.size > group.ranks_per_node:
        check_same_settings(config, group.rank)
    return LLMEngine(config, source, tp=tp, load_tokenizer=partial(load_fast_tokenizer, source))


def check_same_settings(config: EngineConfig, rank: int) -> None:
    """Ranks started by separate commands (one per node) must agree on every engine setting, or their schedulers
    part ways: refuse at start, naming the flag."""
    import torch.distributed as dist

    from minisrv.config import flag_name

    ours = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "node_rank"}
    everyone: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, ours)
    for other_rank, theirs in enumerate(everyone):
        for name, value in ours.items():
            if theirs[name] != value:
                raise ValueError(f"{name} ({flag_name(name)}): rank {rank} has {value!r}, rank {other_rank} has "
                                 f"{theirs[name]!r}; every node must be started with the same engine flags")


class TPLeader:
    """Rank 0's engine: LLMEngine's interface, each call sent to the other ranks before it is applied."""

    def __init__(self, engine: LLMEngine, followers: Sequence[RecordWriter | RemoteRanks]) -> None:
        self.engine, self.followers = engine, list(followers)
        self.loaded = engine.loaded
        self._digest = 0

    @classmethod
    def of(cls, engine: LLMEngine, local: RecordWriter | None) -> TPLeader:
        """Rank 0 over the ring to this host's ranks (`local`) and gloo to the other hosts' (if any)."""
        from minisrv.runtime.remote_ranks import RemoteRanks

        remote = engine.loaded.model.tp.remote_group
        return cls(engine, [w for w in (local, remote and RemoteRanks(remote)) if w is not None])

    def _send(self, record: Record) -> None:
        for followers in self.followers:
            followers.send(record)

    def add_request(self, rid: int, prompt_ids: Sequence[int], params: SamplingParams,
                    grammar: RequestGrammar | None = None, arrival: float | None = None, priority: int = 0) -> None:
        """The other ranks compile the request's grammar themselves, when its record reaches them: every rank
        then admits it at the same step."""
        self._send(TokenizedRequest(rid, params, list(prompt_ids), priority=priority))
        # A ValueError: on every rank alike.
        self.engine.add_request(rid, prompt_ids, params, grammar, arrival, priority)

    def compile_grammar(self, grammar: str) -> RequestGrammar:
        return self.engine.compile_grammar(grammar)

    def abort(self, rid: int) -> RequestOutput | None:
        self._send(Abort(rid))
        return self.engine.abort(rid)

    def flush_prefix_cache(self) -> int:
        """Rank 0's bookkeeping alone: the other ranks compute the pages each step names, cached or not."""
        return self.engine.flush_prefix_cache()

    def step(self) -> list[RequestOutput]:
        self._send(Step(self._digest))
        outputs = self.engine.step()
        self._digest = step_digest(self.engine, outputs)
        return outputs

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def stats(self) -> SchedulerStats:
        return self.engine.stats()

    def metrics(self) -> RequestMetrics:
        return self.engine.metrics()

    def close(self) -> None:
        for followers in self.followers:
            followers.try_send(Shutdown())
            followers.close()


class RankDiverged(SystemExit):
    def __init__(self, name: str) -> None:
        super().__init__(f"{name}: its step results differ from rank 0's (the ranks' schedulers diverged); "
                         "stopping the server")


class FollowerLoop:
    """A rank other than 0: apply rank 0's records in order until SHUTDOWN."""

    def __init__(self, leader: ChannelSpec | None, watch: ParentWatch | None, name: str) -> None:
        # A rank on rank 0's host attaches its ring end now; one on another host gets RemoteRanks once it
        # has joined the process group.
        self.leader: RecordReader | RemoteRanks | None = leader.open() if leader is not None else None
        self.watch, self.name = watch, name
        self.engine: LLMEngine | None = None   # set before run()
        self._digest = 0

    def run(self) -> None:
        while True:
            records = self.leader.drain()
            for record in records:
                if isinstance(record, Step):
                    if record.previous_digest != self._digest:
                        raise RankDiverged(self.name)
                    self._digest = step_digest(self.engine, self.engine.step())
                elif isinstance(record, TokenizedRequest):
                    try:
                        self.engine.add_request(record.rid, record.prompt_ids.tolist(), record.params,
                                                priority=record.priority)
                    except ValueError:
                        pass   # rank 0 refused it too, and told the client
                elif isinstance(record, Abort):
                    self.engine.abort(record.rid)
                elif isinstance(record, Shutdown):
                    return
            if self.watch is not None:
                self.watch.check()
            if not records:
                self.leader.wait(IDLE_WAIT_S)

    def close(self) -> None:
        if self.leader is not None:
            self.leader.close()


def follower_main(info: WorkerInfo, config: EngineConfig, source: ModelSource, group: TPGroup,
                  leader: ChannelSpec) -> None:
    """Entry point of a spawned server rank (a worker like the others: status slot, heartbeat, exit)."""

    def set_up(loop: FollowerLoop, status: StatusBlock) -> None:
        loop.engine = load_rank_engine(config, source, group)

    serve_worker(info, lambda status, watch: FollowerLoop(leader, watch, info.name), set_up)


def detached_follower_main(config: EngineConfig, source: ModelSource, group: TPGroup,
                           leader: ChannelSpec | None) -> None:
    """Entry point of a rank spawned by the offline `LLM` (`leader`: its ring) or by `minisrv serve` on a node
    other than 0 (no ring: rank 0's records come over gloo). No status block; it dies with its parent."""
    start_process(f"rank-{group.rank}", "info")
    loop = FollowerLoop(leader, None, f"rank {group.rank}")
    try:
        loop.engine = load_rank_engine(config, source, group)
        if loop.leader is None:
            from minisrv.runtime.remote_ranks import RemoteRanks

            loop.leader = RemoteRanks(loop.engine.loaded.model.tp.remote_group)
        run_until_peers_leave(loop.run)
        if leader is not None:   # the offline LLM's rank: it leaves the group with rank 0 (see leave_group)
            leave_group(loop.engine)
    finally:
        loop.close()
    exit_quickly()


def serve_node(config: EngineConfig, source: ModelSource) -> int:
    """`minisrv serve --node-rank K` (K > 0): run this host's ranks until rank 0 ends them (exit 0) or one of
    them fails (the others are killed, exit 1 naming it); SIGINT/SIGTERM stop them."""
    group = TPGroup.for_config(config)
    first = config.node_rank * config.ranks_per_node
    spawn = multiprocessing.get_context("spawn")
    ranks = {rank: spawn.Process(target=detached_follower_main, args=(config, source, group.of_rank(rank), None),
                                 name=f"minisrv-rank-{rank}") for rank in range(first, first + config.ranks_per_node)}
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    for process in ranks.values():
        process.start()
    logger.info("node %d of %d: ranks %s, meeting at %s", config.node_rank, config.nnodes,
                ", ".join(f"{rank} (pid {p.pid})" for rank, p in ranks.items()), config.dist_init_addr)
    code = 0
    while not stop.is_set() and all(p.is_alive() for p in ranks.values()):
        multiprocessing.connection.wait([p.sentinel for p in ranks.values()], timeout=0.5)
    for rank, process in ranks.items():
        if process.exitcode:
            logger.error("rank %d (pid %d) exited with code %d; stopping this node", rank, process.pid,
                         process.exitcode)
            code = 1
    for process in ranks.values():
        if process.is_alive():
            process.kill()
        process.join()
    return code


class TensorParallelRanks:
    """The offline `LLM`'s group: this process is rank 0 (its engine a TPLeader), the others are spawned here
    and fed through a broadcast ring, as in the server."""

    def __init__(self, config: EngineConfig, source: ModelSource, capacity: int = 4 << 20) -> None:
        from minisrv.runtime.channels import RingChannels

        if config.nnodes > 1:
            raise ValueError(f"nnodes (--nnodes) {config.nnodes}: the offline LLM runs its ranks on one host")
        group = TPGroup.for_config(config)
        config = dataclasses.replace(config, dtype=config.resolved_dtype())   # once, for every rank
        self.channels = RingChannels()
        self.processes: list[multiprocessing.process.BaseProcess] = []
        try:
            ends = self.channels.create("tp", capacity, num_readers=config.tp_size - 1)
            spawn = multiprocessing.get_context("spawn")
            for rank, reader in enumerate(ends.readers, start=1):
                process = spawn.Process(target=detached_follower_main, name=f"minisrv-rank-{rank}", daemon=True,
                                        args=(config, source, group.of_rank(rank), reader))
                process.start()
                self.processes.append(process)
            self.leader = TPLeader(load_rank_engine(config, source, group), [ends.producer.open()])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        leader = getattr(self, "leader", None)
        if leader is not None:
            leader.close()   # SHUTDOWN: every rank now leaves the group with this one
            leave_group(leader.engine)
        for process in self.processes:
            process.join(10.0)
            if process.is_alive():
                process.kill()
        self.channels.unlink()


def leave_group(engine: LLMEngine) -> None:
    """Free what this rank holds of the group (graphs with collectives inside, the peer-memory buffers), then
    leave it with the others, so that this process may join another (the offline LLM's)."""
    import torch
    import torch.distributed as dist

    engine.runner.graphs = None
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    fast = engine.loaded.model.tp.fast_all_reduce
    if fast is not None:
        fast.close()
    if dist.is_initialized():
        dist.destroy_process_group()
