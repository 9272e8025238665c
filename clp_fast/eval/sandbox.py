"""Run untrusted Python (a model's completion plus its tests) in a sandboxed subprocess.

Generated code never runs in the caller's process. Each :func:`run_python` call starts a fresh
``python -I -B`` child with:

- a **wall-clock timeout** (the whole process group is killed: ``start_new_session``), and
  ``resource`` limits on **CPU time** (``RLIMIT_CPU``), **address space** (``RLIMIT_AS``), file size
  (``RLIMIT_FSIZE``, which also bounds the captured output) and core dumps;
- a **fresh temporary directory** as its working directory, removed afterwards, and an **empty
  environment**; stdin is empty;
- an **audit hook** (PEP 578), installed before the code runs, that ends the child as an escape
  attempt on: creating a socket (no network), opening a file for writing or changing the file
  system outside its directory, starting or signalling processes, and loading native code through
  ``ctypes``.

The audit hook is a guard against the accidents and curiosities of generated code, not a security
boundary against a determined attacker (native code could bypass it); the resource limits, the
process group kill and the empty environment are enforced by the OS.

A pass needs exit status 0 **and** a per-run random token the bootstrap prints after the code
finished: code that calls ``sys.exit(0)`` or ``os._exit(0)`` before its tests ran does not pass.
A crash, a timeout, a limit hit or an escape attempt is a failed result (:class:`ExecResult`),
never an exception in the caller.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

__all__ = ["ExecResult", "Limits", "run_python"]

ESCAPE_EXIT = 113  # the bootstrap's exit status after an escape attempt
ESCAPE_MARK = "SANDBOX-ESCAPE:"
OUTPUT_TAIL = 2000  # characters of stdout / stderr kept in the result

# Runs in the child before the untrusted code. Reads {"nonce", "code"} from stdin, installs the audit
# hook, runs the code as __main__, and prints the nonce only if the code ran to its end.
_BOOTSTRAP = r'''
import json, os, resource, sys
_req = json.loads(sys.stdin.read())
for _name, _value in _req["rlimits"].items():  # hard limits too: the code cannot raise them again
    # CPU: SIGXCPU at the soft limit, SIGKILL a second later should the code catch SIGXCPU
    resource.setrlimit(getattr(resource, _name), (_value, _value + (_name == "RLIMIT_CPU")))
_root = os.path.realpath(os.getcwd())
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_BLOCKED = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "subprocess.Popen",
            "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
            "os.killpg", "signal.pthread_kill", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "pty.spawn",
            "sys.remote_exec"}
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
                "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile",
                "os.chdir"}
_realpath, _join, _getcwd, _exit, _write = os.path.realpath, os.path.join, os.getcwd, os._exit, os.write

def _inside(path):
    if isinstance(path, int):
        return True  # an already open descriptor (stdout, stderr, or one opened inside)
    p = _realpath(_join(_getcwd(), os.fsdecode(path)))
    return p == _root or p.startswith(_root + os.sep)

def _escape(event, args):
    _write(2, ("\n%s %s %r\n" % ("SANDBOX-ESCAPE:", event, args)).encode("utf-8", "replace")[:2000])
    _exit(113)

def _hook(event, args):
    if event in _BLOCKED:
        _escape(event, args)
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writes and not _inside(path):
            _escape(event, args)
    elif event in _PATH_EVENTS:
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                _escape(event, args)

def _flush():  # os._exit skips it: keep what the code printed before it failed
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass

sys.dont_write_bytecode = True
sys.addaudithook(_hook)
_nonce, _code = _req["nonce"], _req["code"]
del _req
try:
    exec(compile(_code, "<sandboxed>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit as e:
    sys.stderr.write("sandboxed code exited early (SystemExit %r)\n" % (e.code,))
    _flush()
    _exit(2)
except BaseException:
    import traceback
    traceback.print_exc()
    _flush()
    _exit(1)
sys.stdout.write("\n" + _nonce + "\n")
sys.stdout.flush()
_exit(0)
'''


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run.

    ``timeout_s`` is wall-clock (the process group is killed); ``cpu_s`` is ``RLIMIT_CPU``
    (SIGXCPU, and SIGKILL a second later); ``memory_mb`` is ``RLIMIT_AS`` (allocations beyond it
    fail with ``MemoryError``); ``file_mb`` is ``RLIMIT_FSIZE`` for any file the code writes,
    its captured stdout and stderr included.
    """

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    file_mb: int = 16

    def __post_init__(self):
        for name in ("timeout_s", "cpu_s", "memory_mb", "file_mb"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Limits.{name}={value!r} must be a positive number")


@dataclass(frozen=True)
class ExecResult:
    """What one sandboxed run did.

    ``status``: ``"passed"`` (ran to its end, exit 0), ``"failed"`` (an exception, e.g. an assertion
    of the tests, or ``MemoryError`` at the memory limit), ``"exited"`` (``sys.exit``/``os._exit``
    before the end), ``"timeout"`` (wall clock or CPU time), ``"escape"`` (the audit hook stopped a
    forbidden operation), ``"killed"`` (another signal, e.g. a file-size limit) or ``"error"`` (the
    sandbox itself could not run it: counted as a failure too, but reported apart).
    """

    status: str
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * OUTPUT_TAIL))
            return f.read().decode("utf-8", "replace")[-OUTPUT_TAIL:]
    except OSError:
        return ""


