"""A process of its own for the matchers of structured output, so that their work never runs on the engine thread.

llguidance's matchers are advanced token by token and fill a bitmask of allowed tokens per step. In the scheduler
process that work, and the hand-overs of the GIL to a mask thread, lands on the engine thread: at batch 64 on the
H200 machine a constrained llama-3.2-1b step took 1.23-1.28x a free one that way, 1.13-1.21x with this process
(in the same runs; 1.02x with the grammars' host work gone altogether; README, issue 11).

The engine side (`GrammarProcess`) sends binary records through a pipe (`send_bytes`: no pickling): NEW (a
request's grammar and the tokens it has output so far), FILL (a step's rows: each request's tokens since the last
FILL, and the row its mask goes to) and DROP (requests gone). The child keeps one matcher per request, compiles
grammars on a thread of its own (NEW comes at admission, so a big schema compiles while the prompt is computed and
the other requests' masks are filled; only a step that needs its first mask sooner waits for it), advances the
matchers and writes the masks into shared memory, the engine's pinned host buffer (registered with CUDA where there
is one), then a flag per row (the grammar completed or refused a token) and the FILL's sequence number. The engine
spins on that number: masks are needed within a step, so a wake-up through the kernel would cost more than it saves.

The matchers here follow each request's recorded output, so a grammar's completion is learnt when the next
step's masks come back (`FilledMasks.completed`), one step after the token that completed it.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import struct
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np
import torch

from minisrv.scheduler.request import Request

logger = logging.getLogger(__name__)

NEW, FILL, DROP, STOP = b"N", b"F", b"D", b"S"
NEW_HEADER = struct.Struct("<qII")     # rid, number of tokens, grammar bytes; then the tokens (int32), the grammar
FILL_HEADER = struct.Struct("<qII4x")  # sequence number, batch rows, rows with a grammar; padded to 8 bytes
# Then, per row with a grammar: rid, mask row, tokens to consume (int64 each), then every row's tokens (int64).
COMPLETED, REFUSED = 1, 2              # a row's flag: its grammar is complete / refused a token
DONE_WORDS = 8                         # the FILL sequence number, alone on its cache line
SPIN_CHECKS = 100_000                  # spins between checks that the child still lives
STARTUP_TIMEOUT_S = 120.0              # for the child to import llguidance and build its token trie
COMPILE_THREADS = 1
MATCHER_THREADS = 1                    # llguidance's executor for advancing and filling (more were no faster)


def _segment_bytes(max_rows: int, words: int) -> int:
    return _masks_offset(max_rows) + max_rows * words * 4


def _masks_offset(max_rows: int) -> int:
    return DONE_WORDS * 8 + -(-max_rows // 64) * 64   # the sequence number's line, then a flag a row in whole lines


def _segment_views(buf: memoryview, max_rows: int, words: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shared segment's layout, for both ends: the FILL sequence number done, a flag per row, the masks."""
    done = np.ndarray((1,), np.int64, buffer=buf[:8])
    flags = np.ndarray((max_rows,), np.uint8, buffer=buf[DONE_WORDS * 8: DONE_WORDS * 8 + max_rows])
    masks = np.ndarray((max_rows, words), np.int32, buffer=buf[_masks_offset(max_rows):])
    return done, flags, masks


class GrammarProcessGone(RuntimeError):
    """The grammar process exited; the engine cannot constrain output any more."""


@dataclass
class FilledMasks:
    """A FILL's result once it is done: the masks of the batch's rows, and the rids whose grammar is complete (or
    refused a token: logged by the child) after the tokens recorded so far."""

    masks: torch.Tensor
    completed: list[int]


class RemoteGrammar:
    """A request's TokenConstraint while its matcher lives in the grammar process: the scheduler's advance is a
    no-op (the process advances its copy at the next fill, which reports the grammar's completion)."""

    def fill_bitmask(self, address: int, num_bytes: int) -> None:
        raise RuntimeError("this request's masks come from the grammar process")

    def advance(self, token_id: int) -> bool:
        return False


