"""Lossless acceptance over a draft tree: the pure-PyTorch rule, greedy and sampled.

Every draft is a point mass (a guessed token, no draft distribution), so speculative sampling
reduces to one rule per tree node, applied from the root down (SpecInfer's multi-candidate rule
with deterministic drafts):

- let ``p`` be the processed target distribution after the current node;
- visit the node's children in index order; accept child ``x`` with probability ``p(x)``;
- on rejection set ``p(x) = 0`` and renormalise before trying the next child;
- if every child is rejected, the next token is sampled from what is left of ``p``;
- if a child is accepted it becomes the current node (a fresh ``p``); at a leaf the next token
  is sampled from its ``p`` as usual.

Why this is exact: the first child ``x`` is emitted with probability ``p(x)``; given it was
rejected, the next candidate sees ``p`` conditioned on "not x", and so on, so the emitted token
is always a draw from ``p``. Greedy is the same walk with "accept iff ``x`` is the argmax".
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["accept_draft", "walk_tree"]


def accept_draft(p_x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Accept a point-mass draft ``x`` whose target probability is ``p_x [R]``, given uniforms ``u [R]``
    in ``[0, 1)``: ``min(1, p(x) / q(x))`` with ``q(x) = 1``. Returns ``[R]`` bool."""
    return u < p_x


def walk_tree(tokens: torch.Tensor, parent: torch.Tensor, n_fed: torch.Tensor,
              scores_at: Callable[[torch.Tensor, int], torch.Tensor], *, do_sample: bool,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk each row's draft tree from its root; return the deepest accepted node and the next token.

    Args:
        tokens: ``[B, T]`` node tokens (node 0 = the root, already accepted); parents precede children.
        parent: ``[B, T]`` parent index of each node (node 0: unused).
        n_fed: ``[B]`` real nodes per row; rows with 0 are skipped (their outputs are 0).
        scores_at: ``scores_at(rows [R], i)`` → ``[R, V]`` float32 processed scores after node ``i`` of
            those rows (logits processors already applied with the node's own prefix). Called exactly
            once per accepted node, in root-to-leaf order, so it may extend a per-row prefix.
        do_sample: sample (the rule above) or greedy (accept iff the token is the argmax).
        generator: the random source for uniforms and the final draw (None: torch's global one).

    Returns:
        ``best [B]`` the deepest accepted node of each row and ``next_token [B]`` drawn after it.
    """
    B, T = tokens.shape
    dev = tokens.device
    live = n_fed > 0
    rows = live.nonzero().flatten()
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    nxt = torch.zeros(B, dtype=torch.long, device=dev)
    if rows.numel() == 0:
        return cur, nxt
    first = scores_at(rows, 0)
    V = first.shape[-1]
    if do_sample:
        p = torch.zeros((B, V), dtype=torch.float32, device=dev)  # current (residual) distribution per row
        p[rows] = torch.softmax(first.float(), -1)
    else:
        top = torch.zeros(B, dtype=torch.long, device=dev)  # argmax after the current node
        top[rows] = first.argmax(-1)
    for i in range(1, T):
        cand = live & (i < n_fed) & (parent[:, i] == cur)  # children of each row's current node
        if not bool(cand.any()):
            continue
        r = cand.nonzero().flatten()
        tok = tokens[r, i]
        if do_sample:
            u = torch.rand(r.numel(), generator=generator, device=dev)
            acc = accept_draft(p[r, tok], u)
            rej = r[~acc]
            if rej.numel():
                p[rej, tokens[rej, i]] = 0.0
                p[rej] /= p[rej].sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        else:
            acc = tok == top[r]
        ra = r[acc]
        if ra.numel():
            cur[ra] = i
            s = scores_at(ra, i)
            if do_sample:
                p[ra] = torch.softmax(s.float(), -1)
            else:
                top[ra] = s.argmax(-1)
    if do_sample:
        nxt[rows] = torch.multinomial(p[rows], 1, generator=generator).squeeze(1)
    else:
        nxt[rows] = top[rows]
    return cur, nxt
