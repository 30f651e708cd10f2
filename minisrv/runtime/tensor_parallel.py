"""Tensor parallelism across processes: rank 0 leads, every other rank repeats its engine calls.

Each rank runs an LLMEngine over its part of the model (minisrv/layers/parallel.py). Rank 0's engine (in the
scheduler process, or in the offline `LLM`) is wrapped in a `TPLeader`: every request, abort and step it is
given is first written to a broadcast ring (one producer, a reader per other rank), then applied. The other
ranks (`FollowerLoop`) apply the same records in the same order, so their schedulers make the same decisions,
their models meet rank 0's in every collective, and their sampled tokens (drawn from the same gathered
logits with the same seeds) are the same. Only rank 0's results leave. Each STEP record carries a digest
of what rank 0's previous step produced; a rank whose own differs stops the server instead of computing
garbage in lockstep.
"""
from __future__ import annotations

import logging
import multiprocessing
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from minisrv.config import EngineConfig
from minisrv.models.source import ModelSource
from minisrv.runtime.channels import ChannelSpec, RecordWriter
from minisrv.runtime.status_block import StatusBlock
from minisrv.runtime.worker import (IDLE_WAIT_S, ParentWatch, WorkerInfo, exit_quickly, run_until_peers_leave,
                                    serve_worker, start_process)
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.request import RequestOutput
from minisrv.wire.records import Abort, Shutdown, Step, TokenizedRequest
from minisrv.wire.terms import SchedulerStats

if TYPE_CHECKING:
    from minisrv.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

DIGEST_MASK = (1 << 64) - 1


def outputs_digest(outputs: Sequence[RequestOutput]) -> int:
    """A 64-bit summary of one step's results: which requests got which tokens, and which finished."""
    return hash(tuple((o.rid, *o.new_token_ids, int(o.finish_reason)) for o in outputs)) & DIGEST_MASK


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TPGroup:
    """Where rank `rank` of `size` meets the others (torch.distributed's init_method)."""

    size: int
    init_method: str
    rank: int = 0

    def of_rank(self, rank: int) -> TPGroup:
        return TPGroup(self.size, self.init_method, rank)

    @classmethod
    def on_this_host(cls, size: int) -> TPGroup:
        return cls(size, f"tcp://127.0.0.1:{free_tcp_port()}")


def load_rank_engine(config: EngineConfig, source: ModelSource, group: TPGroup) -> LLMEngine:
    """Join the group, then load this rank's part of the model into an engine of its own."""
    from minisrv.engine.llm_engine import LLMEngine
    from minisrv.layers.parallel import init_tensor_parallel

    tp = init_tensor_parallel(group.rank, group.size, group.init_method, config.resolved_device())
    return LLMEngine(config, source, tp=tp)


class TPLeader:
    """Rank 0's engine: LLMEngine's interface, each call broadcast to the other ranks before it is applied."""

    def __init__(self, engine: LLMEngine, followers: RecordWriter) -> None:
        self.engine, self.followers = engine, followers
        self.loaded = engine.loaded
        self._digest = 0

    def add_request(self, rid: int, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        self.followers.send(TokenizedRequest(rid, params, list(prompt_ids)))
        self.engine.add_request(rid, prompt_ids, params)   # a ValueError here is raised on every rank alike

    def abort(self, rid: int) -> RequestOutput | None:
        self.followers.send(Abort(rid))
        return self.engine.abort(rid)

    def step(self) -> list[RequestOutput]:
        self.followers.send(Step(self._digest))
        outputs = self.engine.step()
        self._digest = outputs_digest(outputs)
        return outputs

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def stats(self) -> SchedulerStats:
        return self.engine.stats()

    def close(self) -> None:
        self.followers.try_send(Shutdown())
        self.followers.close()


class RankDiverged(SystemExit):
    def __init__(self, name: str) -> None:
        super().__init__(f"{name}: its step results differ from rank 0's (the ranks' schedulers diverged); "
                         "stopping the server")


class FollowerLoop:
    """A rank other than 0: apply rank 0's records in order until SHUTDOWN."""

    def __init__(self, leader: ChannelSpec, watch: ParentWatch | None, name: str) -> None:
        self.leader = leader.open()
        self.watch, self.name = watch, name
        self.engine: LLMEngine | None = None   # set before run()
        self._digest = 0

    def run(self) -> None:
        while True:
            records = self.leader.drain()
            for record in records:
                if isinstance(record, Step):
                    if record.outputs_digest != self._digest:
                        raise RankDiverged(self.name)
                    self._digest = outputs_digest(self.engine.step())
                elif isinstance(record, TokenizedRequest):
                    try:
                        self.engine.add_request(record.rid, record.prompt_ids.tolist(), record.params)
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
        self.leader.close()


def follower_main(info: WorkerInfo, config: EngineConfig, source: ModelSource, group: TPGroup,
                  leader: ChannelSpec) -> None:
    """Entry point of a spawned server rank (a worker like the others: status slot, heartbeat, exit)."""

    def set_up(loop: FollowerLoop, status: StatusBlock) -> None:
        loop.engine = load_rank_engine(config, source, group)

    serve_worker(info, lambda status, watch: FollowerLoop(leader, watch, info.name), set_up)


def offline_follower_main(config: EngineConfig, source: ModelSource, group: TPGroup, leader: ChannelSpec) -> None:
    """Entry point of a rank the offline `LLM` spawns: no status block; it dies with its parent."""
    start_process(f"rank-{group.rank}", "warning")
    loop = FollowerLoop(leader, None, f"rank {group.rank}")
    try:
        loop.engine = load_rank_engine(config, source, group)
        run_until_peers_leave(loop.run)
    finally:
        loop.close()
    exit_quickly()


class TensorParallelRanks:
    """The offline `LLM`'s group: this process is rank 0 (its engine a TPLeader), the others are spawned here
    and fed through a broadcast ring, as in the server."""

    def __init__(self, config: EngineConfig, source: ModelSource, capacity: int = 4 << 20) -> None:
        from minisrv.runtime.channels import RingChannels

        group = TPGroup.on_this_host(config.tp_size)
        self.channels = RingChannels()
        self.processes: list[multiprocessing.process.BaseProcess] = []
        try:
            ends = self.channels.create("tp", capacity, num_readers=config.tp_size - 1)
            spawn = multiprocessing.get_context("spawn")
            for rank, reader in enumerate(ends.readers, start=1):
                process = spawn.Process(target=offline_follower_main, name=f"minisrv-rank-{rank}", daemon=True,
                                        args=(config, source, group.of_rank(rank), reader))
                process.start()
                self.processes.append(process)
            self.leader = TPLeader(load_rank_engine(config, source, group), ends.producer.open())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        import torch.distributed as dist

        leader = getattr(self, "leader", None)
        if leader is not None:
            leader.close()
        for process in self.processes:
            process.join(5.0)
            if process.is_alive():
                process.kill()
        self.channels.unlink()
        if dist.is_initialized():
            dist.destroy_process_group()   # so this process can join a new group for another LLM
