"""Qwen2.5-Coder-1.5B, bf16, 2 threads, batch 1: transformers greedy vs clp_fast greedy / lossless (shipped k=2
heads, adaptive) on 3 held-out HumanEval prompts x 96 tokens, interleaved, per-prompt ratios."""
import time, statistics, torch
from transformers import GenerationConfig
import clp_fast
from clp_fast.hub import load_model
from clp_fast.data import humaneval_prompts
torch.set_num_threads(2)
model, tok = load_model("qwen2.5-coder-1.5b-instruct", dtype="bf16")
eos = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")]
N = 96
def hf(ids):
    return model.generate(ids, generation_config=GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=N, eos_token_id=eos, pad_token_id=eos[0]))
def ours(ids, mode):
    return clp_fast.generate(model, ids, max_new_tokens=N, mode=mode, eos_token_id=eos, return_stats=True)
ids0 = tok("def f(x):", return_tensors="pt").input_ids
with torch.inference_mode():
    hf(ids0); ours(ids0, "greedy"); ours(ids0, "lossless")
    rat = {"greedy": [], "lossless": []}; taus = []; same = 0
    for p in humaneval_prompts(3, seed=2):
        ids = tok(p["prompt"], return_tensors="pt").input_ids
        t = time.perf_counter(); ref = hf(ids); th = time.perf_counter() - t
        nh = ref.shape[1] - ids.shape[1]
        for mode in ("greedy", "lossless"):
            t = time.perf_counter(); out, st = ours(ids, mode); dt = time.perf_counter() - t
            rat[mode].append((sum(st.new_tokens) / dt) / (nh / th))
            if mode == "lossless":
                taus.append(st.tau); same += int(out.shape == ref.shape and torch.equal(out, ref))
        print(p["task_id"], {m: round(r[-1], 2) for m, r in rat.items()}, "tau", round(taus[-1], 2), flush=True)
    print({m: round(statistics.median(r), 3) for m, r in rat.items()}, "tau", round(statistics.mean(taus), 2), "identical", same, "/ 3")
