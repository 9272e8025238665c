"""The GPU launch plan of ``fused_heads`` (tiles, 2 splits per SM, chunked merges) against the reference.

Elsewhere the kernels run with the interpreter's own plan (a few big tiles, <= 8 splits), so the plan a GPU run
uses, computed from an H100's properties (``clp_fast.kernels.device.DeviceProps``), would never run before a GPU is
lent.
Here it runs under the interpreter on CPU: 157 vocabulary splits, so the merge walks three 64-split chunks and,
with top-m 4, three 256-candidate chunks, with each row's winner tied bit for bit across two of them.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from conftest import first_mismatch  # noqa: E402
from test_kernels import plant_winners  # noqa: E402
from test_kernels_topm import assert_top_ids_near  # noqa: E402

from clp_fast import reference  # noqa: E402
from clp_fast.kernels import fused_heads as fh  # noqa: E402
from clp_fast.kernels.device import DeviceProps  # noqa: E402

H100 = DeviceProps(sm_count=132, smem_per_block=232_448, capability=(9, 0), name="H100 (planned on CPU)")
# Confidences: the same fp32 math in another summation order; bf16 logits are rounded alike in both.
CONF_TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-3, 2e-2)}


def run_plan(args, Vd, top_m, props=H100):
    done, launches = fh._launches(*args, 0.5, Vd, top_m, props, interpret=True)
    for kernel, grid, a, meta in launches:
        kernel[grid](*a, **meta)
    return done


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("top_m", [1, 4])
def test_gpu_plan_matches_reference_with_ties_across_merge_chunks(dtype, top_m):
    R, H, V, Vd, k = 3, 64, 20_000, 12_000, 2
    cfg = fh._config(H100, R * (k + 1), V, H, dtype)
    span = cfg["tiles_per_split"] * cfg["BLOCK_V"]  # vocabulary per split
    assert cfg["n_splits"] > 128 and cfg["n_splits"] * top_m > (256 if top_m > 1 else 0), cfg
    hidden = torch.randn(R, H)
    W = torch.randn(V, H) / H**0.5
    # Zero heads: every head row's z is the hidden row itself, so one planted winner wins all k + 1 rows.
    hw, hb = torch.zeros(k, H, H), torch.zeros(k, H)
    cw, cb = torch.randn(k, H + k) / H**0.5, torch.randn(k)
    low = [5 * span + 7 + r for r in range(R)]  # split 5: the merge's first chunk (splits 0-63)
    high = [80 * span + 3 + r for r in range(R)]  # split 80: its second chunk, still below Vd
    # One-hot winners (exact in any summation order, issue 21) and their bit-identical twins.
    plant_winners(hidden, W, torch.tensor(low))
    W[torch.tensor(high)] = W[torch.tensor(low)]
    args = tuple(t.to(dtype) for t in (hidden, hw, hb, W)) + (cw, cb)
    got = run_plan(args, Vd, top_m)
    want = reference.fused_heads(*args, draft_vocab=Vd, top_m=top_m)
    expected = torch.tensor(low)[:, None].expand(R, k + 1)
    assert torch.equal(want[0], expected), "planting failed"
    assert torch.equal(got[0], want[0]), first_mismatch(got[0], want[0])
    atol, rtol = CONF_TOL[dtype]
    assert torch.allclose(got[1], want[1], atol=atol, rtol=rtol), (got[1] - want[1]).abs().max()
    assert torch.equal(got[2], want[2])
    if top_m > 1:
        assert torch.equal(got[3][..., :2], torch.tensor([[[p, q]] * k for p, q in zip(low, high)]))
        assert_top_ids_near(args, got[3], want[3], Vd)  # random logits below the twins may near-tie
        assert torch.allclose(got[4], want[4], atol=atol, rtol=rtol)
