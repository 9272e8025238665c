"""What the quality run reports: per-method rows, the threshold rule, the table, the plot, the card entry."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from clp_fast.eval import metrics
from clp_fast.eval.stats import mcnemar_exact, paired_counts, wilson_interval

RULE = ("the fastest threshold (most tokens per forward over all problems) whose paired loss against greedy "
        "(problems greedy passes and it fails) is at most one problem")
FULL_N = 164
CARD_SECTION = "## CLP threshold chosen by executed pass@1"


def summarize_quality(methods: list[dict], problems: list[dict], completions: dict, executed: dict,
                      speed: dict | None, tok) -> list[dict]:
    """One row per method: pass@1 [95 % Wilson], paired counts vs greedy + McNemar p, τ, agreement, repetition."""
    ids = [p["task_id"] for p in problems]
    greedy_pass = [executed["greedy"][t]["passed"] for t in ids]
    greedy_text = [completions["greedy"][t]["completion"] for t in ids]

    def rep(name):
        return statistics.fmean(metrics.seq_rep_n(tok(completions[name][t]["completion"])["input_ids"], 4)
                                for t in ids)

    greedy_rep = rep("greedy")
    rows = []
    for m in methods:
        name = m["name"]
        passed = [executed[name][t]["passed"] for t in ids]
        pairs = paired_counts(greedy_pass, passed)
        recs = [completions[name][t] for t in ids]
        statuses = [executed[name][t]["status"] for t in ids]
        seq_rep = rep(name)
        sp = (speed or {}).get("rows", {}).get(name)
        rows.append({
            "method": name, "policy": None if m["mode"] != "clp" else m["policy"], "threshold": m["threshold"],
            "shipped": m.get("shipped", False), "problems": len(ids), "passed": sum(passed),
            "pass_at_1": sum(passed) / len(ids), "pass_at_1_ci95": list(wilson_interval(sum(passed), len(ids))),
            "greedy_pass_this_fail": pairs["a_only"], "this_pass_greedy_fail": pairs["b_only"],
            "mcnemar_p": mcnemar_exact(pairs["a_only"], pairs["b_only"]),
            "tau": sum(r["new_tokens"] for r in recs) / max(sum(r["row_forwards"] for r in recs), 1),
            "new_tokens": sum(r["new_tokens"] for r in recs),
            "exact_match": sum(r["completion"] == g for r, g in zip(recs, greedy_text)) / len(ids),
            "seq_rep_4": seq_rep, "repetition_ratio": seq_rep / greedy_rep if greedy_rep > 0 else None,
            "sandbox": {s: statuses.count(s) for s in sorted(set(statuses))},
            "speedup_median": sp["speedup_median"] if sp else None,
            "tokens_per_s": sp["tokens_per_s"] if sp else None, "speed_tau": sp["tau"] if sp else None,
        })
    return rows


def choose_threshold(rows: list[dict], n_problems: int, full: bool) -> dict:
    """Apply :data:`RULE` to the clp rows and, for comparison, to the gate rows.

    Returns ``{"rule", "problems", "provisional", "clp": row or None, "gate": row or None}``; a
    policy's entry is None when none of its thresholds keeps the loss at one problem or less.
    Ties in τ go to the higher (safer) threshold. Provisional unless all 164 problems were run.
    """
    out = {"rule": RULE, "problems": n_problems, "provisional": not full}
    for policy in ("clp", "gate", "drafter"):
        ok = [r for r in rows if r["policy"] == policy and r["greedy_pass_this_fail"] <= 1]
        best = max(ok, key=lambda r: (r["tau"], r["threshold"]), default=None)
        out[policy] = None if best is None else {k: best[k] for k in (
            "method", "threshold", "tau", "pass_at_1", "greedy_pass_this_fail", "this_pass_greedy_fail",
            "mcnemar_p", "speedup_median")}
    return out


def _f(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


def format_quality_table(rows: list[dict], choice: dict, executed: dict, speed: dict | None, header: str) -> str:
    lines = [f"### {header}", "",
             "| method | pass@1 [95% CI] | greedy ✓ / this ✗ | this ✓ / greedy ✗ | McNemar p | τ | identical to "
             "greedy | seq-rep-4 | rep. ratio | speedup (median, B=1) | sandbox |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lo, hi = r["pass_at_1_ci95"]
        name = r["method"] + (" (shipped)" if r["shipped"] else "")
        lines.append(f"| {name} | {r['pass_at_1']:.3f} ({r['passed']}/{r['problems']}) [{lo:.3f}, {hi:.3f}] | "
                     f"{r['greedy_pass_this_fail']} | {r['this_pass_greedy_fail']} | {r['mcnemar_p']:.3g} | "
                     f"{r['tau']:.3f} | {100 * r['exact_match']:.0f}% | {r['seq_rep_4']:.4f} | "
                     f"{_f(r['repetition_ratio'], '.2f')} | {_f(r['speedup_median'], '.2f')}× | "
                     + ", ".join(f"{k} {v}" for k, v in r["sandbox"].items()) + " |")
    canon = executed.get("canonical", {})
    lines += ["", f"Harness check: {sum(v['passed'] for v in canon.values())}/{len(canon)} canonical solutions pass "
              "in the sandbox."]
    for policy in ("clp", "gate", "drafter"):
        c = choice.get(policy)
        tag = " (provisional: fewer than 164 problems)" if choice["provisional"] else ""
        ran = any(r["policy"] == policy for r in rows)
        if policy == "drafter" and not ran:
            continue
        lines.append(f"Chosen {policy} threshold{tag}: " + (
            "not run." if not ran else "none keeps the paired loss at <= 1 problem." if c is None else
            f"**{c['threshold']:.4g}** (τ {c['tau']:.3f}, speedup {_f(c['speedup_median'], '.2f')}×, pass@1 "
            f"{c['pass_at_1']:.3f}, loses {c['greedy_pass_this_fail']} / gains {c['this_pass_greedy_fail']} vs "
            "greedy)."))
    lines.append(f"Rule: {choice['rule']}.")
    if speed:
        hf = speed["rows"].get("hf-greedy", {})
        la0, la1 = speed["loadavg_start"], speed["loadavg_end"]
        lines.append(f"Speed: batch 1, {len(speed['problems'])} problems x {speed['max_new_tokens']} tokens, methods "
                     f"interleaved with transformers greedy ({_f(hf.get('tokens_per_s'), '.1f')} tok/s); load avg "
                     f"{la0[0]:.1f} → {la1[0]:.1f}. τ, pass@1 and the paired counts do not depend on load; "
                     "speedups measured beside other jobs do.")
    lines.append("τ: tokens per forward over all completions (each chunk's prefill counts as a forward). "
                 "Identical: completion text equal to greedy's. rep. ratio: seq-rep-4 of the completions "
                 "(re-tokenized) over greedy's.")
    return "\n".join(lines)


def plot_quality(rows: list[dict], choice: dict, path: Path, title: str) -> None:
    """Speed vs pass@1 per threshold (with 95 % intervals), and τ and paired loss against the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5))
    have_speed = all(r["speedup_median"] is not None for r in rows)
    ykey, ylabel = ("speedup_median", "speedup vs transformers greedy (median, B=1)") if have_speed else (
        "tau", "τ (tokens per forward)")
    colors = {None: "black", "clp": "tab:orange", "gate": "tab:red", "drafter": "tab:blue"}
    for r in rows:
        lo, hi = r["pass_at_1_ci95"]
        x, y = r["pass_at_1"], r[ykey]
        ax1.errorbar(x, y, xerr=[[x - lo], [hi - x]], fmt="o", color=colors[r["policy"]], capsize=3, alpha=0.8)
        ax1.annotate(r["method"], (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax1.axhline(1.0, ls="--", color="gray", lw=1)
    ax1.set(xlabel="pass@1 (95% Wilson interval)", ylabel=ylabel, title="speed vs executed pass@1")
    for policy, marker in (("clp", "o-"), ("gate", "s--"), ("drafter", "^-.")):
        pr = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["threshold"])
        if pr:
            ts = [r["threshold"] for r in pr]
            ax2.plot(ts, [r["tau"] for r in pr], marker, color=colors[policy], label=f"{policy}: τ")
            ax2.plot(ts, [1 + r["greedy_pass_this_fail"] / 10 for r in pr], marker, color=colors[policy], alpha=0.4,
                     label=f"{policy}: 1 + loss/10 (problems greedy passes, it fails)")
    ax2.axhline(1.1, ls=":", color="gray", lw=1)
    c = choice.get("clp")
    if c is not None:
        ax2.axvline(c["threshold"], color="tab:green", lw=1, label=f"chosen clp threshold {c['threshold']:.3g}")
    ax2.set(xlabel="threshold", ylabel="τ  /  1 + loss/10", title="τ and paired loss per threshold (loss 1 at 1.1)")
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def card_section(choice: dict, rows: list[dict], header: str, result_name: str) -> str:
    """The training card's markdown section for a quality-chosen threshold."""
    c = choice["clp"]
    verdict = ("No CLP threshold keeps the paired loss at <= 1 problem; the config's threshold is unchanged."
               if c is None else f"Chosen CLP threshold **{c['threshold']:.4g}** (τ {c['tau']:.3f}).")
    if choice["provisional"]:
        verdict += f" Provisional: {choice['problems']} of 164 problems."
    lines = [CARD_SECTION, "", f"{header}. Rule: {choice['rule']}. {verdict} Result file: `{result_name}`.", "",
             "| method | pass@1 | greedy ✓ / this ✗ | this ✓ / greedy ✗ | McNemar p | τ |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['pass_at_1']:.3f} | {r['greedy_pass_this_fail']} | "
                     f"{r['this_pass_greedy_fail']} | {r['mcnemar_p']:.3g} | {r['tau']:.3f} |")
    return "\n".join(lines) + "\n"


def write_threshold(heads_dir: Path, choice: dict, rows: list[dict], header: str, result_name: str) -> None:
    """Record the choice in a heads folder: ``config.json`` thresholds (clp, and gate if chosen), the
    training card's JSON (``quality_threshold``) and markdown (a section, replaced on a re-run).
    Each file is written to a temporary name and renamed."""
    from clp_fast.train.config import atomic_write_text

    cfg_path = heads_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for policy in ("clp", "gate"):
        if choice.get(policy) is not None:
            cfg.setdefault("thresholds", {})[policy] = choice[policy]["threshold"]
    entry = {"rule": choice["rule"], "problems": choice["problems"], "provisional": choice["provisional"],
             "chosen": {p: choice.get(p) for p in ("clp", "gate")}, "header": header, "result": result_name,
             "table": [{k: r[k] for k in ("method", "threshold", "pass_at_1", "greedy_pass_this_fail",
                                          "this_pass_greedy_fail", "mcnemar_p", "tau")} for r in rows]}
    card_json = heads_dir / "training_card.json"
    card = json.loads(card_json.read_text()) if card_json.is_file() else {}
    card["quality_threshold"] = entry
    card_md = heads_dir / "training_card.md"
    md = card_md.read_text() if card_md.is_file() else ""
    if CARD_SECTION in md:  # replace the previous section (up to the next "## " heading)
        head, _, rest = md.partition(CARD_SECTION)
        nxt = rest.find("\n## ")
        md = head.rstrip("\n") + ("\n\n" + rest[nxt + 1:] if nxt >= 0 else "")
    md = md.rstrip("\n") + ("\n\n" if md.strip() else "") + card_section(choice, rows, header, result_name)
    atomic_write_text(card_json, json.dumps(card, indent=1) + "\n")
    atomic_write_text(card_md, md)
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2) + "\n")
