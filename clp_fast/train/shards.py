"""How cached data is stored: atomic safetensors shards, checked on read, and the training positions in them.

One shard holds ``n`` right-padded sequences of length ``L``:

- ``hidden`` ``[n, L, H]`` bf16 -- final (post-norm) hidden states;
- ``argmax`` ``[n, L]`` int32 -- the backbone's greedy next token at each position;
- ``top_ids`` / ``top_logp`` ``[n, L, top_k]`` int32 / fp16 -- the backbone's top-k next-token ids and their
  log-probabilities over the full vocabulary (the soft targets of distillation);
- ``tokens`` ``[n, L]`` int32, ``length`` / ``start`` / ``gen_start`` ``[n]`` int32.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from clp_fast.faults import kill_point, pid_alive

SHARD_KEYS = ("hidden", "argmax", "top_ids", "top_logp", "tokens", "length", "start", "gen_start")
META_KEYS = ("argmax", "tokens", "length", "start", "gen_start")


class CorruptShardError(ValueError):
    """A cached data shard is unreadable or incomplete; the message names the file."""


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The low-level shard writer (a seam for tests that simulate a full disk)."""
    save_file(tensors, str(path))


def write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one shard atomically (temp file + rename); on a full disk, raise a clear ``OSError``.

    Shards written before stay intact, and a resumed build recomputes only the missing ones.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_tensors(tensors, tmp)  # a module global, looked up at call time: tests patch it
        kill_point("build:shard-tmp")
        os.replace(tmp, path)
        kill_point("build:shard")
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"disk full while writing data shard {path}; the shards before it are "
                                        f"intact -- free some space and rerun with --resume (resume=True)") from err
        raise


def remove_dead_temps(folder: Path) -> None:
    """Delete the ``.<name>.tmp-<pid>`` files in ``folder`` left by writers that were killed (their pid is gone):
    never taken for complete (their names do not match), but litter."""
    for tmp in folder.glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def check_shard(path: Path, planned: list[list[int]] | None = None, prompts_only: bool = False) -> None:
    """Raise :class:`CorruptShardError` naming ``path`` unless it is a complete shard -- and, given the
    ``planned`` sequences it should hold, one built from exactly them (for greedy continuations,
    ``prompts_only``: the planned prompts begin its rows)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            missing = [k for k in SHARD_KEYS if k not in keys]
            if missing:
                raise CorruptShardError(f"data shard {path} lacks {missing}; delete it or rerun with --resume, "
                                        f"which rebuilds it")
            if planned is None:
                return
            tokens, length = f.get_tensor("tokens"), f.get_tensor("length")
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CorruptShardError(f"data shard {path} is corrupt or truncated ({err}); rerun with --resume, which "
                                f"rebuilds it") from err
    ok = tokens.shape[0] == len(planned)
    for i, seq in enumerate(planned if ok else []):
        n = len(seq)
        if (not prompts_only and int(length[i]) != n) or int(length[i]) < n or tokens[i, :n].tolist() != seq:
            ok = False
            break
    if not ok:
        raise CorruptShardError(f"data shard {path} does not hold the planned sequences (stale: built for other "
                                f"data options); it is rebuilt")


def _read(path: Path, keys=None) -> dict[str, torch.Tensor]:
    try:
        if keys is None:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            return {n: f.get_tensor(n) for n in keys}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CorruptShardError(f"data shard {path} is corrupt or truncated ({err}); rerun with --resume, which "
                                f"rebuilds it") from err


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    return _read(path)


def load_meta(path: Path) -> dict[str, torch.Tensor]:
    return _read(path, META_KEYS)


def shard_paths(cache: Path, kind: str) -> list[Path]:
    return sorted((cache / kind).glob("shard-*.safetensors"))


def agree_runs(meta: dict, k: int) -> torch.Tensor:
    """``run [n, L, k]`` bool: ``run[:, t, j-1]`` iff the text after ``t`` equals the backbone's argmax for
    ``j`` tokens running -- then head ``j``'s target at ``t`` is exactly the greedy one."""
    tokens, am, length = meta["tokens"].long(), meta["argmax"].long(), meta["length"].long()
    n, L = tokens.shape
    agree = torch.zeros(n, L, dtype=torch.bool)
    agree[:, :-1] = tokens[:, 1:] == am[:, :-1]
    agree &= torch.arange(L)[None] < (length[:, None] - 1)
    run = torch.zeros(n, L, k, dtype=torch.bool)
    cur = agree.clone()
    for j in range(k):
        run[:, :, j] = cur
        nxt = torch.zeros_like(cur)
        nxt[:, : L - j - 1] = agree[:, j + 1 :]
        cur = cur & nxt
    return run


def targets(meta: dict, k: int, w_bad: float, from_gen: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Training positions of one shard: flat indices ``[P]`` into ``[n * L]`` and weights ``[P, k]``.

    Head ``j``'s target at ``t`` is the backbone's argmax at ``t + j``: exact where the text is
    greedy-consistent (weight 1), a same-context proxy otherwise (weight ``w_bad``).
    """
    length = meta["length"].long()
    n, L = meta["tokens"].shape
    start = meta["gen_start" if from_gen else "start"].long()
    run = agree_runs(meta, k)
    t = torch.arange(L)
    has_target = (t[None, :, None] + torch.arange(1, k + 1)[None, None]) < length[:, None, None]  # [n, L, k]
    weight = torch.where(run, 1.0, w_bad) * has_target
    use = (t[None] >= start[:, None]) & (t[None] < length[:, None] - 1) & (weight.sum(-1) > 0)
    flat = use.flatten().nonzero().flatten()
    return flat, weight.view(n * L, k)[flat]