class GrammarProcess:
    """The engine's handle on the grammar process. Not thread-safe: the engine thread alone calls it."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int], max_rows: int) -> None:
        self.words = (vocab_size + 31) // 32
        self._shm = shared_memory.SharedMemory(create=True, size=_segment_bytes(max_rows, self.words))
        self._done, self._flags, masks = _segment_views(self._shm.buf, max_rows, self.words)
        self.masks = torch.from_numpy(masks)
        self._done[0] = 0
        self._registered = False
        if torch.cuda.is_available():
            # Pinned, so that the copy to the device is queued, not done on the spot.
            error = torch.cuda.cudart().cudaHostRegister(self.masks.data_ptr(), self.masks.nbytes, 0)
            self._registered = int(error) == 0
        spawn = multiprocessing.get_context("spawn")
        self._conn, child_end = spawn.Pipe()
        self._process = spawn.Process(target=_serve, name="minisrv-grammar", daemon=True,
                                      args=(child_end, self._shm.name, max_rows, self.words, vocab_size,
                                            list(eos_token_ids), os.getpid()))
        self._process.start()
        child_end.close()
        try:
            self._conn.send_bytes(tokenizer_json.encode())
            ready = self._conn.poll(STARTUP_TIMEOUT_S) and self._conn.recv_bytes() == b"ready"
        except (EOFError, OSError):
            ready = False
        # The child has mapped the segment (or failed): its name can go, so nothing is left in /dev/shm.
        self._shm.unlink()
        if not ready:
            self.close()
            raise GrammarProcessGone("the grammar process did not start (a script that builds an engine when it is "
                                     "imported needs an `if __name__ == \"__main__\":` guard: multiprocessing's "
                                     "spawn imports it again in the child)")
        self._sequence = 0
        self._synced: dict[int, int] = {}       # rid -> output tokens the child has consumed
        self._requests: dict[int, Request] = {}

    def register(self, req: Request) -> None:
        """Have the process compile req's grammar (on its compile thread) and follow its output from here on."""
        if req.rid not in self._synced:
            self._new(req)

    def fill(self, requests: list[Request]) -> PendingFill:
        """Send the tokens each constrained request recorded since the last fill and ask for the masks of
        `requests` (rows without a grammar allow everything); returns at once."""
        self._drop_finished()
        rows, tokens = [], []
        for row, req in enumerate(requests):
            if req.grammar is None:
                continue
            output = req.output_ids
            if req.rid not in self._synced:
                self._new(req)
            new = output[self._synced[req.rid]:]
            self._synced[req.rid] = len(output)
            rows.append((req.rid, row, len(new)))
            tokens += new
        self._sequence += 1
        table = np.array(rows, np.int64).reshape(-1, 3)
        self._conn.send_bytes(FILL + FILL_HEADER.pack(self._sequence, len(requests), len(rows)) + table.tobytes()
                              + np.array(tokens, np.int64).tobytes())
        return PendingFill(self, self._sequence, len(requests), [rid for rid, _, _ in rows], table[:, 1])

    def _new(self, req: Request) -> None:
        grammar = req.params.grammar.encode()
        output = req.output_ids
        self._conn.send_bytes(NEW + NEW_HEADER.pack(req.rid, len(output), len(grammar))
                              + np.array(output, np.int32).tobytes() + grammar)
        self._requests[req.rid] = req
        self._synced[req.rid] = len(output)

    def _drop_finished(self) -> None:
        gone = [rid for rid, req in self._requests.items() if req.finished]
        if gone:
            self._conn.send_bytes(DROP + np.array(gone, np.int64).tobytes())
            for rid in gone:
                del self._requests[rid], self._synced[rid]

    def wait(self, sequence: int) -> None:
        done, spins = self._done, 0
        while done[0] != sequence:
            spins += 1
            if spins % SPIN_CHECKS == 0 and not self._process.is_alive():
                raise GrammarProcessGone(f"the grammar process exited (code {self._process.exitcode})")

    def close(self) -> None:
        if not hasattr(self, "masks"):
            return   # closed already
        if self._process.is_alive():
            try:
                self._conn.send_bytes(STOP)
            except OSError:
                pass
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
        self._conn.close()
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.masks.data_ptr())
            self._registered = False
        del self._done, self._flags, self.masks
        self._shm.close()


