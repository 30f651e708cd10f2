"""Processes of their own for the matchers of structured output, so that their work never runs on the engine thread.

llguidance's matchers are advanced token by token and fill a bitmask of allowed tokens per step. In the scheduler
process that work, and the hand-overs of the GIL to a mask thread, lands on the engine thread: at batch 64 on the
H200 machine a constrained llama-3.2-1b step took 1.06-1.34x a free one that way, 1.05-1.17x with these processes
(in the same runs; 1.02x with the grammars' host work gone altogether; README, issue 11).

The engine side (`GrammarProcess`) gives each request to one of the processes (the least loaded) and sends them
binary records through pipes (`send_bytes`: no pickling): NEW (a request's grammar and the tokens it has output so
far), FILL (a step's rows of that process: each request's tokens recorded since the last FILL, the row of its token
in a draw not yet recorded, and the row its mask goes to) and DROP (requests gone). Each step that draws for
constrained rows has its tokens copied from the device into shared memory, then the draw's number (`publish`: queued
on the device's stream after the draw; a decode graph's masked draw holds those copies, and the copy of the masks
in, itself), so under overlap scheduling a step's FILL goes out as soon as it is launched, and its process takes the
last step's tokens the moment they reach the host, while the device runs the forward; the engine's own record of
those tokens comes later. Every FILL waits for the last draw published: the masks may be copied to the device until
then, and are not overwritten before. A process keeps one matcher per request, compiles grammars on a thread of its
own (NEW comes at admission, so a big schema compiles while the prompt is computed and the other requests' masks are
filled; only a step that needs its first mask sooner waits for it), advances the matchers and writes their masks
into the shared memory, the engine's pinned host buffer (registered with CUDA where there is one), then a flag per
row (the grammar completed or refused a token) and the FILL's sequence number. The processes fill their rows at
once; the engine spins on their sequence numbers, and they poll for the next record before they block: masks are
needed within a step, so a wake-up through the kernel would cost more than it saves. Every spin yields its core to
whatever else would run there.

The matchers here follow each request's output token by token, so a grammar's completion is learnt when the next
step's masks come back (`FilledMasks.completed`), one step after the token that completed it.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import select
import signal
import struct
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import NamedTuple

import numpy as np
import torch

from minisrv.config import GRAMMAR_PROCESSES
from minisrv.ipc.process import die_with_parent, set_process_name
from minisrv.scheduler.request import Request

logger = logging.getLogger(__name__)

NEW, FILL, DROP, STOP = b"N", b"F", b"D", b"S"
NEW_HEADER = struct.Struct("<qII")     # rid, number of tokens, grammar bytes; then the tokens (int32), the grammar
FILL_HEADER = struct.Struct("<qqI4x")  # sequence number, last draw published (to wait for), rows; padded to 8
# Then, per row with a grammar: rid, mask row, recorded tokens to consume, the row of the draw's token to consume
# after them or -1 (int64 each); then every row's recorded tokens (int64).
FILL_COLUMNS = 4
COMPLETED, REFUSED = 1, 2              # a row's flag: its grammar is complete / refused a token
DONE_WORDS = 8                         # a process's FILL sequence number, alone on its cache line
SPIN_CHECKS = 100_000                  # spins between checks that the processes still live
POLL_S = 0.005                         # how long a process polls for the next record before it blocks
STARTUP_TIMEOUT_S = 120.0              # for a process to import llguidance and build its token trie
COMPILE_THREADS = 1
# llguidance's executor for advancing and filling: more threads were slower on the H200 machine, where two processes
# of half the rows each took half the time of one (README, issue 11).
MATCHER_THREADS = 1


class _Segment(NamedTuple):
    """The shared segment's layout, for both ends: each process's FILL sequence number and the number of the last
    draw published, each on a cache line of its own; a flag per row; the published draw's tokens; the masks."""

    done: np.ndarray        # [processes, DONE_WORDS] int64: column 0
    published: np.ndarray   # [DONE_WORDS] int64: word 0
    flags: np.ndarray       # [max_rows] uint8
    tokens: np.ndarray      # [max_rows] int64
    masks: np.ndarray       # [max_rows, words] int32

    @staticmethod
    def layout(processes: int, max_rows: int, words: int) -> list[tuple[str, tuple[int, ...], type]]:
        return [("done", (processes, DONE_WORDS), np.int64), ("published", (DONE_WORDS,), np.int64),
                ("flags", (max_rows,), np.uint8), ("tokens", (max_rows,), np.int64),
                ("masks", (max_rows, words), np.int32)]

    @staticmethod
    def size(processes: int, max_rows: int, words: int) -> int:
        return sum(_line_bytes(shape, dtype) for _, shape, dtype in _Segment.layout(processes, max_rows, words))

    @staticmethod
    def views(buf: memoryview, processes: int, max_rows: int, words: int) -> _Segment:
        views, offset = {}, 0
        for name, shape, dtype in _Segment.layout(processes, max_rows, words):
            views[name] = np.ndarray(shape, dtype, buffer=buf[offset:])
            offset += _line_bytes(shape, dtype)
        return _Segment(**views)


