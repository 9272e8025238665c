"""Which machine a bench ran on, how loaded it was, and how much memory each call took."""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import os
import platform
import resource
import socket
import time
from pathlib import Path

import torch
from gitinfo import git_commit  # noqa: F401  (re-exported: benches import it from here)

import clp_fast

ROOT = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """CPU, threads and library versions: what a reader needs to compare two result files."""
    return {
        "host": socket.gethostname(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "clp_fast": clp_fast.__version__,
        "commit": git_commit(),
        "loadavg_start": loadavg(),
    }


def contention_probe(repeats: int = 30) -> float:
    """Median ms of a tiny matmul ([5, 900] x [900, 4]): ~0.003 ms on an idle core.

    With more torch threads than free cores, every parallel op waits for a descheduled thread: on
    the project's 2-core CPU next to a training job this op took 16 ms at 2 threads, 0.003 ms at 1.
    Such a run still compares methods side by side, but it charges per-op costs, not per-FLOP ones.
    """
    a, w = torch.randn(5, 900), torch.randn(4, 900)
    times = []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, w)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


CONTENDED_MS = 1.0


# ------------------------------------------------------------------------------------------- memory
class PeakRSS:
    """Resident-set high-water mark of this process around one call.

    Linux ≥ 4.0 lets a process reset its own ``VmHWM`` (write ``5`` to ``/proc/self/clear_refs``),
    so each call's peak is its own; elsewhere ``ru_maxrss`` is the whole run's peak so far (then
    ``method`` says so). RSS, not tracemalloc: tracemalloc sees only Python's allocator, not
    torch's tensors.
    """

    def __init__(self):
        self.method = "VmHWM reset per call (/proc/self/clear_refs)"
        try:
            self._reset()
            self._read("VmHWM")
        except OSError:
            self.method = "ru_maxrss (process high-water, not reset per call)"

    @staticmethod
    def _read(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
        raise OSError(f"{key} not in /proc/self/status")

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def start(self) -> float:
        """Reset the high-water mark; returns the current RSS (MiB)."""
        if self.method.startswith("VmHWM"):
            self._reset()
            return self._read("VmRSS")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def peak(self) -> float:
        """Peak RSS (MiB) since :meth:`start`."""
        if self.method.startswith("VmHWM"):
            return self._read("VmHWM")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024



def result_stem() -> str:
    """``<date>-<host>-<commit>``: the stem of a result file, named when the run starts."""
    date = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{date}-{socket.gethostname()}-{git_commit()}"


def loadavg() -> list[float] | None:
    """``os.getloadavg()`` as a list (1, 5, 15 min), or None where the OS has none."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None