class PendingFill:
    """A FILL on its way: `result` waits for it."""

    def __init__(self, owner: GrammarProcess, sequence: int, batch: int, rids: list[int], rows: np.ndarray) -> None:
        self._owner, self._sequence, self._batch, self._rids, self._rows = owner, sequence, batch, rids, rows

    def result(self) -> FilledMasks:
        self._owner.wait(self._sequence)
        flags = self._owner._flags[self._rows]
        completed = [rid for rid, flag in zip(self._rids, flags.tolist()) if flag]
        return FilledMasks(self._owner.masks[: self._batch], completed)


# ---- the child


def _serve(conn, shm_name: str, max_rows: int, words: int, vocab_size: int, eos_token_ids: list[int],
           parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s grammar %(levelname)s %(message)s")
    from llguidance import LLExecutor, LLMatcher, LLTokenizer

    shm = shared_memory.SharedMemory(name=shm_name)
    done, flags, masks = _segment_views(shm.buf, max_rows, words)
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
    conn.send_bytes(b"ready")
    while True:
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
        elif kind == FILL:
            sequence, batch, num_rows = FILL_HEADER.unpack_from(body)
            table = np.frombuffer(body, np.int64, 3 * num_rows, FILL_HEADER.size).reshape(num_rows, 3)
            tokens = np.frombuffer(body, np.int64, offset=FILL_HEADER.size + table.nbytes).tolist()
            _fill(table, tokens, batch, matchers, executor, masks, flags)
            done[0] = sequence
        elif kind == STOP:
            return


def _fill(table: np.ndarray, tokens: list[int], batch: int, matchers: dict[int, Future | object], executor,
          masks: np.ndarray, flags: np.ndarray) -> None:
    """Advance each row's matcher by its new tokens (one token a row, the usual case, in one executor call), then
    write every row's mask and flag."""
    flags[:batch] = 0
    rows, one_token, one_token_rows, used = [], [], [], 0
    for rid, row, count in table.tolist():
        matcher = matchers[rid]
        if isinstance(matcher, Future):   # compiled and caught up on the compile thread
            matcher = matchers[rid] = matcher.result()
        if count == 1:
            one_token.append((matcher, tokens[used]))
            one_token_rows.append((rid, row))
        else:
            for token in tokens[used: used + count]:
                if not matcher.consume_token(token):
                    _refused(rid, token, matcher, row, flags)
                    break
        used += count
        rows.append((matcher, row))
    if one_token:
        for accepted, (matcher, token), (rid, row) in zip(executor.consume_token_par(one_token), one_token,
                                                          one_token_rows):
            if not accepted:
                _refused(rid, token, matcher, row, flags)
    for matcher, row in rows:
        if not flags[row] and matcher.is_stopped():
            flags[row] = COMPLETED
    if len(rows) < batch:
        unconstrained = np.ones(batch, bool)
        unconstrained[table[:, 1]] = False
        masks[:batch][unconstrained] = -1
    if rows:
        executor.unsafe_compute_mask_ptr(rows, masks.ctypes.data, masks.shape[1] * 4, batch)


def _refused(rid: int, token: int, matcher, row: int, flags: np.ndarray) -> None:
    # Only a row whose every token was masked can sample one its grammar refuses; the engine stops it.
    logger.error("request %d: the grammar refused token %d: %s", rid, token, matcher.get_error())
    flags[row] = REFUSED


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)   # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)
