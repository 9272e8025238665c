"""Objective and head design of the MTP heads, by ablation at one fixed data budget and one held-out set.

Every variant trains from zero-initialised heads on the same first ``--positions`` training positions
of a ``clp-fast train`` data cache (same batches, same seed) and is scored on the same held-out
teacher-forced rows (positions of held-out files whose greedy label is exact), over the heads' draft
vocabulary. Writes a JSON that ``clp-fast train --ablation`` puts into the training card.

    python bench/ablate_heads.py --model qwen2.5-coder-0.5b-instruct --cache /path/to/train-cache \
        --positions 150000 --out bench/results/ablation-qwen.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from clp_fast.heads import MTPHeads
from clp_fast.models.hub import load_model
from clp_fast.train.config import TrainConfig, atomic_write_text
from clp_fast.train.fit import TrainableHeads, fit_heads
from clp_fast.train.policies import chain_accuracy, head_accuracy, heldout_rows

# name -> (TrainConfig overrides); "ce" is the recipe before this ablation.
VARIANTS = {
    "ce (Medusa-1, argmax labels)": dict(ce_weight=1.0, kl_weight=0.0, reg_weight=0.0),
    "kl (top-32 distillation)": dict(ce_weight=0.0, kl_weight=1.0, reg_weight=0.0),
    "kl + ce": dict(ce_weight=1.0, kl_weight=1.0, reg_weight=0.0),
    "reg (logit-space hidden-state regression)": dict(ce_weight=0.0, kl_weight=0.0, reg_weight=1.0),
    "reg + kl": dict(ce_weight=0.0, kl_weight=1.0, reg_weight=1.0),
    "kl + pending-token input": dict(ce_weight=0.0, kl_weight=1.0, head_design="medusa1+token"),
    "kl + 2 residual blocks": dict(ce_weight=0.0, kl_weight=1.0, head_design="medusa2"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--cache", required=True, help="a clp-fast train data cache (its run.json gives k, dtype ...)")
    ap.add_argument("--positions", type=int, default=150_000, help="training positions per variant")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--eval-rows", type=int, default=40_000, help="held-out rows scored per variant")
    ap.add_argument("--variants", nargs="*", default=None, help=f"subset of {list(VARIANTS)} (default: all)")
    ap.add_argument("--kl-topk", type=int, default=32)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    if not (cache / "run.json").is_file():
        raise SystemExit(f"--cache {args.cache!r} holds no run.json: not a clp-fast train cache")
    unknown = set(args.variants or []) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {list(VARIANTS)}")
    run = json.loads((cache / "run.json").read_text())
    base = {key: v for key, v in run["config"].items() if key in {f.name for f in dataclasses.fields(TrainConfig)}}
    base["corpus"] = tuple(base["corpus"])
    model, _ = load_model(args.model, dtype=base["dtype"])
    W = model.get_output_embeddings().weight.detach()
    embed = model.get_input_embeddings().weight.detach()
    out_path = Path(args.out)
    done = json.loads(out_path.read_text()) if out_path.is_file() else None
    result = done or {"model": args.model, "cache": str(cache), "positions": args.positions, "epochs": args.epochs,
                      "command": "python bench/ablate_heads.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                      "load_avg_at_start": os.getloadavg()[0], "variants": []}
    for name in args.variants or list(VARIANTS):
        if any(v["name"] == name for v in result["variants"]):
            continue  # resumable: a finished variant is not trained again
        cfg = TrainConfig(**{**base, "epochs": args.epochs, "kl_topk": args.kl_topk, **VARIANTS[name]})
        cfg.validate()
        torch.manual_seed(cfg.seed)
        heads = MTPHeads.for_model(model, cfg.k, draft_vocab=cfg.draft_vocab)
        net = TrainableHeads(heads, cfg.head_design, embed)
        t0 = time.perf_counter()
        stats = fit_heads(net, W, cfg, cache, run["fingerprint"], progress=True, max_positions=args.positions,
                          checkpoint=False)
        secs = time.perf_counter() - t0
        with torch.no_grad():
            rows = heldout_rows(lambda h, pend, net=net: net(h.float(), pend), W, cache, cfg.k, heads.draft_vocab,
                                ("heldout_tf",), max_rows=args.eval_rows)
        entry = {"name": name, "overrides": VARIANTS[name], "seconds": secs, "steps": stats["steps"],
                 "positions": stats["positions_per_epoch"], "eval_rows": int(rows["hidden"].shape[0]),
                 "head_top1": head_accuracy(rows), "head_top3": head_accuracy(rows, 3),
                 "chain": chain_accuracy(rows), "final_loss": stats["loss_history"][-1]}
        result["variants"].append(entry)
        print(f"{name}: top-1 " + " / ".join(f"{a:.3f}" for a in entry["head_top1"]) + f" ({secs:.0f} s)",
              flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_path, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
