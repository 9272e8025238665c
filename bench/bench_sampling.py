"""Question: how much faster is clp_fast's lossless speculative sampling than transformers' own sampling?

Single stream (B = 1), the same HumanEval prompts, temperature / top-p sampling (defaults T = 0.7,
top-p 0.95, no top-k) for both: transformers' ``model.generate(do_sample=True)`` and clp_fast's
lossless sampling (:func:`clp_fast.generate_processed`, the engine behind
``model.generate(custom_generate=clp_fast.hf.generate)``), methods taking turns per prompt (machine
drift falls on all alike), each seeded. Also times greedy through the patched ``model.generate``
against ``clp_fast.generate`` (the overhead of the drop-in). Prints tokens/s, the ratios, and the
acceptance statistics; writes ``bench/results/<date>-<host>-<commit>-sampling.json``.

    python bench/bench_sampling.py [--model qwen2.5-coder-0.5b-instruct] [--prompts 4] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import git_commit, loadavg, machine_info, result_stem  # noqa: E402
from methods import stop_ids  # noqa: E402

import clp_fast  # noqa: E402
from clp_fast.engine import sampling_processors  # noqa: E402
from clp_fast.eval import metrics  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--prompts", type=int, default=4, help="HumanEval prompts (a seeded subset)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-greedy", action="store_true", help="skip the patched-vs-direct greedy overhead rows")
    args = p.parse_args(argv)
    if args.prompts < 1 or args.new_tokens < 1 or args.threads < 1:
        p.error(f"--prompts {args.prompts}, --new-tokens {args.new_tokens}, --threads {args.threads} must be >= 1")
    if not args.temperature > 0 or not 0 < args.top_p <= 1:
        p.error(f"--temperature {args.temperature} must be > 0 and --top-p {args.top_p} in (0, 1]")
    return args


def make_methods(model, heads, args, eos: list[int], pad: int) -> dict:
    """name → fn(ids, mask, seed, n) → (output ids [1, P + G], DecodeStats or None)."""
    T, top_p = args.temperature, args.top_p
    procs = sampling_processors(T, None, top_p)

    def hf_sample(ids, mask, seed, n):
        torch.manual_seed(seed)
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=True, temperature=T, top_p=top_p,
                              top_k=0, eos_token_id=eos, pad_token_id=pad), None

    def clp_sample(ids, mask, seed, n):
        g = torch.Generator().manual_seed(seed)
        return clp_fast.generate_processed(model, ids, heads, attention_mask=mask, max_new_tokens=n,
                                           logits_processor=procs, do_sample=True, generator=g, eos_token_id=eos,
                                           pad_token_id=pad, return_stats=True)

    methods = {"hf-sample": hf_sample, "clp-sample": clp_sample}
    if not args.no_greedy:
        def clp_greedy(ids, mask, seed, n):
            return clp_fast.generate(model, ids, heads, attention_mask=mask, max_new_tokens=n, eos_token_id=eos,
                                     pad_token_id=pad, return_stats=True)

        def patched_greedy(ids, mask, seed, n):
            clp_fast.patch(model, heads)
            try:
                return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                      eos_token_id=eos, pad_token_id=pad), None
            finally:
                clp_fast.unpatch(model)

        methods.update({"clp-greedy": clp_greedy, "patched-greedy": patched_greedy})
    return methods


def run(methods: dict, prompts: list[torch.Tensor], eos: list[int], seed: int, n: int) -> dict:
    """Every method on every prompt, order alternating per prompt; per method tokens, seconds, accept stats."""
    acc = {m: {"tokens": 0, "seconds": 0.0, "forwards": 0, "drafted": 0, "accepted": 0, "hist": []} for m in methods}
    ids0 = prompts[0]
    for fn in methods.values():  # warm-up (a few tokens: first-call costs, not a measurement)
        fn(ids0, torch.ones_like(ids0), seed, 4)
    for i, ids in enumerate(prompts):
        mask = torch.ones_like(ids)
        names = list(methods) if i % 2 == 0 else list(reversed(methods))
        for name in names:
            t0 = time.perf_counter()
            out, stats = methods[name](ids, mask, seed + i, n)
            a = acc[name]
            a["seconds"] += time.perf_counter() - t0
            a["tokens"] += len(metrics.generated_ids(out[0].tolist(), ids.shape[1], eos))
            if stats is not None:
                a["forwards"] += stats.forward_passes
                a["drafted"] += stats.drafted
                a["accepted"] += stats.accepted
                a["hist"] = [x + y for x, y in zip(a["hist"], stats.accept_hist)] if a["hist"] else stats.accept_hist
    return acc


def summarize(acc: dict) -> list[dict]:
    rows = []
    for name, a in acc.items():
        tps = a["tokens"] / a["seconds"] if a["seconds"] else 0.0
        row = {"method": name, "tokens": a["tokens"], "seconds": round(a["seconds"], 3), "tokens_per_s": tps}
        if a["forwards"]:
            row.update(tau=a["tokens"] / a["forwards"], accept_rate=a["accepted"] / max(1, a["drafted"]),
                       drafted=a["drafted"], accepted=a["accepted"], accept_hist=a["hist"])
        rows.append(row)
    by = {r["method"]: r["tokens_per_s"] for r in rows}
    for r in rows:
        if r["method"].endswith("sample") and by.get("hf-sample"):
            r["vs_hf_sample"] = r["tokens_per_s"] / by["hf-sample"]
        if r["method"] == "patched-greedy" and by.get("clp-greedy"):
            r["vs_clp_greedy"] = r["tokens_per_s"] / by["clp-greedy"]
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from clp_fast.assets import default_heads_for
    from clp_fast.eval.data import humaneval_prompts
    from clp_fast.models.hub import load_model

    torch.set_num_threads(args.threads)
    stem = result_stem()
    model, tok = load_model(args.model, dtype=args.dtype)
    heads = default_heads_for(model)
    eos, pad = stop_ids(model, tok), tok.pad_token_id if tok.pad_token_id is not None else 0
    prompts = [tok(r["prompt"], return_tensors="pt").input_ids for r in humaneval_prompts(args.prompts, args.seed)]
    load_before = loadavg()
    acc = run(make_methods(model, heads, args, eos, pad), prompts, eos, args.seed, args.new_tokens)
    rows = summarize(acc)
    load_after = loadavg()

    print(f"{args.model} {args.dtype}, {args.prompts} HumanEval prompts x {args.new_tokens} tokens, B=1, "
          f"T={args.temperature} top-p={args.top_p}, {args.threads} threads, load average {load_before} -> "
          f"{load_after}")
    print(f"{'method':>15} {'tok/s':>7} {'ratio':>22} {'tau':>5} {'accept':>7}  accept_hist")
    for r in rows:
        ratio = (f"{r['vs_hf_sample']:.2f}x hf-sample" if "vs_hf_sample" in r
                 else f"{r['vs_clp_greedy']:.3f}x clp-greedy" if "vs_clp_greedy" in r else "")
        tau = f"{r['tau']:.2f}" if "tau" in r else ""
        rate = f"{r['accept_rate']:.2f}" if "accept_rate" in r else ""
        print(f"{r['method']:>15} {r['tokens_per_s']:7.1f} {ratio:>22} {tau:>5} {rate:>7}  {r.get('accept_hist', '')}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{stem}-sampling.json"
    record = {"question": __doc__.splitlines()[0], "args": vars(args), "commit": git_commit(),
              "machine": machine_info(), "loadavg_before": load_before, "loadavg_after": load_after, "rows": rows}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
