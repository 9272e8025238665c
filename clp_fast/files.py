"""Saving weights so that nothing half-written is ever taken for complete: everything is written into a private
temporary folder beside the target, then renamed into place (a rename is atomic within one file system).

Two layouts: :func:`save_weights` puts ``<weights>`` + ``config.json`` into a folder that may hold other files
(the MTP heads, the drafter: weights renamed first, config last, the config naming the weights' sha256, so a
process killed between the two renames leaves new weights beside the old config and the load names the
mismatch); :func:`publish_folder` renames a whole finished folder into an absent or empty ``out`` (exports).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from clp_fast.faults import kill_point

__all__ = ["sha256", "staging", "save_weights", "publish_folder"]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _usual_mode(path: Path) -> None:
    """mkdtemp's private modes (0700 / a new file's) -> what a new file or folder gets under the user's umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def staging(target: Path):
    """A private temporary folder beside ``target`` (same file system), removed on exit whatever happens."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_weights(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict, weights_name: str,
                 config_name: str = "config.json", kill_prefix: str | None = None) -> Path:
    """Write ``tensors`` (safetensors) and ``config`` + ``weights_sha256`` (JSON) into ``directory``: other files
    there are left alone, these two replaced, weights first. ``kill_prefix`` names the test kill points after
    each rename (:func:`clp_fast.faults.kill_point`)."""
    directory = Path(directory)
    with staging(directory) as tmp:
        save_file(tensors, str(tmp / weights_name))
        config = {**config, "weights_sha256": sha256(tmp / weights_name)}
        (tmp / config_name).write_text(json.dumps(config, indent=2) + "\n")
        directory.mkdir(exist_ok=True)
        for name in (weights_name, config_name):
            _usual_mode(tmp / name)
            os.replace(tmp / name, directory / name)
            if kill_prefix:
                kill_point(f"{kill_prefix}:replaced-{name}")
    return directory


def publish_folder(tmp: Path, out: Path) -> Path:
    """Rename the finished folder ``tmp`` (from :func:`staging`) to ``out``, which must be absent or empty."""
    for path in (tmp, *tmp.iterdir()):
        _usual_mode(path)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out
