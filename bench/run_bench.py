#!/usr/bin/env python
"""``make bench``: how much faster clp_fast decodes a real Qwen2.5 model than transformers, and whether
it says the same thing.

Every method runs in this one process, on the same prompts, interleaved: for each prompt every
method runs in turn (the order rotated from prompt to prompt), so machine drift — on a shared
2-core CPU, another job starting — hits all methods alike. The ratios are taken against
``hf-greedy`` measured side by side in the same run.

Methods (batch 1): ``hf-greedy`` (transformers ``generate(do_sample=False)``, the baseline),
``hf-prompt-lookup`` (``prompt_lookup_num_tokens=10``), ``clp_fast greedy`` (our engine, no
heads: isolates engine overhead), ``clp_fast lossless`` and ``clp_fast clp`` at each k, and
``gate`` (the ~1M-parameter gate policy in clp mode). Then a batched throughput table
(left-padded HumanEval prompts, clp_fast lossless vs transformers batched greedy).

Outputs: the table on stdout (progress bar on stderr), and in ``--out-dir``
``<date>-<host>-<commit>.{json,md,png}`` plus ``latest.md`` (the markdown table, for the README).

Other modes: ``--exactness`` (fp32: lossless must equal hf-greedy token for token; exit 1 if not)
and ``--profile`` (where one decode step's time goes, by timers wrapped around the engine's
functions, plus a torch.profiler operator table).

Examples::

    python bench/run_bench.py                    # default: a seeded subset, <= 15 min on 2 CPU cores
    python bench/run_bench.py --full             # all 164 HumanEval + 32 prose prompts, B in {1, 4, 16}
    python bench/run_bench.py --exactness        # fp32 exactness check
    python bench/run_bench.py --profile --heads path/to/heads
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import random
import resource
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import clp_fast
from clp_fast import backend, decode, metrics, reference
from clp_fast.heads import GatePolicy, MTPHeads
from clp_fast.model import NativeBackbone

SCHEMA = "clp_fast.bench/1"
ROOT = Path(__file__).resolve().parent.parent
BASELINE = "hf-greedy"
PROMPT_LOOKUP = "hf-prompt-lookup"
DEFAULTS = {  # sized so that `make bench` takes <= 15 min on the project's 2-core CPU (see the README)
    "n_humaneval": 4, "n_prose": 2, "max_new_tokens": 128,
    "batch_sizes": "1,4,16", "batch_new_tokens": 32, "batch_reps": 1, "batch_k": 2,
}
FULL = {
    "n_humaneval": 164, "n_prose": 32, "max_new_tokens": 128,
    "batch_sizes": "1,4,16", "batch_new_tokens": 128, "batch_reps": 2, "batch_k": 2,
}
# End-of-text tokens that stop generation besides the generation config's EOS. The GGUF-converted
# Qwen2.5 config names only <|im_end|>; Qwen's own generation_config.json also stops at
# <|endoftext|>, the token the model ends a raw (non-chat) completion with.
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>")


# ------------------------------------------------------------------------------------------ machine
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "nogit"


def machine_info() -> dict:
    """CPU, threads and library versions: what a reader needs to compare two result files."""
    return {
        "host": socket.gethostname(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "clp_fast": clp_fast.__version__,
        "commit": _git_commit(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def contention_probe(repeats: int = 30) -> float:
    """Median ms of a tiny matmul ([5, 900] x [900, 4]): ~0.003 ms on an idle core.

    With more torch threads than free cores, every parallel op waits for a descheduled thread: on
    the project's 2-core CPU next to a training job this op took 16 ms at 2 threads, 0.003 ms at 1.
    Such a run still compares methods side by side, but it charges per-op costs, not per-FLOP ones.
    """
    a, w = torch.randn(5, 900), torch.randn(4, 900)
    times = []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, w)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


CONTENDED_MS = 1.0


# ------------------------------------------------------------------------------------------- memory
class PeakRSS:
    """Resident-set high-water mark of this process around one call.

    Linux ≥ 4.0 lets a process reset its own ``VmHWM`` (write ``5`` to ``/proc/self/clear_refs``),
    so each call's peak is its own; elsewhere ``ru_maxrss`` is the whole run's peak so far (then
    ``method`` says so). RSS, not tracemalloc: tracemalloc sees only Python's allocator, not
    torch's tensors.
    """

    def __init__(self):
        self.method = "VmHWM reset per call (/proc/self/clear_refs)"
        try:
            self._reset()
            self._read("VmHWM")
        except OSError:
            self.method = "ru_maxrss (process high-water, not reset per call)"

    @staticmethod
    def _read(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
        raise OSError(f"{key} not in /proc/self/status")

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def start(self) -> float:
        """Reset the high-water mark; returns the current RSS (MiB)."""
        if self.method.startswith("VmHWM"):
            self._reset()
            return self._read("VmRSS")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def peak(self) -> float:
        """Peak RSS (MiB) since :meth:`start`."""
        if self.method.startswith("VmHWM"):
            return self._read("VmHWM")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------ methods
@dataclass
class Method:
    """One row of the table: ``run(ids [B, P], mask [B, P], max_new_tokens) -> (out [B, P + G], info)``."""

    name: str
    k: int | None
    run: Callable
    family: str  # "hf" | "clp_fast"

    @property
    def label(self) -> str:
        return f"{self.name} k={self.k}" if self.k else self.name


class ForwardCounter:
    """Counts top-level forwards of a transformers model (to give HF methods a τ)."""

    def __init__(self, model):
        self.n = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.n += 1


def make_methods(model, heads: MTPHeads, ks: list[int], eos: list[int], pad: int, threshold: float | None,
                 counter: ForwardCounter) -> list[Method]:
    """The methods of the single-stream table, in table order."""
    from transformers import GenerationConfig

    def hf(**extra):
        def run(ids, mask, n):
            # A fresh config: the baseline must be plain greedy whatever the checkpoint's defaults
            # (Qwen's published generation_config.json samples, with a repetition penalty).
            cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, eos_token_id=eos,
                                   pad_token_id=pad, **extra)
            before = counter.n
            out = model.generate(ids, attention_mask=mask, generation_config=cfg)
            return out, {"forward_passes": counter.n - before}
        return run

    def ours(mode, k, policy="clp"):
        h = heads.truncated(k) if k else None

        def run(ids, mask, n):
            out, st = clp_fast.generate(model, ids, h, attention_mask=mask, max_new_tokens=n, mode=mode,
                                        eos_token_id=eos, pad_token_id=pad, policy=policy,
                                        clp_threshold=threshold if mode == "clp" and policy == "clp" else None,
                                        return_stats=True)
            return out, {"forward_passes": st.forward_passes, "row_forwards": st.row_forwards,
                         "accept_hist": st.accept_hist, "new_tokens": st.new_tokens, "drafted": st.drafted}
        return run

    methods = [Method(BASELINE, None, hf(), "hf"), Method(PROMPT_LOOKUP, None, hf(prompt_lookup_num_tokens=10), "hf"),
               Method("clp_fast greedy", None, ours("greedy", None), "clp_fast")]
    methods += [Method("clp_fast lossless", k, ours("lossless", k), "clp_fast") for k in ks]
    methods += [Method("clp_fast clp", k, ours("clp", k), "clp_fast") for k in ks]
    if heads.gate is not None:
        methods.append(Method("gate", heads.k, ours("clp", heads.k, policy="gate"), "clp_fast"))
    return methods


# ------------------------------------------------------------------------------------------ prompts
@dataclass
class Prompt:
    set: str  # "humaneval" | "prose"
    id: str
    text: str
    ids: torch.Tensor = field(repr=False)  # [1, P]


def load_prompts(tok, n_humaneval: int, n_prose: int, seed: int) -> list[Prompt]:
    """A seeded subset of HumanEval (raw completion prompts) and of the stdlib prose set."""
    from clp_fast.data import humaneval_prompts, prose_prompts

    out = []
    if n_humaneval:
        rows = humaneval_prompts() if n_humaneval >= 164 else humaneval_prompts(n_humaneval, seed)
        out += [Prompt("humaneval", r["task_id"], r["prompt"], tok(r["prompt"], return_tensors="pt").input_ids)
                for r in rows]
    if n_prose:
        for i, text in enumerate(prose_prompts(n_prose, seed)):
            out.append(Prompt("prose", f"prose/{i}", text, tok(text, return_tensors="pt").input_ids))
    return out


def stop_ids(model, tok) -> list[int]:
    """EOS ids used by every method: the generation config's, the tokenizer's and :data:`END_TOKENS`."""
    ids = []
    cfg_eos = getattr(model.generation_config, "eos_token_id", None)
    ids += [cfg_eos] if isinstance(cfg_eos, int) else list(cfg_eos or [])
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    vocab = tok.get_vocab()
    ids += [vocab[t] for t in END_TOKENS if t in vocab and t in tok.all_special_tokens]
    return sorted(set(ids))


# ---------------------------------------------------------------------------------------- the runs
def _timed(method: Method, ids, mask, n, mem: PeakRSS | None = None) -> dict:
    rss0 = mem.start() if mem else None
    t0 = time.perf_counter()
    out, info = method.run(ids, mask, n)
    dt = time.perf_counter() - t0
    if mem:
        peak = mem.peak()
        info["peak_rss_mib"] = peak
        info["peak_rss_delta_mib"] = peak - rss0
    info["time_s"] = dt
    return {"out": out, **info}


def warm_up(methods: list[Method], prompt: Prompt, n: int, bar) -> float:
    """One short call of each method: bf16 oneDNN kernels are built per shape on first use (~10x slower)."""
    t0 = time.perf_counter()
    for m in methods if n > 0 else []:
        bar.set_postfix_str(f"warm-up {m.label}")
        m.run(prompt.ids, torch.ones_like(prompt.ids), n)
    return time.perf_counter() - t0


def run_single_stream(methods: list[Method], prompts: list[Prompt], n: int, eos: list[int], mem: PeakRSS,
                      bar) -> list[dict]:
    """Per prompt, every method in turn (order rotated per prompt). Returns one record per prompt."""
    records = []
    for pi, p in enumerate(prompts):
        P = p.ids.shape[1]
        rec = {"set": p.set, "id": p.id, "prompt_len": P, "order": [], "results": {}}
        order = methods[pi % len(methods):] + methods[: pi % len(methods)]
        for m in order:
            bar.set_postfix_str(f"{p.id} {m.label}")
            r = _timed(m, p.ids, torch.ones_like(p.ids), n, mem)
            out = r.pop("out")
            gen = metrics.generated_ids(out[0].tolist(), P, eos)
            r["ids"] = gen
            r["n_new"] = len(gen)
            rec["order"].append(m.label)
            rec["results"][m.label] = r
            bar.update(1)
        records.append(rec)
    return records


def summarize(methods: list[Method], records: list[dict], prompt_set: str | None = None) -> list[dict]:
    """One row per method: speed, τ, acceptance, quality vs hf-greedy, memory."""
    recs = [r for r in records if prompt_set is None or r["set"] == prompt_set]
    if not recs:
        return []
    base = [r["results"][BASELINE] for r in recs]
    pl = [r["results"][PROMPT_LOOKUP] for r in recs] if PROMPT_LOOKUP in recs[0]["results"] else None
    base_seqs = [b["ids"] for b in base]

    def tps(r):
        return r["n_new"] / r["time_s"]

    rows = []
    for m in methods:
        res = [r["results"][m.label] for r in recs]
        seqs = [x["ids"] for x in res]
        tokens, times = [x["n_new"] for x in res], [x["time_s"] for x in res]
        if m.family == "clp_fast":
            tau = metrics.tau([{"new_tokens": x["new_tokens"], "row_forwards": x["row_forwards"],
                                "forward_passes": x["forward_passes"]} for x in res])
            hist = metrics.accept_histogram(res)
        else:
            tau = sum(tokens) / max(sum(x["forward_passes"] for x in res), 1)
            hist = None
        rep = metrics.mean_seq_rep_n(seqs, 4)
        row = {
            "method": m.name, "k": m.k, "label": m.label, "prompts": len(res),
            "new_tokens": sum(tokens), "time_s": sum(times),
            "tokens_per_s": sum(tokens) / sum(times),
            "speedup_median": metrics.median_ratio([tps(x) for x in res], [tps(b) for b in base]),
            "speedup_total": metrics.throughput_ratio(tokens, times, [b["n_new"] for b in base],
                                                      [b["time_s"] for b in base]),
            "vs_prompt_lookup_median": (metrics.median_ratio([tps(x) for x in res], [tps(b) for b in pl])
                                        if pl else None),
            "tau": tau, "accept_hist": hist,
            "exact_match": metrics.exact_match(seqs, base_seqs),
            "diverged": sum(metrics.first_divergence(s, b) is not None for s, b in zip(seqs, base_seqs)),
            "mean_first_divergence": metrics.mean_first_divergence(seqs, base_seqs),
            "seq_rep_4": rep,
            "seq_rep_4_delta": rep - metrics.mean_seq_rep_n(base_seqs, 4),
            "peak_rss_mib": max(x.get("peak_rss_mib", 0.0) for x in res),
            "peak_rss_delta_mib": max(x.get("peak_rss_delta_mib", 0.0) for x in res),
        }
        rows.append(row)
    return rows


def left_pad_batch(tok, texts: list[str], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    return clp_fast.left_pad([tok(t)["input_ids"] for t in texts], pad)


def run_batched(model, tok, heads: MTPHeads, k: int, batch_sizes: list[int], n: int, reps: int, seed: int,
                eos: list[int], pad: int, counter: ForwardCounter, bar, warmup_tokens: int = 4) -> dict:
    """clp_fast lossless vs transformers batched greedy on left-padded HumanEval batches, interleaved."""
    from clp_fast.data import humaneval_prompts

    pool = humaneval_prompts()
    rng = random.Random(seed + 1)
    ms = make_methods(model, heads, [k], eos, pad, None, counter)
    hf_m = next(m for m in ms if m.name == BASELINE)
    ours_m = next(m for m in ms if m.name == "clp_fast lossless")
    rows, batches = [], []
    for B in batch_sizes:
        texts_w = [r["prompt"] for r in rng.sample(pool, B)]
        ids_w, mask_w = left_pad_batch(tok, texts_w, pad)
        for m in (hf_m, ours_m) if warmup_tokens > 0 else ():
            bar.set_postfix_str(f"warm-up B={B} {m.label}")
            m.run(ids_w, mask_w, min(warmup_tokens, n))
        agg = {hf_m.label: [0, 0.0], ours_m.label: [0, 0.0]}
        same = total = 0
        for rep in range(reps):
            texts = [r["prompt"] for r in rng.sample(pool, B)]
            ids, mask = left_pad_batch(tok, texts, pad)
            P = ids.shape[1]
            outs = {}
            for m in ((hf_m, ours_m) if rep % 2 == 0 else (ours_m, hf_m)):
                bar.set_postfix_str(f"B={B} {m.label}")
                r = _timed(m, ids, mask, n)
                gen = [metrics.generated_ids(row, P, eos) for row in r["out"].tolist()]
                outs[m.label] = gen
                toks = sum(len(g) for g in gen)
                agg[m.label][0] += toks
                agg[m.label][1] += r["time_s"]
                batches.append({"B": B, "rep": rep, "method": m.label, "time_s": r["time_s"], "new_tokens": toks,
                                "forward_passes": r["forward_passes"]})
                bar.update(1)
            same += sum(a == b for a, b in zip(outs[ours_m.label], outs[hf_m.label]))
            total += B
        hf_tps = agg[hf_m.label][0] / agg[hf_m.label][1]
        our_tps = agg[ours_m.label][0] / agg[ours_m.label][1]
        rows.append({"B": B, "k": k, "max_new_tokens": n, "batches": reps,
                     "hf_tokens_per_s": hf_tps, "clp_fast_tokens_per_s": our_tps, "ratio": our_tps / hf_tps,
                     "rows_identical": same / total})
    return {"rows": rows, "batches": batches}


# ----------------------------------------------------------------------------------------- profile
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
    (decode, "_draft", "LM head + argmax/softmax"),  # _draft's own time once heads and policy are taken out
    (reference, "clp_accept_lengths", "CLP policy"),
    (GatePolicy, "accept_lengths", "gate policy"),
    (decode, "_lossless_tree", "draft tree (lookup + trie)"),
    (decode, "_chain_tree", "draft chain"),
    (decode, "_verify", "verify"),
    (backend, "commit_kv_span_", "commit KV span"),
    (decode, "_emit", "emit (budget/EOS)"),
    (decode, "_append", "append output"),
    (decode, "_count_accepts", "stats"),
]


@contextlib.contextmanager
def patched_timers(timers: StepTimers, model=None):
    """Wrap the engine's step functions (and, for HF, the model's forward) with ``timers``; restore after."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in PROFILED] + [(decode, "_prefill", decode._prefill)]
    try:
        for obj, name, bucket in PROFILED:
            setattr(obj, name, timers.wrap(bucket, getattr(obj, name)))
        decode._prefill = timers.wrap_phase("prefill", decode._prefill)
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


