"""Executed task quality: pass@1 intervals, McNemar, stop strings, the threshold rule, and the script end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clp_fast.eval.stats import mcnemar_exact, paired_counts, wilson_interval
from tests.conftest import smollm2_path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import quality  # noqa: E402
import quality_report  # noqa: E402


# ------------------------------------------------------------------------------------------ stats
@pytest.mark.parametrize("passed,n,lo,hi", [
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998), Stat. Med. 17:857, table I, Wilson score method
    (15, 148, 0.0624, 0.1605),  # same table
    (0, 10, 0.0, 0.2775),  # z^2 / (n + z^2) = 3.8415 / 13.8415
    (10, 10, 0.7225, 1.0),
])
def test_wilson_interval_matches_published_values(passed, n, lo, hi):
    got = wilson_interval(passed, n)
    assert got == pytest.approx((lo, hi), abs=6e-5), got


def test_wilson_interval_rejects_bad_counts():
    with pytest.raises(ValueError, match="n=0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="passed=11"):
        wilson_interval(11, 10)


@pytest.mark.parametrize("b,c,p", [
    (0, 0, 1.0),
    (1, 0, 1.0),  # 2 * 1/2
    (6, 0, 2 / 64),  # 2 * (1/2)^6
    (10, 2, 2 * (1 + 12 + 66) / 4096),  # 2 * P(Bin(12, 1/2) <= 2)
    (3, 3, 1.0),  # capped at 1
    (5, 1, 2 * (1 + 6) / 64),
])
def test_mcnemar_exact_by_hand(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)
    assert mcnemar_exact(c, b) == pytest.approx(p, rel=1e-12)  # two-sided: symmetric


def test_paired_counts_and_bad_input():
    greedy = [True, True, False, False, True]
    other = [True, False, True, False, False]
    assert paired_counts(greedy, other) == {"a_only": 2, "b_only": 1, "both": 1, "neither": 1}
    with pytest.raises(ValueError, match="5 vs 4"):
        paired_counts(greedy, other[:4])
    with pytest.raises(ValueError, match="b=-1"):
        mcnemar_exact(-1, 2)


# ------------------------------------------------------------------------------------ text + rule
def test_completion_stops_at_the_end_of_the_function():
    body = "    return a + b\n"
    assert quality.truncate_completion(body + "\n\ndef main():\n    pass\n") == body + "\n"
    assert quality.truncate_completion(body + "\nif __name__ == '__main__':\n    main()") == body
    assert quality.truncate_completion(body + "\nprint(add(1, 2))") == body
    assert quality.truncate_completion(body + "\n# test\nassert add(1, 2) == 3") == body
    assert quality.truncate_completion(body + "\nclass X:\n    pass") == body
    nested = "    def helper(x):\n        return x\n    # inner comment\n    return helper(a)\n"
    assert quality.truncate_completion(nested) == nested  # indented defs and comments belong to the function


def test_check_program_runs_the_tests_on_the_entry_point():
    from clp_fast.eval.sandbox import run_python

    problem = {"prompt": "def inc(x):\n    \"\"\"x + 1\"\"\"\n", "entry_point": "inc",
               "test": "def check(candidate):\n    assert candidate(1) == 2\n"}
    assert run_python(quality.check_program(problem, "    return x + 1\n")).passed
    assert not run_python(quality.check_program(problem, "    return x\n")).passed


def _row(name, policy, t, tau, lost, gained=0, n=40):
    return {"method": name, "policy": policy, "threshold": t, "tau": tau, "pass_at_1": 0.5,
            "greedy_pass_this_fail": lost, "this_pass_greedy_fail": gained,
            "mcnemar_p": mcnemar_exact(lost, gained), "speedup_median": None}


def test_threshold_rule_takes_the_fastest_within_one_problem():
    rows = [_row("greedy", None, None, 1.0, 0), _row("clp@0.96", "clp", 0.96, 1.01, 0),
            _row("clp@0.8", "clp", 0.8, 1.10, 1, 2), _row("clp@0.6", "clp", 0.6, 1.30, 2),
            _row("clp@0.5", "clp", 0.5, 1.50, 9), _row("gate@0.99", "gate", 0.99, 1.0, 0),
            _row("gate@0.5", "gate", 0.5, 1.2, 3)]
    choice = quality_report.choose_threshold(rows, 40, full=False)
    assert choice["clp"]["threshold"] == 0.8 and choice["gate"]["threshold"] == 0.99
    assert choice["provisional"] is True
    assert quality_report.choose_threshold(rows, 164, full=True)["provisional"] is False
    none_ok = [r for r in rows if r["threshold"] in (0.6, 0.5)]
    assert quality_report.choose_threshold(none_ok, 40, full=False)["clp"] is None
    # the lossless control (policy None) is never a candidate, however fast and however small its loss
    control = _row("lossless", None, None, 2.5, 0)
    assert quality_report.choose_threshold(none_ok + [control], 40, full=False)["clp"] is None


def test_table_says_which_policies_were_not_run():
    def full(r):
        return {**r, "pass_at_1_ci95": [0.3, 0.7], "passed": 20, "problems": 40, "shipped": False,
                "exact_match": 1.0, "seq_rep_4": 0.05, "repetition_ratio": 1.0, "sandbox": {"passed": 20}}

    rows = [full(_row("greedy", None, None, 1.0, 0)), full(_row("clp@0.9", "clp", 0.9, 1.1, 3))]
    text = quality_report.format_quality_table(rows, quality_report.choose_threshold(rows, 40, False), {}, None, "t")
    assert "Chosen clp threshold (provisional: fewer than 164 problems): none keeps" in text
    assert "Chosen gate threshold (provisional: fewer than 164 problems): not run." in text
    rows.append(full(_row("gate@0.99", "gate", 0.99, 1.0, 0)))
    text = quality_report.format_quality_table(rows, quality_report.choose_threshold(rows, 40, False), {}, None, "t")
    assert "Chosen gate threshold (provisional: fewer than 164 problems): **0.99**" in text


def test_lossless_control_is_listed_last_and_only_when_asked():
    class Heads:
        thresholds, gate = {"clp": 0.96, "gate": 0.99}, object()

    names = [m["name"] for m in quality.quality_methods(Heads, ["shipped", "0.8"], ["shipped"])]
    assert names == ["greedy", "clp@0.96", "clp@0.8", "gate@0.99"]
    with_control = quality.quality_methods(Heads, ["shipped"], [], lossless=True)
    assert [m["name"] for m in with_control] == ["greedy", "clp@0.96", "lossless"]
    assert with_control[-1]["mode"] == "lossless" and with_control[-1]["policy"] is None


def test_drafter_rows_are_their_own_policy_keyed_by_the_drafters_weights():
    """``--drafter``: clp-mode rows of the drafter's CLP at each threshold ("shipped" = the one training saved),
    cached under its weights' digest, and a threshold chosen among them alone."""
    class Heads:
        thresholds, gate = {"clp": 0.96}, None

    class Drafter:
        clp_threshold = 0.93

    methods = quality.quality_methods(Heads, ["shipped"], [], drafter=Drafter, drafter_thresholds=["shipped", "0.5"])
    assert [m["name"] for m in methods] == ["greedy", "clp@0.96", "drafter@0.93", "drafter@0.5"]
    d = methods[2]
    assert d["policy"] == "drafter" and d["mode"] == "clp" and d["shipped"] and not methods[3]["shipped"]
    assert quality.method_key(d, "run", "abc") == "run/drafter@0.93/abc"
    assert quality.method_key(methods[1], "run", "abc") == "run/clp@0.96"  # the heads' rows do not depend on it
    rows = [{"method": m["name"], "policy": m["policy"] if m["mode"] == "clp" else None, "threshold": m["threshold"],
             "tau": tau, "greedy_pass_this_fail": lost, "pass_at_1": 0.5, "this_pass_greedy_fail": 0,
             "mcnemar_p": 1.0, "speedup_median": None}
            for m, tau, lost in zip(methods, [1.0, 1.5, 1.4, 1.9], [0, 0, 1, 3])]
    choice = quality_report.choose_threshold(rows, 40, full=False)
    assert choice["drafter"]["method"] == "drafter@0.93" and choice["clp"]["method"] == "clp@0.96"


