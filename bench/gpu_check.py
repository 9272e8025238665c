"""One prepared check for a lent GPU (H200; torch 2.11, triton 3.6): correctness, then speed, in ~5 minutes.

1. Device-to-device copy bandwidth (the roof every memory-bound kernel here is measured against).
2. Correctness vs ``clp_fast.reference`` on the GPU at Qwen2.5 0.5B/1.5B/7B LM-head shapes with random
   weights: planted clear winners and exact ties must give ``torch.equal`` ids; confidences within tolerance.
3. ``triton.testing.do_bench`` medians: fused kernel vs naive (k+1 separate ``F.linear``) vs single GEMM
   (the reference) at R in {1, 4, 16, 64}, k in {2, 3, 4}; the commit kernel vs the reference's per-row
   copies. Targets: fused >= 85% of copy bandwidth at R <= 16; >= 4x faster than naive at k = 3.
4. Each launch of the fused heads (bf16, k = 3) and of the commit, timed alone, against its lower bound: the
   bytes it must move (``bench/gpu_compile.py``) over the spec peak (H200 4.8, H100 3.35, A100 2.0 TB/s) and
   over the copy bandwidth of step 1 (``ROOF`` lines; ``bench/gpu_compile_report.py`` has the bounds alone).
5. End-to-end decode-step timing at the 0.5B/1.5B shapes with random weights: greedy vs lossless step cost.
6. Batched decoding (``bench/gpu_batched.py``) at B in {1, 8, 32}: clp_fast greedy and lossless (adaptive
   speculation) against transformers' batched greedy, same random 0.5B-shaped model.

Writes ``gpu_check-<time>.json`` to ``$OUT`` if set, else ``bench/results/``. ``GPU_CHECK_TINY=1`` runs tiny
shapes (on CPU under ``TRITON_INTERPRET=1`` when there is no GPU) so CI can check this script itself.
Exit status: 0 when every correctness check passes (speed targets are reported, not enforced); 1 otherwise.

    bash bench/gpu_check.sh            # or: python bench/gpu_check.py
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

TINY = os.environ.get("GPU_CHECK_TINY", "") == "1"
if not torch.cuda.is_available():
    if not TINY:
        sys.exit("gpu_check: no CUDA device; set GPU_CHECK_TINY=1 to run the tiny CPU (interpreter) variant")
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, below
    os.environ.setdefault("CLP_FAST_BACKEND", "triton")  # so the tiny end-to-end decode runs the kernels too

import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from gpu_batched import batched_hook  # noqa: E402

from clp_fast import reference  # noqa: E402
from clp_fast.kernels.fused_heads import fused_heads  # noqa: E402
from clp_fast.kernels.kv_commit import commit_kv_span_  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (atol, rtol) on confidences: logits are rounded to the input dtype in both; one-ulp flips at boundaries.
CONF_TOL = {"bf16": (1e-3, 2e-2), "fp16": (2e-4, 4e-3), "fp32": (1e-6, 1e-5)}

if TINY:
    SHAPES = {"tiny": (64, 1000)}
    RS, KS, CHECK_RS = [1, 4], [2, 3], [1, 3]
    COPY_BYTES = 1 << 20
    KV = dict(L=2, B=3, KVH=2, M=16, T=4, D=32)
else:
    SHAPES = {"qwen2.5-0.5b": (896, 151_936), "qwen2.5-1.5b": (1536, 151_936), "qwen2.5-7b": (3584, 152_064)}
    RS, KS, CHECK_RS = [1, 4, 16, 64], [2, 3, 4], [1, 16, 64]
    COPY_BYTES = 1 << 30
    KV = dict(L=28, B=16, KVH=4, M=4096, T=5, D=128)


def bench(fn) -> float:
    """Median milliseconds."""
    if DEV.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * COPY_BYTES / ms / 1e6


def inputs(R, H, V, k, dtype, plant):
    hidden = torch.randn(R, H, device=DEV)
    hw = torch.randn(k, H, H, device=DEV) * (0.5 / H**0.5)
    hb = torch.randn(k, H, device=DEV) * 0.1
    W = torch.randn(V, H, device=DEV) / H**0.5
    expected = None
    if plant:
        # Winner t_r of row r: hidden spike 4 at coordinate c_r (the rest x 0.25), W[t_r] = 8 e_{c_r}. Its logit is
        # one exact product plus exact zeros, so the twin below ties it bit for bit in any summation order or MMA
        # tiling (dense planted rows do not tie under every BLAS: issue 21). R <= H.
        targets = torch.randperm(V, device=DEV)[:R]
        spike = torch.randperm(H, device=DEV)[:R]
        hidden *= 0.25
        hidden[torch.arange(R, device=DEV), spike] = 4.0
        W[targets] = 0.0
        W[targets, spike] = 8.0
        # Exact tie: a copy of each winner at a lower index, in an earlier vocabulary split.
        dup = torch.arange(R, device=DEV) * 7
        keep = ~torch.isin(dup, targets)
        W[dup[keep]] = W[targets[keep]]
        expected = torch.where(keep & (dup < targets), dup, targets)
    cw = torch.randn(k, H + k, device=DEV) / H**0.5
    cb = torch.randn(k, device=DEV) * 0.5
    cast = lambda t: t.to(dtype)  # noqa: E731
    return (cast(hidden), cast(hw), cast(hb), cast(W), cw, cb), expected


def check_fused(name, H, V, R, k, dname) -> dict:
    dtype = DTYPES[dname]
    args, expected = inputs(R, H, V, k, dtype, plant=True)
    ids, conf, accept = fused_heads(*args)
    ref_ids, ref_conf, ref_accept = reference.fused_heads(*args)
    atol, rtol = CONF_TOL[dname]
    ids_ok = torch.equal(ids, ref_ids) and torch.equal(ref_ids, expected[:, None].expand_as(ref_ids))
    conf_err = (conf - ref_conf).abs().max().item()
    conf_ok = bool(torch.isclose(conf, ref_conf, atol=atol, rtol=rtol).all())
    acc_eq = (accept == ref_accept).float().mean().item()
    # Random (unplanted) data: how often do ids differ at near-ties? Reported, not enforced.
    rargs, _ = inputs(R, H, V, k, dtype, plant=False)
    (r_ids, r_conf, _), (rr_ids, rr_conf, _) = fused_heads(*rargs), reference.fused_heads(*rargs)
    rand_same = (r_ids == rr_ids).float().mean().item()
    rand_conf_ok = bool(torch.isclose(r_conf, rr_conf, atol=atol, rtol=rtol).all())
    conf_err = max(conf_err, (r_conf - rr_conf).abs().max().item())
    conf_ok = conf_ok and rand_conf_ok
    # Draft vocabulary (head rows over W[:V // 4]): kernel against reference on the planted inputs.
    d_ids, d_conf, _ = fused_heads(*args, draft_vocab=V // 4)
    dr_ids, dr_conf, _ = reference.fused_heads(*args, draft_vocab=V // 4)
    draft_ok = torch.equal(d_ids, dr_ids) and bool(torch.isclose(d_conf, dr_conf, atol=atol, rtol=rtol).all())
    # Top-4 candidates per head row (draft trees): the first is the head's argmax; the lists follow the reference
    # (reported: random logits may near-tie below the first), probabilities within the confidence tolerance.
    t_ids, _, _, t_top, t_p = fused_heads(*args, draft_vocab=V // 4, top_m=4)
    r_top, r_p = reference.fused_heads(*args, draft_vocab=V // 4, top_m=4)[3:]
    top_ok = bool(torch.equal(t_top[..., 0], t_ids[:, 1:]) and torch.isclose(t_p, r_p, atol=atol, rtol=rtol).all())
    top_agree = (t_top == r_top).float().mean().item() if t_top.numel() else 1.0
    ok = ids_ok and conf_ok and draft_ok and top_ok
    print(f"CORRECT fused_heads {name} H={H} V={V} R={R} k={k} {dname}: {'PASS' if ok else 'FAIL'} "
          f"(planted ids equal={ids_ok}, draft-vocab equal={draft_ok}, max conf err={conf_err:.2e}, "
          f"accept agree={acc_eq:.2f}, top-4 ok={top_ok} (lists agree={top_agree:.3f}), "
          f"random-data ids agree={rand_same:.3f})")  # fmt: skip
    return dict(check="fused_heads", shape=name, H=H, V=V, R=R, k=k, dtype=dname, ok=ok, draft_ok=draft_ok,
                top_ok=top_ok, top_agree=top_agree,
                conf_err=conf_err,
                accept_agree=acc_eq, random_ids_agree=rand_same)  # fmt: skip


def check_commit() -> tuple[dict, dict]:
    L, B, KVH, M, T, D = (KV[x] for x in ("L", "B", "KVH", "M", "T", "D"))
    ck = torch.full((L, B, KVH, M, D), float("nan"), device=DEV, dtype=torch.bfloat16)
    cv = ck.clone()
    nk = torch.randn(L, B, KVH, T, D, device=DEV).bfloat16()
    nv = torch.randn(L, B, KVH, T, D, device=DEV).bfloat16()
    lens = torch.randint(0, T + 1, (B,), device=DEV)
    lens[0] = 0
    offs = torch.randint(0, M - T, (B,), device=DEV)
    rk, rv = ck.clone(), cv.clone()
    commit_kv_span_(ck, cv, nk, nv, offs, lens)
    reference.commit_kv_span_(rk, rv, nk, nv, offs, lens)
    same = lambda a, b: torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0), b.nan_to_num(0))  # noqa: E731
    ok = same(ck, rk) and same(cv, rv)
    print(f"CORRECT commit_kv_span_ L={L} B={B} KVH={KVH} max_len={M} T={T} D={D}: {'PASS' if ok else 'FAIL'}")
    t_kernel = bench(lambda: commit_kv_span_(ck, cv, nk, nv, offs, lens))
    t_ref = bench(lambda: reference.commit_kv_span_(rk, rv, nk, nv, offs, lens))
    moved = 2 * 2 * int(lens.sum()) * L * KVH * D * 2  # k and v, read + write, bf16
    print(f"PERF commit_kv_span_: kernel {t_kernel:.4f} ms, reference {t_ref:.4f} ms "
          f"({t_ref / t_kernel:.1f}x), {moved / t_kernel / 1e6:.1f} GB/s moved")  # fmt: skip
    return (dict(check="commit_kv_span_", ok=ok, **KV),
            dict(bench="commit_kv_span_", kernel_ms=t_kernel, reference_ms=t_ref, **KV))  # fmt: skip


def naive(hidden, hw, hb, W):
    z = reference.head_hidden(hidden, hw, hb)
    return [F.linear(z[:, j], W).argmax(-1) for j in range(z.shape[1])]


def perf(copy_gbps) -> list[dict]:
    rows = []
    print(f"{'shape':>13} {'dtype':>5} {'R':>3} {'k':>2} | {'fused ms':>9} {'%copy':>6} | {'naive ms':>9} "
          f"{'x':>5} | {'gemm ms':>8} {'x':>5}")  # fmt: skip
    for name, (H, V) in SHAPES.items():
        for dname in ["bf16"]:
            dtype = DTYPES[dname]
            args, _ = inputs(max(RS), H, V, max(KS), dtype, plant=False)
            hidden_all, hw_all, hb_all, W = args[:4]
            w_bytes = W.numel() * W.element_size()
            for R in RS:
                for k in KS:
                    a = (hidden_all[:R], hw_all[:k], hb_all[:k], W)
                    t_f = bench(lambda a=a: fused_heads(*a))
                    t_n = bench(lambda a=a: naive(*a))
                    t_g = bench(lambda a=a: reference.fused_heads(*a))
                    pct = 100 * (w_bytes + (k * H * H * W.element_size())) / t_f / 1e6 / copy_gbps
                    row = dict(bench="fused_heads", shape=name, H=H, V=V, R=R, k=k, dtype=dname, fused_ms=t_f,
                               naive_ms=t_n, gemm_ms=t_g, pct_copy_bw=pct,
                               x_naive=t_n / t_f, x_gemm=t_g / t_f)  # fmt: skip
                    flags = []
                    if R <= 16 and pct < 85:
                        flags.append("MISS bw<85%")
                    if k == 3 and t_n / t_f < 4:
                        flags.append("MISS <4x naive")
                    row["targets"] = "ok" if not flags else ",".join(flags)
                    rows.append(row)
                    print(f"{name:>13} {dname:>5} {R:>3} {k:>2} | {t_f:9.4f} {pct:5.1f}% | {t_n:9.4f} "
                          f"{t_n / t_f:5.2f} | {t_g:8.4f} {t_g / t_f:5.2f}  {' '.join(flags)}")  # fmt: skip
            del W, args
    return rows


def roofline(copy_gbps) -> list[dict]:
    """Each launch of ``fused_heads`` (bf16, k = 3, CLP on) and of ``commit_kv_span_`` timed alone, against the
    least time its bytes take (``bench/gpu_compile.py``'s count: each input read once, each output written once)
    at the device's spec peak (H200 / H100 / A100) and at the copy bandwidth measured above. The launches are
    the launcher's own (``_launches`` / ``_launch``), run once in order first, so each reads real inputs."""
    from gpu_compile import launch_bytes, peak_bytes_per_s

    from clp_fast.kernels import fused_heads as fh
    from clp_fast.kernels import kv_commit as kv
    from clp_fast.kernels.device import props_of

    peak = peak_bytes_per_s(torch.cuda.get_device_name(DEV)) if DEV.type == "cuda" else None
    interpret = DEV.type != "cuda"

    def cases():  # one at a time: the 7B LM head alone is 1.1 GB
        for name, (H, V) in SHAPES.items():
            for R in CHECK_RS:
                args, _ = inputs(R, H, V, 3, torch.bfloat16, plant=False)
                yield f"{name} R={R} k=3 bf16", fh._launches(*args, 0.5, V, 1, props_of(DEV), interpret)[1]
        L, B, KVH, M, T, D = (KV[x] for x in ("L", "B", "KVH", "M", "T", "D"))
        ck = torch.zeros((L, B, KVH, M, D), device=DEV, dtype=torch.bfloat16)
        nk = torch.randn(L, B, KVH, T, D, device=DEV).bfloat16()
        full = torch.full((B,), T, device=DEV)  # every row commits T positions: the bytes launch_bytes counts
        grid, args, meta = kv._launch(ck, ck.clone(), nk, nk.clone(), full * 0, full, T)
        yield f"L={L} B={B} KVH={KVH} T={T} D={D} bf16", [(kv._kv_commit_kernel, grid, args, meta)]

    rows = []
    print(f"ROOF lower bound = bytes / peak ({'%.2f TB/s' % (peak / 1e12) if peak else 'peak unknown'}) and / copy "
          f"bandwidth ({copy_gbps:.0f} GB/s); measured = median of the launch alone")
    for label, launches in cases():
        for kernel, grid, args, meta in launches:
            kernel[grid](*args, **meta)
        for kernel, grid, args, meta in launches:
            ms = bench(lambda k=kernel, g=grid, a=args, m=meta: k[g](*a, **m))
            nbytes = launch_bytes(kernel.__name__, args)
            bound_us = nbytes / peak * 1e6 if peak else None
            copy_us = nbytes / (copy_gbps * 1e9) * 1e6
            at_peak = f"{bound_us:.2f} us at peak ({100 * bound_us / (ms * 1e3):.0f}% of peak reached)" if peak else "-"
            print(f"ROOF {kernel.__name__} {label}: measured {ms * 1e3:.2f} us, {nbytes / 1e6:.3f} MB, lower bound "
                  f"{at_peak}, {copy_us:.2f} us at copy bandwidth")  # fmt: skip
            rows.append(dict(bench="roofline", kernel=kernel.__name__, case=label, measured_us=ms * 1e3,
                             bytes=nbytes, lower_bound_us=bound_us, copy_bound_us=copy_us))  # fmt: skip
    return rows


E2E_SHAPES = {  # Qwen2.5 decoder shapes; random weights (no model weights travel to the device)
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151_936),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151_936),
}