# ------------------------------------------------------------------------------------------ tables
def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


def _hist_str(hist: list[int] | None) -> str:
    if not hist:
        return "–"
    tot = sum(hist) or 1
    return " ".join(f"{100 * h / tot:.0f}" for h in hist)


def format_table(rows: list[dict]) -> str:
    """The main table as GitHub markdown (also what the terminal shows)."""
    head = ("| method | tok/s | speedup (median) | speedup (total) | × prompt-lookup | τ | accepted 0..k (% of steps) "
            "| identical to hf-greedy | mean 1st divergence | seq-rep-4 | Δ seq-rep-4 | peak RSS MiB (+call) |")
    lines = [head, "|---|" + "---:|" * 5 + "---|" + "---:|" * 5]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['tokens_per_s']:.1f} | {r['speedup_median']:.2f}× | {r['speedup_total']:.2f}× | "
            f"{_fmt(r['vs_prompt_lookup_median'], '.2f')}× | {r['tau']:.2f} | {_hist_str(r['accept_hist'])} | "
            f"{100 * r['exact_match']:.0f}% ({r['prompts'] - r['diverged']}/{r['prompts']}) | "
            f"{_fmt(r['mean_first_divergence'], '.1f')} | {r['seq_rep_4']:.4f} | {r['seq_rep_4_delta']:+.4f} | "
            f"{r['peak_rss_mib']:.0f} (+{r['peak_rss_delta_mib']:.0f}) |")
    return "\n".join(lines)


