"""Ahead-of-time compile of every Triton kernel of clp_fast for named GPUs, on a machine without one.

The launchers' own planning functions (``clp_fast.kernels.fused_heads._launches``,
``clp_fast.kernels.kv_commit._launch``) run on ``device="meta"`` tensors of real shapes with a named GPU's
:class:`~clp_fast.kernels.device.DeviceProps`, so each launch
carries the very grid, tiles, warps, stages and arguments a run on that GPU would. Triton's own binder then
specializes those arguments as its JIT does at launch (16-divisible pointers and sizes, unit strides and sizes
as constants; meta tensors sit at address 0, like the caching allocator's 512-byte-aligned blocks), and
``triton.compile`` builds a cubin for the GPU's architecture. Identical compile inputs are compiled once.

Each unit is read back: registers, stack and local memory (spills) from the bundled ``cuobjdump
--dump-resource-usage``, shared memory from the kernel's metadata (what Triton's loader checks against the
device's opt-in limit), and the PTX's tensor-core MMA, vectorized / async loads and scalar 16-bit loads.

    python bench/gpu_compile.py --gpus A100,H100 --json out.json   # what tests/test_kernels_compile.py runs

Must run without ``TRITON_INTERPRET``, which makes ``triton.jit`` build interpreter functions; the test and
the report run it in a subprocess with that variable removed and a fresh ``TRITON_CACHE_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clp_fast.kernels.device import DeviceProps  # noqa: E402


@dataclass(frozen=True)
class Gpu:
    """A named GPU: what its launcher sees, plus what occupancy and the roofline need (public spec sheets)."""

    props: DeviceProps
    smem_per_sm: int  # bytes; each resident block also takes 1 KB of it for the driver
    max_threads_per_sm: int
    peak_bytes_per_s: float | None = None  # HBM peak; None: compile-checked only


GPUS = {
    "A100": Gpu(DeviceProps(108, 166_912, (8, 0), "A100-SXM4-80GB"), 167_936, 2048, 2.0e12),
    "H100": Gpu(DeviceProps(132, 232_448, (9, 0), "H100 SXM5 80GB"), 233_472, 2048, 3.35e12),
    "H200": Gpu(DeviceProps(132, 232_448, (9, 0), "H200 SXM 141GB"), 233_472, 2048, 4.8e12),
    "B200": Gpu(DeviceProps(148, 232_448, (10, 0), "B200"), 233_472, 2048),
    "RTX5090": Gpu(DeviceProps(170, 101_376, (12, 0), "GeForce RTX 5090"), 102_400, 1536),
}
REGS_PER_SM, MAX_BLOCKS_PER_SM = 65_536, 32


def peak_bytes_per_s(device_name: str) -> float | None:
    """Spec-sheet HBM peak of a live device, by name (``torch.cuda.get_device_name``); None if not in ``GPUS``."""
    for key in ("H200", "H100", "A100"):
        if key in device_name:
            return GPUS[key].peak_bytes_per_s
    return None

# (hidden size, vocabulary) of the Qwen2.5 backbones; the heads' draft vocabulary is W's first 32,768 rows.
SHAPES = {"qwen2.5-0.5b": (896, 151_936), "qwen2.5-1.5b": (1536, 151_936), "qwen2.5-7b": (3584, 152_064)}
DRAFT_VOCAB = 32_768
# (layers, KV heads, head dim) of the same backbones, for the KV-cache commit.
KV_SHAPES = {"qwen2.5-0.5b": (24, 2, 64), "qwen2.5-1.5b": (28, 2, 128), "qwen2.5-7b": (28, 4, 128)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Decode rows (batch) and the 512-row chunk of head calibration / shard building; k = 0 is the backbone-only
# call (decode's verify rows, cost.py), k = 1, 2, 4 the heads.
ROWS, KS, TOP_MS = (1, 8, 64, 512), (0, 1, 2, 4), (1, 4)
# Commit spans: nothing accepted (1), k + 1 for k = 1, 2, 4, and a 128-token prefill.
SPANS, MAX_LEN = (1, 2, 3, 5, 128), 4096


def fused_heads_cases(dtypes=tuple(DTYPES), shapes=tuple(SHAPES)):
    """Every (label, call arguments) of ``fused_heads`` at real shapes: rows x k x dtype x top-m x CLP, heads
    in fp32 (``MTPHeads.from_pretrained``'s default) and in the backbone's dtype."""
    for name in shapes:
        H, V = SHAPES[name]
        for dn in dtypes:
            dt = DTYPES[dn]
            W = torch.empty(V, H, dtype=dt, device="meta")
            for R in ROWS:
                hidden = torch.empty(R, H, dtype=dt, device="meta")
                for k in KS:
                    for hd in sorted({dt, torch.float32}, key=str) if k else [dt]:
                        hw = torch.empty(k, H, H, dtype=hd, device="meta")
                        hb = torch.empty(k, H, dtype=hd, device="meta")
                        cw = torch.empty(k, H + k, dtype=torch.float32, device="meta")
                        cb = torch.empty(k, dtype=torch.float32, device="meta")
                        for m in TOP_MS if k else (1,):
                            for clp in (True, False) if k else (False,):
                                label = dict(kernel="fused_heads", shape=name, dtype=dn, R=R, k=k, top_m=m, clp=clp,
                                             heads=str(hd).removeprefix("torch."))  # fmt: skip
                                yield label, (hidden, hw, hb, W, cw if clp else None, cb if clp else None, 0.5,
                                              DRAFT_VOCAB if k else V, m)  # fmt: skip


def kv_commit_cases(dtypes=tuple(DTYPES), shapes=tuple(KV_SHAPES)):
    """Every (label, launch arguments) of ``commit_kv_span_`` at real (layers, KV heads, head dim)."""
    for name in shapes:
        L, KVH, D = KV_SHAPES[name]
        for dn in dtypes:
            for B in ROWS[:3]:
                for n in SPANS:
                    cache = torch.empty(L, B, KVH, MAX_LEN, D, dtype=DTYPES[dn], device="meta")
                    new = torch.empty(L, B, KVH, n, D, dtype=DTYPES[dn], device="meta")
                    idx = torch.empty(B, dtype=torch.int64, device="meta")
                    label = dict(kernel="commit_kv_span_", shape=name, dtype=dn, B=B, span=n)
                    yield label, (cache, cache, new, new, idx, idx, n)


def launches(gpu: Gpu, dtypes=tuple(DTYPES), shapes=tuple(SHAPES)):
    """(case label, kernel, grid, args, meta) of every launch the launchers make on ``gpu`` for the cases."""
    from clp_fast.kernels import fused_heads as fh
    from clp_fast.kernels import kv_commit as kv

    for label, a in fused_heads_cases(dtypes, shapes):
        _, ls = fh._launches(*a, props=gpu.props, interpret=False)
        for kernel, grid, args, meta in ls:
            yield label, kernel, grid, args, meta
    for label, a in kv_commit_cases(dtypes, shapes):
        grid, args, meta = kv._launch(*a)
        yield label, kv._kv_commit_kernel, grid, args, meta


def specialize(kernel, args, meta: dict, arch: int):
    """``(target, ASTSource, options)`` exactly as ``JITFunction.run`` builds them for these arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(kernel, JITFunction):
        raise TypeError(f"{kernel!r} is not a JITFunction: TRITON_INTERPRET must be unset to compile")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    # The options JITFunction.run adds before binding.
    kwargs = dict(meta, debug=kernel.debug or triton.knobs.runtime.debug,
                  instrumentation_mode=triton.knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=triton.knobs.compilation.fpsan_homomorphic_casts)  # fmt: skip
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    return target, ASTSource(kernel, signature, constexprs, attrs), options


_MMA = re.compile(r"\b(mma\.sync|wgmma\.mma_async|tcgen05\.mma)\b")
_ASYNC = re.compile(r"\bcp\.async\b")
_LD_GLOBAL = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld\.global[\w.:]*)", re.M)
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptx_facts(ptx: str) -> dict:
    """Tensor-core MMA instructions by kind, async copies and global loads (vector, scalar, scalar 16-bit)."""
    mma = _MMA.findall(ptx)
    loads = _LD_GLOBAL.findall(ptx)
    vector = [op for op in loads if re.search(r"\.v[248]\.", op)]
    scalar16 = [op for op in loads if op not in vector and re.search(r"\.[bsuf]16$", op)]
    return dict(mma=len(mma), mma_kinds=sorted(set(mma)), cp_async=len(_ASYNC.findall(ptx)), ld_vector=len(vector),
                ld_scalar=len(loads) - len(vector), ld_scalar16=len(scalar16))  # fmt: skip


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local bytes per thread from ``cuobjdump --dump-resource-usage``."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    m = _USAGE.search(out)
    if not m:
        raise RuntimeError(f"no resource line in cuobjdump output:\n{out}")
    regs, stack, static_smem, local = map(int, m.groups())
    return dict(regs=regs, stack=stack, static_smem=static_smem, local=local)


