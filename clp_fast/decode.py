"""Deprecated path: the decode loop lives in :mod:`clp_fast.engine` (``clp_fast.generate`` is unchanged)."""

from clp_fast.engine.api import LOOKUP_WIDTH, MAX_STEP_TOKENS, MODES, POLICIES, SPECULATION, generate, left_pad
from clp_fast.engine.loop import DecodeStats

__all__ = ["generate", "left_pad", "DecodeStats", "MODES", "POLICIES", "SPECULATION", "MAX_STEP_TOKENS",
           "LOOKUP_WIDTH"]