def _line_bytes(shape: tuple[int, ...], dtype: type) -> int:
    return -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 64) * 64   # in whole cache lines


class GrammarProcessGone(RuntimeError):
    """A grammar process exited; the engine cannot constrain output any more."""


@dataclass
class FilledMasks:
    """A FILL's result once it is done: the masks of the batch's rows, and the rids whose grammar is complete (or
    refused a token: logged by the process, and listed in `refused` too) after the tokens recorded so far."""

    masks: torch.Tensor
    completed: list[int]
    refused: list[int] = field(default_factory=list)


class RemoteGrammar:
    """A request's TokenConstraint while its matcher lives in a grammar process: the scheduler's advance is a
    no-op (the process advances its copy at the next fill, which reports the grammar's completion)."""

    def fill_bitmask(self, address: int, num_bytes: int) -> None:
        raise RuntimeError("this request's masks come from the grammar process")

    def advance(self, token_id: int) -> bool:
        return False


class GrammarProcess:
    """The engine's handle on the grammar processes (`processes` of them, each with the matchers of its share of
    the requests, filling their rows of the masks at once). Not thread-safe: the engine thread alone calls it."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int], max_rows: int,
                 processes: int = GRAMMAR_PROCESSES, device: torch.device | str = "cpu") -> None:
        self.words = (vocab_size + 31) // 32
        size = _Segment.size(processes, max_rows, self.words)
        self._shm = shared_memory.SharedMemory(create=True, size=size)
        self._segment = _Segment.views(self._shm.buf, processes, max_rows, self.words)
        self._segment.done[:] = 0
        self._segment.published[:] = 0
        self.masks = torch.from_numpy(self._segment.masks)
        self._tokens = torch.from_numpy(self._segment.tokens)
        self._published = torch.from_numpy(self._segment.published[:1])
        self._draws = 0                                   # draws published
        self.device = torch.device(device)
        # The number of the last draw published, counted on the device, so that a CUDA graph can publish too.
        self._draw_number = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._registered = 0
        if self.device.type == "cuda":
            # Pinned, so that the copies to and from the device are queued, not done on the spot.
            base = np.frombuffer(self._shm.buf, np.uint8, size).ctypes.data
            error = torch.cuda.cudart().cudaHostRegister(base, size, 0)
            if int(error) == 0:
                self._registered = base
            else:   # the copies still work, but each waits for the device
                logger.warning("grammar_process: cannot pin the masks' shared memory (%s); every mask and token copy "
                               "will wait for the device", error)
        spawn = multiprocessing.get_context("spawn")
        self._conns, self._processes = [], []
        for index in range(processes):
            conn, child_end = spawn.Pipe()
            process = spawn.Process(target=_serve, name=f"minisrv-grammar-{index}", daemon=True,
                                    args=(child_end, self._shm.name, index, processes, max_rows, self.words,
                                          vocab_size, list(eos_token_ids), os.getpid()))
            process.start()
            child_end.close()
            self._conns.append(conn)
            self._processes.append(process)
        ready = True
        for conn in self._conns:
            try:
                conn.send_bytes(tokenizer_json.encode())
            except OSError:
                ready = False
        for conn in self._conns:
            try:
                ready = ready and conn.poll(STARTUP_TIMEOUT_S) and conn.recv_bytes() == b"ready"
            except (EOFError, OSError):
                ready = False
        # The processes have mapped the segment (or failed): its name can go, so nothing is left in /dev/shm.
        self._shm.unlink()
        if not ready:
            self.close()
            raise GrammarProcessGone("the grammar process did not start (a script that builds an engine when it is "
                                     "imported needs an `if __name__ == \"__main__\":` guard: multiprocessing's "
                                     "spawn imports it again in the child)")
        self._sequence = 0
        self._synced: dict[int, int] = {}       # rid -> output tokens its process has consumed, or will by a draw
        self._owner: dict[int, int] = {}        # rid -> the process that keeps its matcher
        self._load = [0] * processes            # requests each process keeps
        self._requests: dict[int, Request] = {}

    def register(self, req: Request) -> None:
        """Have a process compile req's grammar (on its compile thread) and follow its output from here on."""
        if req.rid not in self._synced:
            self._new(req)

    @property
    def pinned(self) -> bool:
        """Whether the shared segment is registered with CUDA (so copies to and from it can be queued)."""
        return self._registered != 0

    def publish(self, tokens: torch.Tensor) -> int:
        """Have the tokens a step just drew (its rows of last_tokens) copied here once the device has drawn them,
        then the draw's number, which `fill` names; returns it. Queued on the device's stream, after the draw."""
        self.queue_publish(tokens)
        return self.count_published()

    def queue_publish(self, tokens: torch.Tensor) -> None:
        """publish's copies, with no host work after them, so that a CUDA graph can hold them
        (DecodeGraphs.capture_published_draws); each time they run, count_published must count the draw."""
        if tokens.device != self.device:
            raise ValueError(f"tokens on {tokens.device}, published through a counter on {self.device}")
        rows = tokens.shape[0]
        self._tokens[:rows].copy_(tokens, non_blocking=True)
        self._draw_number.add_(1)
        self._published.copy_(self._draw_number, non_blocking=True)   # after the tokens, in the stream's order

    def count_published(self) -> int:
        """The number of the draw whose publish was queued last (the one queue_publish numbers on the device)."""
        self._draws += 1
        return self._draws

    def fill(self, requests: list[Request], drawn: dict[int, int] | None = None, draw: int = 0) -> PendingFill:
        """Ask for the masks of `requests` (rows without a grammar allow everything), once each constrained
        request's matcher has taken the tokens it recorded since the last fill, then its token of the published
        `draw`, if it is in flight there (drawn: rid -> row of last_tokens); returns at once. So the masks of a
        step can be filled while the device still runs it, from the moment the last step's tokens are drawn."""
        self._drop_finished()
        synced, owner, drawn = self._synced, self._owner, drawn or {}
        draw_is_last = 0 < draw == self._draws   # the segment holds that draw's tokens
        tables: list[list[int]] = [[] for _ in self._conns]
        tokens: list[list[int]] = [[] for _ in self._conns]
        free_rows: list[int] = []
        for row, req in enumerate(requests):
            if req.grammar is None or req.grammar_complete:   # complete: this row's sample is dropped
                free_rows.append(row)
                continue
            output = req.output_ids
            consumed = synced.get(req.rid)
            if consumed is None:
                self._new(req)
                consumed = len(output)
            index = owner[req.rid]
            count = len(output) - consumed
            if count < 0:
                raise RuntimeError(f"request {req.rid}: a drawn token its grammar took was not recorded")
            if count:
                tokens[index] += output[consumed:]
            source = drawn.get(req.rid, -1)
            if source >= 0 and not draw_is_last:
                raise RuntimeError(f"request {req.rid}: its token is in flight, but no draw was published" if draw <= 0
                                   else f"request {req.rid}: its token is in draw {draw}, which draw {self._draws} "
                                   "overwrote")
            synced[req.rid] = len(output) + (source >= 0)
            tables[index] += (req.rid, row, count, source)
        if free_rows:
            self._segment.masks[free_rows] = -1
        self._sequence += 1
        sent, filled = [], []
        for index, (table, process_tokens) in enumerate(zip(tables, tokens)):
            if table:
                rows = np.array(table, np.int64).reshape(-1, FILL_COLUMNS)
                # The process waits for the last draw published, even where no row takes a token from it: its
                # masks may be copied to the device until then.
                self._conns[index].send_bytes(FILL + FILL_HEADER.pack(self._sequence, self._draws, len(rows))
                                              + rows.tobytes() + np.array(process_tokens, np.int64).tobytes())
                sent.append(index)
                filled.append(rows)
        rows = np.concatenate(filled) if filled else np.zeros((0, FILL_COLUMNS), np.int64)
        return PendingFill(self, self._sequence, sent, len(requests), rows[:, 0], rows[:, 1])

    def _new(self, req: Request) -> None:
        index = min(range(len(self._load)), key=self._load.__getitem__)
        grammar = req.params.grammar.encode()
        output = req.output_ids
        self._conns[index].send_bytes(NEW + NEW_HEADER.pack(req.rid, len(output), len(grammar))
                                      + np.array(output, np.int32).tobytes() + grammar)
        self._requests[req.rid] = req
        self._synced[req.rid] = len(output)
        self._owner[req.rid] = index
        self._load[index] += 1

    def _drop_finished(self) -> None:
        gone = [rid for rid, req in self._requests.items() if req.finished]
        if not gone:
            return
        by_process: list[list[int]] = [[] for _ in self._conns]
        for rid in gone:
            index = self._owner.pop(rid)
            by_process[index].append(rid)
            self._load[index] -= 1
            del self._requests[rid], self._synced[rid]
        for conn, rids in zip(self._conns, by_process):
            if rids:
                conn.send_bytes(DROP + np.array(rids, np.int64).tobytes())

    def wait(self, sequence: int, processes: list[int]) -> None:
        for index in processes:
            done, spins = self._segment.done[index], 0
            while done[0] != sequence:
                os.sched_yield()
                spins += 1
                if spins % SPIN_CHECKS == 0 and not self._processes[index].is_alive():
                    raise GrammarProcessGone(f"the grammar process exited (code {self._processes[index].exitcode})")

    def __del__(self) -> None:
        # Unpinned before the segment is unmapped: CUDA would keep the range registered, and refuse to pin the next
        # segment mapped there. (Nothing to report from a finalizer, which may run at interpreter exit.)
        if hasattr(self, "_processes"):
            with contextlib.suppress(Exception):
                self.close()

    def close(self) -> None:
        if not hasattr(self, "masks"):
            return   # closed already
        for conn, process in zip(self._conns, self._processes):
            if process.is_alive():
                try:
                    conn.send_bytes(STOP)
                except OSError:
                    pass
        for conn, process in zip(self._conns, self._processes):
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()
        if self._registered:
            torch.cuda.synchronize()   # no copy still in flight to or from the segment
            torch.cuda.cudart().cudaHostUnregister(self._registered)
            self._registered = 0
        del self._segment, self.masks, self._tokens, self._published
        self._shm.close()


