"""`bench/run_bench.py` end to end on the real SmolLM2-135M: 2 prompts x 8 tokens, every method, every output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clp_fast.decode import LOOKUP_WIDTH
from tests.conftest import smollm2_path, tiny_model

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"method", "k", "label", "prompts", "new_tokens", "time_s", "tokens_per_s", "speedup_median",
            "speedup_total", "vs_prompt_lookup_median", "tau", "accept_hist", "exact_match", "diverged",
            "mean_first_divergence", "seq_rep_4", "seq_rep_4_delta", "peak_rss_mib", "peak_rss_delta_mib"}


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "run_bench.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _shipped_heads_config() -> dict:
    """The shipped SmolLM2 heads' config.json; fails loudly if they are not shipped (no silent random fallback)."""
    from clp_fast.assets import shipped_heads

    folder = shipped_heads().get("smollm2-135m-instruct")
    if folder is None:
        pytest.fail("the shipped SmolLM2 heads (clp_fast/assets/heads/smollm2-135m-instruct) are missing")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["k"] >= 2 and cfg["with_gate"], f"the shipped SmolLM2 heads need k >= 2 and a gate: {cfg}"
    return cfg


@pytest.mark.slow
def test_bench_end_to_end(smollm2, tmp_path):
    shipped = _shipped_heads_config()
    out_dir = tmp_path / "results"
    # No --heads: the bench must find the shipped heads by the backbone's LM-head fingerprint. CLP threshold 0.5,
    # not the shipped 0.96: in 2 x 8 tokens the shipped threshold may take no guess, and clp rows claim some.
    # fixed speculation: the acceptance asserted below must not depend on this machine's cost model
    proc = _run(["--model", str(smollm2_path()), "--clp-threshold", "0.5", "--n-humaneval", "1", "--n-prose", "1",
                 "--speculation", "fixed",
                 "--max-new-tokens", "8", "--dtype", "fp32", "--threads", "1", "--batch-sizes", "1,2",
                 "--batch-new-tokens", "4", "--warmup-tokens", "2", "--profile", "--quiet", "--out-dir", str(out_dir)],
                timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    (json_path,) = out_dir.glob("*.json")
    res = json.loads(json_path.read_text())
    assert res["schema"] == "clp_fast.bench/1"
    for key in ("cpu", "torch_threads", "torch", "transformers", "triton", "commit", "host"):
        assert key in res["machine"], key
    assert res["machine"]["torch_threads"] == 1
    assert res["settings"]["max_new_tokens"] == 8 and res["settings"]["dtype"] == "fp32"

    # the shipped heads were used, not a stand-in built for the model (whose fingerprint would match too)
    used = res["settings"]["heads_config"]
    for key in ("backbone", "lm_head_fingerprint", "k", "draft_vocab", "thresholds", "extra"):
        assert used.get(key) == shipped[key], (key, used.get(key), shipped[key])
    k = res["settings"]["heads_config"]["k"]
    ks = [j for j in (2, 3, 4) if j <= k]
    want = (["hf-greedy", "hf-prompt-lookup", "clp_fast greedy"] + [f"clp_fast lossless k={j}" for j in ks]
            + [f"clp_fast clp k={j}" for j in ks] + [f"gate k={k}"])
    assert res["methods"] == want
    assert [r["label"] for r in res["rows"]] == want
    for row in res["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["prompts"] == 2 and row["tokens_per_s"] > 0 and row["new_tokens"] > 0
        assert 0.0 <= row["exact_match"] <= 1.0 and 0.0 <= row["seq_rep_4"] <= 1.0
        assert row["peak_rss_mib"] > 0
    base = res["rows"][0]
    assert base["exact_match"] == 1.0 and base["speedup_median"] == pytest.approx(1.0)
    # fp32: our greedy and lossless (every k) must be token-identical to transformers' greedy, not merely a rate
    by_label = {r["label"]: r for r in res["rows"]}
    for label in ["clp_fast greedy"] + [f"clp_fast lossless k={j}" for j in ks]:
        assert by_label[label]["exact_match"] == 1.0 and by_label[label]["diverged"] == 0, label
    # every method ran on every prompt and produced tokens; the saved ids are what the metrics used
    assert len(res["per_prompt"]) == 2
    for rec in res["per_prompt"]:
        assert sorted(rec["results"]) == sorted(want)
        for label, r in rec["results"].items():
            assert 0 < r["n_new"] == len(r["ids"]) <= 8, label
            assert r["time_s"] > 0
    for row in res["rows"]:
        if row["method"].startswith(("clp_fast", "gate")):
            # lossless rows also count prompt-lookup guesses: up to max(k, LOOKUP_WIDTH) per step
            width = max(row["k"], LOOKUP_WIDTH) if "lossless" in row["label"] else (row["k"] or 0)
            assert len(row["accept_hist"]) == width + 1 and sum(row["accept_hist"]) > 0
            if row["method"] in ("clp_fast lossless", "clp_fast clp"):
                # speculation claimed: some step took a guess (bucket 0 counts steps that took none) and
                # tau shows it; the gate row runs at its shipped 0.99-precision threshold and may take none
                assert sum(row["accept_hist"][1:]) > 0, (row["label"], row["accept_hist"])
                assert row["tau"] > 1.0, (row["label"], row["tau"])
    assert [r["B"] for r in res["batched"]["rows"]] == [1, 2]
    assert all(r["ratio"] > 0 for r in res["batched"]["rows"])
    assert {t["target"] for t in res["targets"]} >= {"lossless >= 2.0x hf-greedy"}
    assert "backbone forward" in res["profile"]["methods"]["clp_fast greedy"]["ms_per_step"]

    stem = json_path.with_suffix("")
    assert stem.with_suffix(".png").stat().st_size > 10_000
    md = stem.with_suffix(".md").read_text()
    assert (out_dir / "latest.md").read_text() == md
    for label in want:
        assert f"| {label} |" in md
    assert "| hf-greedy |" in proc.stdout  # the table is printed too


def test_bench_without_heads_says_how_to_get_them(tmp_path):
    """No shipped heads fit the backbone and no --heads: a message naming the way out, no traceback."""
    model_dir = tmp_path / "tiny"
    tiny_model("qwen2").save_pretrained(model_dir)
    proc = _run(["--model", str(model_dir), "--quiet", "--out-dir", str(tmp_path)], timeout=120)
    assert proc.returncode != 0
    assert "no MTP heads" in proc.stderr and "--heads DIR" in proc.stderr
    assert "Traceback" not in proc.stderr

    missing = tmp_path / "no-heads-here"
    proc = _run(["--model", str(model_dir), "--heads", str(missing), "--quiet", "--out-dir", str(tmp_path)],
                timeout=120)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "config.json is missing" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.json"))
