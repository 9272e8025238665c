"""The training card: what was trained, on what, how it scores -- as JSON and as Markdown."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from clp_fast.train.config import TRAIN_KINDS, TrainConfig
from clp_fast.train.shards import agree_runs, load_meta, shard_paths, targets


def _data_volume(cfg: TrainConfig, plan: dict, cache: Path) -> dict:
    out = {}
    for kind in TRAIN_KINDS + ("heldout_tf", "heldout"):
        pos, tokens, cons = 0, 0, [0.0] * cfg.k
        for p in shard_paths(cache, kind):
            meta = load_meta(p)
            flat, _ = targets(meta, cfg.k, 1.0, from_gen=kind == "heldout")
            run = agree_runs(meta, cfg.k).view(-1, cfg.k)[flat]
            pos += len(flat)
            cons = [c + float(run[:, j].sum()) for j, c in enumerate(cons)]
            tokens += int(meta["length"].sum())
        out[kind] = {"sequences": len(plan.get(kind, [])), "tokens": tokens, "positions": pos,
                     "greedy_consistent_fraction": [c / max(1, pos) for c in cons]}
    return out


def make_card(cfg: TrainConfig, plan: dict, cache: Path, *, name, fingerprint, budget, command, wall, data_stats,
              train_stats, results, stage, thresholds, ablation) -> dict:
    return {
        "backbone": name, "lm_head_fingerprint": fingerprint, "date": time.strftime("%Y-%m-%d"),
        "command": command, "budget": budget, "wall_time_s": wall,
        "config": {**dataclasses.asdict(cfg), "corpus": list(cfg.corpus)},
        "data": {"corpus": (["stdlib"] if cfg.stdlib else []) + list(cfg.corpus), "files": plan["files"],
                 "volume": _data_volume(cfg, plan, cache), "shards": data_stats},
        "training": train_stats, "results": results, "ablation": ablation, "stage_seconds": stage,
        "thresholds": thresholds,
    }


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _pr_lines(per_depth: list[dict]) -> list[str]:
    lines = ["| depth | rows | accepted | precision | recall |", "|---|---|---|---|---|"]
    lines += [f"| {r['depth']} | {r.get('rows', '-')} | {r['accepted']} | {_f(r['precision'])} | {_f(r['recall'])} |"
              for r in per_depth]
    return lines


def ablation_md(ablation: dict) -> list[str]:
    lines = [f"Ablation on {ablation.get('model', '?')} ({ablation.get('positions', '?')} training positions, "
             f"{ablation.get('epochs', '?')} epoch(s), every variant from zero-init on the same batches; scored on "
             f"held-out teacher-forced rows with exact greedy labels; `{ablation.get('command', '')}`):", "",
             "| variant | head top-1 | head top-3 | chain | fit s |", "|---|---|---|---|---|"]
    for v in ablation["variants"]:
        lines.append(f"| {v['name']} | {' / '.join(f'{a:.3f}' for a in v['head_top1'])} | "
                     f"{' / '.join(f'{a:.3f}' for a in v['head_top3'])} | "
                     f"{' / '.join(f'{a:.3f}' for a in v['chain'])} | {v['seconds']:.0f} |")
    return lines


def card_md(card: dict) -> str:
    d, r, c = card["data"], card["results"], card["config"]
    budget = f", budget {card['budget']}" if card.get("budget") else ""
    lines = [f"# MTP heads for {card['backbone']}", "",
             f"k = {c['k']}, head design `{c['head_design']}`, trained by `clp_fast.train` on {card['date']} "
             f"({card['wall_time_s'] / 60:.1f} min wall, 2-core CPU{budget}).", ""]
    if card.get("command"):
        lines += ["Reproduce:", "", "```", card["command"], "```", ""]
    terms = (("ce_weight", "CE(argmax)"), ("kl_weight", f"KL(top-{c['kl_topk']})"), ("reg_weight", "logit MSE"))
    loss = " + ".join(f"{c[w]} x {n}" for w, n in terms if c[w])
    lines += ["## Data", "",
              f"- corpus: {d['corpus']} ({d['files']['train']} training files, {d['files']['heldout']} held-out "
              "files); HumanEval function names excluded.",
              f"- backbone dtype while building: {c['dtype']}; per position: hidden state (bf16), argmax, "
              f"top-{c['top_k']} ids and log-probabilities.",
              "",
              "| source | sequences | tokens | positions | greedy-consistent targets per head |",
              "|---|---|---|---|---|"]
    names = {"tf": "teacher-forced windows (training files)", "gen": "greedy continuations (training prompts)",
             "heldout_tf": "teacher-forced windows (held-out files)", "heldout": "greedy continuations (held-out)"}
    for kind, v in d["volume"].items():
        lines.append(f"| {names.get(kind, kind)} | {v['sequences']} | {v['tokens']} | {v['positions']} | "
                     + " / ".join(f"{x:.2f}" for x in v["greedy_consistent_fraction"]) + " |")
    lines += ["", f"Training: {card['training']['positions_per_epoch']} positions per epoch, "
              f"{card['training']['steps']} steps (batch {c['batch_size']}, {c['epochs']} epochs, lr {c['lr']}); "
              f"loss = {loss}.", "", "## Held-out results", "",
              "Teacher-forced held-out rows with known greedy labels and greedy continuations of held-out "
              f"prompts ({r['heldout_positions']} positions in all):", "",
              "| head | top-1 | top-3 | P(heads 1..j all right) | top-1 on greedy continuations |",
              "|---|---|---|---|---|"]
    g = r["greedy_continuations"]
    for j in range(c["k"]):
        lines.append(f"| {j + 1} | {r['head_top1'][j]:.3f} | {r['head_top3'][j]:.3f} | {r['chain'][j]:.3f} | "
                     f"{g['head_top1'][j]:.3f} |")
    if card.get("ablation"):
        lines += ["", "## Objective and head design", ""] + ablation_md(card["ablation"])
    pol = r["policies"]
    clp = pol["clp"]
    rp = clp["depth1_recall_at_p95"]
    lines += ["", "## CLP (one linear layer over [h, conf_1..k])", "",
              f"Fit on {pol['rows_fit']} rows, validated on {pol['rows_val']}; base rates per depth "
              + " / ".join(f"{x:.3f}" for x in pol["base_rates"]) + ".", "",
              f"Depth-1 recall at precision >= {rp['precision_target']}: **{rp['recall']:.3f}** "
              f"(threshold {_f(rp['threshold'])}).", "",
              f"Shipped threshold {clp['threshold']:.4f} (smallest with every depth's precision >= "
              f"{clp['target_precision']}):", ""] + _pr_lines(clp["per_depth"])
    lines += ["", "Precision / recall per depth at other thresholds:", "",
              "| threshold | " + " | ".join(f"depth {j + 1}" for j in range(c["k"])) + " |",
              "|---|" + "---|" * c["k"]]
    for row in clp["table"]:
        lines.append(f"| {row['threshold']} | " + " | ".join(f"{_f(x['precision'])} / {_f(x['recall'])}"
                                                             for x in row["per_depth"]) + " |")
    if "gate" in pol:
        gt = pol["gate"]
        lines += ["", f"Gate baseline (~1M-parameter MLP over h, same rows): depth-1 recall at precision >= 0.95 "
                  f"{gt['depth1_recall_at_p95']['recall']:.3f}; threshold {gt['threshold']:.4f}:", ""]
        lines += _pr_lines(gt["per_depth"])
    lines += ["", "## Stage wall times (s)", ""] + [f"- {k}: {v:.0f}" for k, v in card["stage_seconds"].items()]
    return "\n".join(lines) + "\n"
