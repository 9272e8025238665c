"""Every Triton kernel compiles for real GPUs at the configs its launcher picks, checked without a GPU.

``bench/gpu_compile.py`` plans each launch of ``fused_heads`` and ``commit_kv_span_`` on meta tensors of the
Qwen2.5 0.5B / 1.5B / 7B shapes with an A100's and an H100's properties (decode rows 1, 8, 64 and the 512-row
calibration chunk; k 0, 1, 2, 4; bf16 / fp16 / fp32; top-m 1 and 4; CLP on and off; the KV commit at each model's
layers, KV heads and head dim), specializes the arguments with Triton's own binder as its JIT would, and compiles
every distinct unit to an sm_80 / sm_90 cubin (356 units from 4,734 launches; ~50 s on 2 cores, in a fresh cache).
It runs in a subprocess: other test files set ``TRITON_INTERPRET=1`` before importing Triton, and under it
``triton.jit`` builds interpreter functions that do not compile.

A unit fails on a compile error, on any spill (cuobjdump's stack or local bytes), on shared memory above the
GPU's per-block limit, and, for the LM-head pass and the heads' projection in 16-bit, on missing tensor-core MMA,
missing vectorized or async loads, or any scalar 16-bit global load (what the same source compiles to when the
JIT's 16-divisibility hints are lost: 80 ``ld.global.b16`` per tile and ~1 KB of spills).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# As in the other kernel tests, so that whichever test file imports Triton first, the suite's kernels are the
# interpreter's (the compiles below run in a subprocess without this variable).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from gpu_compile import GPUS  # noqa: E402

from clp_fast.kernels import fused_heads as fh  # noqa: E402
from clp_fast.kernels.device import INTERPRETER, props_of  # noqa: E402

CHECKED = ("A100", "H100")  # sm_80, sm_90; H200 compiles the same units as H100 (same SM count and limits)
KERNELS = ("_fused_heads_kernel", "_head_hidden_kernel", "_merge_clp_kernel", "_kv_commit_kernel")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "units.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_compile.py"), "--gpus", ",".join(CHECKED),
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout.strip())
    return json.loads(out.read_text())


def describe(u: dict) -> str:
    """One line per unit: arch, meta-parameters, warps/stages and a launch that uses it."""
    return (f"sm_{u['arch']} {u['kernel']} {u['constexprs']} {u['options']} dtypes={sorted(set(u['dtypes'].values()))} "
            f"(e.g. {u['example']}; {u['n_launches']} launches)")  # fmt: skip


def units_of(compiled, kernel, gpu):
    units = [u for u in compiled["units"] if u["kernel"] == kernel and gpu in u["gpus"]]
    assert units, f"no {kernel} launches planned for {gpu}"
    return units


@pytest.mark.parametrize("gpu", CHECKED)
@pytest.mark.parametrize("kernel", KERNELS)
def test_compiles_without_spills_within_shared_memory(compiled, kernel, gpu):
    units = units_of(compiled, kernel, gpu)
    errors = [f"{describe(u)}\n    {u['error']}" for u in units if "error" in u]
    assert not errors, f"{len(errors)} of {len(units)} units fail to compile:\n" + "\n".join(errors)
    spills = [f"{describe(u)}: {u['regs']} registers, stack {u['stack']} B, local {u['local']} B, "
              f"ptxas spill stores {u['spill_stores']} B" for u in units if u["stack"] or u["local"]]  # fmt: skip
    assert not spills, f"{len(spills)} of {len(units)} units spill:\n" + "\n".join(spills)
    limit = GPUS[gpu].props.smem_per_block
    smem = lambda u: u["shared"] + u["static_smem"]  # noqa: E731
    over = [f"{describe(u)}: {smem(u)} B" for u in units if smem(u) > limit]
    assert not over, f"shared memory above {gpu}'s {limit} B per block:\n" + "\n".join(over)


@pytest.mark.parametrize("gpu", CHECKED)
def test_16_bit_dots_use_tensor_cores_and_wide_loads(compiled, gpu):
    """The LM-head pass and the heads' projection: MMA, vector or async loads, no scalar 16-bit global load."""
    bad = []
    for kernel in ("_fused_heads_kernel", "_head_hidden_kernel"):
        for u in units_of(compiled, kernel, gpu):
            if "error" in u or u["constexprs"]["FP32_DOT"]:
                continue  # a compile error fails the test above; FP32_DOT (fp32, or fp32 heads) is an FMA dot
            if not u["mma"] or not (u["cp_async"] or u["ld_vector"]) or u["ld_scalar16"]:
                bad.append(f"{describe(u)}: mma {u['mma']}, cp.async {u['cp_async']}, vector loads {u['ld_vector']},"
                           f" scalar 16-bit loads {u['ld_scalar16']}")  # fmt: skip
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("gpu", CHECKED)
def test_specialization_is_the_jits(compiled, gpu):
    """The units carry the JIT's hints for real arguments: unit strides as constants, 16-divisible pointers and
    sizes. Without them the same source is another program (scalar loads, spills), so this guards the check."""
    u = next(u for u in units_of(compiled, "_fused_heads_kernel", gpu) if u["dtypes"]["w_ptr"] == "*bf16")
    assert {"stride_zh", "stride_wh"} <= set(u["unit_strides"]), u["unit_strides"]
    assert {"z_ptr", "w_ptr", "V", "H", "stride_wv"} <= set(u["div16"]), u["div16"]
    lead = [u for u in units_of(compiled, "_fused_heads_kernel", gpu) if u["example"]["k"] == 0]
    assert lead and all(u["constexprs"].get("K1") == 1 for u in lead), "k = 0 must specialize K1 = 1 as the JIT does"


def test_gpu_configs_are_computed_from_plain_properties():
    """Both launchers plan from a DeviceProps; a CPU device reads as the interpreter, as before."""
    assert props_of(torch.device("cpu")) == INTERPRETER
    args = (24, 151_936, 896, torch.bfloat16)
    assert fh._config(torch.device("cpu"), *args) == fh._config(INTERPRETER, *args)
    a100, h100 = fh._config(GPUS["A100"].props, *args), fh._config(GPUS["H100"].props, *args)
    assert (a100["BLOCK_M"], a100["n_splits"], h100["n_splits"]) == (32, 216, 264), (a100, h100)