def format_set_table(by_set: dict[str, list[dict]]) -> str:
    sets = [s for s in by_set if by_set[s]]
    lines = ["| method | " + " | ".join(f"{s}: speedup (median) | {s}: τ | {s}: identical" for s in sets) + " |",
             "|---|" + "---:|---:|---:|" * len(sets)]
    for i, r0 in enumerate(by_set[sets[0]]):
        cells = []
        for s in sets:
            r = by_set[s][i]
            cells.append(f"{r['speedup_median']:.2f}× | {r['tau']:.2f} | {100 * r['exact_match']:.0f}%")
        lines.append(f"| {r0['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_batched(b: dict) -> str:
    lines = ["| B | new tokens | batches | transformers greedy tok/s | clp_fast lossless tok/s | ratio "
             "| rows identical |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in b["rows"]:
        lines.append(f"| {r['B']} | {r['max_new_tokens']} | {r['batches']} | {r['hf_tokens_per_s']:.1f} | "
                     f"{r['clp_fast_tokens_per_s']:.1f} (k={r['k']}) | {r['ratio']:.2f}× | "
                     f"{100 * r['rows_identical']:.0f}% |")
    return "\n".join(lines)


def check_targets(rows: list[dict], batched: dict | None, dtype: str) -> list[dict]:
    """The issue's targets, measured (reported, not asserted)."""
    out = []

    def add(name, value, ok, note=""):
        out.append({"target": name, "measured": value, "met": bool(ok), "note": note})

    by = {r["label"]: r for r in rows}
    ll = [r for r in rows if r["method"] == "clp_fast lossless"]
    cl = [r for r in rows if r["method"] == "clp_fast clp"]
    base_rep = by[BASELINE]["seq_rep_4"]
    if ll:
        best = max(ll, key=lambda r: r["speedup_median"])
        add("lossless >= 2.0x hf-greedy", f"{best['speedup_median']:.2f}x ({best['label']})",
            best["speedup_median"] >= 2.0)
        add("lossless >= 1.6x hf-prompt-lookup", f"{best['vs_prompt_lookup_median']:.2f}x ({best['label']})",
            best["vs_prompt_lookup_median"] >= 1.6)
        worst = min(r["exact_match"] for r in ll)
        add(f"lossless identical to hf-greedy ({dtype})", f"{100 * worst:.0f}% (worst k)", worst == 1.0,
            "" if dtype == "fp32" else "bf16: near-tie flips are expected; --exactness checks fp32")
    if cl:
        ok = [r for r in cl if r["seq_rep_4"] <= base_rep + 0.005 and r["exact_match"] >= 0.95]
        best = max(ok or cl, key=lambda r: r["speedup_median"])
        add("clp >= 1.5x with seq-rep-4 <= hf + 0.005 and >= 95% identical",
            f"{best['speedup_median']:.2f}x, Δseq-rep-4 {best['seq_rep_4_delta']:+.4f}, "
            f"{100 * best['exact_match']:.0f}% identical ({best['label']})",
            bool(ok) and best["speedup_median"] >= 1.5)
    if batched:
        big = max(batched["rows"], key=lambda r: r["B"])
        add(f"B={big['B']} lossless >= 1.6x transformers batched greedy", f"{big['ratio']:.2f}x",
            big["ratio"] >= 1.6, "" if big["B"] >= 16 else "target is stated at B=16; run --full")
    return out


def format_targets(targets: list[dict]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for t in targets:
        note = f" — {t['note']}" if t["note"] else ""
        lines.append(f"| {t['target']} | {t['measured']}{note} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- plot
def plot(rows: list[dict], path: Path, title: str) -> None:
    """Speedup vs quality (Δ seq-rep-4, exact match) per method, and accept-length histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(14, 9))
    gs = fig.add_gridspec(2, 2)
    ax1, ax2, ax3 = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1]), fig.add_subplot(gs[1, :])
    colors = {"hf-greedy": "black", "hf-prompt-lookup": "tab:gray", "clp_fast greedy": "tab:brown",
              "clp_fast lossless": "tab:blue", "clp_fast clp": "tab:orange", "gate": "tab:red"}
    for r in rows:
        c = colors.get(r["method"], "tab:green")
        ax1.scatter(r["seq_rep_4_delta"], r["speedup_median"], color=c)
        ax1.annotate(r["label"], (r["seq_rep_4_delta"], r["speedup_median"]), fontsize=7,
                     xytext=(3, 3), textcoords="offset points")
        ax2.scatter(100 * r["exact_match"], r["speedup_median"], color=c)
        ax2.annotate(r["label"], (100 * r["exact_match"], r["speedup_median"]), fontsize=7,
                     xytext=(3, 3), textcoords="offset points")
    ax1.axvline(0.005, ls=":", color="gray", lw=1)
    ax1.set(xlabel="Δ seq-rep-4 vs hf-greedy (lower is better)", ylabel="speedup vs hf-greedy (median)",
            title="speed vs repetition")
    ax2.set(xlabel="% sequences identical to hf-greedy", ylabel="speedup vs hf-greedy (median)",
            title="speed vs agreement")
    for ax in (ax1, ax2):
        ax.axhline(1.0, ls="--", color="gray", lw=1)
        ax.grid(alpha=0.3)
    hist_rows = [r for r in rows if r["accept_hist"] and len(r["accept_hist"]) > 1]
    width = 0.8 / max(len(hist_rows), 1)
    for i, r in enumerate(hist_rows):
        h = r["accept_hist"]
        tot = sum(h) or 1
        xs = [j + (i - len(hist_rows) / 2) * width + width / 2 for j in range(len(h))]
        ax3.bar(xs, [v / tot for v in h], width=width, label=r["label"], color=colors.get(r["method"]),
                alpha=0.35 + 0.65 * (r["k"] or 1) / max(x["k"] or 1 for x in hist_rows))
    ax3.set(xlabel="head guesses accepted per step", ylabel="fraction of steps", title="accept-length histograms")
    ax3.legend(fontsize=7, ncol=3)
    fig.suptitle("\n".join(textwrap.wrap(title, 170)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------- exactness
def run_exactness(args, model, tok, heads, eos, pad, counter) -> int:
    """fp32: clp_fast greedy and lossless (every k) must equal hf-greedy token for token."""
    from tqdm import tqdm

    prompts = load_prompts(tok, args.n_humaneval, args.n_prose, args.seed)
    methods = [m for m in make_methods(model, heads, args.ks, eos, pad, None, counter)
               if m.name in (BASELINE, PROMPT_LOOKUP, "clp_fast greedy", "clp_fast lossless")]
    with tqdm(total=len(prompts) * len(methods), file=sys.stderr, disable=args.quiet) as bar:
        records = run_single_stream(methods, prompts, args.max_new_tokens, eos, PeakRSS(), bar)
    failures, report = 0, []
    for rec in records:
        ref = rec["results"][BASELINE]["ids"]
        for label, r in rec["results"].items():
            d = metrics.first_divergence(r["ids"], ref)
            required = label.startswith(("clp_fast greedy", "clp_fast lossless"))
            if d is not None and required:
                failures += 1
            report.append({"prompt": rec["id"], "method": label, "identical": d is None, "first_divergence": d,
                           "required": required,
                           "tokens": None if d is None else [ref[d] if d < len(ref) else None,
                                                             r["ids"][d] if d < len(r["ids"]) else None]})
    print(f"fp32 exactness, {len(prompts)} prompts x {args.max_new_tokens} tokens "
          f"(threads={torch.get_num_threads()}):")
    for label in [m.label for m in methods[1:]]:
        rows = [x for x in report if x["method"] == label]
        bad = [x for x in rows if not x["identical"]]
        tag = "required" if rows[0]["required"] else "info"
        print(f"  {label:24s} {len(rows) - len(bad)}/{len(rows)} identical to hf-greedy [{tag}]"
              + "".join(f"\n    {x['prompt']}: first divergence at {x['first_divergence']} "
                        f"(hf {x['tokens'][0]} vs {x['tokens'][1]})" for x in bad))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.stem}-exactness.json"
    result = {"schema": SCHEMA + "/exactness", "machine": machine_info(), "settings": dict(vars(args)),
              "passed": failures == 0, "report": report, "records": records}
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'PASS' if failures == 0 else 'FAIL'}: wrote {path}")
    return 0 if failures == 0 else 1


# -------------------------------------------------------------------------------------------- main
def _stem() -> str:
    date = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{date}-{socket.gethostname()}-{_git_commit()}"


def load_heads(args, model) -> MTPHeads:
    """``--heads DIR`` or the shipped heads for this backbone; a clear message if there are none."""
    from clp_fast.assets import HEADS_DIR, default_heads_for

    if args.heads:
        try:
            return MTPHeads.from_pretrained(args.heads, model=model)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"run_bench: --heads {args.heads}: {e}") from None

    try:
        return default_heads_for(model)
    except ValueError as e:
        raise SystemExit(
            f"run_bench: no MTP heads for {args.model}.\n  {e}\n"
            f"  Shipped heads live in {HEADS_DIR}/<model name>/ (they may still be training).\n"
            f"  Pass --heads DIR (a folder written by `clp-fast train --out DIR` or MTPHeads.save_pretrained)."
        ) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="known model name or transformers folder")
    p.add_argument("--heads", help="folder of MTP heads (default: the shipped heads for --model)")
    p.add_argument("--full", action="store_true",
                   help=f"all prompts and batch sizes: {FULL}")
    p.add_argument("--n-humaneval", type=int, help=f"HumanEval prompts (default {DEFAULTS['n_humaneval']})")
    p.add_argument("--n-prose", type=int, help=f"prose prompts (default {DEFAULTS['n_prose']})")
    p.add_argument("--max-new-tokens", type=int, help=f"default {DEFAULTS['max_new_tokens']}")
    p.add_argument("--ks", default="2,3,4", help="head counts for the lossless/clp rows (default 2,3,4)")
    p.add_argument("--clp-threshold", type=float, help="CLP threshold for clp rows (default: the heads' own)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice, stated in the output)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt subsets")
    p.add_argument("--batch-sizes", help=f"batched table (default {DEFAULTS['batch_sizes']}; '' to skip)")
    p.add_argument("--batch-new-tokens", type=int, help=f"default {DEFAULTS['batch_new_tokens']}")
    p.add_argument("--batch-reps", type=int, help="batches per B (default 1)")
    p.add_argument("--batch-k", type=int, help=f"heads for the batched lossless run (default {DEFAULTS['batch_k']}, "
                   "the best single-stream k measured here; at most the heads' k)")
    p.add_argument("--warmup-tokens", type=int, default=16, help="tokens of each method's warm-up call (0: none)")
    p.add_argument("--exactness", action="store_true",
                   help="fp32 check that lossless == hf-greedy token for token (default 3 HumanEval + 1 prose)")
    p.add_argument("--profile", action="store_true", help="also time the parts of one decode step")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _resolve(args) -> None:
    base = FULL if args.full else DEFAULTS
    if args.exactness:
        base = {**base, "n_humaneval": 3, "n_prose": 1}
        args.dtype = "fp32"
    for key, val in base.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    args.ks = sorted({int(k) for k in str(args.ks).split(",") if k.strip()})
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    for name in ("n_humaneval", "n_prose"):
        if getattr(args, name) < 0:
            raise SystemExit(f"run_bench: --{name.replace('_', '-')} {getattr(args, name)} must be >= 0")
    if args.n_humaneval + args.n_prose == 0:
        raise SystemExit("run_bench: no prompts (--n-humaneval 0 and --n-prose 0)")
    if args.batch_k < 1:
        raise SystemExit(f"run_bench: --batch-k {args.batch_k} must be >= 1")
    if args.max_new_tokens < 1:
        raise SystemExit(f"run_bench: --max-new-tokens {args.max_new_tokens} must be >= 1")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _resolve(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    started = _dt.datetime.now().isoformat(timespec="seconds")
    stem = _stem()  # named at the start: the commit the run began on, even if HEAD moves meanwhile
    from tqdm import tqdm

    from clp_fast.hub import load_model

    model, tok = load_model(args.model, dtype=args.dtype)
    heads = load_heads(args, model)
    if tok is None:
        raise SystemExit(f"run_bench: no tokenizer with the model {args.model}")
    too_big = [k for k in args.ks if k > heads.k]
    if too_big:
        print(f"run_bench: heads have k={heads.k}; skipping k={too_big}", file=sys.stderr)
        args.ks = [k for k in args.ks if k <= heads.k]
    eos = stop_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    counter = ForwardCounter(model)
    if args.exactness:
        args.stem = stem
        return run_exactness(args, model, tok, heads, eos, pad, counter)

    prompts = load_prompts(tok, args.n_humaneval, args.n_prose, args.seed)
    methods = make_methods(model, heads, args.ks, eos, pad, args.clp_threshold, counter)
    mem = PeakRSS()
    batch_k = min(args.batch_k, heads.k)
    n_batched = sum(2 * args.batch_reps for _ in args.batch_sizes)
    total = len(prompts) * len(methods) + n_batched
    info = machine_info()
    info["tiny_matmul_ms"] = contention_probe()
    if info["tiny_matmul_ms"] > CONTENDED_MS:
        print(f"run_bench: WARNING: a 0.003 ms matmul takes {info['tiny_matmul_ms']:.1f} ms with "
              f"{info['torch_threads']} threads: other processes hold the cores. Stop them, or pass --threads 1.",
              file=sys.stderr)
    print(f"{args.model} {args.dtype}, heads k={heads.k} ({args.heads or 'shipped'}), {len(prompts)} prompts x "
          f"{args.max_new_tokens} tokens, batch 1, {info['torch_threads']} threads on {info['cpu']} "
          f"({info['cpu_count']} CPUs)", file=sys.stderr)
    with tqdm(total=total, file=sys.stderr, disable=args.quiet, desc="bench", unit="run") as bar:
        warmup_s = warm_up(methods, prompts[0], args.warmup_tokens, bar)
        records = run_single_stream(methods, prompts, args.max_new_tokens, eos, mem, bar)
        batched = (run_batched(model, tok, heads, batch_k, args.batch_sizes, args.batch_new_tokens, args.batch_reps,
                               args.seed, eos, pad, counter, bar, min(args.warmup_tokens, 4))
                   if args.batch_sizes else None)
    profile = None
    if args.profile:
        pm = [m for m in methods if m.name in (BASELINE, "clp_fast greedy")]
        pm += [m for m in methods if m.name in ("clp_fast lossless", "clp_fast clp") and m.k == max(args.ks)]
        profile = profile_methods(model, pm, prompts[0], args.max_new_tokens)

    rows = summarize(methods, records)
    by_set = {s: summarize(methods, records, s) for s in ("humaneval", "prose")}
    targets = check_targets(rows, batched, args.dtype)
    elapsed = time.perf_counter() - t_start
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    header = (f"clp_fast bench — {args.model}, {args.dtype}, {len(prompts)} prompts "
              f"({args.n_humaneval} HumanEval + {args.n_prose} prose, seed {args.seed}) x {args.max_new_tokens} new "
              f"tokens, batch 1, {info['torch_threads']} torch threads, {info['cpu']}; heads k={heads.k}, "
              f"CLP threshold {args.clp_threshold if args.clp_threshold is not None else heads.thresholds['clp']:.3g}, "
              f"gate threshold {heads.thresholds.get('gate', float('nan')):.3g}; commit {info['commit']}, "
              f"{started}; load avg {info['loadavg_start'][0]:.1f} → {info['loadavg_end'][0]:.1f}")
    notes = [
        "Speedups are vs hf-greedy measured in the same run (median of per-prompt tokens/s ratios; total = total "
        "tokens / total time, the total-time ratio when lengths match). τ = tokens per forward (prefill "
        "included; HF forwards counted by a hook). Accepted 0..k = share of steps taking that many guesses "
        "(lossless: head or lookup guesses, up to max(k, 6)). "
        "seq-rep-4 = 1 − unique/total 4-grams of the generated ids, mean over prompts. Peak RSS: " + mem.method
        + f", in MiB (+ growth during the call). Warm-up {warmup_s:.0f} s; whole run {elapsed / 60:.1f} min.",
    ]
    if info["tiny_matmul_ms"] > CONTENDED_MS:
        notes.append(f"**CPU contended**: a [5, 900] x [900, 4] matmul took {info['tiny_matmul_ms']:.1f} ms "
                     f"(~0.003 ms idle) at {info['torch_threads']} threads — other processes held the cores, so "
                     "every parallel op paid a scheduler wait. Ratios are side by side but not clean.")
    if heads.k > 1 and any(m.k and m.k < heads.k for m in methods):
        notes.append(f"k < {heads.k} rows use MTPHeads.truncated(k): the CLP drops the dropped heads' confidence "
                     "features, an approximation unless it was trained per k.")
    md = [f"### {header}", "", format_table(rows), ""]
    if sum(bool(v) for v in by_set.values()) > 1:
        md += ["By prompt set:", "", format_set_table(by_set), ""]
    if batched:
        md += [f"Batched throughput (left-padded HumanEval, greedy vs clp_fast lossless k={batch_k}):", "",
               format_batched(batched), ""]
    md += ["Targets (reported, not asserted):", "", format_targets(targets), "", *notes, ""]
    if profile:
        md += [format_profile(profile), ""]
    text = "\n".join(md)
    print(text)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "schema": SCHEMA, "started": started, "elapsed_s": elapsed, "warmup_s": warmup_s,
        "machine": info, "settings": {**dict(vars(args)), "eos_token_ids": eos, "pad_token_id": pad,
                                      "batch_k": batch_k, "memory": mem.method, "heads_config": heads.config_dict(),
                                      "prompts": [{"set": p.set, "id": p.id, "prompt_len": p.ids.shape[1]}
                                                  for p in prompts]},
        "methods": [m.label for m in methods],
        "rows": rows, "rows_by_set": by_set, "targets": targets, "batched": batched, "profile": profile,
        "per_prompt": records,
    }
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(text + "\n")
    shutil.copyfile(out_dir / f"{stem}.md", out_dir / "latest.md")
    if not args.no_plot:
        plot(rows, out_dir / f"{stem}.png", header)
    print(f"wrote {json_path} (+ .md{'' if args.no_plot else ', .png'}, latest.md) in {elapsed / 60:.1f} min",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