class PendingFill:
    """A FILL on its way: `result` waits for it."""

    def __init__(self, owner: GrammarProcess, sequence: int, processes: list[int], batch: int, rids: np.ndarray,
                 rows: np.ndarray) -> None:
        self._owner, self._sequence, self._processes = owner, sequence, processes
        self._batch, self._rids, self._rows = batch, rids, rows

    def result(self) -> FilledMasks:
        self._owner.wait(self._sequence, self._processes)
        flags = self._owner._segment.flags[self._rows]
        return FilledMasks(self._owner.masks[: self._batch], self._rids[flags != 0].tolist(),
                           self._rids[flags == REFUSED].tolist())


# ---- the child


def _serve(conn, shm_name: str, index: int, processes: int, max_rows: int, words: int, vocab_size: int,
           eos_token_ids: list[int], parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    set_process_name(f"grammar-{index}")
    if os.getppid() != parent_pid:   # the parent died before the kernel would kill this with it
        os._exit(1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s grammar %(levelname)s %(message)s")
    from llguidance import LLExecutor, LLMatcher, LLTokenizer

    shm = shared_memory.SharedMemory(name=shm_name)
    segment = _Segment.views(shm.buf, processes, max_rows, words)
    done, published = segment.done[index], segment.published
    tokenizer = LLTokenizer(conn.recv_bytes().decode(), n_vocab=vocab_size, eos_token=eos_token_ids)
    executor = LLExecutor(MATCHER_THREADS)
    compiler = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="compile")
    compiled: dict[bytes, Future] = {}
    matchers: dict[int, Future | object] = {}   # rid -> its matcher, or the Future of it while it compiles
    compile_lock = threading.Lock()

    def matcher_for(grammar: bytes, tokens: np.ndarray):
        with compile_lock:
            base = compiled.get(grammar)
            if base is None:
                base = compiled[grammar] = compiler.submit(LLMatcher, tokenizer, grammar.decode(), log_level=0)
        matcher = base.result().deep_copy()
        for token in tokens.tolist():
            matcher.consume_token(token)
        return matcher

    catch_up = ThreadPoolExecutor(1, thread_name_prefix="catch-up")
    last = _Batch()
    incoming = select.poll()
    incoming.register(conn.fileno(), select.POLLIN)
    conn.send_bytes(b"ready")
    while True:
        # Polled for a while before blocking: while requests decode, the next FILL comes within a step, and waking
        # a process blocked in read costs a GPU step tens to hundreds of microseconds.
        deadline = time.perf_counter() + POLL_S
        while not incoming.poll(0) and time.perf_counter() < deadline:
            os.sched_yield()   # to whatever else would run on this core
        try:
            record = conn.recv_bytes()
        except (EOFError, OSError):
            return
        kind, body = record[:1], memoryview(record)[1:]
        if kind == NEW:
            rid, num_tokens, grammar_bytes = NEW_HEADER.unpack_from(body)
            tokens = np.frombuffer(body, np.int32, num_tokens, NEW_HEADER.size)
            grammar = bytes(body[NEW_HEADER.size + 4 * num_tokens: NEW_HEADER.size + 4 * num_tokens + grammar_bytes])
            matchers[rid] = catch_up.submit(matcher_for, grammar, tokens.copy())
        elif kind == DROP:
            for rid in np.frombuffer(body, np.int64).tolist():
                matchers.pop(rid, None)
            last.key = b""
        elif kind == FILL:
            sequence, draw, num_rows = FILL_HEADER.unpack_from(body)
            table = np.frombuffer(body, np.int64, FILL_COLUMNS * num_rows, FILL_HEADER.size).reshape(num_rows, -1)
            recorded = np.frombuffer(body, np.int64, offset=FILL_HEADER.size + table.nbytes).tolist()
            while published[0] < draw:   # the draw's tokens are on their way from the device
                os.sched_yield()
            _fill(table, recorded, segment.tokens, last, matchers, executor, segment.masks, segment.flags)
            done[0] = sequence
        elif kind == STOP:
            return


class _Batch:
    """The last FILL's constrained rows and their matchers: a decoding batch keeps its rows from step to step, so
    the next FILL with the same (rid, row) table reuses them instead of looking each up again."""

    def __init__(self) -> None:
        self.key = b""
        self.matchers: list = []
        self.rows: list[tuple[object, int]] = []   # (matcher, mask row), as the executor takes them

    def update(self, table: np.ndarray, matchers: dict[int, Future | object]) -> None:
        key = table[:, :2].tobytes()
        if key == self.key:
            return
        self.matchers = []
        for rid in table[:, 0].tolist():
            matcher = matchers[rid]
            if isinstance(matcher, Future):   # compiled and caught up on the compile thread
                matcher = matchers[rid] = matcher.result()
            self.matchers.append(matcher)
        self.rows = list(zip(self.matchers, table[:, 1].tolist()))
        self.key = key


def _fill(table: np.ndarray, recorded: list[int], drawn: np.ndarray, last: _Batch,
          matchers: dict[int, Future | object], executor, masks: np.ndarray, flags: np.ndarray) -> None:
    """Advance each row's matcher by its recorded tokens, then its drawn one (one new token a row, the usual
    case, in one executor call), then write each row's mask and flag."""
    flags[table[:, 1]] = 0
    last.update(table, matchers)
    counts, sources = table[:, 2], table[:, 3]
    one_drawn = (counts == 0) & (sources >= 0)
    if one_drawn.all():
        one_token = drawn[sources].tolist()
    elif ((counts == 1) & (sources < 0)).all():
        one_token = recorded
    else:
        one_token = None
    if one_token is not None:
        accepted = executor.consume_token_par(list(zip(last.matchers, one_token)))
        if not all(accepted):
            for ok, (rid, row, _, _), matcher, token in zip(accepted, table.tolist(), last.matchers, one_token):
                if not ok:
                    _refused(rid, token, matcher, row, flags)
    else:
        used = 0
        for (rid, row, count, source), matcher in zip(table.tolist(), last.matchers):
            tokens = recorded[used: used + count] + ([int(drawn[source])] if source >= 0 else [])
            used += count
            for token in tokens:
                if not matcher.consume_token(token):
                    _refused(rid, token, matcher, row, flags)
                    break
    for matcher, row in last.rows:
        if matcher.is_stopped() and not flags[row]:
            flags[row] = COMPLETED
    executor.unsafe_compute_mask_ptr(last.rows, masks.ctypes.data, masks.shape[1] * 4, len(masks))
    for rid, (matcher, row) in zip(table[:, 0].tolist(), last.rows):
        if matcher.is_error() and flags[row] != REFUSED:   # its mask failed (allowing only an end): the engine stops it
            logger.error("request %d: the grammar failed: %s", rid, matcher.get_error())
            flags[row] = REFUSED


def _refused(rid: int, token: int, matcher, row: int, flags: np.ndarray) -> None:
    # Only a row whose every token was masked can sample one its grammar refuses; the engine stops it.
    logger.error("request %d: the grammar refused token %d: %s", rid, token, matcher.get_error())
    flags[row] = REFUSED
