"""What every process minisrv spawns does first on Linux: die with its parent, and show its role in top and ps.

Both go through prctl, where there is one; elsewhere (or refused) they do nothing, and the processes' wait loops
still notice a dead parent (minisrv/runtime/worker.py's ParentWatch, the grammar processes' parent check).
"""
from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def die_with_parent() -> None:
    """Have the kernel kill this process (SIGKILL) when the thread that spawned it exits."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def set_process_name(name: str) -> None:
    """Show the role in top and ps (its first 15 bytes, the kernel's limit), where every spawned process would
    otherwise read `python`."""
    _prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))


def _prctl(option: int, arg: object) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):
        pass
