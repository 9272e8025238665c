"""The stages after the data: fit the heads, round them, fit the CLP and gate, write the outputs."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from clp_fast.faults import kill_point
from clp_fast.heads import MTPHeads
from clp_fast.train.card import card_md, make_card
from clp_fast.train.config import CKPT_NAME, TrainConfig, atomic_write_text, log
from clp_fast.train.fit import TrainableHeads, fit_heads
from clp_fast.train.policies import chain_accuracy, fit_policies, head_accuracy, heldout_rows, shipped_z_fn


def finish_run(model, bb, plan: dict, cfg: TrainConfig, cache: Path, out_dir: Path, marker: Path, *,
               fingerprint: str, name: str, data_stats: dict, stage: dict, t_start: float, save_dtype: torch.dtype,
               keep_cache: bool, budget: str | None, command: str | None, progress: bool,
               ablation=None) -> MTPHeads:
    import json

    if cfg.head_design != "medusa1":
        raise ValueError(f"head_design={cfg.head_design!r} can be measured (bench/ablate_heads.py) but not shipped: "
                         f"the decode kernels run 'medusa1'")
    W = bb.plain_lm_head.detach()
    heads = MTPHeads.for_model(model, cfg.k, backbone=name, with_gate=cfg.with_gate, draft_vocab=cfg.draft_vocab)
    heads.train()
    t = time.perf_counter()
    train_stats = fit_heads(TrainableHeads(heads, cfg.head_design), W, cfg, cache, fingerprint, progress)
    stage["heads (this run)"] = time.perf_counter() - t

    # Round the heads to the shipped dtype before fitting the CLP, so its features are the decode-time ones.
    t = time.perf_counter()
    with torch.no_grad():
        heads.weight.copy_(heads.weight.to(save_dtype).float())
        heads.bias.copy_(heads.bias.to(save_dtype).float())
    kinds = ("heldout_tf", "heldout") if plan.get("heldout_tf") else ("heldout",)
    rows = heldout_rows(shipped_z_fn(heads), W, cache, cfg.k, heads.draft_vocab, kinds, progress)
    policies = fit_policies(heads, rows, cfg, progress)
    gen_rows = {key: v[rows["source"] == len(kinds) - 1] for key, v in rows.items()}
    stage["clp+gate"] = time.perf_counter() - t
    results = {"heldout_positions": int(rows["hidden"].shape[0]), "head_top1": head_accuracy(rows),
               "head_top3": head_accuracy(rows, 3), "chain": chain_accuracy(rows),
               "greedy_continuations": {"positions": int(gen_rows["hidden"].shape[0]),
                                        "head_top1": head_accuracy(gen_rows), "head_top3": head_accuracy(gen_rows, 3),
                                        "chain": chain_accuracy(gen_rows)},
               "policies": policies}
    if ablation is not None and not isinstance(ablation, dict):
        ablation = json.loads(Path(ablation).read_text())  # read now: the ablation may have run alongside
    card = make_card(cfg, plan, cache, name=name, fingerprint=fingerprint, budget=budget, command=command,
                     wall=time.perf_counter() - t_start, data_stats=data_stats, train_stats=train_stats,
                     results=results, stage=stage, thresholds=heads.thresholds, ablation=ablation)
    heads.extra_config = {"trained_by": "clp_fast.train", "head_top1_heldout": results["head_top1"]}
    heads.save_pretrained(out_dir, dtype=save_dtype)
    atomic_write_text(out_dir / "training_card.json", json.dumps(card, indent=1) + "\n")
    atomic_write_text(out_dir / "training_card.md", card_md(card))
    atomic_write_text(out_dir / "clp_metrics.json", json.dumps(policies, indent=1) + "\n")
    kill_point("finish:saved")
    marker.unlink(missing_ok=True)
    (cache / CKPT_NAME).unlink(missing_ok=True)
    if not keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    log(f"wrote {out_dir} in {card['wall_time_s'] / 60:.1f} min; held-out head top-1 "
        + " / ".join(f"{a:.3f}" for a in results["head_top1"]), progress)
    return MTPHeads.from_pretrained(out_dir, model=model)
