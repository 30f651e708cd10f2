"""Ring names: unique, private (0600), and gone from /dev/shm once everyone attached, whatever happens next."""
from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import signal
import stat

import pytest
from conftest import leftovers
from ipc_peers import PEER_GONE_EXIT, attach_and_serve, attach_then_raise

from minisrv.ipc import RingReader, RingSet, RingWriter, Wakeup
from minisrv.ipc.segment import FIFO_DIR, RingNames

SPAWN = multiprocessing.get_context("spawn")


def test_names_are_per_instance_and_unguessable(ring_set: RingSet) -> None:
    other = RingSet()
    assert re.fullmatch(rf"/minisrv-{os.getpid()}-[0-9a-f]{{16}}", ring_set.prefix)
    assert other.prefix != ring_set.prefix
    specs = ring_set.create("tokens", 1024)
    assert specs.producer.name == f"{ring_set.prefix}-tokens" and specs.producer.label == "tokens"


@pytest.mark.parametrize("wakeup", list(Wakeup))
def test_every_name_is_created_mode_0600(ring_set: RingSet, wakeup: Wakeup) -> None:
    os.umask(old := os.umask(0))  # read the umask: it may only narrow 0600, never widen it
    specs = ring_set.create("perm", 1024, num_readers=2, wakeup=wakeup)
    names = RingNames(specs.producer.name)
    paths = [f"{FIFO_DIR}/{names.segment[1:]}", f"{FIFO_DIR}/sem.{names.space[1:]}"]
    paths += [names.doorbell(r, wakeup) if wakeup is Wakeup.FIFO else f"{FIFO_DIR}/sem.{names.doorbell(r, wakeup)[1:]}"
              for r in range(2)]
    for path in paths:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 & ~old, path
    assert len(leftovers(ring_set.prefix)) == len(paths)


def test_bad_arguments_name_the_field(ring_set: RingSet) -> None:
    with pytest.raises(ValueError, match="capacity must be a power of two"):
        ring_set.create("a", 1000)
    with pytest.raises(ValueError, match="num_readers"):
        ring_set.create("b", 1024, num_readers=0)
    with pytest.raises(ValueError, match="ring name"):
        ring_set.create("Bad-Name", 1024)
    assert leftovers(ring_set.prefix) == []
    ring_set.create("c", 1024)
    with pytest.raises(ValueError, match="already exists"):
        ring_set.create("c", 1024)


def test_last_attach_unlinks_every_name(ring_set: RingSet) -> None:
    specs = ring_set.create("t", 1024, num_readers=2, wakeup=Wakeup.FIFO)
    endpoints = [RingWriter(specs.producer), RingReader(specs.readers[0])]
    assert leftovers(ring_set.prefix) != []
    endpoints.append(RingReader(specs.readers[1]))
    assert leftovers(ring_set.prefix) == []
    with pytest.raises(FileNotFoundError, match="ring 't'.*does not exist"):
        RingReader(specs.readers[1])
    for endpoint in endpoints:
        endpoint.close()


def test_specs_pickle_and_roles_are_checked(ring_set: RingSet) -> None:
    specs = ring_set.create("t", 1024)
    assert pickle.loads(pickle.dumps(specs)) == specs
    with pytest.raises(ValueError, match="needs a producer spec"):
        RingWriter(specs.reader)
    with pytest.raises(ValueError, match="needs a reader spec"):
        RingReader(specs.producer)
    with RingReader(specs.reader), pytest.raises(RuntimeError, match="already attached"):
        RingReader(specs.reader)


def start(target, *args) -> tuple[multiprocessing.Process, object]:
    attached = SPAWN.Event()
    process = SPAWN.Process(target=target, args=(*args, attached))
    process.start()
    assert attached.wait(30), "child did not attach"
    return process, attached


@pytest.mark.parametrize("victim", ["producer", "reader"])
def test_kill_9_of_either_side_leaves_nothing_and_the_survivor_notices(ring_set: RingSet, victim: str) -> None:
    specs = ring_set.create("t", 1024)
    producer, _ = start(attach_and_serve, specs.producer)
    reader, _ = start(attach_and_serve, specs.reader)
    assert leftovers(ring_set.prefix) == []        # both attached: unlinked before any kill
    killed, survivor = (producer, reader) if victim == "producer" else (reader, producer)
    os.kill(killed.pid, signal.SIGKILL)
    survivor.join(30)
    killed.join(30)
    assert survivor.exitcode == PEER_GONE_EXIT
    assert killed.exitcode == -signal.SIGKILL
    assert leftovers(ring_set.prefix) == []


def test_child_killed_before_its_peer_attached_is_cleaned_by_the_launcher(ring_set: RingSet) -> None:
    specs = ring_set.create("t", 1024)
    producer, _ = start(attach_and_serve, specs.producer)
    os.kill(producer.pid, signal.SIGKILL)
    producer.join(30)
    assert leftovers(ring_set.prefix) != []        # the reader never attached, so nobody unlinked
    ring_set.unlink()                              # what the launcher does in its finally
    assert leftovers(ring_set.prefix) == []


def test_child_raising_after_attach_leaves_nothing(ring_set: RingSet) -> None:
    specs = ring_set.create("t", 1024)
    with RingWriter(specs.producer):
        child, _ = start(attach_then_raise, specs.reader)
        child.join(30)
    assert child.exitcode == 1
    assert leftovers(ring_set.prefix) == []


def test_sweep_removes_only_names_of_dead_instances(tmp_path) -> None:
    import subprocess
    import sys

    from minisrv.ipc import sweep_dead_instances

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    live = str(os.getpid())
    names = {f"minisrv-{dead}-0123456789abcdef-req0": False, f"sem.minisrv-{dead}-0123456789abcdef-req0-space": False,
             f"minisrv-{dead}-0123456789abcdef-text-r0.fifo": False, f"minisrv-{live}-fedcba9876543210-req0": True,
             "minisrv-notapid-0123456789abcdef-x": True, "other-file": True}
    for name in names:
        (tmp_path / name).write_bytes(b"")
    removed = sweep_dead_instances((str(tmp_path),))
    assert sorted(os.path.basename(p) for p in removed) == sorted(n for n, keep in names.items() if not keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, keep in names.items() if keep)
