"""bench/gpu_check.sh, the script a lent GPU runs, must itself work: run its tiny variant on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_runs_and_reports(tmp_path):
    env = dict(os.environ, GPU_CHECK_TINY="1", TRITON_INTERPRET="1", OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    fused = [ln for ln in lines if ln.startswith("CORRECT fused_heads")]
    assert fused and all(": PASS" in ln for ln in fused), "\n".join(fused)
    assert any(ln.startswith("CORRECT commit_kv_span_") and ln.endswith("PASS") for ln in lines)
    assert any(ln.startswith("CORRECTNESS PASS") for ln in lines)
    assert any(ln.startswith("COPY device-to-device") for ln in lines)
    roof = [ln for ln in lines if ln.startswith("ROOF _")]
    assert {ln.split()[1] for ln in roof} == {"_head_hidden_kernel", "_fused_heads_kernel", "_merge_clp_kernel",
                                              "_kv_commit_kernel"}, "\n".join(roof)
    assert any(ln.startswith("E2E") and "lossless == greedy: True" in ln for ln in lines), "\n".join(lines[-6:])
    (result,) = tmp_path.glob("gpu_check-*.json")
    rows = json.loads(result.read_text())
    assert {r.get("bench") for r in rows} >= {"copy", "fused_heads", "commit_kv_span_", "e2e", "e2e-match", "batched",
                                              "batched-match", "roofline"}
    batched = [ln for ln in lines if ln.startswith("BATCHED")]
    assert any("lossless == greedy: True" in ln for ln in batched), "\n".join(batched)
    assert {r["B"] for r in rows if r.get("bench") == "batched"} == {1, 2}