def e2e_hook() -> list[dict]:
    """Decode-step cost with random weights at real shapes: greedy vs lossless (k = 3, every guess
    verified), through ``clp_fast.generate`` and so through the Triton kernels on CUDA."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from clp_fast.heads import MTPHeads

    shapes = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000)} if TINY else E2E_SHAPES
    new_tokens, dtype = (4, torch.float32) if TINY else (64, torch.bfloat16)
    rows = []
    for name, shape in shapes.items():
        cfg = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True)
        with torch.device(DEV):
            model = Qwen2ForCausalLM(cfg).to(dtype).eval()
            heads = MTPHeads.for_model(model, 3).to(DEV)
        with torch.no_grad():
            heads.clp.linear.bias.fill_(5.0)  # take every guess: the widest verify step
        prompt = torch.randint(0, cfg.vocab_size, (1, 128), device=DEV)
        res = {}
        # The eager step against the CUDA-graph step (clp_fast.models.graphs); on the CPU the same bucketed static step
        # without the graph.
        for kind in ("eager", "graph" if DEV.type == "cuda" else "static"):
            os.environ["CLP_FAST_STEP"] = kind
            for mode in ("greedy", "lossless"):
                res[kind, mode] = e2e_run(model, heads, prompt, mode, new_tokens)
                st = res[kind, mode][1]
                step_ms = st.wall_time_s / st.forward_passes * 1e3
                print(f"E2E {name:>13} {kind:>6} {mode:>8}: {st.forward_passes} forwards, {step_ms:.2f} ms/forward, "
                      f"tau {st.tau:.2f}, {sum(st.new_tokens) / st.wall_time_s:.1f} tok/s")
                rows.append(dict(bench="e2e", shape=name, step=kind, mode=mode, forwards=st.forward_passes,
                                 ms_per_forward=step_ms, tau=st.tau, tokens_per_s=sum(st.new_tokens) / st.wall_time_s))
        os.environ.pop("CLP_FAST_STEP")
        outs = {key: out for key, (out, _) in res.items()}
        same = torch.equal(outs["eager", "greedy"], outs["eager", "lossless"])
        same_step = all(torch.equal(outs["eager", m], o) for (_, m), o in outs.items())
        print(f"E2E {name:>13} lossless == greedy: {same}, graph/static step == eager step: {same_step} "
              f"({dtype}; bf16 near-tie flips are possible)")
        rows.append(dict(bench="e2e-match", shape=name, equal=same, step_equal=same_step, dtype=str(dtype)))
        del model, heads
    return rows


def e2e_run(model, heads, prompt, mode, new_tokens):
    """One warm-up call (compiles, captures graphs), then the timed one: ``(out, stats)``."""
    import clp_fast

    clp_fast.generate(model, prompt, heads, max_new_tokens=4, mode=mode, eos_token_id=[])
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    out, st = clp_fast.generate(model, prompt, heads, max_new_tokens=new_tokens, mode=mode, eos_token_id=[],
                                return_stats=True)
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    return out, st


def main() -> int:
    t_start = time.perf_counter()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    meta = dict(device=torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else "cpu (interpreter)",
                date=datetime.datetime.now().isoformat(timespec="seconds"), commit=commit.stdout.strip() or "none",
                torch=torch.__version__, triton=__import__("triton").__version__, tiny=TINY)  # fmt: skip
    print(f"# gpu_check on {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, tiny={TINY}")
    torch.manual_seed(0)
    copy_gbps = copy_bandwidth()
    print(f"COPY device-to-device {copy_gbps:.1f} GB/s")
    rows = [dict(bench="copy", gbps=copy_gbps)]

    for name, (H, V) in SHAPES.items():
        for R in CHECK_RS:
            for k, dname in [(3, "bf16"), (4, "fp16"), (2, "fp32")] if name != "qwen2.5-7b" else [(3, "bf16")]:
                rows.append(check_fused(name, H, V, R, k, dname))
    c_check, c_bench = check_commit()
    rows += [c_check, c_bench]
    all_ok = all(r.get("ok", True) for r in rows)
    print(f"CORRECTNESS {'PASS' if all_ok else 'FAIL'} ({sum('ok' in r for r in rows)} checks)")

    rows += perf(copy_gbps)
    rows += roofline(copy_gbps)
    rows += e2e_hook()
    rows += batched_hook(DEV, TINY)
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_check-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps([dict(meta, **r) for r in rows], indent=1))
    print(f"# wrote {len(rows)} rows to {path} in {time.perf_counter() - t_start:.0f} s")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
