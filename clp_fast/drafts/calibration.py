"""How often a draft source's guess is the greedy token: per-depth acceptance tables, measured on held-out data.

A head candidate's softmax probability maps to its measured acceptance rate per depth (``rates``); a
prompt-lookup guess has one rate per depth (``lookup``). Shipped with the heads (config ``extra.tree``,
``bench/calibrate_tree.py``); every draft source's **prior** comes from such a table, and the tree is built
from the priors (:mod:`clp_fast.engine.tree`).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

__all__ = ["TreeCalibration"]


@dataclass(frozen=True)
class TreeCalibration:
    """Per-depth map from a head candidate's softmax probability to its measured acceptance rate.

    ``edges`` are increasing bin edges over [0, 1]; ``rates[j][b]`` is the fraction of held-out
    candidates of head ``j + 1`` with probability in bin ``b`` that were the greedy token.
    ``lookup`` is the acceptance rate of a prompt-lookup guess per depth (its last entry repeats).
    ``default``: whether lossless decoding uses the trees when the caller does not say (``tree_top_m=None``);
    set from a measurement (``bench/bench_tree.py``), since on a compute-bound CPU the argmax chain can win.
    """

    edges: tuple[float, ...]
    rates: tuple[tuple[float, ...], ...]
    lookup: tuple[float, ...] = (0.6, 0.75, 0.8)
    top_m: int = 4
    default: bool = True

    def __post_init__(self):
        if len(self.edges) < 2 or list(self.edges) != sorted(self.edges):
            raise ValueError(f"tree calibration edges={list(self.edges)!r} must be >= 2 increasing values")
        for j, r in enumerate(self.rates):
            if len(r) != len(self.edges) - 1 or not all(0.0 <= x <= 1.0 for x in r):
                raise ValueError(f"tree calibration rates[{j}] must hold {len(self.edges) - 1} values in [0, 1]")
        if not self.lookup or not all(0.0 <= x <= 1.0 for x in self.lookup):
            raise ValueError(f"tree calibration lookup={list(self.lookup)!r} must be values in [0, 1]")
        if not 1 <= self.top_m <= 8:
            raise ValueError(f"tree calibration top_m={self.top_m!r} must be in [1, 8]")

    def rate(self, depth: int, p: float) -> float:
        """Calibrated acceptance of a depth-``depth`` (1-based) head candidate of probability ``p``."""
        table = self.rates[min(depth, len(self.rates)) - 1]
        return table[min(max(bisect_right(self.edges, p) - 1, 0), len(table) - 1)]

    def lookup_rate(self, depth: int) -> float:
        return self.lookup[min(depth, len(self.lookup)) - 1]

    def to_dict(self) -> dict:
        return {"edges": list(self.edges), "rates": [list(r) for r in self.rates], "lookup": list(self.lookup),
                "top_m": self.top_m, "default": self.default}

    @classmethod
    def uncalibrated(cls, k: int, bins: int = 20) -> TreeCalibration:
        """A candidate's own probability as its rate (bin midpoints), the default lookup rates; for heads that
        ship no calibration."""
        edges = tuple(i / bins for i in range(bins + 1))
        mids = tuple((i + 0.5) / bins for i in range(bins))
        return cls(edges, (mids,) * max(k, 1), default=False)

    @classmethod
    def from_dict(cls, d: dict) -> TreeCalibration:
        try:
            return cls(tuple(d["edges"]), tuple(tuple(r) for r in d["rates"]), tuple(d.get("lookup", cls.lookup)),
                       int(d.get("top_m", 4)), bool(d.get("default", True)))
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed tree calibration {d!r}: {err}") from None