def _rlimits(limits: Limits) -> dict[str, int]:
    """``{RLIMIT name: value}`` the bootstrap sets (soft and hard) before the code runs.

    Set by the child itself rather than in a ``preexec_fn``: the caller holds torch's threads, and
    ``preexec_fn`` is unsafe in a threaded parent.
    """
    mb = 1024 * 1024
    return {"RLIMIT_CPU": int(limits.cpu_s), "RLIMIT_AS": int(limits.memory_mb * mb),
            "RLIMIT_FSIZE": int(limits.file_mb * mb), "RLIMIT_CORE": 0}


def _classify(rc: int | None, timed_out: bool, nonce_seen: bool, stderr: str) -> str:
    if timed_out or rc == -signal.SIGXCPU:
        return "timeout"
    if rc == ESCAPE_EXIT and ESCAPE_MARK in stderr:
        return "escape"
    if rc == 0 and nonce_seen:
        return "passed"
    if rc in (0, 2):
        return "exited"
    if rc is not None and rc < 0:
        return "killed"
    return "failed"


def run_python(code: str, limits: Limits | None = None, *, python: str | None = None) -> ExecResult:
    """Run ``code`` as ``__main__`` in a sandboxed child process; never raises for what the code does.

    Args:
        code: Python source (e.g. a HumanEval prompt + completion + tests + ``check(entry_point)``).
        limits: :class:`Limits` (default: 10 s wall, 10 s CPU, 1 GiB address space, 16 MiB files).
        python: interpreter for the child (default: this one, ``sys.executable``).

    Returns:
        :class:`ExecResult`; ``.passed`` is True only if the code ran to its end with exit status 0.

    Raises:
        TypeError: ``code`` is not a string (a caller's bug, not the code's).
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    limits = limits or Limits()
    if os.name != "posix":
        return ExecResult("error", None, 0.0, "", f"the sandbox needs a POSIX system (resource limits), not {os.name}")
    nonce = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="clp_fast-sandbox-")
    t0 = time.perf_counter()
    rc, timed_out = None, False
    out_path, err_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([python or sys.executable, "-I", "-B", "-c", _BOOTSTRAP], cwd=workdir, env={},
                                    stdin=subprocess.PIPE, stdout=out, stderr=err, start_new_session=True,
                                    close_fds=True)
            try:
                try:
                    proc.stdin.write(json.dumps({"nonce": nonce, "code": code, "rlimits": _rlimits(limits)}).encode())
                    proc.stdin.close()
                except BrokenPipeError:
                    pass  # the child died before reading: its status says why
                rc = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                if proc.poll() is None or timed_out:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    rc = proc.wait()
        stdout, stderr = _tail(out_path), _tail(err_path)
        nonce_seen = stdout.rstrip().endswith(nonce)
        if nonce_seen:
            stdout = stdout.rstrip()[: -len(nonce)].rstrip("\n")
        status = _classify(rc, timed_out, nonce_seen, stderr)
        return ExecResult(status, rc, time.perf_counter() - t0, stdout, stderr)
    except OSError as e:  # the sandbox could not start or read its child: not the code's doing
        return ExecResult("error", rc, time.perf_counter() - t0, "", f"sandbox error: {e}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