def test_plot_draws_every_policy(tmp_path):
    """The figure of a sweep with greedy, the heads' CLP, the gate, the drafter's CLP and the lossless control
    (the drafter's rows once raised KeyError after the tables were written)."""
    pytest.importorskip("matplotlib")
    rows = [{**_row(name, policy, t, tau, lost), "pass_at_1_ci95": [0.4, 0.6]}
            for name, policy, t, tau, lost in [("greedy", None, None, 1.0, 0), ("clp@0.9", "clp", 0.9, 1.1, 2),
                                               ("gate@0.99", "gate", 0.99, 1.0, 0), ("drafter@0.97", "drafter", 0.97,
                                                                                      1.02, 9),
                                               ("lossless", None, None, 2.0, 0)]]
    path = tmp_path / "q.png"
    quality_report.plot_quality(rows, quality_report.choose_threshold(rows, 164, full=True), path, "t")
    assert path.stat().st_size > 1000


def test_write_threshold_updates_config_and_card(tmp_path):
    from clp_fast.heads import MTPHeads
    from tests.conftest import tiny_model

    heads_dir = MTPHeads.for_model(tiny_model("qwen2"), 2).save_pretrained(tmp_path / "heads")
    (heads_dir / "training_card.md").write_text("# card\n\n## CLP\n\nold text\n")
    (heads_dir / "training_card.json").write_text(json.dumps({"backbone": "tiny"}))
    rows = [_row("greedy", None, None, 1.0, 0), _row("clp@0.7", "clp", 0.7, 1.2, 1)]
    for _ in range(2):  # a re-run replaces the section, never duplicates it
        choice = quality_report.choose_threshold(rows, 164, full=True)
        quality_report.write_threshold(heads_dir, choice, rows, "test run", "x-quality.json")
    md = (heads_dir / "training_card.md").read_text()
    assert md.count(quality_report.CARD_SECTION) == 1 and "old text" in md and "**0.7**" in md
    card = json.loads((heads_dir / "training_card.json").read_text())
    assert card["backbone"] == "tiny" and card["quality_threshold"]["chosen"]["clp"]["threshold"] == 0.7
    assert MTPHeads.from_pretrained(heads_dir).thresholds["clp"] == 0.7


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_quality_script_smoke_on_smollm2(smollm2, tmp_path):
    """2 problems x 16 tokens on the real SmolLM2 with its shipped heads: every method, executed, paired."""
    import torch
    from transformers import GenerationConfig

    model, tok = smollm2
    out_dir = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "bench" / "quality.py"), "--model", str(smollm2_path()), "--n", "2",
           "--max-new-tokens", "16", "--chunk-tokens", "8", "--batch-size", "2", "--thresholds", "shipped,0.5",
           "--speed-problems", "1", "--speed-tokens", "8", "--dtype", "fp32", "--threads", "1",
           "--lossless", "--cache", str(tmp_path / "cache.jsonl")]
    proc = subprocess.run(cmd + ["--quiet", "--out-dir", str(out_dir)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = out_dir.glob("*-quality.json")
    res = json.loads(json_path.read_text())
    names = [m["name"] for m in res["methods"]]
    assert names[0] == "greedy" and "clp@0.5" in names and "clp@0.96" in names and names[-2].startswith("gate@")
    assert names[-1] == "lossless"
    problems = res["settings"]["problems"]
    assert len(problems) == 2

    # greedy completions are transformers' greedy, token for token (fp32), stopped at 16 tokens or EOS
    from clp_fast.eval.data import humaneval_problems

    eos = res["settings"]["eos_token_ids"]
    by_id = {p["task_id"]: p for p in humaneval_problems(2, 0)}
    for tid in problems:
        ids = tok(by_id[tid]["prompt"], return_tensors="pt").input_ids
        cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=16, eos_token_id=eos,
                               pad_token_id=res["settings"]["pad_token_id"])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)[0, ids.shape[1]:]
        ref = ref.tolist()
        ref = ref[: next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))]
        got = res["completions"]["greedy"][tid]
        assert got["ids"] == ref[: len(got["ids"])], tid
        text = tok.decode(got["ids"], skip_special_tokens=True)
        assert got["completion"] == quality.truncate_completion(text)
        # it stopped early only because the function had ended (a stop string), checked per 8-token chunk
        assert len(got["ids"]) == len(ref) or (got["completion"] != text and len(got["ids"]) % 8 == 0), tid

    # every completion was executed; the canonical solutions pass in the sandbox (the harness works)
    assert all(res["executed"]["canonical"][t]["passed"] for t in problems)
    rows = {r["method"]: r for r in res["rows"]}
    for name in names:
        r = rows[name]
        statuses = [res["executed"][name][t]["status"] for t in problems]
        assert r["passed"] == statuses.count("passed") and r["problems"] == 2
        lo, hi = r["pass_at_1_ci95"]
        assert lo <= r["pass_at_1"] <= hi
        assert r["greedy_pass_this_fail"] + r["this_pass_greedy_fail"] <= 2
        assert r["tau"] >= 1.0 and r["speedup_median"] > 0
    assert rows["greedy"]["exact_match"] == 1.0 and rows["greedy"]["tau"] == 1.0
    assert rows["greedy"]["greedy_pass_this_fail"] == rows["greedy"]["this_pass_greedy_fail"] == 0
    assert rows["clp@0.5"]["tau"] > 1.0  # a low threshold takes guesses: clp mode really ran
    # the lossless control: in fp32 it says what greedy says, token for token, and is
    # never a threshold candidate
    for tid in problems:
        assert res["completions"]["lossless"][tid]["ids"] == res["completions"]["greedy"][tid]["ids"], tid
    assert rows["lossless"]["exact_match"] == 1.0 and rows["lossless"]["policy"] is None
    assert rows["lossless"]["greedy_pass_this_fail"] == rows["lossless"]["this_pass_greedy_fail"] == 0
    assert res["choice"]["provisional"] is True
    assert json_path.with_suffix(".png").stat().st_size > 10_000
    assert "| greedy |" in proc.stdout and "pass@1" in proc.stdout


