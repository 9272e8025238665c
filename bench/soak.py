#!/usr/bin/env python
"""Soak: does clp_fast stay right and stay put over hundreds of ``generate`` calls of every shape?

A bounded run (default 5 minutes) on SmolLM2-135M-Instruct in fp32 with its shipped heads: each call draws a
batch size in 1..8, per-row prompt lengths (windows of stdlib source code), a mode (greedy / lossless / clp),
a budget of new tokens, a number of heads, a prompt-lookup width and a step cap. Every greedy and lossless
output is compared token for token (``torch.equal``) with transformers' own batched greedy ``generate`` on the
same left-padded batch; clp outputs (the paper's approximate mode) are checked for shape and vocabulary only.
The process's resident memory is sampled after every call.

Warm-up is one call per mode at the largest shape the run can draw (B = 8, longest prompts, largest budget), so
the RSS measured afterwards can only grow through a leak, not through a larger batch. Pass criteria: 0
mismatches and RSS growth after warm-up < 5 %.

Prints a summary table, writes ``bench/results/soak-<date>-<commit>.json`` (every call, the RSS samples, the
load average at start and end) and exits 1 if a criterion fails.

Examples::

    python bench/soak.py                  # ~5 minutes
    python bench/soak.py --seconds 60     # a short run
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

MODES = ("greedy", "lossless", "clp")
MIN_PROMPT = 4
# Largest batch, prompt and budget drawn. Each call also runs transformers' greedy on the same batch, so a call
# costs two decodes; these keep a 5-minute run at a few hundred calls on 2 CPU cores.
LIMITS = {"max_batch": 8, "max_prompt": 48, "max_budget": 24}
RSS_GROWTH_LIMIT = 0.05
SOURCE_FILES = ("json/decoder.py", "json/encoder.py", "textwrap.py", "argparse.py", "functools.py")


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; ru_maxrss elsewhere, which is the peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def source_tokens(tok) -> list[int]:
    """Token ids of a few stdlib modules: the pool that prompts are cut from."""
    from clp_fast.eval.data import stdlib_dir

    text = "\n".join((stdlib_dir() / f).read_text() for f in SOURCE_FILES if (stdlib_dir() / f).is_file())
    return tok(text)["input_ids"]


def draw_call(rng: random.Random, pool_len: int, k_max: int, limits: dict, *, largest: str | None = None) -> dict:
    """One call's shape: batch, per-row (start, length) windows, mode, budget, k, lookup width, step cap.
    ``largest``: the warm-up call of that mode, at the largest shape the run can draw."""
    max_prompt = limits["max_prompt"]
    if largest is not None:
        rows = [(rng.randrange(pool_len - max_prompt), max_prompt) for _ in range(limits["max_batch"])]
        return {"rows": rows, "mode": largest, "budget": limits["max_budget"], "k": k_max,
                "lookup": None if largest == "lossless" else 0, "step_cap": None}
    B = rng.randint(1, limits["max_batch"])
    rows = []
    for _ in range(B):
        n = rng.randint(MIN_PROMPT, max_prompt)
        rows.append((rng.randrange(pool_len - n), n))
    mode = rng.choice(MODES)
    return {"rows": rows, "mode": mode, "budget": rng.randint(1, limits["max_budget"]), "k": rng.randint(1, k_max),
            "lookup": rng.choice([None, 0, 3]) if mode == "lossless" else 0,
            "step_cap": rng.choice([None, 10, 4]) if mode == "lossless" else None}


def run_call(model, heads, pool: list[int], call: dict, pad: int, eos: int | None) -> dict:
    """Run one drawn call through clp_fast and (greedy / lossless) through transformers; returns its record."""
    import clp_fast

    rows = [pool[s : s + n] for s, n in call["rows"]]
    ids, mask = clp_fast.left_pad(rows, pad)
    use_heads = heads.truncated(call["k"]) if call["mode"] != "greedy" else None
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = clp_fast.generate(model, ids, use_heads, attention_mask=mask, max_new_tokens=call["budget"],
                                mode=call["mode"], prompt_lookup=call["lookup"], max_step_tokens=call["step_cap"],
                                pad_token_id=pad, eos_token_id=eos)
    ours_s = time.perf_counter() - t0
    record = {**call, "B": len(rows), "ours_s": ours_s, "checked": call["mode"] != "clp"}
    if call["mode"] == "clp":
        V = model.get_output_embeddings().weight.shape[0]
        record["ok"] = bool(out.shape[0] == len(rows) and out.shape[1] <= ids.shape[1] + call["budget"]
                            and int(out.min()) >= 0 and int(out.max()) < V)
        return record
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=call["budget"], do_sample=False,
                             pad_token_id=pad, eos_token_id=eos)
    record["ok"] = bool(out.shape == ref.shape and torch.equal(out, ref))
    if not record["ok"]:
        record["first_mismatch"] = first_mismatch(out, ref)
    return record


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    idx = tuple((a != b).nonzero()[0].tolist())
    return f"first mismatch at {idx}: {a[idx].item()} vs {b[idx].item()}"


def soak(model, tok, heads, seconds: float, seed: int = 0, limits: dict | None = None, generate=None) -> dict:
    """Warm up, then draw and run calls until ``seconds`` have passed; returns the summary and every record.

    ``limits``: overrides of :data:`LIMITS`. ``generate``: a stand-in for ``clp_fast.generate`` (tests use it to
    prove that a wrong output is caught)."""
    import clp_fast

    limits = {**LIMITS, **(limits or {})}
    if generate is not None:
        real, clp_fast.generate = clp_fast.generate, generate
    try:
        rng = random.Random(seed)
        pool = source_tokens(tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        eos = tok.eos_token_id
        warm = [run_call(model, heads, pool, draw_call(rng, len(pool), heads.k, limits, largest=m), pad, eos)
                for m in MODES]
        rss_warm = rss_bytes()
        records, samples, t0 = [], [], time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            records.append(run_call(model, heads, pool, draw_call(rng, len(pool), heads.k, limits), pad, eos))
            samples.append([round(time.perf_counter() - t0, 2), rss_bytes()])
    finally:
        if generate is not None:
            clp_fast.generate = real
    peak_after = max((r for _, r in samples), default=rss_warm)
    return {
        "calls": len(records), "warmup_calls": len(warm), "seconds": time.perf_counter() - t0,
        "mismatches": sum(not r["ok"] for r in warm + records),
        "checked": sum(r["checked"] for r in warm + records),
        "calls_by_mode": {m: sum(r["mode"] == m for r in records) for m in MODES},
        "rss_after_warmup": rss_warm, "rss_peak_after_warmup": peak_after,
        "rss_growth": (peak_after - rss_warm) / rss_warm, "limits": limits,
        "rss_samples": samples, "records": warm + records,
    }


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--seconds", type=float, default=300.0, help="length of the run after warm-up (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    if args.seconds <= 0:
        p.error(f"--seconds {args.seconds} must be > 0")
    from clp_fast.assets import default_heads_for
    from clp_fast.models.hub import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype="fp32")
    heads = default_heads_for(model)
    load_start = os.getloadavg()
    result = soak(model, tok, heads, args.seconds, args.seed)
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    result.update(model=args.model, dtype="fp32", seed=args.seed, commit=_commit(), host=platform.node(),
                  threads=torch.get_num_threads(), date=date, loadavg_start=load_start, loadavg_end=os.getloadavg())
    ok = result["mismatches"] == 0 and result["rss_growth"] < RSS_GROWTH_LIMIT
    mib = 2**20
    print(f"soak {args.model} fp32, {result['seconds']:.0f} s after {result['warmup_calls']} warm-up calls, "
          f"{result['threads']} threads, load average {load_start[0]:.2f} -> {result['loadavg_end'][0]:.2f}")
    print("| calls | by mode (greedy/lossless/clp) | checked vs transformers | mismatches | RSS after warm-up | "
          "peak RSS after | growth |")
    print("|---|---|---|---|---|---|---|")
    by = result["calls_by_mode"]
    print(f"| {result['calls']} | {by['greedy']}/{by['lossless']}/{by['clp']} | {result['checked']} | "
          f"{result['mismatches']} | {result['rss_after_warmup'] / mib:.0f} MiB | "
          f"{result['rss_peak_after_warmup'] / mib:.0f} MiB | {100 * result['rss_growth']:+.2f} % |")
    for r in result["records"]:
        if not r["ok"]:
            print(f"MISMATCH {r['mode']} B={r['B']} budget={r['budget']} k={r['k']}: {r.get('first_mismatch')}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"soak-{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}-{result['commit']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'PASS' if ok else 'FAIL'}: 0 mismatches and RSS growth < {100 * RSS_GROWTH_LIMIT:.0f} % required; "
          f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
