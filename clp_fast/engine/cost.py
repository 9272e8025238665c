"""What a forward costs on this machine, as a function of the tokens it feeds.

Speculation pays only while verifying a guess costs less than the guess is expected to return. On a
GPU, or a CPU at batch 1, a forward of a few more tokens costs about the same as one (memory-bound);
on the project's 2-core CPU in bf16 a matmul turns compute-bound at ~16 rows (a [16, 1536] x [1536,
8960] bf16 matmul takes as long as in fp32), so a batch of 16 rows that feeds one guess each pays
~1.9x for the step. :class:`StepCost` holds measured seconds per forward at a few fed-token counts
and interpolates; :func:`step_cost` measures it once per (model, dtype, device, threads, machine),
keeps it for the process and, for a named model, on disk under ``<clp_home>/cost/``. Decoding then
refines it from its own steps (:meth:`StepCost.observe`), so a change of load or context length moves
the decisions without a new start-up measurement.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from bisect import bisect_left
from dataclasses import dataclass, field

import torch

from clp_fast import backend
from clp_fast.models.hub import clp_home

__all__ = ["StepCost", "step_cost", "MEASURED_SIZES"]

# Fed-token counts measured at start-up (packed over the batch; the forward runs over real tokens only).
MEASURED_SIZES = (1, 2, 4, 8, 16, 32, 64)
_CACHE: dict[str, StepCost] = {}


@dataclass
class StepCost:
    """Seconds per forward against fed tokens: piecewise-linear through ``points``, linear past the last.

    Args:
        points: ``{fed tokens: seconds}``, at least one entry, every value > 0.
        learn: whether :meth:`observe` updates the points (False: a fixed model, e.g. a synthetic one in tests).
        source: how the points were obtained (``"measured"``, ``"disk"``, ``"given"``), shown in stats.
    """

    points: dict[int, float]
    learn: bool = True
    source: str = "given"
    observed: int = field(default=0, init=False)

    def __post_init__(self):
        if not self.points:
            raise ValueError("StepCost needs at least one (fed tokens, seconds) point")
        for n, t in self.points.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1 or not t > 0:
                raise ValueError(f"StepCost point ({n!r}, {t!r}) must be a positive int and a positive time")
        self.points = dict(sorted(self.points.items()))

    @classmethod
    def flat(cls) -> StepCost:
        """A forward that costs the same whatever it feeds: every guess offered pays ("fixed" speculation)."""
        return cls({1: 1.0, 1 << 20: 1.0}, learn=False, source="fixed")

    def __call__(self, n: int) -> float:
        """Estimated seconds of a forward feeding ``n >= 1`` tokens."""
        xs = list(self.points)
        ys = list(self.points.values())
        if len(xs) == 1:
            return ys[0] * max(n, 1) / xs[0] if n > xs[0] else ys[0]
        i = bisect_left(xs, n)
        if i < len(xs) and xs[i] == n:
            return ys[i]
        if i == 0:
            return ys[0]  # below the smallest measured count: a forward never gets cheaper than that
        lo, hi = (i - 1, i) if i < len(xs) else (len(xs) - 2, len(xs) - 1)
        slope = (ys[hi] - ys[lo]) / (xs[hi] - xs[lo])
        return max(ys[lo] + slope * (n - xs[lo]), 1e-9)

    def observe(self, n: int, seconds: float, weight: float = 0.1) -> None:
        """Blend one measured forward of ``n`` fed tokens into the model (an exponential moving average at the
        nearest point; a new count beyond the measured range becomes a point)."""
        if not self.learn or n < 1 or not seconds > 0:
            return
        self.observed += 1
        if n in self.points:
            self.points[n] += weight * (seconds - self.points[n])
        elif n > max(self.points):
            self.points[n] = seconds
            self.points = dict(sorted(self.points.items()))
        else:  # between points: move the interpolated value by nudging both neighbours proportionally
            ratio = seconds / self(n)
            xs = list(self.points)
            i = bisect_left(xs, n)
            for x in {xs[max(i - 1, 0)], xs[min(i, len(xs) - 1)]}:
                self.points[x] *= 1 + weight * (ratio - 1) / 2

    def relative(self, n: int, base: int) -> float:
        """Cost of feeding ``n`` tokens over the cost of feeding ``base``."""
        return self(n) / self(base)

    def to_dict(self) -> dict:
        return {"points": {str(n): t for n, t in self.points.items()}, "source": self.source}


def _key(bb) -> tuple[str, bool]:
    """Cache key of a backbone on this machine, and whether it names a real model (worth a file on disk)."""
    cfg = bb.model.config
    name = str(getattr(cfg, "_name_or_path", "") or "")
    parts = [name, cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size,
             cfg.vocab_size, str(bb.dtype), bb.device.type, torch.get_num_threads(), torch.__version__,
             platform.machine(), platform.processor() or _cpu_name(),
             bb.step is not None]  # a packed step (clp_fast.models.packed) costs ~half the plain one: another model
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16], bool(name)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure(bb, sizes=MEASURED_SIZES, context: int = 64, reps: int = 3) -> StepCost:
    """Time a forward (and its backbone logit rows) of each fed-token count in ``sizes``: one row, a chain
    of ``n`` tokens after ``context`` committed ones; the fastest of ``reps`` runs, after one warm-up."""
    V = bb.lm_head_weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    points = {}
    for n in sizes:
        cache = bb.allocate_cache(1, context + n + 1)
        cache.lengths.fill_(context)
        tokens = torch.randint(0, V, (1, n), generator=gen).to(bb.device)
        new_len = torch.tensor([n], device=bb.device)
        best = float("inf")
        for r in range(reps + 1):
            _sync(bb.device)
            t0 = time.perf_counter()
            hidden, _, _ = bb.forward(tokens, cache, new_len)
            backend.fused_heads(hidden[0], bb.no_heads[0], bb.no_heads[1], bb.lm_head_weight)
            _sync(bb.device)
            if r:
                best = min(best, time.perf_counter() - t0)
        points[n] = best
    return StepCost(points, source="measured")


def step_cost(bb, *, refresh: bool = False) -> StepCost:
    """The cost model of this backbone here: from this process's cache, else from disk (named models), else
    measured now (a few seconds) and stored in both."""
    key, named = _key(bb)
    if not refresh and key in _CACHE:
        return _CACHE[key]
    path = clp_home() / "cost" / f"{key}.json"
    model = None
    if named and not refresh and path.is_file():
        try:
            d = json.loads(path.read_text())
            model = StepCost({int(n): float(t) for n, t in d["points"].items()}, source="disk")
        except (OSError, ValueError, KeyError, TypeError):
            model = None  # unreadable: measure again and overwrite
    if model is None:
        model = measure(bb)
        if named:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                tmp.write_text(json.dumps(model.to_dict(), indent=1))
                os.replace(tmp, path)
            except OSError:
                pass  # a read-only home only costs a re-measurement next time
    _CACHE[key] = model
    return model