def compile_unit(unit: dict) -> dict:
    """Compile one unit (``target``, ``src``, ``options`` from :func:`specialize`); resources or the error.

    ``spill_stores`` comes from ptxas' own ``-v`` report (printed when ``dump_ptxas_log`` is on; None on a cache
    hit, hence the fresh cache directory); the checks use cuobjdump's stack and local bytes."""
    import contextlib
    import io

    import triton

    t0 = time.perf_counter()
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(unit["src"], target=unit["target"], options=unit["options"])
    except Exception as e:  # noqa: BLE001 -- any compiler failure is the finding, reported by the caller
        return dict(error=f"{type(e).__name__}: {e}"[-4000:], compile_s=time.perf_counter() - t0)
    spills = _SPILLS.search(log.getvalue())
    return dict(resource_usage(k.asm["cubin"]), shared=k.metadata.shared, spill_stores=spills and int(spills[1]),
                **ptx_facts(k.asm["ptx"]), compile_s=time.perf_counter() - t0)  # fmt: skip


def _summary(src) -> dict:
    """The unit's constexpr values and 16-divisible arguments, by parameter name."""
    names = list(src.signature)
    const = {names[p[0]]: v for p, v in src.constants.items()}
    return dict(constexprs={k: v for k, v in const.items() if not k.startswith("stride")},
                unit_strides=sorted(k for k, v in const.items() if k.startswith("stride") and v == 1),
                div16=sorted(names[p[0]] for p, v in src.attrs.items() if v),
                dtypes={n: t for n, t in src.signature.items() if t.startswith("*")})  # fmt: skip


