"""The decode engine: one loop (:mod:`.loop`), its verifiers (:mod:`.verify`), the draft tree (:mod:`.tree`), the
cost model and speculation policy (:mod:`.cost`, :mod:`.speculation`), and the public calls (:mod:`.api`)."""

from clp_fast.engine.api import (
    LOOKUP_WIDTH,
    MAX_STEP_TOKENS,
    MODES,
    POLICIES,
    PROCESSED_MODES,
    SPECULATION,
    generate,
    generate_processed,
    left_pad,
    sampling_processors,
)
from clp_fast.engine.loop import DecodeStats

__all__ = ["generate", "generate_processed", "left_pad", "sampling_processors", "DecodeStats", "MODES", "POLICIES",
           "PROCESSED_MODES", "SPECULATION", "MAX_STEP_TOKENS", "LOOKUP_WIDTH"]
