"""transformers' logits processors at every verified tree node, each with its own prefix.

Each accepted tree node's full logit row goes through the processors with that node's own prefix (the
left-padded prompt row, the row's generated tokens, and the tree path down to the node — exactly what
transformers' ``generate`` would pass at that point). Processors must treat rows independently (transformers'
own do, except the batch-coupled ones that :mod:`clp_fast.hf` refuses); rows that share a prefix length go
through together.
"""

from __future__ import annotations

import copy

import torch

__all__ = ["sampling_processors", "process", "node_scorer", "pick"]


def sampling_processors(temperature: float | None = None, top_k: int | None = None, top_p: float | None = None):
    """transformers' warpers for the given settings, in its own order (temperature, top-k, top-p); None or a
    neutral value (1.0, 0) leaves one out. Returns a ``LogitsProcessorList``."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    procs = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    return procs


def process(procs, pre: torch.Tensor, plen: torch.Tensor, rows: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Processors over ``logits [R, V]`` (fp32) of ``rows [R]`` whose prefixes are ``pre[r, :plen[r]]``;
    rows sharing a prefix length go through together."""
    if not procs:
        return logits
    out = torch.empty_like(logits)
    lens = plen[rows]
    for L in lens.unique().tolist():
        sel = (lens == L).nonzero().flatten()
        ids, scores = pre[rows[sel], :L], logits[sel]
        for proc in procs:
            scores = _rows_view(proc, rows[sel])(ids, scores)
        out[sel] = scores
    return out


def _rows_view(proc, rows: torch.Tensor):
    """``proc`` narrowed to batch ``rows`` where it holds per-row state: transformers' repetition penalty keeps
    each row's left-padding length (``prompt_ignore_length [B]``, skipped when penalising) since 4.5x."""
    ignore = getattr(proc, "prompt_ignore_length", None)
    if isinstance(ignore, torch.Tensor) and ignore.dim() == 1:
        view = copy.copy(proc)
        view.prompt_ignore_length = ignore.to(rows.device)[rows]
        return view
    return proc


def node_scorer(procs, lm_head, tokens: torch.Tensor, n_fed: torch.Tensor, hidden: torch.Tensor, seq: torch.Tensor,
                 seq_len: torch.Tensor):
    """``scores_at(rows, i)`` for :func:`clp_fast.engine.sampling.walk_tree` over one step's tree ``tokens [B, T]``
    (row b's first ``n_fed[b]`` real) and its hidden states ``[B, T, H]``: node ``i``'s full logit row,
    processed with its prefix (the row's sequence ``seq[b, :seq_len[b]]`` then the accepted path down to
    ``i``, grown as the walk accepts).

    All real nodes' logit rows come from one LM-head call: on the CPU a row costs a read of the whole LM head
    (Qwen2.5-0.5B, 1 thread: ~47 ms per call whether it holds 1 row or 10), and the walk needs ~2 per step."""
    pre, plen = seq.clone(), seq_len.clone()
    real = torch.arange(tokens.shape[1], device=tokens.device)[None] < n_fed[:, None]  # [B, T]
    where = torch.full(tokens.shape, -1, dtype=torch.long, device=tokens.device)
    where[real] = torch.arange(int(real.sum()), device=tokens.device)
    logits = lm_head(hidden[real])  # [N, V] in the model's dtype, as transformers computes them

    def scores_at(rows: torch.Tensor, i: int) -> torch.Tensor:
        pre[rows, plen[rows]] = tokens[rows, i]
        plen[rows] += 1
        return process(procs, pre, plen, rows, logits[where[rows, i]].float())

    return scores_at


def pick(scores: torch.Tensor, do_sample: bool, generator) -> torch.Tensor:
    """One token per row of processed ``scores [R, V]``: a draw from their softmax, or the argmax."""
    if do_sample:
        return torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(1)
    return scores.argmax(-1)