@pytest.mark.slow
def test_generation_resumes_from_the_completion_cache(smollm2, tmp_path, monkeypatch):
    """A killed run loses nothing it wrote: cached completions are reused, a torn last line is skipped."""
    import argparse

    model, tok = smollm2
    from clp_fast.eval.data import humaneval_problems

    problems = humaneval_problems(3, 1)
    for p in problems:
        p["ids"] = tok(p["prompt"])["input_ids"]
    args = argparse.Namespace(chunk_tokens=4, max_new_tokens=8, batch_size=2)
    methods = [{"name": "greedy", "mode": "greedy", "policy": "clp", "threshold": None}]
    path = tmp_path / "cache.jsonl"
    eos = [tok.eos_token_id]
    first = quality.generate_all(model, tok, None, methods, problems[:2], args, eos, eos[0],
                                 quality.CompletionCache(path), "run", lambda msg: None)
    assert len(path.read_text().splitlines()) == 2
    with open(path, "a") as f:
        f.write('{"key": "run/greedy", "task_id": "HumanEval/0", "ids": [1, 2')  # killed mid-write

    calls = []
    real = quality.clp_fast.generate
    monkeypatch.setattr(quality.clp_fast, "generate", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    again = quality.generate_all(model, tok, None, methods, problems, args, eos, eos[0],
                                 quality.CompletionCache(path), "run", lambda msg: None)
    assert all(again["greedy"][p["task_id"]] == first["greedy"][p["task_id"]] for p in problems[:2])
    assert calls and all(shape[0] == 1 for shape in calls)  # only the third problem was generated
    assert len(again["greedy"][problems[2]["task_id"]]["ids"]) > 0
