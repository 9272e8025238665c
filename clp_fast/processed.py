"""Decoding from *processed* distributions: logits processors, stopping criteria, sampling, streaming.

The same engine as :mod:`clp_fast.decode` (prefill → draft tree → one verifying forward → commit),
but each accepted tree node's full logit row goes through the logits processors with that node's
own prefix (the left-padded prompt row, the row's generated tokens, and the tree path down to the
node — exactly what transformers' ``generate`` would pass at that point), and acceptance follows
:func:`clp_fast.sampling.walk_tree`: greedy (accept iff argmax) or lossless speculative sampling.
Stopping criteria are checked after every kept token, as transformers does after each step.

Logits processors and stopping criteria must treat rows independently (transformers' own do, except
the batch-coupled ones that :mod:`clp_fast.hf` refuses); processors run once per accepted node, on
the rows that share a prefix length; stopping criteria get ``scores=None``.
"""

from __future__ import annotations

import copy
import time

import torch

from clp_fast import backend, streaming
from clp_fast.decode import (
    MAX_STEP_TOKENS,
    TREE_MAX_GUESSES,
    DecodeStats,
    _append,
    _chain_tree,
    _check_inputs,
    _count_accepts,
    _draft,
    _lossless_tree,
    _start,
    _Step,
    _tree_setup,
)
from clp_fast.heads import MTPHeads
from clp_fast.model import NativeBackbone
from clp_fast.sampling import walk_tree
from clp_fast.tree import FED_TOKEN_COST, _topm_tree

__all__ = ["PROCESSED_MODES", "generate_processed", "sampling_processors"]

PROCESSED_MODES = ("greedy", "lossless")


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


def _process(procs, pre: torch.Tensor, plen: torch.Tensor, rows: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
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


def _node_scorer(procs, lm_head, tokens: torch.Tensor, n_fed: torch.Tensor, hidden: torch.Tensor, seq: torch.Tensor,
                 seq_len: torch.Tensor):
    """``scores_at(rows, i)`` for :func:`clp_fast.sampling.walk_tree` over one step's tree ``tokens [B, T]``
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
        return _process(procs, pre, plen, rows, logits[where[rows, i]].float())

    return scores_at


def _pick(scores: torch.Tensor, do_sample: bool, generator) -> torch.Tensor:
    """One token per row of processed ``scores [R, V]``: a draw from their softmax, or the argmax."""
    if do_sample:
        return torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(1)
    return scores.argmax(-1)


def _keep(path: torch.Tensor, n_path: torch.Tensor, remaining: torch.Tensor, eos, criteria, seq: torch.Tensor,
          seq_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How many of each row's path tokens ``path [B, T]`` (first ``n_path[b]`` real) are kept, and whether
    the row stops: cut at the budget, just after the first EOS, and just after the first token at which a
    stopping criterion fires (checked on the row's full sequence so far). Writes the kept tokens into
    ``seq`` after ``seq_len`` (not advanced). Returns (count ``[B]``, stopped ``[B]`` bool)."""
    B, T = path.shape
    count = torch.minimum(n_path, remaining)
    stopped = (n_path > 0) & (n_path >= remaining)
    if eos is not None:
        j = torch.arange(T, device=path.device)[None]
        is_eos = torch.isin(path, eos) & (j < count[:, None])
        first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full_like(count, T))
        count = torch.minimum(count, first + 1)
        stopped |= is_eos.any(-1)
    _append(seq, seq_len.clone(), path, count)
    if criteria:
        for j in range(int(count.max())):
            rows = (j < count).nonzero().flatten()
            lens = seq_len[rows] + j + 1
            for L in lens.unique().tolist():
                r = rows[lens == L]
                fire = torch.zeros(r.numel(), dtype=torch.bool, device=path.device)
                for crit in criteria:
                    fire |= crit(seq[r, :L], None).to(fire.device)
                count[r[fire]] = j + 1
                stopped[r[fire]] = True
    return count, stopped