def collect(gpus, dtypes=tuple(DTYPES), shapes=tuple(SHAPES)) -> tuple[list[dict], list[dict]]:
    """Distinct compile units over the cases on the named ``gpus``, and every launch as a row
    ``(case label, gpu, kernel, grid, unit index, bytes)``."""
    units, index, rows = [], {}, []
    for gname in gpus:
        gpu = GPUS[gname]
        for label, kernel, grid, args, meta in launches(gpu, dtypes, shapes):
            target, src, options = specialize(kernel, args, meta, gpu.props.arch)
            key = (gpu.props.arch, src.hash(), options.hash())
            if key not in index:
                index[key] = len(units)
                units.append(dict(kernel=kernel.__name__, arch=gpu.props.arch, gpus=[], n_launches=0, example=label,
                                  src=src, target=target, options=options.__dict__, **_summary(src)))  # fmt: skip
            u = units[index[key]]
            u["n_launches"] += 1
            if gname not in u["gpus"]:
                u["gpus"].append(gname)
            rows.append(dict(label, gpu=gname, launch=kernel.__name__, grid=list(grid), unit=index[key],
                             bytes=launch_bytes(kernel.__name__, args)))  # fmt: skip
    return units, rows


def launch_bytes(kernel: str, args) -> int:
    """Bytes a launch must move at the least: each input read once, each output written once. For the commit,
    every row's span is taken as full (``new_k``'s T positions)."""
    n = lambda t: t.numel() * t.element_size()  # noqa: E731
    if kernel == "_head_hidden_kernel":
        hidden, hw, hb, z3 = args[:4]
        return n(hidden) + n(hw) + n(hb) + n(z3)
    if kernel == "_fused_heads_kernel":
        z, W, pmax, parg, psum, ptopv, ptopi = args[:7]
        top = n(ptopv) + n(ptopi) if ptopv.numel() > 1 else 0
        return n(z) + n(W) + n(pmax) + n(parg) + n(psum) + top
    if kernel == "_merge_clp_kernel":
        pmax, parg, psum, ptopv, ptopi, hidden, cw, cb, ids, conf, accept, tid, tp = args[:13]
        clp = n(hidden) + n(cw) + n(cb) if cw is not pmax else 0
        top = n(ptopv) + n(ptopi) + n(tid) + n(tp) if ptopv.numel() > 1 else 0
        return n(pmax) + n(parg) + n(psum) + clp + n(ids) + n(conf) + n(accept) + top
    if kernel == "_kv_commit_kernel":
        new_k, new_v = args[2:4]
        return 2 * (n(new_k) + n(new_v))  # read the span, write it into the cache
    raise ValueError(f"no byte count for kernel {kernel!r}")


