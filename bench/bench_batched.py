"""Batches never slower: clp_fast greedy and lossless against transformers' batched greedy, per batch size.

For each B, ``--reps`` batches of B HumanEval prompts (left-padded, drawn with a seed; never used in
training) decode ``--new-tokens`` tokens with every method, interleaved (the order alternates per
repetition), stopping at the model's end tokens. Per cell: tokens/s min and median over repetitions, the
ratio to transformers' batched greedy of the *same* batch (min / median), tokens fed per forward, tau,
peak RSS, and whether the rows equal transformers' greedy (exactly so in fp32; a rate in bf16).

    python bench/bench_batched.py                       # B in 1 2 4 8 16 32, 2 reps, 32 tokens, bf16
    python bench/bench_batched.py --batch-sizes 4 16 --reps 3 --methods greedy lossless lossless-fixed

Writes ``bench/results/<stem>-batched.json`` and ``.md``. Run it on a quiet machine: the load average
is recorded at the start and end, and a contention probe (``machine.contention_probe``) beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from machine import PeakRSS, contention_probe, loadavg, machine_info, result_stem  # noqa: E402
from methods import COMPILED, compiled_graphs, compiled_hf_greedy, stop_ids  # noqa: E402

import clp_fast  # noqa: E402
from clp_fast.engine import MAX_STEP_TOKENS  # noqa: E402
from clp_fast.eval import metrics  # noqa: E402
from clp_fast.eval.data import humaneval_prompts, prose_prompts  # noqa: E402
from clp_fast.models.hub import load_model  # noqa: E402

HF = "hf greedy"
METHODS = ("greedy", "lossless", "lossless-fixed")


class _NoCounter:
    """compiled_hf_greedy pauses a forward counter around its calls; this bench counts no forwards."""

    @contextlib.contextmanager
    def paused(self):
        yield


def make_runs(model, heads, eos: list[int], pad: int, names: list[str], compiled_cache_len: int | None = None) -> dict:
    """name -> ``run(ids, mask, n) -> (out, info)``; transformers' greedy always first, then (with
    ``compiled_cache_len``) its compiled peer: static cache of that length, inductor freezing (see methods.py)."""
    from transformers import GenerationConfig

    def hf(ids, mask, n):
        cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad)
        return model.generate(ids, attention_mask=mask, generation_config=cfg), {}

    def ours(mode, **kw):
        def run(ids, mask, n):
            out, st = clp_fast.generate(model, ids, heads if mode != "greedy" else None, attention_mask=mask,
                                        max_new_tokens=n, mode=mode, eos_token_id=eos, pad_token_id=pad,
                                        return_stats=True, **kw)
            steps = max(1, st.forward_passes - 1)
            return out, {"tau": st.tau, "fed_per_step": st.fed_tokens / steps, "forwards": st.forward_passes}
        return run

    table = {"greedy": ours("greedy"), "lossless": ours("lossless"),
             "lossless-fixed": ours("lossless", speculation="fixed", max_step_tokens=MAX_STEP_TOKENS)}
    peer = {}
    if compiled_cache_len:
        compiled = compiled_hf_greedy(model, eos, pad, _NoCounter(), compiled_cache_len).run

        def peer_run(ids, mask, n):
            before = compiled_graphs()
            out, _ = compiled(ids, mask, n)
            return out, {"compiled": compiled_graphs() - before}  # > 0: this call compiled (shown, not hidden)
        peer = {COMPILED: peer_run}
    return {HF: hf, **peer, **{n: table[n] for n in names}}


def run_cell(runs: dict, ids, mask, n: int, eos: list[int], rep: int, mem: PeakRSS) -> dict:
    """One batch through every method (order alternating with ``rep``); per method its record."""
    names = list(runs) if rep % 2 == 0 else list(runs)[::-1]
    P = ids.shape[1]
    res, gens = {}, {}
    for name in names:
        mem.start()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out, info = runs[name](ids, mask, n)
        dt = time.perf_counter() - t0
        gen = [metrics.generated_ids(row, P, eos) for row in out.tolist()]
        gens[name] = gen
        toks = sum(len(g) for g in gen)
        res[name] = {"time_s": dt, "new_tokens": toks, "tokens_per_s": toks / dt, "peak_rss_mib": mem.peak(),
                     **info}
    for name in res:
        res[name]["rows_equal_hf"] = sum(a == b for a, b in zip(gens[name], gens[HF]))
        res[name]["ratio"] = res[name]["tokens_per_s"] / res[HF]["tokens_per_s"]
        if COMPILED in res:
            res[name]["ratio_compiled"] = res[name]["tokens_per_s"] / res[COMPILED]["tokens_per_s"]
    return res


def prompt_pool(kind: str, seed: int) -> list[str]:
    """The prompts batches are drawn from: HumanEval's, or those with English prose of three lengths."""
    code = [r["prompt"] for r in humaneval_prompts()]
    if kind == "humaneval":
        return code
    prose = [text for chars in (150, 400, 1200) for text in prose_prompts(24, seed=seed + chars, chars=chars)]
    return code[:72] + prose


