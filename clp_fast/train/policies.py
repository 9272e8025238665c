"""Fitting the CLP and the gate baseline on decode-time features of held-out data.

Rows are positions of the held-out shards (teacher-forced windows from held-out files, and greedy
continuations of held-out prompts). Features are exactly the decode-time ones: the hidden state and
the heads' max-softmax confidences, from the heads rounded to their shipped dtype. The label of depth
``j`` is "heads 1..j are all right on the greedy path"; on teacher-forced text it is known only where
the text follows the greedy path far enough (or an earlier head is already known to be wrong), and
rows with an unknown label are masked out of that depth's fit and tables.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clp_fast import reference
from clp_fast.heads import MTPHeads
from clp_fast.train.config import TrainConfig, log, seeded
from clp_fast.train.shards import agree_runs, load_shard, shard_paths


def head_predictions(z: torch.Tensor, W: torch.Tensor, vocab_limit: int, top: int = 3, chunk: int = 256):
    """Head outputs ``z [R, k, H]`` → top-``top`` ids ``[R, k, top]`` and max-softmax conf ``[R, k]`` over
    ``W[:vocab_limit]`` (logits rounded to W's dtype, as :func:`reference.fused_heads` does)."""
    R, k, H = z.shape
    ids, conf = [], []
    Wd = W[:vocab_limit]
    flat = z.reshape(R * k, H)
    for i in range(0, R * k, chunk):
        lg = F.linear(flat[i : i + chunk].to(W.dtype), Wd).float()
        t = lg.topk(top, dim=-1).indices
        t[:, 0] = lg.max(dim=-1).indices  # the decode-time argmax (lowest index on ties); topk has no tie rule
        ids.append(t)
        conf.append(torch.softmax(lg, dim=-1).amax(dim=-1))
    return torch.cat(ids).view(R, k, top), torch.cat(conf).view(R, k)


@torch.no_grad()
def heldout_rows(z_fn, W: torch.Tensor, cache: Path, k: int, vocab_limit: int, kinds=("heldout_tf",),
                 progress: bool = False, max_rows: int | None = None, per_shard: bool = False) -> dict:
    """Decode-time rows of the held-out shards.

    ``z_fn(h [R, H] backbone dtype, pending [R]) -> [R, k, H]`` gives the heads' outputs; with ``per_shard``,
    ``z_fn(shard) -> [n, L, k, H]`` gives them at every position of a shard's sequences (a drafter reading its
    context: position ``t``'s depth-``j`` output guesses the token after ``t + j``). Returns hidden
    ``[N, H]``, conf ``[N, k]``, top ``[N, k, 3]`` ids, target ``[N, k]``, known ``[N, k]`` (head j's
    target is the greedy one), group ``[N]`` (sequence id), source ``[N]`` (index into ``kinds``).
    """
    out = {key: [] for key in ("hidden", "conf", "top", "target", "known", "group", "source")}
    gid, rows = 0, 0
    for si, kind in enumerate(kinds):
        for p in tqdm(shard_paths(cache, kind), desc=f"rows:{kind}", disable=not progress, dynamic_ncols=True):
            data = load_shard(p)
            run = agree_runs(data, k)
            n, L, H = data["hidden"].shape
            length = data["length"].long()
            start = data["gen_start" if kind == "heldout" else "start"].long()
            t = torch.arange(L)
            use = (t[None] >= start[:, None]) & (t[None] < length[:, None] - 1)
            flat = use.flatten().nonzero().flatten()
            if max_rows is not None:
                flat = flat[: max_rows - rows]
            if not len(flat):
                continue
            h = data["hidden"].view(n * L, H)[flat]
            pending = data["argmax"].view(-1)[flat].long()
            tgt_idx = (flat[:, None] + torch.arange(1, k + 1)[None]).clamp(max=n * L - 1)
            pos, seq_len = t.repeat(n)[flat], length.repeat_interleave(L)[flat]
            has = (pos[:, None] + torch.arange(1, k + 1)[None]) < seq_len[:, None]
            z = z_fn(data).reshape(n * L, k, H)[flat] if per_shard else z_fn(h.to(W.dtype), pending)
            top, conf = head_predictions(z, W, vocab_limit)
            out["hidden"].append(h)
            out["conf"].append(conf)
            out["top"].append(top)
            out["target"].append(data["argmax"].view(-1)[tgt_idx].long())
            out["known"].append(run.view(n * L, k)[flat] & has)
            out["group"].append(gid + flat // L)
            out["source"].append(torch.full((len(flat),), si))
            gid += n
            rows += len(flat)
            if max_rows is not None and rows >= max_rows:
                break
    if not out["hidden"]:
        raise ValueError(f"no held-out positions in {cache} ({kinds}): the held-out data is empty")
    return {key: torch.cat(v) for key, v in out.items()}


def chain_labels(rows: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``y [N, k]`` (heads 1..j all right) and ``known [N, k]`` (that label is determined)."""
    right = rows["top"][..., 0] == rows["target"]
    known = rows["known"]
    y = (right & known).long().cumprod(-1).bool()
    wrong_before = torch.cumsum((known & ~right).long(), -1) > 0  # some head <= j known to be wrong
    return y.float(), known | wrong_before


def head_accuracy(rows: dict, top: int = 1) -> list[float]:
    hit = (rows["top"][..., :top] == rows["target"][..., None]).any(-1)
    kn = rows["known"]
    return [float(hit[:, j][kn[:, j]].float().mean()) if kn[:, j].any() else 0.0 for j in range(kn.shape[1])]


def chain_accuracy(rows: dict) -> list[float]:
    y, known = chain_labels(rows)
    return [float(y[:, j][known[:, j]].mean()) if known[:, j].any() else 0.0 for j in range(y.shape[1])]


def _fit_bce(module, logits_fn, y: torch.Tensor, mask: torch.Tensor, seed: int, epochs: int = 20,
             lr: float = 3e-3, wd: float = 1e-4) -> None:
    """Adam on a masked BCE over all k logits."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=wd)
    N, bs = y.shape[0], 2048
    for e in range(epochs):
        perm = torch.randperm(N, generator=seeded(seed, "bce", e))
        for i in range(0, N, bs):
            idx = perm[i : i + bs]
            m = mask[idx].float()
            loss = (F.binary_cross_entropy_with_logits(logits_fn(idx), y[idx], reduction="none") * m).sum()
            loss = loss / m.sum().clamp(min=1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def accept_len(prob: torch.Tensor, thr: float) -> torch.Tensor:
    return (prob >= thr).long().cumprod(dim=-1).sum(dim=-1)


def pr_table(prob: torch.Tensor, y: torch.Tensor, known: torch.Tensor, thr: float) -> list[dict]:
    """Per-depth precision (accepted >= j → heads 1..j right) and recall (right → accepted) at ``thr``,
    over the rows whose depth-j label is known."""
    acc = accept_len(prob, thr)
    rows = []
    for j in range(1, y.shape[1] + 1):
        kn = known[:, j - 1]
        took = (acc >= j) & kn
        right = (y[:, j - 1] > 0.5) & kn
        rows.append({"depth": j, "rows": int(kn.sum()), "accepted": int(took.sum()), "positives": int(right.sum()),
                     "precision": float((took & right).sum() / took.sum()) if took.any() else None,
                     "recall": float((took & right).sum() / right.sum()) if right.any() else None})
    return rows


def pick_threshold(prob, y, known, target: float, min_support: int = 20) -> float:
    """The smallest threshold at which every depth's precision reaches ``target`` (a depth that accepts
    nothing passes; so does one with fewer than ``min_support`` acceptances and at most one error)."""
    grid = sorted(set([i / 100 for i in range(50, 100)] + [1 - 10 ** (-x / 4) for x in range(8, 25)]))
    for thr in grid:
        rows = pr_table(prob, y, known, thr)
        if all(r["accepted"] == 0 or r["precision"] >= target
               or (r["accepted"] < min_support and r["accepted"] * (1 - r["precision"]) <= 1.0 + 1e-6)
               for r in rows):
            return float(thr)
    return 1.0


def recall_at_precision(prob, y, known, target: float = 0.95) -> dict:
    """Depth-1 recall at the smallest threshold whose depth-1 precision reaches ``target``."""
    kn = known[:, 0]
    p, t = prob[kn, 0], y[kn, 0] > 0.5
    order = torch.argsort(p, descending=True)
    tp = torch.cumsum(t[order].float(), 0)
    prec = tp / torch.arange(1, len(order) + 1)
    ok = (prec >= target).nonzero()
    if not len(ok) or not t.any():
        return {"precision_target": target, "recall": 0.0, "threshold": None}
    i = int(ok[-1])
    return {"precision_target": target, "recall": float(tp[i] / t.sum()), "threshold": float(p[order][i])}


def split_groups(groups: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows to fit on (70 % of the sequences) and to validate on (the other 30 %), as bool masks."""
    n_groups = int(groups.max()) + 1
    val_groups = torch.randperm(n_groups, generator=seeded(seed, "split"))[: max(1, n_groups * 3 // 10)]
    is_val = torch.isin(groups, val_groups) if n_groups >= 2 else torch.ones_like(groups, dtype=torch.bool)
    return (~is_val if (~is_val).any() else is_val), is_val


def fit_clp(clp, rows: dict, seed: int, precision: float, progress: bool = False) -> dict:
    """Fit ``clp`` (:class:`clp_fast.heads.CLP`, in place) on the fit rows of ``rows`` (:func:`heldout_rows`) and
    pick its threshold on the validation rows: the smallest at which every depth's precision reaches
    ``precision``. Returns the threshold and the validation tables."""
    h, conf = rows["hidden"].float(), rows["conf"].float()
    y, known = chain_labels(rows)
    tr, is_val = split_groups(rows["group"], seed)
    X = torch.cat([h, conf], dim=-1)  # standardise for the fit, then fold mean/std into the linear layer
    mu, sd = X[tr].mean(0), X[tr].std(0).clamp(min=1e-3)
    lin = torch.nn.Linear(X.shape[1], conf.shape[1])
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    Xtr, ytr, ktr = ((X - mu) / sd)[tr], y[tr], known[tr]
    log(f"CLP: {int(tr.sum())} fit rows, {int(is_val.sum())} validation rows", progress)
    with torch.enable_grad():
        _fit_bce(lin, lambda idx: lin(Xtr[idx]), ytr, ktr, seed)
    with torch.no_grad():
        clp.linear.weight.copy_(lin.weight / sd)
        clp.linear.bias.copy_(lin.bias - (lin.weight / sd) @ mu)
        p_clp = torch.sigmoid(clp.logits(h[is_val], conf[is_val]))
    yv, kv = y[is_val], known[is_val]
    thr = pick_threshold(p_clp, yv, kv, precision)
    return {"rows_fit": int(tr.sum()), "rows_val": int(is_val.sum()),
            "base_rates": [float(yv[:, j][kv[:, j]].mean()) if kv[:, j].any() else 0.0 for j in range(y.shape[1])],
            "clp": {"threshold": thr, "target_precision": precision,
                    "per_depth": pr_table(p_clp, yv, kv, thr), "at_0.5": pr_table(p_clp, yv, kv, 0.5),
                    "depth1_recall_at_p95": recall_at_precision(p_clp, yv, kv, 0.95),
                    "table": [{"threshold": t, "per_depth": pr_table(p_clp, yv, kv, t)}
                              for t in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)]}}


def fit_policies(heads: MTPHeads, rows: dict, cfg: TrainConfig, progress: bool) -> dict:
    """Fit the CLP (and gate) on 70 % of the held-out sequences, pick thresholds on the other 30 %."""
    h = rows["hidden"].float()
    y, known = chain_labels(rows)
    tr, is_val = split_groups(rows["group"], cfg.seed)
    ytr, ktr, yv, kv = y[tr], known[tr], y[is_val], known[is_val]
    out = fit_clp(heads.clp, rows, cfg.seed, cfg.clp_precision, progress)
    thr = out["clp"]["threshold"]
    heads.thresholds["clp"] = thr
    # Lossless: the accepted count is the longest verified prefix of the drafted guesses, so drafting more
    # never accepts fewer -> draft all.
    heads.thresholds["lossless"] = 0.0
    if heads.gate is not None:
        mu, sd = h[tr].mean(0), h[tr].std(0).clamp(min=1e-3)
        hs_tr = ((h - mu) / sd)[tr]
        gate = heads.gate
        with torch.enable_grad():
            _fit_bce(gate, lambda idx: gate.logits(hs_tr[idx]), ytr, ktr, cfg.seed + 1, epochs=10, lr=1e-3)
        with torch.no_grad():  # fold the input standardisation into the first layer
            lin0 = gate.net[0]
            lin0.bias.copy_(lin0.bias - (lin0.weight / sd) @ mu)
            lin0.weight.copy_(lin0.weight / sd)
            p_gate = torch.sigmoid(gate.logits(h[is_val]))
        gthr = pick_threshold(p_gate, yv, kv, cfg.clp_precision)
        heads.thresholds["gate"] = gthr
        out["gate"] = {"threshold": gthr, "target_precision": cfg.clp_precision,
                       "per_depth": pr_table(p_gate, yv, kv, gthr),
                       "depth1_recall_at_p95": recall_at_precision(p_gate, yv, kv, 0.95)}
    return out


def shipped_z_fn(heads: MTPHeads):
    """Decode-time head outputs of ``heads`` (reference.head_hidden, rows 1..k)."""
    return lambda h, pending: reference.head_hidden(h, heads.weight, heads.bias)[:, 1:]
