"""Deprecated path: processed decoding lives in :mod:`clp_fast.engine` (``clp_fast.generate_processed``)."""

from clp_fast.engine.api import PROCESSED_MODES, generate_processed, sampling_processors

__all__ = ["PROCESSED_MODES", "generate_processed", "sampling_processors"]
