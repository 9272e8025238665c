"""Issue 23's ablation at one data budget: shipped Medusa heads vs the EAGLE-style drafter, training-time test on
and off, draft vocabulary 32K vs 16K, each read at depths 1-5 on the same held-out teacher-forced windows.

Every variant trains on the same cached shards (``--cache``, built by ``clp-fast train --drafter eagle``) for the
same number of steps, then is read by :func:`clp_fast.train.eagle_eval.evaluate_eagle` at depth ``--eval-depth``: per
depth the top-1 agreement with the backbone's argmax and the chain (all depths right to here). The shipped heads
are read on the same positions (head ``j`` at ``i`` guesses the backbone's argmax at ``i + j``, as the drafter's
depth ``j`` does). Each variant's drafter and result land in ``--work/<variant>/`` as it finishes (a rerun skips
finished variants: the ablation resumes), the table in ``--out-dir``.

    python bench/eagle_ablation.py --cache ~/.cache/clp_fast/runs/abl-data --work ~/.cache/clp_fast/runs/abl \
        --steps 240 --out-dir bench/results/issue23
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clp_fast import reference  # noqa: E402
from clp_fast.drafts.eagle_model import EagleDrafter  # noqa: E402
from clp_fast.train.config import atomic_write_text  # noqa: E402
from clp_fast.train.eagle import EagleTrainConfig, fit_eagle  # noqa: E402
from clp_fast.train.eagle_eval import evaluate_eagle, heldout_accuracy  # noqa: E402

VARIANTS = {  # name: (training-time-test depth, draft vocabulary)
    "ttt3-v32k": (3, 32768),
    "ttt1-v32k": (1, 32768),  # no training-time test: depth 1 only, the drafter never fed its own feature
    "ttt3-v16k": (3, 16384),
    "ttt5-v32k": (5, 32768),
}


@torch.no_grad()
def evaluate_heads_tf(heads, model, cache: Path, depth: int, max_windows: int = 64) -> dict:
    """The heads on :func:`evaluate_eagle`'s positions (:func:`heldout_accuracy`): head ``j`` at ``i`` guesses the
    backbone's argmax at ``i + j``, as the drafter's depth ``j`` does; depths past ``k`` never hit."""
    W = model.get_output_embeddings().weight.detach()

    def guesses(data, w, L):
        ids = reference.fused_heads(data["hidden"][w, : L - 1].to(W.dtype), heads.weight.to(W.dtype),
                                    heads.bias.to(W.dtype), W, draft_vocab=heads.draft_vocab)[0][:, 1:]  # [T, k]
        out = torch.full((L - 1, depth), -1, dtype=torch.long)
        out[:, : min(depth, heads.k)] = ids[:, :depth]
        return out

    return heldout_accuracy(cache, depth, guesses, max_windows=max_windows)


def run_variant(name: str, model, cache: Path, work: Path, steps: int, eval_depth: int, windows: int) -> dict:
    """Train one variant (resumable through its own checkpoint) and read it; its result is kept as it lands."""
    out = work / name
    done = out / "ablation.json"
    if done.is_file():
        return json.loads(done.read_text())
    depth, vocab = VARIANTS[name]
    cfg = EagleTrainConfig(depth=depth, draft_vocab=vocab, epochs=100, max_steps=steps, batch_windows=4)
    torch.manual_seed(cfg.seed)
    drafter = EagleDrafter.for_model(model, draft_vocab=vocab, backbone="ablation").float()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fit = fit_eagle(drafter, model, cache, cfg, progress=True, checkpoint=out / "checkpoint.pt")
    ev = evaluate_eagle(drafter, model, cache, eval_depth, max_windows=windows)
    res = {"variant": name, "ttt_depth": depth, "draft_vocab": vocab, "steps": fit["steps"],
           "fit_seconds_this_run": fit["seconds_this_run"], "seconds": time.perf_counter() - t0,
           "final_kl": fit["loss_history"][-1][2:] if fit["loss_history"] else None, "heldout": ev}
    drafter.save_pretrained(out / "drafter")
    atomic_write_text(done, json.dumps(res, indent=1) + "\n")
    (out / "checkpoint.pt").unlink(missing_ok=True)
    return res


def table(results: list[dict], heads: dict | None, eval_depth: int) -> str:
    head = "| drafter | TTT depth | draft vocab | steps | fit s | " + " | ".join(
        f"top-1 d{j}" for j in range(1, eval_depth + 1)) + " | chain tau |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    if heads:
        lines.append("| shipped Medusa heads (k=4) | - | 32768 | - | - | " + " | ".join(
            f"{a:.3f}" for a in heads["acc"]) + f" | {heads['tau']:.3f} |")
    for r in results:
        ev = r["heldout"]
        lines.append(f"| {r['variant']} | {r['ttt_depth']} | {r['draft_vocab']} | {r['steps']} | "
                     f"{r['fit_seconds_this_run']:.0f} | " + " | ".join(f"{a:.3f}" for a in ev["acc"])
                     + f" | {ev['tau']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--cache", required=True, help="data cache with train and heldout_tf shards")
    ap.add_argument("--work", required=True, help="folder for each variant's checkpoint, drafter and result")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=240, help="optimiser steps per variant (one budget for all)")
    ap.add_argument("--eval-depth", type=int, default=5)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default="bench/results/issue23")
    args = ap.parse_args()
    from clp_fast.assets import default_heads_for
    from clp_fast.models.hub import load_model

    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    cache, work = Path(args.cache).expanduser(), Path(args.work).expanduser()
    heads = evaluate_heads_tf(default_heads_for(model), model, cache, args.eval_depth, args.eval_windows)
    print(f"shipped heads: {heads}", flush=True)
    results = []
    for name in names:
        results.append(run_variant(name, model, cache, work, args.steps, args.eval_depth, args.eval_windows))
        print(f"{name}: {results[-1]['heldout']}", flush=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "cache": str(cache), "steps": args.steps, "eval_depth": args.eval_depth,
              "load_average_end": os.getloadavg(), "heads": heads, "variants": results}
    atomic_write_text(out / "ablation.json", json.dumps(report, indent=1) + "\n")
    md = (f"# Drafter ablation ({args.model}, {args.steps} steps of 4 windows each, held-out teacher-forced "
          f"windows: {heads['positions']} positions)\n\n"
          f"Command: `python bench/eagle_ablation.py {' '.join(sys.argv[1:])}`\n\n"
          + table(results, heads, args.eval_depth))
    atomic_write_text(out / "ablation.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
