"""The sandbox for generated code: every way out or over a limit is a failed result, never a crash of the caller."""

from __future__ import annotations

import os
import socket
import time

import pytest

from clp_fast.eval.sandbox import ExecResult, Limits, run_python

FAST = Limits(timeout_s=5.0, cpu_s=2, memory_mb=512, file_mb=4)


def _run(code: str, limits: Limits = FAST) -> ExecResult:
    r = run_python(code, limits)
    assert isinstance(r, ExecResult)
    return r


def test_correct_code_passes_and_wrong_code_fails():
    ok = _run("def add(a, b):\n    return a + b\n\ndef check(f):\n    assert f(2, 3) == 5\n\ncheck(add)\nprint('done')")
    assert ok.passed and ok.status == "passed" and ok.returncode == 0 and ok.stdout == "done"
    bad = _run("def add(a, b):\n    return a - b\n\ndef check(f):\n    assert f(2, 3) == 5\n\ncheck(add)\n")
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.stderr
    syntax = _run("def add(a, b:\n    return a\n")
    assert not syntax.passed and syntax.status == "failed" and "SyntaxError" in syntax.stderr


def test_infinite_loop_is_stopped_by_the_cpu_limit():
    t0 = time.perf_counter()
    r = _run("while True:\n    pass\n", Limits(timeout_s=20.0, cpu_s=1, memory_mb=512))
    assert r.status == "timeout" and not r.passed
    assert time.perf_counter() - t0 < 15  # the CPU limit (1 s), not the 20 s wall clock, ended it


def test_sleeping_forever_is_stopped_by_the_wall_clock():
    t0 = time.perf_counter()
    r = _run("import time\ntime.sleep(1000)\n", Limits(timeout_s=1.5, cpu_s=5, memory_mb=512))
    assert r.status == "timeout" and not r.passed
    assert time.perf_counter() - t0 < 10


def test_unbounded_allocation_fails_at_the_memory_limit():
    code = ("chunks = []\ntry:\n    while True:\n        chunks.append(bytearray(50 * 2**20))\n"
            "except MemoryError:\n    print(len(chunks))\n    raise\n")
    r = _run(code)  # 512 MB address space
    assert r.status == "failed" and not r.passed and "MemoryError" in r.stderr
    assert int(r.stdout) * 50 <= 512  # stopped at the limit, not at whatever the machine had


def test_opening_a_socket_is_an_escape_even_if_the_code_catches_the_error():
    r = _run("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.connect(('127.0.0.1', 9))\n")
    assert r.status == "escape" and not r.passed and "socket" in r.stderr
    caught = _run("import socket\ntry:\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
                  "except Exception:\n    pass\nprint('carried on')\n")
    assert caught.status == "escape" and not caught.passed and "carried on" not in caught.stdout


def test_writing_outside_its_directory_is_an_escape(tmp_path):
    target = tmp_path / "escaped.txt"
    r = _run(f"with open({str(target)!r}, 'w') as f:\n    f.write('out')\n")
    assert r.status == "escape" and not r.passed
    assert not target.exists()
    up = _run("import os\nos.makedirs('../clp_fast_sandbox_escape_dir', exist_ok=True)\n")
    assert up.status == "escape" and not up.passed
    remove = _run(f"import os\nos.remove({str(tmp_path / 'x')!r})\n")
    assert remove.status == "escape"


def test_files_inside_its_directory_are_allowed_and_removed_afterwards():
    r = _run("import os\nopen('scratch.txt', 'w').write('hi')\nprint(os.getcwd())\nprint(open('scratch.txt').read())")
    assert r.passed, r.stderr
    cwd, text = r.stdout.splitlines()
    assert text == "hi" and os.path.basename(cwd).startswith("clp_fast-sandbox-")
    assert not os.path.exists(cwd)


def test_processes_and_early_exits_do_not_pass():
    assert _run("import subprocess\nsubprocess.run(['true'])\n").status == "escape"
    assert _run("import os\nos.kill(os.getpid(), 0)\n").status == "escape"  # signal 0: harmless if let through
    # exit status 0 before the tests ran is not a pass: the bootstrap's token never printed
    assert _run("import sys\nsys.exit(0)\nassert False\n").status == "exited"
    assert _run("import os\nos._exit(0)\n").status == "exited"


def test_empty_environment_and_output_limit():
    env = _run("import os\nprint(sorted(os.environ))\n")
    assert env.passed and env.stdout in ("[]", "['LC_CTYPE']")  # Python may set LC_CTYPE itself (PEP 538)
    flood = _run("while True:\n    print('x' * 4096)\n")
    assert not flood.passed and flood.status in ("failed", "killed")
    assert len(flood.stdout) <= 2000


def test_the_caller_keeps_working_and_bad_arguments_are_named():
    socket.socket().close()  # the hook lives in the child only
    with pytest.raises(TypeError, match="code must be a str"):
        run_python(b"print(1)")
    with pytest.raises(ValueError, match="timeout_s"):
        Limits(timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        Limits(memory_mb=-1)
