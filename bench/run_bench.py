#!/usr/bin/env python
"""``make bench``: how much faster clp_fast decodes a real Qwen2.5 model than transformers, and whether
it says the same thing.

Every method runs in this one process, on the same prompts, interleaved: for each prompt every
method runs in turn (the order rotated from prompt to prompt), so machine drift — on a shared
2-core CPU, another job starting — hits all methods alike. The ratios are taken against
``hf-greedy`` measured side by side in the same run.

Methods (batch 1): ``hf-greedy`` (transformers ``generate(do_sample=False)``, the baseline),
``hf-greedy + torch.compile`` (the compiled peer: static cache, inductor freezing; its compile time reported
apart, ``--no-compiled-peer`` skips it), ``hf-prompt-lookup`` (``prompt_lookup_num_tokens=10``),
``clp_fast greedy`` (our engine, no heads: isolates engine overhead), ``clp_fast lossless`` and ``clp_fast clp``
at each k, and ``gate`` (the ~1M-parameter gate policy in clp mode); with ``--datastore`` also
``clp_fast lossless + datastore k=2`` (retrieval drafts, :mod:`clp_fast.drafts.datastore`) and its accepted guesses
per kind of retrieval. Then a batched throughput table
(left-padded HumanEval prompts, clp_fast lossless vs transformers batched greedy).

Outputs: the table on stdout (progress bar on stderr), and in ``--out-dir``
``<date>-<host>-<commit>.{json,md,png}`` plus ``latest.md`` (the markdown table, for docs/results.md). Every row has a
"% of bandwidth limit": the weight bytes a greedy step streams (``bandwidth.weight_bytes_per_token``) x tok/s over
a 1 GiB copy measured in the same run. vLLM's rows (``make bench-vllm``: ``vllm_peer.py`` in its own venv, on
the prompts ``--write-prompts`` wrote) are shown when a ``vllm-*.json`` in ``--out-dir`` matches this run.

The code is split by question: ``methods.py`` (which methods, prompts, heads), ``timing.py`` (running
and timing them), ``report.py`` (rows, tables, targets, plot), ``profile_step.py`` (``--profile``),
``machine.py`` (machine, load, memory); ``quality.py`` answers the task-quality question (``make eval``).

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
import datetime as _dt
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when imported from elsewhere
from bandwidth import copy_bandwidth, weight_bytes_per_token  # noqa: E402
from machine import CONTENDED_MS, PeakRSS, contention_probe, loadavg, machine_info, result_stem  # noqa: E402
from methods import (  # noqa: E402,F401  (BASELINE, ForwardCounter, make_methods, stop_ids: sweep_step_cap)
    BASELINE,
    COMPILED,
    PROMPT_LOOKUP,
    ForwardCounter,
    drafter_factory,
    load_heads,
    load_prompts,
    make_methods,
    stop_ids,
)
from profile_step import format_profile, profile_methods  # noqa: E402
from report import (  # noqa: E402
    add_bandwidth,
    check_targets,
    format_batched,
    format_set_table,
    format_table,
    format_targets,
    format_vllm,
    load_vllm_peer,
    plot,
    summarize,
    vllm_rows,
)
from timing import run_batched, run_single_stream, warm_up  # noqa: E402

from clp_fast.eval import metrics  # noqa: E402

SCHEMA = "clp_fast.bench/1"
ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = {  # sized so that `make bench` takes <= 15 min on the project's 2-core CPU (see docs/results.md)
    "n_humaneval": 4, "n_prose": 2, "max_new_tokens": 128,
    "batch_sizes": "1,4,16", "batch_new_tokens": 32, "batch_reps": 1, "batch_k": 2,
}
FULL = {
    "n_humaneval": 164, "n_prose": 32, "max_new_tokens": 128,
    "batch_sizes": "1,4,16", "batch_new_tokens": 128, "batch_reps": 2, "batch_k": 2,
}


# --------------------------------------------------------------------------------------- exactness
def run_exactness(args, model, tok, heads, eos, pad, counter) -> int:
    """fp32: clp_fast greedy and lossless (every k) must equal hf-greedy token for token."""
    from tqdm import tqdm

    prompts = load_prompts(tok, args.n_humaneval, args.n_prose, args.seed)
    methods = [m for m in make_methods(model, heads, args.ks, eos, pad, None, counter, args.speculation)
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


def datastore_note(records: list[dict]) -> str:
    """The retrieval row's accepted guesses per kind, summed over prompts (shared credit: a guess another source
    also proposed counts for both)."""
    tot: dict[str, list[int]] = {}
    for rec in records:
        for label, r in rec["results"].items():
            for kind, c in r.get("by_kind", {}).items():
                t = tot.setdefault(f"{label} / {kind}", [0, 0])
                t[0], t[1] = t[0] + c["accepted"], t[1] + c["steps"]
    return "Retrieval drafts, accepted guesses its branches held / row-steps it proposed in: " + "; ".join(
        f"{k}: {a} / {s}" for k, (a, s) in tot.items()) + "."


def drafter_note(records: list[dict], args) -> str:
    """The drafter rows' own time per step it drafted in, and the steps adaptive speculation asked it for guesses
    (its gate, :class:`clp_fast.engine.speculation.SourceGate`), summed over prompts."""
    tot: dict[str, list[float]] = {}
    for rec in records:
        for label, r in rec["results"].items():
            if "draft_s" in r:
                t = tot.setdefault(label, [0.0, 0, 0, 0])
                gate = next((s for s in r.get("sources", []) if "draft_s" in s), {})
                t[0], t[1] = t[0] + r["draft_s"], t[1] + r["draft_steps"]
                t[2], t[3] = t[2] + gate.get("asked", 0), t[3] + gate.get("skipped", 0)
    return (f"Drafter {args.drafter} (depth {args.drafter_depth}, top_m {args.drafter_top_m}, stop below "
            f"{args.drafter_stop_below}), its own ms per step "
            "it drafted in (catch-up + propose), and the steps it was asked for guesses: " + "; ".join(
                f"{k}: {1e3 * s / max(n, 1):.1f} ms, asked {a} of {a + sk}" for k, (s, n, a, sk) in tot.items()) + ".")


def write_prompts(args, model, tok) -> int:
    """``--write-prompts FILE``: the prompts this run would time, as token ids, for ``bench/vllm_peer.py``."""
    from clp_fast.models.hub import resolve_model_path

    prompts = load_prompts(tok, args.n_humaneval, args.n_prose, args.seed)
    eos = stop_ids(model, tok)
    path = Path(args.write_prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "schema": SCHEMA + "/prompts", "model": args.model, "model_path": str(resolve_model_path(args.model)),
        "dtype": args.dtype, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
        "commit": machine_info()["commit"],
        "eos_token_ids": eos, "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else eos[0],
        "weight_bytes_per_token": weight_bytes_per_token(model)["bytes"],
        "prompts": [{"set": p.set, "id": p.id, "ids": p.ids[0].tolist()} for p in prompts]}) + "\n")
    print(f"wrote {len(prompts)} prompts to {path}", file=sys.stderr)
    return 0


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
    p.add_argument("--speculation", default="adaptive", choices=["adaptive", "fixed"],
                   help="lossless rows: the cost-model policy (default) or every guess (deterministic acceptance)")
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
    p.add_argument("--compiled-peer", action=argparse.BooleanOptionalAction, default=True,
                   help="the hf-greedy + torch.compile row (default on; compiling costs minutes on 2 cores)")
    p.add_argument("--datastore", action="store_true",
                   help="add a 'clp_fast lossless + datastore k=2' row: retrieval drafts from the code on this machine "
                        "(clp_fast.drafts.datastore; built on first use, minutes)")
    p.add_argument("--drafter", metavar="DIR",
                   help="an EAGLE-style drafter folder (clp-fast train --drafter eagle): adds the rows 'heads alone' "
                        "(k=2, no lookup), 'drafter alone' (no heads, no lookup) and 'lossless + drafter' (k=2)")
    p.add_argument("--drafter-depth", type=int, default=3, help="the drafter's guesses per step (default 3)")
    p.add_argument("--drafter-top-m", type=int, default=1, help="1: chains; > 1: EAGLE-2 trees of that many paths")
    p.add_argument("--drafter-stop-below", type=float, default=0.2,
                   help="a chain stops once every row's product of priors is below this (default 0.2, as "
                        "use_drafter; 0: full depth)")
    p.add_argument("--methods", help="comma-separated substrings: time only the rows whose label holds one "
                                     "(hf-greedy always)")
    p.add_argument("--write-prompts", metavar="FILE",
                   help="write this run's prompts (token ids, EOS, settings) as JSON for bench/vllm_peer.py and exit")
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
    stem = result_stem()  # named at the start: the commit the run began on, even if HEAD moves meanwhile
    from tqdm import tqdm

    from clp_fast.models.hub import load_model

    model, tok = load_model(args.model, dtype=args.dtype)
    if args.write_prompts and tok is not None:  # no heads needed
        return write_prompts(args, model, tok)
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
    # one static-cache size for the whole run: the compiled peer's decode graph has one shape for every prompt
    cache_len = max(p.ids.shape[1] for p in prompts) + args.max_new_tokens if args.compiled_peer else None
    store = None
    if args.datastore:
        from clp_fast.drafts.datastore import datastore_factory

        store = datastore_factory(tok)
    drafter = drafter_factory(model, args.drafter, args.drafter_depth, args.drafter_top_m,
                              args.drafter_stop_below) if args.drafter else None
    methods = make_methods(model, heads, args.ks, eos, pad, args.clp_threshold, counter, args.speculation,
                           compiled_cache_len=cache_len, datastore=store, drafter=drafter)
    if args.methods:
        methods = [m for m in methods if m.label == BASELINE or any(s in m.label for s in args.methods.split(","))]
    wbytes = weight_bytes_per_token(model)
    bw = copy_bandwidth()
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
        warm_s = warm_up(methods, prompts[0], args.warmup_tokens, bar)
        records = run_single_stream(methods, prompts, args.max_new_tokens, eos, mem, bar)
        batched = (run_batched(model, tok, heads, batch_k, args.batch_sizes, args.batch_new_tokens, args.batch_reps,
                               args.seed, eos, pad, counter, bar, min(args.warmup_tokens, 4), args.speculation)
                   if args.batch_sizes else None)
    profile = None
    if args.profile:
        pm = [m for m in methods if m.name in (BASELINE, "clp_fast greedy")]
        pm += [m for m in methods if m.name in ("clp_fast lossless", "clp_fast clp") and m.k == max(args.ks)]
        profile = profile_methods(model, pm, prompts[0], args.max_new_tokens)

    rows = summarize(methods, records)
    by_set = {s: summarize(methods, records, s) for s in ("humaneval", "prose")}
    add_bandwidth(rows, wbytes["bytes"], bw["copy_gb_s"])
    warmup_s = sum(warm_s.values())
    vllm_path, vllm_res, vllm_skipped = load_vllm_peer(Path(args.out_dir), {
        "model": args.model, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
        "prompts": [[p.id, p.ids.shape[1]] for p in prompts]})
    peer_rows = (vllm_rows(vllm_res, records, next(r for r in rows if r["label"] == BASELINE), wbytes["bytes"])
                 if vllm_res else None)
    targets = check_targets(rows, batched, args.dtype)
    elapsed = time.perf_counter() - t_start
    info["loadavg_end"] = loadavg()
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
    notes.append(f"% of bandwidth limit = {wbytes['bytes'] / 1e6:.0f} MB of weights per token (the "
                 f"{wbytes['linear_modules']} nn.Linear weights and biases a greedy step streams, LM head included, "
                 f"{wbytes['lm_head_bytes'] / 1e6:.0f} MB; not norms, embedding row, KV cache or MTP heads) x tok/s, "
                 f"over a 1 GiB torch copy measured in this run: {bw['copy_gb_s']:.1f} GB/s read + write "
                 f"(sum: {bw['sum_gb_s']:.1f} GB/s read). tok/s includes the prefill. Above 100 %: faster than any "
                 "one-token-per-step decoder can be here (speculative rows).")
    cp = next((r for r in rows if r["label"] == COMPILED), None)
    if cp:
        notes.append(f"{COMPILED}: transformers generate, static cache of {cache_len} positions for every prompt "
                     "(longest prompt + new tokens: one decode graph, no recompile per prompt length), inductor "
                     "freezing + cpp.weight_prepack; prefill runs eager. Compiling: "
                     f"{warm_s.get(COMPILED, 0.0):.0f} s (its warm-up call, not in tok/s); {cp['recompiles']} timed "
                     f"call(s) compiled again (re-run, {cp['recompile_s']:.0f} s not in tok/s).")
    if args.datastore:
        notes.append(datastore_note(records))
    if args.drafter:
        notes.append(drafter_note(records, args))
    if vllm_skipped and not vllm_res:
        notes.append(f"vLLM rows not shown: {', '.join(vllm_skipped[:3])} ran other prompts or settings "
                     "(`make bench-vllm` runs this run's defaults).")
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
    if peer_rows:
        md += [format_vllm(vllm_path, vllm_res, peer_rows), ""]
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
        "schema": SCHEMA, "started": started, "elapsed_s": elapsed, "warmup_s": warmup_s, "warmup_s_by_method": warm_s,
        "bandwidth": {**bw, "weights": wbytes}, "compiled_cache_len": cache_len,
        "vllm": {"file": vllm_path.name, "rows": peer_rows} if peer_rows else None,
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
