"""`kill -9` of the server while it starts (workers spawned, some not attached to their rings yet, the model
loading): every worker goes within 5 s, and whatever shared-memory names the dead instance could not unlink
are gone once the next server has started."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.faults.harness import EXIT_WITHIN_S, alive
from tests.server.live_server import LiveServer, free_port

pytestmark = pytest.mark.slow


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").iterdir():
            children = {int(c) for c in (task / "children").read_text().split()}
            found |= children
            todo += children
    return found


def names_of(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.removeprefix("sem.").startswith(f"minisrv-{pid}-")]


def test_servers_killed_while_starting_leave_nothing_behind() -> None:
    """Killed at several moments of start-up (before the workers exist, while they attach, while the model
    loads), so that some attempt lands in the window where names are created but not yet unlinked."""
    dead, left = [], 0
    for after_s in (0.8, 1.2, 1.5, 1.8, 2.2, 3.0):
        server = subprocess.Popen([sys.executable, "-m", "minisrv.cli", "serve", "--port", str(free_port()),
                                   "--max-model-len", "1024"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(after_s)
        workers = descendants(server.pid)
        server.kill()
        server.wait()
        killed = time.monotonic()
        while any(alive(p) for p in workers) and time.monotonic() - killed < EXIT_WITHIN_S:
            time.sleep(0.05)
        assert not [p for p in workers if alive(p)], f"workers outlived their parent killed after {after_s} s"
        dead.append(server.pid)
        left += len(names_of(server.pid))
    print(f"{len(dead)} servers killed while starting left {left} names in /dev/shm")
    with LiveServer(["--max-model-len", "1024"]):
        assert [n for pid in dead for n in names_of(pid)] == [], "the next start did not remove the dead names"
