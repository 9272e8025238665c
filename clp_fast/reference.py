"""Pure-PyTorch reference of every kernel in ``clp_fast/kernels/``: the specification.

Each function here has the same signature and the same outputs as its Triton twin. Tests and
benchmarks import these functions; nobody re-implements them inline. Token ids produced by a
kernel must be ``torch.equal`` to the ids produced here; floating outputs get a per-dtype
tolerance in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clp_fast.models.packed import linear, rows

__all__ = ["head_hidden", "fused_heads", "head_rows", "clp_accept_lengths", "commit_kv_span_"]


def head_hidden(hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor) -> torch.Tensor:
    """Hidden vectors of the backbone row and all k MTP heads.

    Head j is a residual block ``z_j = h + SiLU(h @ W_j^T + b_j)`` (Medusa-1), computed in fp32 and
    cast back to the input dtype so that the LM-head matmul sees the same operand as a plain
    backbone forward would.

    Args:
        hidden: ``[R, H]`` final (post-norm) hidden states.
        head_weight: ``[k, H, H]`` (``W_j`` is ``head_weight[j]``, used as ``h @ W_j^T``).
        head_bias: ``[k, H]``.

    Returns:
        ``[R, k + 1, H]``: row 0 is ``hidden`` itself (the backbone's own LM-head input), rows
        1..k the heads' outputs.
    """
    h32 = hidden.float()
    proj = torch.einsum("rh,kgh->rkg", h32, head_weight.float()) + head_bias.float()  # [R, k, H]
    z = h32.unsqueeze(1) + F.silu(proj)  # [R, k, H]
    return torch.cat([hidden.unsqueeze(1), z.to(hidden.dtype)], dim=1)


def clp_accept_lengths(
    hidden: torch.Tensor,
    head_conf: torch.Tensor,
    clp_weight: torch.Tensor,
    clp_bias: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """CLP decision: how many head guesses to take.

    One linear layer over ``[h, conf_1..conf_k]`` gives k acceptance logits; the accept length is
    the longest prefix ``j = 1..n`` with ``sigmoid(logit_j) >= threshold``.

    Args:
        hidden: ``[R, H]``.
        head_conf: ``[R, k]`` max-softmax confidences of heads 1..k (fp32).
        clp_weight: ``[k, H + k]``.
        clp_bias: ``[k]``.
        threshold: probability in ``[0, 1]``.

    Returns:
        ``[R]`` int64 accept lengths in ``[0, k]``.
    """
    feats = torch.cat([hidden.float(), head_conf.float()], dim=-1)  # [R, H + k]
    logits = feats @ clp_weight.float().t() + clp_bias.float()  # [R, k]
    ok = torch.sigmoid(logits) >= threshold
    return ok.long().cumprod(dim=-1).sum(dim=-1)


def fused_heads(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    lm_head_weight: torch.Tensor,
    clp_weight: torch.Tensor | None = None,
    clp_bias: torch.Tensor | None = None,
    threshold: float = 0.5,
    draft_vocab: int | None = None,
    top_m: int = 1,
) -> tuple[torch.Tensor, ...]:
    """Backbone + MTP-head logits, their argmaxes, confidences and the CLP decision.

    All ``R * (k + 1)`` logit rows come from one matmul against ``lm_head_weight`` (one read of W),
    accumulated in fp32 and then **rounded to the input dtype**, exactly as a plain ``lm_head``
    forward (and so transformers' greedy search) produces them; max, argmax and log-sum-exp then
    run in fp32 over those rounded logits. Kernels round their fp32 accumulator the same way
    (``acc.to(dtype).to(fp32)``). Upcasting W instead would copy all of it per call: 372 ms vs
    39 ms for a bf16 [151936, 896] W at R=5 on the 2-core CPU. Argmax ties go to the lowest
    index, like ``torch.argmax``.

    **Draft vocabulary.** The backbone row always ranges over all ``V`` tokens (it is what greedy
    decoding emits). Head rows range over the first ``draft_vocab`` tokens only: their argmax and
    their softmax (hence ``conf``) are taken over ``W[:draft_vocab]``, as if the heads had a smaller
    output layer (FR-Spec's frequency-ranked draft vocabulary; byte-level BPE vocabularies such as
    Qwen2's put frequent merges first, so a prefix is the frequency ranking: the first 32,768 of
    Qwen2.5's 151,936 ids cover 96% of HumanEval's prompt tokens). On a CPU, where logit rows are not
    free, this cuts the head rows' share of the step by ``V / draft_vocab``.

    Args:
        hidden: ``[R, H]`` final hidden states (bf16, fp16 or fp32).
        head_weight: ``[k, H, H]``; ``k`` may be 0 (then only the backbone row is computed).
        head_bias: ``[k, H]``.
        lm_head_weight: ``[V, H]``, a tensor or (on CPU) its :class:`clp_fast.models.packed.PackedWeight`.
        clp_weight: ``[k, H + k]`` or None (then accept lengths are all ``k``).
        clp_bias: ``[k]`` or None.
        threshold: CLP acceptance probability.
        draft_vocab: head rows' vocabulary ``W[:draft_vocab]``, ``1 <= draft_vocab <= V``; None = V.
        top_m: how many candidates each head row returns, ``1 <= top_m <= min(8, draft_vocab)``.

    Returns:
        ids ``[R, k + 1]`` int64 (column 0 = backbone's next token, column j = head j's guess of
        the token j places after it); conf ``[R, k + 1]`` fp32 max softmax probability per row;
        accept ``[R]`` int64 number of head guesses to take, in ``[0, k]``. With ``top_m > 1``
        also top_ids ``[R, k, top_m]`` int64 and top_p ``[R, k, top_m]`` fp32: each head row's
        ``top_m`` most likely tokens, by logit descending and **lowest index first among equal
        logits** (the rule ``torch.argmax`` follows for the first, so ``top_ids[:, :, 0] ==
        ids[:, 1:]``), and their softmax probabilities.
    """
    R, H = hidden.shape
    k = head_weight.shape[0]
    V = lm_head_weight.shape[0]
    Vd = V if draft_vocab is None else draft_vocab
    if isinstance(Vd, bool) or not isinstance(Vd, int) or not 1 <= Vd <= V:
        raise ValueError(f"draft_vocab={draft_vocab!r} must be an int in [1, {V}]")
    check_top_m(top_m, Vd)
    z = head_hidden(hidden, head_weight, head_bias)  # [R, k + 1, H]
    ids, conf, head_logits = _all_rows(z, lm_head_weight, Vd, keep_head_logits=top_m > 1)
    if clp_weight is None or k == 0:
        accept = torch.full((R,), k, dtype=torch.long, device=hidden.device)
    else:
        accept = clp_accept_lengths(hidden, conf[:, 1:], clp_weight, clp_bias, threshold)
    if top_m == 1:
        return ids, conf, accept
    if head_logits is None:  # k == 0
        empty = torch.empty((R, 0, top_m), device=hidden.device)
        return ids, conf, accept, empty.long(), empty.float()
    top_ids, top_p = _top_m(head_logits, top_m)
    return ids, conf, accept, top_ids.view(R, k, top_m), top_p.view(R, k, top_m)


def _all_rows(z: torch.Tensor, lm_head_weight, Vd: int, keep_head_logits: bool):
    """ids, conf ``[R, k + 1]`` of the backbone row (over all ``V``) and the head rows (over ``W[:Vd]``) of
    ``z [R, k + 1, H]``, and the head rows' logits ``[R * k, ·]`` where ``keep_head_logits`` and ``k > 0`` (else None):
    one matmul when the head rows range over all of ``V``."""
    R, k1, H = z.shape
    k, V = k1 - 1, lm_head_weight.shape[0]
    if Vd == V or k == 0:
        logits = linear(z.reshape(R * k1, H), lm_head_weight)  # one matmul
        ids, conf = _argmax_conf(logits)
        head_logits = logits.view(R, k1, V)[:, 1:].reshape(R * k, V) if keep_head_logits and k else None
        return ids.view(R, k1), conf.view(R, k1), head_logits
    ids0, conf0 = _argmax_conf(linear(z[:, 0].contiguous(), lm_head_weight))  # = hidden, as the caller passed it
    head_logits = linear(z[:, 1:].reshape(R * k, H), rows(lm_head_weight, Vd))
    idsj, confj = _argmax_conf(head_logits)
    ids = torch.cat([ids0.view(R, 1), idsj.view(R, k)], dim=1)
    conf = torch.cat([conf0.view(R, 1), confj.view(R, k)], dim=1)
    return ids, conf, head_logits if keep_head_logits else None


def head_rows(hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor, lm_head_weight: torch.Tensor,
              draft_vocab: int | None = None, top_m: int = 1) -> tuple[torch.Tensor, ...]:
    """The head columns of :func:`fused_heads` alone — ids ``[R, k]`` and conf ``[R, k]`` (with ``top_m > 1``
    also top ids / probabilities ``[R, k, m]``) — for a caller that already has the backbone row.

    Lossless decoding on a CPU verifies every fed node with its backbone row and needs the heads only at the
    accepted node; recomputing that node's backbone row there would read the whole ``[V, H]`` LM head once
    more per step (~40 ms of a ~170 ms step at B = 4, Qwen2.5-0.5B, bf16, 2-core CPU). Same arithmetic as
    :func:`fused_heads`'s head rows with a draft vocabulary (one matmul against ``W[:draft_vocab]``).
    """
    R, H = hidden.shape
    k = head_weight.shape[0]
    Vd = lm_head_weight.shape[0] if draft_vocab is None else draft_vocab
    check_top_m(top_m, Vd)
    z = head_hidden(hidden, head_weight, head_bias)[:, 1:]  # [R, k, H]
    logits = linear(z.reshape(R * k, H), rows(lm_head_weight, Vd))
    ids, conf = _argmax_conf(logits)
    if top_m == 1:
        return ids.view(R, k), conf.view(R, k)
    top_ids, top_p = _top_m(logits, top_m)
    return ids.view(R, k), conf.view(R, k), top_ids.view(R, k, top_m), top_p.view(R, k, top_m)


def check_top_m(top_m, vocab: int) -> None:
    """``top_m`` must be an int in ``[1, min(8, vocab)]``; ``ValueError`` naming it otherwise."""
    if isinstance(top_m, bool) or not isinstance(top_m, int) or not 1 <= top_m <= min(8, vocab):
        raise ValueError(f"top_m={top_m!r} must be an int in [1, {min(8, vocab)}]")


def _top_m(logits: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of logits (input dtype) → their ``m`` largest, logit descending and lowest index first among
    equal logits, with softmax probabilities (fp32): ids ``[N, m]``, p ``[N, m]``.

    ``torch.topk`` does not define an order among ties, so it only finds the m-th largest value; every
    logit at or above it is a candidate (m of them unless ties straddle it), and a stable sort of the
    candidates, kept in index order, by value descending gives the rule.
    """
    lf = logits.float()
    kth = lf.topk(m, dim=-1).values[:, -1:]  # [N, 1]
    rows, cols = (lf >= kth).nonzero(as_tuple=True)  # row-major: ascending index within a row
    counts = torch.bincount(rows, minlength=lf.shape[0])
    width = max(m, int(counts.max()))  # a NaN row has no candidates (its ids are unspecified, as for argmax)
    slot = torch.arange(len(rows), device=lf.device) - (torch.cumsum(counts, 0) - counts)[rows]
    cand = torch.full((lf.shape[0], width), -1, dtype=torch.long, device=lf.device)
    cand[rows, slot] = cols
    vals = torch.where(cand >= 0, lf.gather(1, cand.clamp(min=0)), float("-inf"))
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices[:, :m]
    ids = cand.gather(1, order).clamp(min=0)
    p = torch.exp(lf.gather(1, ids) - torch.logsumexp(lf, dim=-1, keepdim=True))  # softmax at m ids only
    return ids, p


def _argmax_conf(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of logits (input dtype) → (argmax, lowest index on ties; max softmax probability, fp32).

    One max pass gives the argmax and, with one softmax pass, the confidence: 2 passes over the
    logits instead of 4 (argmax, amax, logsumexp, exp), which halved this step's elementwise cost
    on the 2-core CPU.
    """
    return logits.max(dim=-1).indices, torch.softmax(logits.float(), dim=-1).amax(dim=-1)


def commit_kv_span_(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    row_offsets: torch.Tensor,
    span_lengths: torch.Tensor,
) -> None:
    """Write each row's accepted K/V span into the static cache at that row's own offset.

    Mutates ``cache_k`` and ``cache_v`` only: for every layer ``l`` and row ``b``,
    ``cache[l, b, :, off_b : off_b + n_b] = new[l, b, :, :n_b]`` with ``off_b = row_offsets[b]`` and
    ``n_b = span_lengths[b]``. Rows with ``n_b == 0`` are untouched.

    Args:
        cache_k, cache_v: ``[L, B, KVH, max_len, D]`` (mutated).
        new_k, new_v: ``[L, B, KVH, T, D]``, the step's keys/values; only the first ``n_b`` of
            row ``b`` are written.
        row_offsets: ``[B]`` int, where each row's span starts (the row's current length).
        span_lengths: ``[B]`` int in ``[0, T]``.

    Raises:
        ValueError: a span would pass ``max_len`` or exceed ``T``.
    """
    max_len, T = cache_k.shape[3], new_k.shape[3]
    offs = row_offsets.tolist()
    lens = span_lengths.tolist()
    for b, (off, n) in enumerate(zip(offs, lens)):
        if n < 0 or n > T:
            raise ValueError(f"span_lengths[{b}]={n} is outside [0, {T}]")
        if off < 0 or off + n > max_len:
            raise ValueError(f"row {b}: span [{off}, {off + n}) passes the cache's max_len={max_len}")
    for b, (off, n) in enumerate(zip(offs, lens)):
        if n:
            cache_k[:, b, :, off : off + n] = new_k[:, b, :, :n]
            cache_v[:, b, :, off : off + n] = new_v[:, b, :, :n]
