"""Shipped MTP heads: ``clp_fast/assets/heads/<name>/`` (bf16 safetensors + config.json)."""

from __future__ import annotations

import json
from pathlib import Path

from clp_fast.heads import MTPHeads, lm_head_fingerprint

HEADS_DIR = Path(__file__).parent / "heads"


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
    for folder in shipped_heads().values():
        if json.loads((folder / "config.json").read_text()).get("lm_head_fingerprint") == fp:
            return MTPHeads.from_pretrained(folder, model=model, device=model.get_output_embeddings().weight.device)
    raise ValueError(
        f"no shipped MTP heads fit this backbone (LM-head fingerprint {fp}); shipped: "
        f"{', '.join(shipped_heads()) or 'none'}. Pass heads=..., or train some with `clp-fast train`."
    )
