"""Shipped MTP heads (``clp_fast/assets/heads/<name>/``) and EAGLE-style drafters (``assets/drafters/<name>/``):
bf16 safetensors + config.json (+ training card), matched to a backbone by its LM-head fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

from clp_fast.heads import MTPHeads, lm_head_fingerprint

HEADS_DIR = Path(__file__).parent / "heads"
DRAFTERS_DIR = Path(__file__).parent / "drafters"


def shipped_heads() -> dict[str, Path]:
    """``{name: folder}`` of every shipped head set."""
    if not HEADS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(HEADS_DIR.iterdir()) if (p / "config.json").is_file()}


def default_heads_for(model):
    """The shipped :class:`~clp_fast.heads.MTPHeads` whose LM-head fingerprint matches ``model``.

    Raises:
        ValueError: no shipped head set fits this backbone (the message lists the shipped ones).
    """
    fp = lm_head_fingerprint(model.get_output_embeddings().weight)
    folder = _fitting(shipped_heads(), fp)
    if folder is not None:
        return MTPHeads.from_pretrained(folder, model=model, device=model.get_output_embeddings().weight.device)
    raise ValueError(
        f"no shipped MTP heads fit this backbone (LM-head fingerprint {fp}); shipped: "
        f"{', '.join(shipped_heads()) or 'none'}. Pass heads=..., or train some with `clp-fast train`."
    )


def shipped_drafters() -> dict[str, Path]:
    """``{name: folder}`` of every shipped drafter."""
    if not DRAFTERS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(DRAFTERS_DIR.iterdir()) if (p / "config.json").is_file()}


def shipped_drafter_for(model):
    """The shipped :class:`~clp_fast.drafts.eagle_model.EagleDrafter` whose LM-head fingerprint matches ``model``
    (in the model's dtype and on its device), or None."""
    from clp_fast.drafts.eagle_model import EagleDrafter

    W = model.get_output_embeddings().weight
    folder = _fitting(shipped_drafters(), lm_head_fingerprint(W))
    return None if folder is None else EagleDrafter.from_pretrained(folder, model=model, dtype=W.dtype,
                                                                    device=W.device)


def _fitting(folders: dict[str, Path], fingerprint: str) -> Path | None:
    """The first of ``folders`` whose config names this LM-head fingerprint, or None."""
    for folder in folders.values():
        if json.loads((folder / "config.json").read_text()).get("lm_head_fingerprint") == fingerprint:
            return folder
    return None
