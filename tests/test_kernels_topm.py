"""Top-m candidates per head row (``top_m > 1``): the Triton kernel against ``clp_fast.reference``.

The rule: logit descending, lowest index first among equal logits (``torch.argmax``'s rule for the first).
As in ``test_kernels.py`` the kernels run under Triton's interpreter on a CPU-only machine.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from conftest import first_mismatch  # noqa: E402
from test_kernels import CONF_TOL, DTYPES, assert_conf_close, make_inputs, ref_logits  # noqa: E402

from clp_fast import reference  # noqa: E402
from clp_fast.kernels import fused_heads as fh_mod  # noqa: E402


def sorted_rule(logits: torch.Tensor, m: int) -> torch.Tensor:
    """The rule spelled out the slow way: a stable descending sort of the whole row."""
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :m]


def assert_top_ids_near(args, top_ids, ref_top, draft_vocab=None):
    """Kernel and reference lists may differ only where two logits are within rounding of each other (the
    kernel sums H products in another order): then the logits they point at must agree within tol."""
    if torch.equal(top_ids, ref_top):
        return
    logits = ref_logits(*args[:4], draft_vocab)[:, 1:]  # head rows [R, k, V]
    a, b = logits.gather(-1, top_ids), logits.gather(-1, ref_top)
    eps = torch.finfo(args[0].dtype).eps
    tol = 4 * eps * logits.abs().amax(-1, keepdim=True).clamp(min=1.0)
    assert bool(((a - b).abs() <= tol).all()), first_mismatch(top_ids, ref_top)
    assert int((top_ids != ref_top).sum()) <= max(2, 0.05 * top_ids.numel()), first_mismatch(top_ids, ref_top)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R,H,V,k,m,Vd", [(3, 96, 1003, 3, 4, None), (5, 64, 1000, 2, 8, 300),
                                          (1, 64, 1000, 1, 2, None), (4, 80, 777, 4, 3, 129),
                                          (2, 64, 1000, 0, 3, None)])
def test_top_m_random_matches_reference(R, H, V, k, m, Vd, dtype):
    args, _ = make_inputs(R, H, V, k, dtype)
    ids, conf, accept, top_ids, top_p = fh_mod.fused_heads(*args, draft_vocab=Vd, top_m=m)
    r_ids, r_conf, r_accept, r_top, r_p = reference.fused_heads(*args, draft_vocab=Vd, top_m=m)
    assert top_ids.shape == top_p.shape == (R, k, m) and top_ids.dtype == torch.int64
    # the reference is the rule: a full stable sort of the rounded logits, softmax over the draft vocabulary
    logits = ref_logits(*args[:4], Vd)[:, 1:]
    assert torch.equal(r_top, sorted_rule(logits, m)), first_mismatch(r_top, sorted_rule(logits, m))
    assert_conf_close(r_p, torch.softmax(logits, -1).gather(-1, r_top), dtype)
    if k:
        assert torch.equal(r_top[..., 0], r_ids[:, 1:])  # the first candidate is the head's argmax
        assert bool((r_top < (Vd or V)).all())
    # the kernel against the reference; ids/conf/accept as with top_m = 1
    assert_top_ids_near(args, top_ids, r_top, Vd)
    assert_conf_close(top_p, r_p, dtype)
    base = fh_mod.fused_heads(*args, draft_vocab=Vd)
    assert torch.equal(ids, base[0]) and torch.equal(accept, base[2])
    assert_conf_close(conf, base[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_top_m_planted_ties_within_a_split_and_across_splits(dtype):
    """Each row's winner gets two bit-identical twins: one in the same vocabulary tile and one in another
    split. All three tie for first: the list must start with the three indices in increasing order."""
    R, H, V, k, m = 4, 64, 1000, 2, 5
    args, targets = make_inputs(R, H, V, k, dtype, plant=True)
    cfg = fh_mod._config(args[0].device, R * (k + 1), V, H, dtype)
    split_len = cfg["tiles_per_split"] * cfg["BLOCK_V"]
    assert cfg["n_splits"] >= 2, cfg
    W = args[3]
    taken = set(targets.tolist())
    expected = []
    for r in range(R):
        t = int(targets[r])
        near = next(v for v in (t - 1, t + 1, t - 2, t + 2) if 0 <= v < V and v not in taken
                    and v // cfg["BLOCK_V"] == t // cfg["BLOCK_V"])
        far = next(v for v in range((t + split_len) % V, V) if v not in taken and v // split_len != t // split_len)
        taken |= {near, far}
        W[near] = W[far] = W[t]
        expected.append(sorted([t, near, far]))
    ids, conf, accept, top_ids, top_p = fh_mod.fused_heads(*args, top_m=m)
    r_top, r_p = reference.fused_heads(*args, top_m=m)[3:]
    want = torch.tensor(expected, device=r_top.device)[:, None, :].expand(R, k, 3)
    assert torch.equal(r_top[..., :3], want), "planting failed"
    assert torch.equal(top_ids[..., :3], r_top[..., :3]), first_mismatch(top_ids[..., :3], r_top[..., :3])
    assert_top_ids_near(args, top_ids, r_top)
    assert_conf_close(top_p, r_p, dtype)
    # three equal maxima share the mass equally
    atol, rtol = CONF_TOL[dtype]
    assert torch.allclose(top_p[..., 0], top_p[..., 2], atol=atol, rtol=rtol)


def test_top_m_one_is_todays_output_and_eight_is_allowed():
    args, _ = make_inputs(3, 64, 1000, 3, torch.float32)
    one = fh_mod.fused_heads(*args, top_m=1)
    assert len(one) == 3
    for x, y in zip(one, fh_mod.fused_heads(*args)):
        assert torch.equal(x, y)
    eight = fh_mod.fused_heads(*args, top_m=8)
    assert eight[3].shape == (3, 3, 8)
    assert_top_ids_near(args, eight[3], reference.fused_heads(*args, top_m=8)[3])
    assert bool((eight[4][..., :-1] >= eight[4][..., 1:]).all())  # probabilities in decreasing order


@pytest.mark.parametrize("fn", [reference.fused_heads, fh_mod.fused_heads], ids=["reference", "kernel"])
@pytest.mark.parametrize("bad,vd", [(0, None), (9, None), (2.0, None), (True, None), (5, 4)])
def test_bad_top_m_refused(fn, bad, vd):
    args, _ = make_inputs(2, 64, 1000, 2, torch.float32)
    with pytest.raises(ValueError, match=f"top_m={bad!r}"):
        fn(*args, draft_vocab=vd, top_m=bad)


def test_top_m_real_shape_qwen05b():
    """Qwen2.5-0.5B LM head (V 151,936, H 896) with the shipped 32,768-token draft vocabulary, R 2, k 4, m 4,
    bf16: the planted winners lead every list, the rest follows the reference."""
    args, targets = make_inputs(2, 896, 151_936, 4, torch.bfloat16, plant=True, plant_below=32_768)
    top_ids, top_p = fh_mod.fused_heads(*args, draft_vocab=32_768, top_m=4)[3:]
    r_top, r_p = reference.fused_heads(*args, draft_vocab=32_768, top_m=4)[3:]
    assert torch.equal(r_top[..., 0].cpu(), targets[:, None].expand(2, 4))
    assert_top_ids_near(args, top_ids, r_top, 32_768)
    assert_conf_close(top_p, r_p, torch.bfloat16)