def summarize(cells: dict[int, list[dict]]) -> list[dict]:
    rows = []
    for B, reps in cells.items():
        for name in reps[0]:
            rs = [r[name] for r in reps]
            ratios = [r["ratio"] for r in rs]
            tps = [r["tokens_per_s"] for r in rs]
            row = {"B": B, "method": name, "reps": len(rs), "tokens_per_s_min": min(tps),
                   "tokens_per_s_median": statistics.median(tps), "ratio_min": min(ratios),
                   "ratio_median": statistics.median(ratios), "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                   "rows_equal_hf": sum(r["rows_equal_hf"] for r in rs) / (B * len(rs))}
            if "ratio_compiled" in rs[0]:
                row["ratio_compiled_median"] = statistics.median(r["ratio_compiled"] for r in rs)
            if "tau" in rs[0]:
                row["tau"] = statistics.mean(r["tau"] for r in rs)
                row["fed_per_step"] = statistics.mean(r["fed_per_step"] for r in rs)
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    out = ["| B | method | tok/s min / median | vs hf greedy min / median | vs compiled (median) | fed per forward "
           "| tau | peak RSS MiB | rows = hf |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fed = f"{r['fed_per_step']:.2f}" if "fed_per_step" in r else "–"
        tau = f"{r['tau']:.2f}" if "tau" in r else "–"
        vs_c = f"{r['ratio_compiled_median']:.2f}x" if "ratio_compiled_median" in r else "–"
        out.append(f"| {r['B']} | {r['method']} | {r['tokens_per_s_min']:.1f} / {r['tokens_per_s_median']:.1f} | "
                   f"{r['ratio_min']:.2f}x / {r['ratio_median']:.2f}x | {vs_c} | {fed} | {tau} | "
                   f"{r['peak_rss_mib']:.0f} | "
                   f"{r['rows_equal_hf']:.0%} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--heads", help="heads folder (default: the shipped heads for --model)")
    p.add_argument("--k", type=int, default=2, help="heads used by the lossless rows (default 2)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--reps", type=int, default=2, help="batches per B (default 2; >= 2 gives min/median)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--methods", nargs="+", default=["greedy", "lossless"], choices=METHODS)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compiled-peer", action=argparse.BooleanOptionalAction, default=False,
                   help="also transformers greedy + torch.compile (static cache, freezing); compiles once per B "
                        "in the warm-up (~1.5 min each on 2 cores), ratios to it in the table")
    p.add_argument("--prompts", default="humaneval", choices=["humaneval", "mixed"],
                   help="humaneval (uniform code batches) or mixed: HumanEval prompts and English prose of three "
                        "lengths (~150 / 400 / 1200 characters) drawn together, so batches are ragged and left-padded")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    if args.reps < 1 or args.new_tokens < 1 or any(b < 1 for b in args.batch_sizes):
        p.error(f"--reps {args.reps}, --new-tokens {args.new_tokens}, --batch-sizes {args.batch_sizes} must be >= 1")
    torch.set_num_threads(args.threads)
    stem = result_stem()
    info = machine_info()
    model, tok = load_model(args.model, dtype=args.dtype)
    heads = clp_fast.MTPHeads.from_pretrained(args.heads) if args.heads else None
    if heads is None:
        from clp_fast.assets import default_heads_for

        heads = default_heads_for(model)
    heads = heads.truncated(min(args.k, heads.k))
    eos, pad = stop_ids(model, tok), tok.pad_token_id if tok.pad_token_id is not None else 0
    pool = prompt_pool(args.prompts, args.seed)
    cache_len = max(len(tok(t)["input_ids"]) for t in pool) + args.new_tokens if args.compiled_peer else None
    runs = make_runs(model, heads, eos, pad, args.methods, cache_len)
    rng = random.Random(args.seed)
    mem = PeakRSS()
    probe = contention_probe()
    cells: dict[int, list[dict]] = {}
    t_start = time.perf_counter()
    for B in args.batch_sizes:
        warm = clp_fast.left_pad([tok(text)["input_ids"] for text in rng.sample(pool, B)], pad)
        for run in runs.values():  # warm-up: first calls allocate and pick kernels
            with torch.inference_mode():
                run(*warm, 4)
        cells[B] = []
        for rep in range(args.reps):
            ids, mask = clp_fast.left_pad([tok(text)["input_ids"] for text in rng.sample(pool, B)], pad)
            cells[B].append(run_cell(runs, ids, mask, args.new_tokens, eos, rep, mem))
            line = ", ".join(f"{n} {r['ratio']:.2f}x" for n, r in cells[B][-1].items() if n != HF)
            print(f"[bench_batched] B={B} rep {rep}: {line} (load {loadavg()[0]:.2f})", flush=True)
    rows = summarize(cells)
    info.update(loadavg_end=loadavg(), contention_probe_ms=probe, wall_s=time.perf_counter() - t_start,
                args=vars(args), memory=mem.method)
    table = format_table(rows)
    head = (f"clp_fast batched — {args.model}, {args.dtype}, {args.threads} threads, k={heads.k}, "
            f"{args.prompts} prompts, "
            f"{args.new_tokens} new tokens, {args.reps} reps; load {info['loadavg_start']} -> {info['loadavg_end']}, "
            f"probe {probe:.3f} ms; commit {info['commit']}")
    print(head + "\n\n" + table)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps({"machine": info, "rows": rows, "cells": {str(b): c for b, c in
                                                                                        cells.items()}}, indent=1)),
                         (".md", f"### {head}\n\n{table}\n")):
        path = out / f"{stem}-batched{suffix}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(f"wrote {out / (stem + '-batched.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
