"""clp_fast: multi-token-prediction heads + a collocation-length predictor for faster decoding."""

from clp_fast.engine import MODES, DecodeStats, generate, generate_processed, left_pad
from clp_fast.heads import CLP, GatePolicy, MTPHeads, lm_head_fingerprint
from clp_fast.hf import is_patched, patch, unpatch

__all__ = ["generate", "generate_processed", "patch", "unpatch", "is_patched", "left_pad", "DecodeStats", "MODES",
           "MTPHeads", "CLP", "GatePolicy", "lm_head_fingerprint"]
__version__ = "0.1.0"
