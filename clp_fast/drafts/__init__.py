"""Draft sources: everything that guesses the tokens after the backbone's next one (one file per source).

- :mod:`~clp_fast.drafts.heads`: the MTP heads (argmax chain or top-m candidates) and the fused LM-head pass;
- :mod:`~clp_fast.drafts.lookup`: prompt lookup (the row's own context).

Every source implements :class:`~clp_fast.drafts.base.DraftSource`; the decode loop
(:mod:`clp_fast.engine.loop`) merges their proposals into one tree per row. Sources beyond the heads and
prompt lookup are registered in :data:`REGISTRY` by name and enabled per call (``generate(..., drafts=[name])``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from clp_fast.drafts.base import Accepted, Branch, DraftSource, Layers, Proposal
from clp_fast.drafts.calibration import TreeCalibration

# The sources themselves live in their modules (clp_fast.drafts.heads needs the heads' model, which needs this
# package's calibration tables, so this package's own import stays light).
__all__ = ["Accepted", "Branch", "DraftSource", "Layers", "Proposal", "TreeCalibration", "REGISTRY", "make_sources"]

# name -> factory(bb, heads, calib) -> DraftSource, or "module:attribute" naming one (imported on first use, so
# importing clp_fast never imports a source's own dependencies), for generate(..., drafts=[name]).
REGISTRY: dict[str, Callable[..., DraftSource] | str] = {
    "eagle": "clp_fast.drafts.eagle:eagle_factory",  # the drafter given to clp_fast.drafts.eagle.use_drafter(model)
    "datastore": "clp_fast.drafts.datastore:datastore_source",  # retrieval from the code corpus store
    "outputs": "clp_fast.drafts.datastore:outputs_source",  # retrieval from this process's own outputs
}


def make_sources(drafts: list, bb, heads, calib: TreeCalibration | None) -> list[DraftSource]:
    """This call's extra sources from ``drafts``: registered names or factories ``f(bb, heads, calib)``."""
    out = []
    for d in drafts:
        if isinstance(d, str):
            if d not in REGISTRY:
                raise ValueError(f"draft source {d!r} is not registered; known: {sorted(REGISTRY)}")
            d = _resolve(REGISTRY[d])
        if not callable(d):
            raise TypeError(f"a draft source must be a registered name or a factory, got {type(d).__name__}")
        src = d(bb, heads, calib)
        if not isinstance(src, DraftSource):
            raise TypeError(f"draft factory {d!r} returned {type(src).__name__}, not a DraftSource")
        out.append(src)
    return out


def _resolve(entry):
    """A registry entry as a factory: ``"module:attribute"`` is imported here."""
    if not isinstance(entry, str):
        return entry
    module, _, attr = entry.partition(":")
    return getattr(importlib.import_module(module), attr)
