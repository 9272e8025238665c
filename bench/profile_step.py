"""``--profile``: where one decode step's time goes, by exclusive timers around the engine's functions."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from methods import Method, Prompt
from report import _fmt

from clp_fast import backend, reference
from clp_fast.drafts import heads as heads_src
from clp_fast.engine import loop, verify
from clp_fast.engine.loop import DecodeStats
from clp_fast.engine.speculation import Speculator
from clp_fast.heads import GatePolicy
from clp_fast.models.native import NativeBackbone


class StepTimers:
    """Exclusive wall time of wrapped functions, split by phase (prefill / decode steps).

    A function's time excludes the wrapped functions it calls, so the buckets add up to the
    measured total; what is left is the decode loop's own Python and small torch ops.
    """

    def __init__(self):
        self.time = defaultdict(float)
        self.calls = defaultdict(int)
        self._stack: list[float] = []
        self.phase = "step"

    def wrap(self, name: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            t0 = time.perf_counter()
            self._stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                child = self._stack.pop()
                key = (self.phase, name)
                self.time[key] += dt - child
                self.calls[key] += 1
                if self._stack:
                    self._stack[-1] += dt
        return wrapped

    def wrap_phase(self, phase: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            prev, self.phase = self.phase, phase
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = prev
        return wrapped


# (module or class, attribute, bucket). The bucket names are what the profile table prints.
PROFILED = [
    (NativeBackbone, "forward", "backbone forward"),
    (reference, "head_hidden", "MTP heads (h + SiLU(Wh+b))"),
    (heads_src, "fused_rows", "LM head + argmax/softmax"),  # its own time once heads and policy are taken out
    (reference, "clp_accept_lengths", "CLP policy"),
    (GatePolicy, "accept_lengths", "gate policy"),
    (loop, "draft", "draft trees (sources + grow)"),
    (Speculator, "select", "cost model's choice"),
    (verify, "accept_argmax", "verify"),
    (backend, "commit_kv_span_", "commit KV span"),
    (loop, "keep_tokens", "keep (budget/EOS)"),
    (loop, "append_tokens", "append output"),
    (DecodeStats, "count_accepts", "stats"),
]


@contextlib.contextmanager
def patched_timers(timers: StepTimers, model=None):
    """Wrap the engine's step functions (and, for HF, the model's forward) with ``timers``; restore after."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in PROFILED] + [(loop, "prefill", loop.prefill)]
    try:
        for obj, name, bucket in PROFILED:
            setattr(obj, name, timers.wrap(bucket, getattr(obj, name)))
        loop.prefill = timers.wrap_phase("prefill", loop.prefill)
        if model is not None:
            model.forward = timers.wrap("HF model forward", model.forward)
        yield timers
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
        if model is not None:
            del model.forward


def profile_methods(model, methods: list[Method], prompt: Prompt, n: int, torch_profile: bool = True) -> dict:
    """ms per decode step in each bucket for a few methods on one prompt (after a warm-up call each)."""
    out = {"prompt": prompt.id, "max_new_tokens": n, "methods": {}}
    for m in methods:
        m.run(prompt.ids, torch.ones_like(prompt.ids), n)  # warm-up, untimed
        timers = StepTimers()
        with patched_timers(timers, model if m.family == "hf" else None):
            t0 = time.perf_counter()
            _, info = m.run(prompt.ids, torch.ones_like(prompt.ids), n)
            wall = time.perf_counter() - t0
        steps = max(info["forward_passes"] - 1, 1)
        step_buckets = {name: t for (phase, name), t in timers.time.items() if phase == "step"}
        prefill = sum(t for (phase, _), t in timers.time.items() if phase == "prefill")
        accounted = sum(timers.time.values())
        step_buckets["loop / Python overhead"] = wall - accounted
        out["methods"][m.label] = {
            "wall_s": wall, "forward_passes": info["forward_passes"], "decode_steps": steps,
            "prefill_s": prefill,
            "ms_per_step": {k: 1e3 * v / steps for k, v in sorted(step_buckets.items(), key=lambda kv: -kv[1])},
        }
    if torch_profile:
        m = next((x for x in methods if x.name == "clp_fast lossless"), methods[-1])
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            m.run(prompt.ids, torch.ones_like(prompt.ids), n)
        out["torch_profiler"] = {"method": m.label,
                                 "table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)}
    return out


def format_profile(prof: dict) -> str:
    names = list(prof["methods"])
    order = ["HF model forward"] + [bucket for _, _, bucket in PROFILED] + ["loop / Python overhead"]
    seen = {b for m in names for b in prof["methods"][m]["ms_per_step"]}
    buckets = [b for b in order if b in seen]
    lines = [f"Where one decode step's time goes (ms per step, prompt {prof['prompt']}, "
             f"{prof['max_new_tokens']} new tokens; exclusive timers; prefill excluded)", ""]
    lines.append("| bucket | " + " | ".join(names) + " |")
    lines.append("|---|" + "---:|" * len(names))
    for b in buckets:
        cells = [_fmt(prof["methods"][m]["ms_per_step"].get(b), ".2f") for m in names]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    tot = [f"**{sum(prof['methods'][m]['ms_per_step'].values()):.2f}**" for m in names]
    lines.append("| **total per step** | " + " | ".join(tot) + " |")
    lines.append("| steps (forwards − 1) | " + " | ".join(str(prof["methods"][m]["decode_steps"]) for m in names)
                 + " |")
    lines.append("| prefill (s) | " + " | ".join(f"{prof['methods'][m]['prefill_s']:.3f}" for m in names) + " |")
    if "torch_profiler" in prof:
        lines += ["", f"torch.profiler, {prof['torch_profiler']['method']}, top operators by self CPU time:", "",
                  "```", prof["torch_profiler"]["table"].rstrip(), "```"]
    return "\n".join(lines)

