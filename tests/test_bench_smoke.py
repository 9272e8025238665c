"""`bench/run_bench.py` end to end on the real SmolLM2-135M: 2 prompts x 8 tokens, every method, every output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clp_fast.decode import LOOKUP_WIDTH
from tests.conftest import smollm2_path, tiny_model

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"method", "k", "label", "prompts", "new_tokens", "time_s", "tokens_per_s", "speedup_median",
            "speedup_total", "vs_prompt_lookup_median", "tau", "accept_hist", "exact_match", "diverged",
            "mean_first_divergence", "seq_rep_4", "seq_rep_4_delta", "peak_rss_mib", "peak_rss_delta_mib"}


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "run_bench.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _heads_dir(model, tmp_path: Path) -> Path:
    """The shipped SmolLM2 heads if they are there, else random ones (k=4, with gate) saved to tmp."""
    from clp_fast.assets import shipped_heads
    from clp_fast.heads import MTPHeads

    shipped = shipped_heads().get("smollm2-135m-instruct")
    if shipped is not None:
        try:
            heads = MTPHeads.from_pretrained(shipped, model=model)
            if heads.k >= 2 and heads.gate is not None:
                return shipped
        except ValueError:
            pass
    heads = MTPHeads.for_model(model, 4, with_gate=True)
    with torch.no_grad():  # non-zero heads, and a CLP / gate that accept guesses, so every path runs
        heads.weight.normal_(std=0.05)
        heads.clp.linear.bias.fill_(3.0)
        heads.gate.net[2].bias.fill_(3.0)
    return heads.save_pretrained(tmp_path / "heads")


@pytest.mark.slow
def test_bench_end_to_end(smollm2, tmp_path):
    model, _ = smollm2
    heads_dir = _heads_dir(model, tmp_path)
    out_dir = tmp_path / "results"
    proc = _run(["--model", str(smollm2_path()), "--heads", str(heads_dir), "--n-humaneval", "1", "--n-prose", "1",
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