@torch.inference_mode()
def generate_processed(
    model,
    input_ids: torch.Tensor,
    heads: MTPHeads | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int,
    mode: str = "lossless",
    logits_processor=None,
    stopping_criteria=None,
    do_sample: bool = False,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    streamer=None,
    prompt_lookup: int | None = None,
    max_step_tokens: int | None = MAX_STEP_TOKENS,
    return_stats: bool = False,
):
    """Greedy or lossless-sampled decoding of a left-padded batch through logits processors.

    Args mirror :func:`clp_fast.generate`, plus:
        logits_processor: callables ``(input_ids [R, L], scores [R, V]) -> scores`` (a transformers
            ``LogitsProcessorList`` — temperature / top-k / top-p warpers included — or a list), applied
            at every accepted tree node with its own prefix ``L`` tokens (left padding included).
        stopping_criteria: callables ``(input_ids [R, L], None) -> [R] bool``, checked after each token.
        do_sample: draw from the processed distribution (lossless speculative sampling, see
            :mod:`clp_fast.sampling`) instead of taking its argmax.
        generator: the ``torch.Generator`` for every random draw (None: torch's global RNG, so
            ``torch.manual_seed`` makes runs repeatable).
        streamer: batch 1 only: ``put(prompt)``, then one ``put`` per step with the kept tokens, then
            ``end()`` (also when decoding raises, so a consumer never waits forever).
        mode: ``"greedy"`` or ``"lossless"`` (``"clp"`` accepts guesses unverified: not lossless).

    Returns:
        ``[B, P + G]`` int64 like :func:`clp_fast.generate`; with ``return_stats`` ``(ids, DecodeStats)``.
    """
    t0 = time.perf_counter()
    if mode not in PROCESSED_MODES:
        raise ValueError(f"mode={mode!r} is not one of {PROCESSED_MODES}: sampling, logits processors and stopping "
                         f"criteria need verified guesses (mode 'clp' accepts them unverified)")
    if heads is not None and not isinstance(heads, MTPHeads):
        raise TypeError(f"heads must be MTPHeads or None, got {type(heads).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    bb = NativeBackbone(model)
    if heads is None and mode == "lossless":
        from clp_fast.assets import default_heads_for

        heads = default_heads_for(model)
    if mode == "greedy":
        heads = None
    threshold = heads.thresholds.get("lossless", 0.0) if heads is not None else 0.5
    if prompt_lookup is None:
        prompt_lookup = max(heads.k, 6) if heads is not None else 0
    _check_inputs(model, bb, heads, input_ids, attention_mask, max_new_tokens, mode, "clp", threshold, prompt_lookup,
                  max_step_tokens)
    streaming.check_streamer(streamer, input_ids.shape[0])
    calib, top_m = _tree_setup(heads, mode, None)  # top-m trees where the heads carry a tree calibration
    procs, criteria = list(logits_processor or []), list(stopping_criteria or [])

    dev = input_ids.device
    B, P = input_ids.shape
    width = max(heads.k if heads is not None else 0, prompt_lookup)
    prompts, prompt_len, eos, pad_token_id, cache = _start(model, bb, input_ids, attention_mask, max_new_tokens,
                                                           width, eos_token_id, pad_token_id, None)
    lm_head = model.get_output_embeddings() if bb.step is None else bb.step.lm_head  # the packed one on CPU/bf16
    # seq: what transformers' processors and criteria would see: the padded prompt row, then the new tokens.
    seq = torch.full((B, P + max_new_tokens + width + 2), pad_token_id, dtype=torch.long, device=dev)
    seq[:, :P] = input_ids
    seq_len = torch.full((B,), P, dtype=torch.long, device=dev)
    out = torch.full((B, max_new_tokens + width + 1), pad_token_id, dtype=torch.long, device=dev)
    produced = torch.zeros(B, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    contexts = [prompts[b, : int(prompt_len[b])].tolist() for b in range(B)] if prompt_lookup else []
    stats = DecodeStats(mode=mode, accept_hist=[0] * (width + 1), forward_passes=1)
    row_forwards = torch.ones(B, dtype=torch.long, device=dev)

    streaming.put_prompt(streamer, input_ids)
    try:
        # prefill: the prompts from slot 0, the first token from the last prompt position
        hidden, new_k, new_v = bb.forward(prompts, cache, prompt_len)  # [B, P, H]
        backend.commit_kv_span_(cache.k, cache.v, new_k, new_v, cache.lengths, prompt_len)
        cache.lengths += prompt_len
        last = hidden[rows, prompt_len - 1]  # [B, H]
        first = _process(procs, seq, seq_len, rows, lm_head(last).float())
        step = _next_step(bb, heads, last, _pick(first, do_sample, generator), mode, threshold, top_m)

        while not bool(done.all()):
            remaining = max_new_tokens - produced
            # A row whose pending token is its last (budget, EOS) finishes without another forward.
            last_tok = ~done & (remaining <= 1)
            if eos is not None:
                last_tok |= ~done & torch.isin(step.pending, eos)
            if bool(last_tok.any()):
                cnt, _ = _keep(step.pending[:, None], last_tok.long(), remaining, eos, criteria, seq, seq_len)
                _commit_tokens(out, produced, seq_len, step.pending[:, None], cnt, streamer)
                done |= last_tok
                if bool(done.all()):
                    break
            active = ~done
            if mode == "lossless":
                max_guesses = (remaining - 1).clamp(min=0)
                if max_step_tokens:
                    max_guesses = max_guesses.clamp(max=max(1, max_step_tokens // int(active.sum()) - 1))
                if top_m > 1:
                    tree = _topm_tree(step, contexts, prompt_lookup, max_guesses.clamp(max=TREE_MAX_GUESSES), active,
                                      calib, FED_TOKEN_COST, dev)
                else:
                    tree = _lossless_tree(step, contexts, prompt_lookup, max_guesses, active, dev)
            else:
                tree = _chain_tree(step, torch.zeros_like(produced), active, dev)
            hidden, new_k, new_v = bb.decode_step(tree.tokens, cache, tree.n_fed, tree.depth, tree.anc)  # [B, T, H]
            stats.forward_passes += 1
            row_forwards += active.long()
            scores_at = _node_scorer(procs, lm_head, tree.tokens, tree.n_fed, hidden, seq, seq_len)
            best, nxt = walk_tree(tree.tokens, tree.parent, tree.n_fed, scores_at, do_sample=do_sample,
                                  generator=generator)
            m = tree.depth[rows, best]  # guesses accepted
            stats.drafted += int((tree.n_fed - 1).clamp(min=0).sum())
            _count_accepts(stats, torch.where(active, m, -1))
            on_path = tree.anc[rows, best]  # [B, T] the accepted path, root first after the sort
            path_order = torch.sort((~on_path).to(torch.uint8), dim=1, stable=True).indices
            path = tree.tokens.gather(1, path_order)
            cnt, stopped = _keep(path, torch.where(active, 1 + m, 0), remaining, eos, criteria, seq, seq_len)
            sel = path_order[None, :, None, :, None]
            backend.commit_kv_span_(cache.k, cache.v, torch.take_along_dim(new_k, sel, dim=3),
                                    torch.take_along_dim(new_v, sel, dim=3), cache.lengths, cnt)
            cache.lengths += cnt
            _commit_tokens(out, produced, seq_len, path, cnt, streamer)
            done |= (stopped & active) | (produced >= max_new_tokens)
            step = _next_step(bb, heads, hidden[rows, best], nxt, mode, threshold, top_m)
            if prompt_lookup:
                for b, c in enumerate(cnt.tolist()):
                    contexts[b] += path[b, :c].tolist()
    finally:
        streaming.end(streamer)

    gen = int(produced.max())
    result = torch.cat([input_ids.long(), out[:, :gen]], dim=1)
    stats.new_tokens = produced.tolist()
    stats.row_forwards = row_forwards.tolist()
    stats.wall_time_s = time.perf_counter() - t0
    return (result, stats) if return_stats else result


def _next_step(bb: NativeBackbone, heads: MTPHeads | None, hidden: torch.Tensor, pending: torch.Tensor, mode: str,
               threshold: float, top_m: int = 1) -> _Step:
    """The chosen next tokens ``pending [B]`` and the heads' guesses from ``hidden [B, H]`` (none in greedy);
    with ``top_m > 1`` also each head's top-m candidates for a top-m tree."""
    if heads is None:
        empty = pending.new_zeros((pending.shape[0], 0))
        return _Step(pending, empty, torch.zeros_like(pending))
    ids, _, n, *top = _draft(bb, heads, hidden, mode, "clp", threshold, top_m)
    return _Step(pending, ids[:, 1:], n, *top)


def _commit_tokens(out, produced, seq_len, fed, cnt, streamer) -> None:
    """Append each row's first ``cnt[b]`` tokens of ``fed [B, T]`` to ``out``; advance ``produced`` and
    ``seq_len`` (the tokens are already in ``seq``); stream them."""
    _append(out, produced, fed, cnt)
    seq_len += cnt
    streaming.put_tokens(streamer, fed, cnt)
