"""Injected kill points: how the tests prove that a fetch, a data build or a training run killed at any point
leaves nothing that a later run takes for complete.

Code that writes something a later run relies on calls :func:`kill_point` with a name before, during and after
its writes. With ``CLP_FAST_KILL_AT=<name>`` (or ``<name>@<n>``: the n-th time that point is reached) in the
environment, the process SIGKILLs itself there -- no ``finally``, no ``atexit``, exactly what the OOM killer or a
power cut does. Unset (always, outside tests) it costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

__all__ = ["KILL_ENV", "kill_point", "pid_alive"]

KILL_ENV = "CLP_FAST_KILL_AT"
_reached: Counter = Counter()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a file named after a dead writer's pid is a killed run's leftover)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_point(name: str) -> None:
    """SIGKILL this process if ``$CLP_FAST_KILL_AT`` names this point (and this is its n-th visit)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
