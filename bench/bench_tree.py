"""Lossless decoding with top-m draft trees vs the argmax chain, side by side with transformers.

    python bench/bench_tree.py [--prompts 6] [--tokens 128] [--ks 2 4] [--ms 1 2 3 4] [--speculation adaptive fixed]

Qwen2.5-Coder-0.5B with its shipped heads (bf16, batch 1, 2 threads): per prompt, every method runs
once, interleaved (hf greedy, hf prompt lookup, then clp_fast lossless with ``tree_top_m`` = each m at
each k, and each fed-token cost of the tree rule). Reports tok/s relative to transformers' greedy and to
its prompt-lookup decoding, tau, fed tokens per step and per accepted token, and the acceptance
histogram; JSON under bench/results/. Quiet machine only: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import clp_fast
from clp_fast.assets import default_heads_for
from clp_fast.models.hub import load_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling bench modules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prose", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--speculation", nargs="+", default=["adaptive"], choices=["adaptive", "fixed"],
                    help="how the tree's nodes are chosen: the measured cost model, or every grown guess")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from methods import load_prompts, stop_ids  # bench/methods.py

    model, tok = load_model(args.model, dtype="bf16")
    heads = default_heads_for(model)
    if heads.tree_calibration is None:
        raise SystemExit(f"the shipped heads of {args.model} have no tree calibration (bench/calibrate_tree.py)")
    eos = stop_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    prompts = load_prompts(tok, args.prompts, args.prose, args.seed)
    from transformers import GenerationConfig

    def hf(**extra):
        cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=args.tokens, eos_token_id=eos,
                               pad_token_id=pad, **extra)
        return lambda ids: (model.generate(ids, generation_config=cfg), None)

    def ours(k, m, speculation):
        h = heads.truncated(k)
        return lambda ids: clp_fast.generate(model, ids, h, max_new_tokens=args.tokens, mode="lossless",
                                             eos_token_id=eos, pad_token_id=pad, tree_top_m=m, return_stats=True,
                                             speculation=speculation)

    methods = {"hf-greedy": hf(), "hf-prompt-lookup": hf(prompt_lookup_num_tokens=10)}
    for k in args.ks:
        for m in args.ms:
            for spec in args.speculation:
                methods[f"lossless k={k} m={m}" + (f" {spec}" if len(args.speculation) > 1 else "")] = \
                    ours(k, m, spec)
    with torch.inference_mode():
        for run in methods.values():  # warm-up
            run(prompts[0].ids[:, :32])
        rows = {name: [] for name in methods}
        for i, p in enumerate(prompts):
            ref = None
            for name, run in methods.items():
                t0 = time.perf_counter()
                out, st = run(p.ids)
                dt = time.perf_counter() - t0
                gen = out[0, p.ids.shape[1]:]
                if name == "hf-greedy":
                    ref = gen
                rec = {"prompt": p.id, "s": dt, "tokens": int(gen.shape[0]),
                       "identical": bool(ref is not None and torch.equal(gen, ref[: gen.shape[0]])
                                         and gen.shape[0] == ref.shape[0])}
                if st is not None:
                    rec |= {"tau": st.tau, "forwards": st.forward_passes, "drafted": st.drafted,
                            "accept_hist": st.accept_hist}
                rows[name].append(rec)
            print(f"prompt {i + 1}/{len(prompts)} done", flush=True)
    base = {r["prompt"]: r["s"] / max(1, r["tokens"]) for r in rows["hf-greedy"]}
    pl = {r["prompt"]: r["s"] / max(1, r["tokens"]) for r in rows["hf-prompt-lookup"]}
    table = []
    for name, rs in rows.items():
        per = [base[r["prompt"]] / (r["s"] / max(1, r["tokens"])) for r in rs]
        vs_pl = [pl[r["prompt"]] / (r["s"] / max(1, r["tokens"])) for r in rs]
        row = {"method": name, "tok_s": sum(r["tokens"] for r in rs) / sum(r["s"] for r in rs),
               "speedup_median": statistics.median(per), "vs_prompt_lookup_median": statistics.median(vs_pl),
               "identical": sum(r["identical"] for r in rs) / len(rs)}
        if "tau" in rs[0]:
            fwd = sum(r["forwards"] - 1 for r in rs)
            acc = sum(r["tokens"] for r in rs)
            row |= {"tau": acc / sum(r["forwards"] for r in rs), "fed_per_step": (sum(r["drafted"] for r in rs) + fwd)
                    / max(1, fwd), "fed_per_token": (sum(r["drafted"] for r in rs) + fwd) / max(1, acc),
                    "accept_hist": [sum(x) for x in zip(*(r["accept_hist"] for r in rs))]}
        table.append(row)
        print(json.dumps(row))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    result = {"model": args.model, "dtype": "bf16", "threads": torch.get_num_threads(), "tokens": args.tokens,
              "prompts": [p.id for p in prompts], "load_average_end": os.getloadavg(), "commit": commit,
              "table": table, "per_prompt": rows}
    out = args.out or HERE / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-tree-{commit}.json"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
