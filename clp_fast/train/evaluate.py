"""How good are trained heads? HumanEval-style evaluation on the backbone's own greedy continuations."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from clp_fast import reference
from clp_fast.heads import MTPHeads
from clp_fast.train.build import prefill
from clp_fast.train.config import encode


def _ids(pr, tokenizer) -> list[int]:
    if isinstance(pr, dict):
        pr = pr["prompt"]
    return encode(tokenizer, pr) if isinstance(pr, str) else list(pr)


def _head_hits(bb, heads: MTPHeads, ids: list[int], cont: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per generated position: which heads guessed right ``[T, k]`` and which had a target ``[T, k]``."""
    k, dev = heads.k, bb.device
    seq = ids + cont
    hid = prefill(bb, [seq], len(seq), 1)["hidden"][0].to(bb.dtype)
    t = torch.arange(len(ids) - 1, len(seq) - 1)
    hids, _, _ = reference.fused_heads(hid[t].to(dev), heads.weight, heads.bias, bb.lm_head_weight,
                                       draft_vocab=heads.draft_vocab)
    tj = t[:, None] + 1 + torch.arange(1, k + 1)[None]  # index of head j's target token
    ok = tj < len(seq)
    tgt = torch.tensor(seq)[tj.clamp(max=len(seq) - 1)]
    return (hids[:, 1:].cpu() == tgt) & ok, ok


def chain_tau(hit: torch.Tensor) -> float:
    """Tokens per forward of heads-only chain drafting along one greedy continuation: from each step's
    position, the longest run of right heads is accepted, plus the backbone's own token."""
    T, steps, t = hit.shape[0], 0, 0
    while t < T:
        acc = int(hit[t].long().cumprod(0).sum())
        t += 1 + acc
        steps += 1
    return T / max(1, steps)


@torch.inference_mode()
def evaluate_heads(model, heads: MTPHeads, prompts, *, tokenizer=None, max_new_tokens: int = 128,
                   clp_threshold: float | None = None, clp_sweep: tuple[float, ...] = (),
                   prompt_lookup: int | None = None, modes: tuple[str, ...] = ("lossless", "clp"),
                   progress: bool = False) -> dict:
    """HumanEval-style evaluation, batch 1: per-head top-1 on the backbone's own greedy continuation,
    lossless τ and clp τ, and the fraction of sequences equal to greedy.

    Args:
        model: the loaded backbone.
        heads: trained heads for it.
        prompts: strings (needs ``tokenizer``), ``{"prompt": str}`` dicts, or lists of token ids.
        max_new_tokens: tokens generated per prompt.
        clp_threshold: the threshold of ``mode="clp"`` (None → the heads' saved one).
        clp_sweep: further clp thresholds to measure (τ and equality with greedy for each).
        prompt_lookup: passed to lossless decoding (0 = heads only).
        modes: which of ``"lossless"`` / ``"clp"`` to run besides greedy.

    Returns:
        ``{"n", "head_top1" [k], "chain" [k] (P(heads 1..j all right)), "chain_tau" (heads-only chain
        drafting along the greedy continuations), "lossless_tau", "lossless_equal_greedy", "clp_tau",
        "clp_equal_greedy", "clp_threshold", "clp_sweep" [{threshold, tau, equal_greedy, tok_s}],
        "greedy_tok_s", "lossless_tok_s", "clp_tok_s", "per_prompt"}`` (a mode not run is absent).
    """
    import clp_fast
    from clp_fast.models.native import NativeBackbone

    bb = NativeBackbone(model)
    dev = bb.device
    k = heads.k
    thr0 = clp_threshold if clp_threshold is not None else heads.thresholds.get("clp", 0.9)
    thresholds = [thr0] + [t for t in clp_sweep if t != thr0] if "clp" in modes else []
    keys = ["greedy"] + (["lossless"] if "lossless" in modes else []) + [f"clp@{t}" for t in thresholds]
    wall, ntok = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0)
    rows, taus = [], []
    correct, count, chain_hits, chain_n = torch.zeros(k), torch.zeros(k), torch.zeros(k), 0
    for pr in tqdm(prompts, desc="evaluate", disable=not progress, dynamic_ncols=True):
        ids = _ids(pr, tokenizer)
        x = torch.tensor([ids], dtype=torch.long, device=dev)
        res = {}
        for key in keys:
            mode, thr = (key.split("@")[0], float(key.split("@")[1])) if "@" in key else (key, None)
            extra = {"prompt_lookup": prompt_lookup} if mode == "lossless" and prompt_lookup is not None else {}
            if mode == "lossless":  # every guess the CLP takes is verified: tau measures the heads, not this machine
                extra["speculation"] = "fixed"
            out, st = clp_fast.generate(model, x, heads if mode != "greedy" else None, max_new_tokens=max_new_tokens,
                                        mode=mode, return_stats=True, clp_threshold=thr, **extra)
            res[key] = (out[0, len(ids) : len(ids) + st.new_tokens[0]].tolist(), st)
            wall[key] += st.wall_time_s
            ntok[key] += st.new_tokens[0]
        greedy = res["greedy"][0]
        hit, ok = _head_hits(bb, heads, ids, greedy)
        taus.append(chain_tau(hit))
        correct += hit.sum(0).float()
        count += ok.sum(0).float()
        full = ok.all(-1)
        chain_hits += hit[full].long().cumprod(-1).sum(0).float()
        chain_n += int(full.sum())
        rows.append({"prompt_tokens": len(ids), "new_tokens": len(greedy), "chain_tau": taus[-1],
                     **{f"{key}_tau": res[key][1].tau for key in keys if key != "greedy"},
                     **{f"{key}_equal": res[key][0] == greedy for key in keys if key != "greedy"}})
    n = max(1, len(rows))
    mean = lambda key: sum(r[key] for r in rows) / n  # noqa: E731
    rate = lambda key: ntok[key] / wall[key] if wall[key] else 0.0  # noqa: E731
    out = {"n": len(rows), "head_top1": (correct / count.clamp(min=1)).tolist(),
           "chain": (chain_hits / max(1, chain_n)).tolist(), "chain_tau": sum(taus) / n,
           "greedy_tok_s": rate("greedy"), "per_prompt": rows}
    if "lossless" in keys:
        out.update(lossless_tau=mean("lossless_tau"), lossless_equal_greedy=mean("lossless_equal"),
                   lossless_tok_s=rate("lossless"))
    if thresholds:
        sweep = [{"threshold": t, "tau": mean(f"clp@{t}_tau"), "equal_greedy": mean(f"clp@{t}_equal"),
                  "tok_s": rate(f"clp@{t}")} for t in thresholds]
        out.update(clp_threshold=thr0, clp_tau=sweep[0]["tau"], clp_equal_greedy=sweep[0]["equal_greedy"],
                   clp_sweep=sweep, clp_tok_s=sweep[0]["tok_s"])
    return out
