"""gpu_check's batched step: clp_fast greedy and lossless against transformers' batched greedy at B in {1, 8, 32}.

Random weights at the Qwen2.5-0.5B shape (no weights travel to the device), left-padded random prompts of
96-128 tokens, 64 new tokens, no EOS. Per B: ms per forward and tokens/s of each method, the ratio to
transformers in the same run, tokens fed per forward, and whether lossless equals clp_fast greedy. On a GPU
these batches stay memory-bound, so the adaptive policy's measured cost model should keep speculating where
the 2-core CPU stops (docs/results.md, "Batches"). Called by ``bench/gpu_check.py``; tiny shapes under
``GPU_CHECK_TINY=1``.
"""

from __future__ import annotations

import time

import torch

import clp_fast
from clp_fast.heads import MTPHeads

QWEN05 = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, vocab_size=151_936)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def batched_hook(dev: torch.device, tiny: bool) -> list[dict]:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    shape, sizes, new, dtype = (TINY_SHAPE, (1, 2), 4, torch.float32) if tiny else (QWEN05, (1, 8, 32), 64,
                                                                                     torch.bfloat16)
    cfg = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True)
    with torch.device(dev):
        model = Qwen2ForCausalLM(cfg).to(dtype).eval()
        heads = MTPHeads.for_model(model, 2).to(dev)
    with torch.no_grad():
        heads.clp.linear.bias.fill_(5.0)  # the CLP takes every guess; the adaptive policy decides what is fed
    g = torch.Generator().manual_seed(0)
    rows = []
    for B in sizes:
        lens = torch.randint(96, 129, (B,), generator=g) if not tiny else torch.randint(4, 9, (B,), generator=g)
        P = int(lens.max())
        ids = torch.zeros((B, P), dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.long)
        for b, n in enumerate(lens.tolist()):
            ids[b, P - n:] = torch.randint(1, cfg.vocab_size, (n,), generator=g)
            mask[b, P - n:] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        def hf(n=new, ids=ids, mask=mask):  # no EOS id: every row decodes n tokens, as ours do with eos_token_id=[]
            gc = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
            return model.generate(ids, attention_mask=mask, generation_config=gc), None

        def ours(mode, n=new, ids=ids, mask=mask):
            return clp_fast.generate(model, ids, heads, attention_mask=mask, max_new_tokens=n, mode=mode,
                                     eos_token_id=[], pad_token_id=0, return_stats=True)

        runs = {"hf greedy": hf, "greedy": lambda n=new: ours("greedy", n),
                "lossless": lambda n=new: ours("lossless", n)}
        res = {}
        for name, fn in runs.items():
            with torch.inference_mode():
                fn(4)  # warm-up (and the cost model's one-time measurement)
                _sync(dev)
                t0 = time.perf_counter()
                out, st = fn()
                _sync(dev)
            dt = time.perf_counter() - t0
            res[name] = (out, st, dt)
        base = res["hf greedy"][2]
        for name, (_, st, dt) in res.items():
            fwd = st.forward_passes if st is not None else new
            fed = st.fed_tokens / max(1, st.forward_passes - 1) if st is not None else float(B)
            row = dict(bench="batched", B=B, method=name, ms_per_forward=dt / fwd * 1e3, tokens_per_s=B * new / dt,
                       vs_hf=base / dt, fed_per_forward=fed, tau=st.tau if st is not None else 1.0)
            rows.append(row)
            print(f"BATCHED B={B:>2} {name:>9}: {row['ms_per_forward']:.2f} ms/forward, {row['tokens_per_s']:.0f} "
                  f"tok/s, {row['vs_hf']:.2f}x hf, fed/forward {fed:.1f}, tau {row['tau']:.2f}")
        same = torch.equal(res["greedy"][0], res["lossless"][0])
        print(f"BATCHED B={B:>2} lossless == greedy: {same} ({dtype}; bf16 near-tie flips are possible)")
        rows.append(dict(bench="batched-match", B=B, equal=same, dtype=str(dtype)))
    return rows