_UNITS: list[dict] = []


def _compile_index(i: int) -> dict:
    return compile_unit(_UNITS[i])


def compile_all(units: list[dict], jobs: int = 2) -> list[dict]:
    """:func:`compile_unit` of every unit, ``jobs`` processes at once (forked: the units are not picklable)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    _UNITS[:] = units
    if jobs <= 1:
        return [_compile_index(i) for i in range(len(units))]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        # Longest first (the LM-head pass), so that no long compile starts last.
        order = sorted(range(len(units)), key=lambda i: units[i]["kernel"] != "_fused_heads_kernel")
        done = dict(zip(order, pool.map(_compile_index, order)))
    return [done[i] for i in range(len(units))]


def run(gpus, dtypes=tuple(DTYPES), shapes=tuple(SHAPES), jobs: int = 2) -> dict:
    """Collect and compile everything for ``gpus`` in a fresh Triton cache (nothing carries over between runs):
    ``{"triton", "gpus", "units": [summary + resources or error], "launches": [...], "wall_s"}``."""
    import triton

    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: triton.jit builds interpreter functions, which do not compile")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clp_fast-aot-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        units, rows = collect(gpus, dtypes, shapes)
        results = compile_all(units, jobs)
    out = []
    for u, r in zip(units, results):
        u = {k: v for k, v in u.items() if k not in ("src", "target")}
        u["options"] = {k: u["options"][k] for k in ("num_warps", "num_stages", "num_ctas")}
        out.append(dict(u, **r))
    return dict(triton=triton.__version__, gpus=list(gpus), units=out, launches=rows, wall_s=time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="A100,H100", help=f"comma-separated, of {', '.join(GPUS)}")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", required=True, help="write units and launches here")
    a = ap.parse_args(argv)
    res = run(a.gpus.split(","), tuple(a.dtypes.split(",")), tuple(a.shapes.split(",")), a.jobs)
    Path(a.json).write_text(json.dumps(res, default=str))
    failed = sum("error" in u for u in res["units"])
    print(f"gpu_compile: {len(res['units'])} units ({failed} failed to compile) from {len(res['launches'])} launches "
          f"on {a.gpus} in {res['wall_s']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
