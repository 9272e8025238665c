"""clp_fast: multi-token-prediction heads + a collocation-length predictor for faster decoding."""

from clp_fast.decode import MODES, DecodeStats, generate, left_pad
from clp_fast.heads import CLP, GatePolicy, MTPHeads, lm_head_fingerprint

__all__ = ["generate", "left_pad", "DecodeStats", "MODES", "MTPHeads", "CLP", "GatePolicy", "lm_head_fingerprint"]
__version__ = "0.1.0"
