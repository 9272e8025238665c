"""Measure and ship the tree calibration of a head set (clp_fast.train.calibrate).

    python bench/calibrate_tree.py --model qwen2.5-coder-0.5b-instruct \
        --heads clp_fast/assets/heads/qwen2.5-coder-0.5b-instruct --cache /path/to/training-cache

Reads the training cache's held-out greedy shards, writes ``extra.tree`` into the heads' config.json
(temp file + rename; the weights are not touched) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from clp_fast.heads import MTPHeads
from clp_fast.models.hub import load_model
from clp_fast.train.calibrate import calibrate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--heads", required=True, type=Path)
    ap.add_argument("--cache", required=True, type=Path)
    ap.add_argument("--top-m", type=int, default=4)
    ap.add_argument("--lookup-width", type=int, default=6)
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()
    for p in (args.heads / "config.json", args.cache):
        if not p.exists():
            ap.error(f"{p} does not exist")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model, _ = load_model(args.model, dtype=args.dtype)
    heads = MTPHeads.from_pretrained(args.heads, model=model)
    t0 = time.perf_counter()
    calib, report = calibrate(heads, model.get_output_embeddings().weight, args.cache, args.top_m, args.lookup_width)
    cfg_path = args.heads / "config.json"
    cfg = json.loads(cfg_path.read_text())
    shards = [str(Path(s).relative_to(args.cache)) for s in report["shards"]]
    cfg.setdefault("extra", {})["tree"] = {**calib.to_dict(), "measured_on": shards,
                                           "hit_rate_by_rank": report["hit_rate_by_rank"]}
    tmp = cfg_path.with_name(f".{cfg_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, cfg_path)
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), **report, "rates": calib.rates}, indent=1))


if __name__ == "__main__":
    main()
