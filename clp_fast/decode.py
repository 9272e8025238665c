"""The decode loop: prefill → draft (fused heads) → verify → commit, on a static per-row KV cache.

Each step feeds every row a small **draft tree** rooted at its pending token ``p_b`` (the
backbone's own next token, always right): in ``lossless`` mode the heads' guesses form one
branch and prompt-lookup guesses (:mod:`clp_fast.lookup`) another, merged where they agree, so
one forward verifies both; in ``clp`` mode the tree is the heads' chain. Attention follows the
tree (a node sees the cache and its own ancestors) and each node sits at position
``len_b + depth``. Each row then keeps its deepest accepted path (ragged acceptance) and
commits exactly that path's K/V at its own offset; nothing else enters the cache.

- ``greedy``: the tree is ``p_b`` alone — one token per forward (the baseline, same engine).
- ``lossless``: a node is accepted iff its token equals the backbone's argmax at its parent and
  its parent is accepted — by construction the output is greedy decoding's.
- ``clp``: the policy's guesses are accepted unverified (the paper's mode).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from clp_fast import backend, streaming
from clp_fast.cost import StepCost, step_cost
from clp_fast.heads import MTPHeads
from clp_fast.model import NativeBackbone, StaticKVCache
from clp_fast.prepare import MODES, POLICIES, _check_inputs, _start, _tree_setup  # noqa: F401
from clp_fast.speculation import SOURCES, HeadsWorth, RowAcceptance, SpeculationWorth, select_nodes
from clp_fast.tree import (  # noqa: F401
    FED_TOKEN_COST,
    TreeCalibration,
    _chain_tree,
    _lossless_tree,
    _lossless_tries,
    _make_tree,
    _topm_tree,
    _Tree,
)

__all__ = ["MODES", "SPECULATION", "DecodeStats", "generate", "left_pad"]

# Lossless mode: "adaptive" feeds, each step, the guesses whose expected return beats their measured cost
# (clp_fast.speculation, clp_fast.cost); "fixed" feeds every drafted guess up to max_step_tokens.
SPECULATION = ("adaptive", "fixed")
# Default prompt-lookup width in lossless mode. Qwen2.5-Coder-0.5B, 4 HumanEval prompts x 128 tokens, bf16,
# 2 threads: k = 2 heads with lookup width 2 -> tau 1.51, 1.39x our greedy; width 6 -> tau 1.68, 1.43x;
# width 10 gains ~0.03 tau more while every extra fed token costs ~1.5 % of a step.
LOOKUP_WIDTH = 6
# Default cap on tokens fed per forward in lossless mode, over the whole batch; every row keeps at least one guess
# (see generate()). Verifying is nearly free while a forward is memory-bound; on the 2-core CPU it stops being so
# past ~10 fed tokens, mostly in the LM head (each fed token is a full-vocabulary logit row plus k draft rows).
# Qwen2.5-Coder-0.5B, k = 2, bf16, 2 threads, HumanEval, lossless tok/s over transformers' batched greedy
# (bench/sweep_step_cap.py, 2 batches of 64 / 48 / 32 tokens at B = 4 / 8 / 16, +-10 % noise):
# B = 4: 1 guess per row 1.16x, 2: 1.08x, 3: 1.03x, 7: 0.90x, 0: 0.86x; B = 8: 1 guess 1.20x, 2: 1.10x,
# 0: 1.05x; B = 16: 1 guess 0.95x, 0: 0.89x. B = 1 stays uncapped.
MAX_STEP_TOKENS = 10
# Tree mode (tree_top_m > 1): at most this many guesses per row per step; the cost rule in clp_fast.tree usually
# stops well before it.
TREE_MAX_GUESSES = 16


@dataclass
class DecodeStats:
    """What one :func:`generate` call did.

    ``tau`` is the mean number of tokens emitted per forward pass (EAGLE's "+1" convention:
    greedy gives 1.0), averaged over rows; forward passes include the prefill, which produces the
    first token.
    """

    mode: str
    forward_passes: int = 0
    new_tokens: list[int] = field(default_factory=list)
    row_forwards: list[int] = field(default_factory=list)
    accept_hist: list[int] = field(default_factory=list)  # accept_hist[m]: steps where a row took m guesses
    drafted: int = 0  # guesses sent to verification (lossless) or taken (clp)
    fed_tokens: int = 0  # tokens fed by the decode steps (prefill excluded), over all rows
    wall_time_s: float = 0.0
    cost_model: dict | None = None  # adaptive speculation: the step-cost points used (after this call's updates)

    @property
    def tau(self) -> float:
        per_row = [n / f for n, f in zip(self.new_tokens, self.row_forwards) if f]
        return sum(per_row) / len(per_row) if per_row else 0.0

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "forward_passes": self.forward_passes,
            "new_tokens": self.new_tokens,
            "tau": self.tau,
            "accept_hist": self.accept_hist,
            "drafted": self.drafted,
            "fed_tokens": self.fed_tokens,
            "wall_time_s": self.wall_time_s,
            "tokens_per_s": sum(self.new_tokens) / self.wall_time_s if self.wall_time_s > 0 else 0.0,
        }


@dataclass
class _Step:
    """Per-row state between forwards (all ``[B]`` or ``[B, k]``)."""

    pending: torch.Tensor  # [B] the backbone's next token, not yet in the cache
    drafts: torch.Tensor  # [B, k] head guesses following ``pending``
    n_drafts: torch.Tensor  # [B] how many of them the policy takes
    top_ids: torch.Tensor | None = None  # [B, k, m] each head's m best candidates (tree mode)
    top_p: torch.Tensor | None = None  # [B, k, m] their probabilities
    conf: torch.Tensor | None = None  # [B, k] the heads' confidences (adaptive speculation's priors)


# ------------------------------------------------------------------------------------------ steps
def _draft(bb: NativeBackbone, heads: MTPHeads | None, hidden: torch.Tensor, mode: str, policy: str,
           threshold: float, top_m: int = 1, backbone: tuple[torch.Tensor, torch.Tensor] | None = None
           ) -> tuple[torch.Tensor, ...]:
    """Fused heads over ``hidden [R, H]`` → ids ``[R, k + 1]``, conf ``[R, k + 1]``, n ``[R]``; with
    ``top_m > 1`` also each head's top-m ids and probabilities ``[R, k, m]``.

    Column 0 of ids is the backbone's next token; n is the number of head guesses the policy
    takes (0 in greedy mode). ``backbone = (ids [R], conf [R])``: that column is already known (computed
    when the rows were verified), so only the head rows are computed (:meth:`MTPHeads.head_rows`).
    """
    if backbone is not None and heads is not None and mode != "greedy":
        ids_h, conf_h, n, *top = heads.head_rows(hidden, bb.lm_head_weight, threshold,
                                                 policy=policy if policy in ("clp", "gate") else None, top_m=top_m)
        return (torch.cat([backbone[0][:, None], ids_h], 1), torch.cat([backbone[1][:, None], conf_h], 1), n, *top)
    if heads is None or mode == "greedy":
        ids, conf, _ = backend.fused_heads(hidden, bb.no_heads[0], bb.no_heads[1], bb.lm_head_weight)
        return ids, conf, torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    use_clp = policy == "clp"
    ids, conf, n, *top = heads.fused(hidden, bb.lm_head_weight, threshold, with_clp=use_clp, top_m=top_m)
    if not use_clp:
        n = heads.gate.accept_lengths(hidden, conf[:, 1:], threshold)
    return (ids, conf, n, *top)


def _draft_fed(bb: NativeBackbone, heads: MTPHeads | None, hidden: torch.Tensor, n_fed: torch.Tensor, mode: str,
               policy: str, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_draft` after a step that fed ``n_fed[b]`` real tokens to row ``b`` (``hidden [B, T, H]``).

    Only real positions go through the LM head: in a ragged batch a row fed fewer tokens than the
    longest (or none, once finished) would otherwise pay ``k + 1`` logit rows per padding slot. Returns
    ids and confidences ``[B, T, k + 1]`` and accept lengths ``[B, T]``; padding positions hold 0 (never read: a row
    accepts at most ``n_fed[b] - 1`` guesses and drafts from the position after its last accepted one).
    """
    B, T, H = hidden.shape
    real = torch.arange(T, device=hidden.device)[None] < n_fed[:, None]  # [B, T]
    if bool(real.all()):
        ids, conf, n = _draft(bb, heads, hidden.reshape(B * T, H), mode, policy, threshold)
        return ids.view(B, T, -1), conf.view(B, T, -1), n.view(B, T)
    ids_r, conf_r, n_r = _draft(bb, heads, hidden[real], mode, policy, threshold)
    ids = ids_r.new_zeros((B, T, ids_r.shape[1]))
    conf = conf_r.new_zeros((B, T, conf_r.shape[1]))
    n = n_r.new_zeros((B, T))
    ids[real], conf[real], n[real] = ids_r, conf_r, n_r
    return ids, conf, n


def _prefill(bb: NativeBackbone, cache: StaticKVCache, prompts: torch.Tensor, prompt_len: torch.Tensor,
             heads, mode, policy, threshold, top_m: int = 1) -> _Step:
    """Run the unpadded prompts ``[B, P]`` (row b real for its first ``prompt_len[b]``), commit them
    from slot 0, and draft from each row's last prompt position."""
    hidden, new_k, new_v = bb.forward(prompts, cache, prompt_len)  # [B, P, H]
    backend.commit_kv_span_(cache.k, cache.v, new_k, new_v, cache.lengths, prompt_len)
    cache.lengths += prompt_len
    last = hidden[torch.arange(prompts.shape[0], device=prompts.device), prompt_len - 1]  # [B, H]
    ids, conf, n, *top = _draft(bb, heads, last, mode, policy, threshold, top_m)
    return _Step(ids[:, 0], ids[:, 1:], n, *top, conf=conf[:, 1:])


def _verify(ids: torch.Tensor, tree: _Tree, mode: str) -> torch.Tensor:
    """Each row's deepest accepted node ``[B]``.

    ``ids [B, T, k + 1]``: column 0 is the backbone's argmax after each fed node. Lossless accepts a
    node when every node on its path (itself included) equals the argmax at its parent; the deepest
    such node wins (lowest index on ties). clp takes the whole chain.
    """
    B, T = tree.tokens.shape
    real = torch.arange(T, device=ids.device)[None] < tree.n_fed[:, None]
    if mode != "lossless":
        return (tree.n_fed - 1).clamp(min=0)  # a chain: its last node
    ok = tree.tokens == ids[..., 0].gather(1, tree.parent)
    ok[:, 0] = True
    ok &= real
    accepted = ~(tree.anc & ~ok[:, None, :]).any(-1) & real  # [B, T]
    return torch.where(accepted, tree.depth, -1).argmax(-1)


def _emit(fed: torch.Tensor, n_fed: torch.Tensor, remaining: torch.Tensor, eos: torch.Tensor | None):
    """How many of the fed tokens ``fed [B, T]`` each row keeps: its first ``n_fed[b]``, cut to the
    token budget and just after the first EOS. Returns (count ``[B]``, hit_eos ``[B]`` bool)."""
    T = fed.shape[1]
    count = torch.minimum(n_fed, remaining)
    if eos is None:
        return count, torch.zeros_like(count, dtype=torch.bool)
    is_eos = torch.isin(fed, eos) & (torch.arange(T, device=fed.device)[None] < count[:, None])
    first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full_like(count, T))
    return torch.minimum(count, first + 1), is_eos.any(-1)


# ------------------------------------------------------------------------------------- generate
def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists → left-padded ``(input_ids [B, P], attention_mask [B, P])``, as
    :func:`generate` and transformers' ``generate`` expect them."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError(f"empty prompt: row lengths {[len(r) for r in rows]}")
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, P - len(r):] = 1
    return ids, mask


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    heads: MTPHeads | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int,
    mode: str = "lossless",
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    clp_threshold: float | None = None,
    policy: str = "clp",
    prompt_lookup: int | None = None,
    max_step_tokens: int | None = None,
    return_stats: bool = False,
    max_cache_bytes: int | None = None,
    streamer=None,
    tree_top_m: int | None = None,
    speculation: str = "adaptive",
    cost_model: StepCost | None = None,
):
    """Decode ``max_new_tokens`` tokens for each row of a (left-padded) batch.

    Args:
        model: a loaded Qwen2 / Llama causal LM (transformers); it is used, not copied.
        input_ids: ``[B, P]`` int64 prompt ids, left-padded like transformers' ``generate``.
        heads: trained :class:`MTPHeads` for this backbone (None → the shipped heads for a known
            backbone in non-greedy modes, else an error).
        attention_mask: ``[B, P]`` of 0/1 (1 = real token); None = all real.
        max_new_tokens: per-row budget, > 0.
        mode: ``"greedy"``, ``"lossless"`` or ``"clp"``.
        eos_token_id: int or list; None → the model's generation config. A row stops after EOS.
        pad_token_id: fills finished rows; None → the generation config's pad, else EOS, else 0.
        clp_threshold: acceptance probability; None → the heads' saved threshold for the mode.
        policy: ``"clp"`` (the CLP linear layer) or ``"gate"`` (the ~1M-parameter baseline).
        prompt_lookup: lossless mode only: up to this many guesses copied from the context where
            its last tokens occurred before (:mod:`clp_fast.lookup`), offered beside the heads'
            guesses; 0 disables; None → ``max(k, LOOKUP_WIDTH)`` in lossless mode, else 0.
        max_step_tokens: lossless mode: cap on the tokens one forward feeds over all unfinished rows; None or
            0 = no cap. With ``speculation="fixed"`` each row gets ``max(1, max_step_tokens // rows - 1)``
            guesses at most (:data:`MAX_STEP_TOKENS` is the measured choice for the 2-core CPU); with
            ``"adaptive"`` it bounds what the cost model may choose. Only speed changes, never the output.
        speculation: lossless mode: ``"adaptive"`` (default) feeds each step the guesses, over all rows, that
            raise the batch's expected tokens per second given the measured cost of a forward here
            (:mod:`clp_fast.speculation`): a compute-bound batch falls back to one token per row and speculates
            again as rows finish; ``"fixed"`` feeds every guess the CLP takes, up to ``max_step_tokens``.
        cost_model: adaptive speculation's forward cost (:class:`clp_fast.cost.StepCost`); None → measured
            once per model on this machine (a few forwards, cached in the process and on disk) and refined
            from this call's own steps.
        return_stats: also return a :class:`DecodeStats`.
        max_cache_bytes: refuse (:class:`clp_fast.memory.CacheTooLargeError`) a static KV cache larger than this;
            one larger than the memory available on the device is always refused, before it is allocated.
        tree_top_m: lossless mode: draft trees over each head's ``tree_top_m`` best candidates, nodes chosen
            by calibrated expected acceptance (:mod:`clp_fast.tree`; needs heads with a tree calibration);
            1 = the heads' argmax chain beside the lookup branch; None → the heads' calibrated m where their
            calibration makes trees the default (measured per head set), else 1.
        streamer: batch 1 only: ``put(prompt)``, one ``put`` per step with the kept tokens, ``end()``
            (transformers' protocol; see :mod:`clp_fast.streaming`).

    Returns:
        ``[B, P + G]`` int64: the input followed by up to G generated tokens per row, finished
        rows padded with ``pad_token_id`` (the shape transformers' ``generate`` returns); with
        ``return_stats`` a tuple ``(ids, stats)``.
    """
    t0 = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if heads is not None and not isinstance(heads, MTPHeads):
        raise TypeError(f"heads must be MTPHeads or None, got {type(heads).__name__}")
    bb = NativeBackbone(model)
    if heads is None and mode != "greedy":
        from clp_fast.assets import default_heads_for

        heads = default_heads_for(model)
    if heads is not None and policy == "gate":
        default_t = heads.thresholds.get("gate", 0.9)
    else:
        default_t = heads.thresholds.get(mode, 0.9) if heads is not None and mode != "greedy" else 0.5
    threshold = default_t if clp_threshold is None else clp_threshold
    if prompt_lookup is None:
        prompt_lookup = max(heads.k, LOOKUP_WIDTH) if (mode == "lossless" and heads is not None) else 0
    _check_inputs(model, bb, heads, input_ids, attention_mask, max_new_tokens, mode, policy, threshold, prompt_lookup,
                  max_step_tokens)
    if speculation not in SPECULATION:
        raise ValueError(f"speculation={speculation!r} is not one of {SPECULATION}")
    if cost_model is not None and not isinstance(cost_model, StepCost):
        raise TypeError(f"cost_model must be a clp_fast.cost.StepCost or None, got {type(cost_model).__name__}")
    streaming.check_streamer(streamer, input_ids.shape[0])
    calib, top_m = _tree_setup(heads, mode, tree_top_m)

    dev = input_ids.device
    B, P = input_ids.shape
    k = heads.k if (heads is not None and mode != "greedy") else 0
    width = max(k, prompt_lookup)  # the most guesses one row can feed in a step
    prompts, prompt_len, eos, pad_token_id, cache = _start(model, bb, input_ids, attention_mask, max_new_tokens,
                                                           width, eos_token_id, pad_token_id, max_cache_bytes)
    stats = DecodeStats(mode=mode, accept_hist=[0] * (width + 1))

    adaptive = mode == "lossless" and speculation == "adaptive" and top_m == 1
    if adaptive:
        cost = cost_model if cost_model is not None else step_cost(bb)
        spec_calib = heads.tree_calibration or TreeCalibration.uncalibrated(heads.k)
        acceptance, heads_worth, step_has_heads = RowAcceptance(B), HeadsWorth(), True
        # The cost model was measured on one row: it prices a single row right, a ragged batch not always. A fixed
        # model (tests) decides alone.
        spec_worth = SpeculationWorth(enabled=cost.learn and B > 1)
    streaming.put_prompt(streamer, input_ids)
    step = _prefill(bb, cache, prompts, prompt_len, heads, mode, policy, threshold, top_m)
    contexts = [prompts[b, : int(prompt_len[b])].tolist() for b in range(B)] if prompt_lookup else []
    stats.forward_passes = 1
    row_forwards = torch.ones(B, dtype=torch.long, device=dev)
    out = torch.full((B, max_new_tokens + width + 1), pad_token_id, dtype=torch.long, device=dev)
    produced = torch.zeros(B, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)

    while not bool(done.all()):
        remaining = max_new_tokens - produced
        # A row whose whole remaining output is already known needs no forward: greedy and
        # lossless at its last token or when the pending token is EOS; clp when its pending
        # token and guesses fill the budget or hold an EOS.
        n_known = torch.where(done, 0, torch.minimum(step.n_drafts, (remaining - 1).clamp(min=0)))
        if mode != "clp":
            n_known = torch.zeros_like(n_known)
        chain = torch.cat([step.pending[:, None], step.drafts], dim=1)[:, : 1 + int(n_known.max())]
        known = remaining <= 1 + n_known
        if eos is not None:
            j = torch.arange(chain.shape[1], device=dev)[None]
            known |= (torch.isin(chain, eos) & (j <= n_known[:, None])).any(-1)
        finishing = known & ~done
        if bool(finishing.any()):
            cnt, _ = _emit(chain, torch.where(finishing, 1 + n_known, 0), remaining, eos)
            _append(out, produced, chain, cnt)
            streaming.put_tokens(streamer, chain, cnt)
            if mode == "clp":
                _count_accepts(stats, torch.where(finishing, n_known, -1))
            done |= finishing
            if bool(done.all()):
                break
        active = ~done
        t_step = time.perf_counter()
        if mode == "lossless":
            max_guesses = (remaining - 1).clamp(min=0)
            if max_step_tokens and not adaptive:  # fewer guesses keep the output; in clp mode they would change it
                max_guesses = max_guesses.clamp(max=max(1, max_step_tokens // int(active.sum()) - 1))
            if adaptive:
                if spec_worth.want():
                    tries = _lossless_tries(step, contexts, prompt_lookup, max_guesses, active, spec_calib,
                                            all_heads=step_has_heads)
                    chosen, choice = select_nodes(tries, acceptance.factors(), cost, max_step_tokens or None)
                    tree = _make_tree(chosen, dev)
                    if step_has_heads:
                        heads_worth.observe_gain(choice["by_source"][SOURCES.index("heads")], choice["expected"])
                else:  # greedy is faster at this batch (SpeculationWorth): the pending tokens alone
                    tree = _make_tree([([p], [-1], [1.0], [-1]) if live else ([], [], [], [])
                                       for p, live in zip(step.pending.tolist(), active.tolist())], dev)
            elif top_m > 1:
                tree = _topm_tree(step, contexts, prompt_lookup, max_guesses.clamp(max=TREE_MAX_GUESSES), active,
                                  calib, FED_TOKEN_COST, dev)
            else:
                tree = _lossless_tree(step, contexts, prompt_lookup, max_guesses, active, dev)
        else:
            tree = _chain_tree(step, n_known, active, dev)
        t_fwd = time.perf_counter()
        hidden, new_k, new_v = bb.decode_step(tree.tokens, cache, tree.n_fed, tree.depth, tree.anc)  # [B, T, H]
        stats.forward_passes += 1
        stats.fed_tokens += int(tree.n_fed.sum())
        row_forwards += active.long()
        if mode == "clp":  # the whole chain is taken: only its last node's logit rows are needed
            best = (tree.n_fed - 1).clamp(min=0)
            ids_last, _, n_last = _draft(bb, heads, hidden[rows, best], mode, policy, threshold)
            next_step = _Step(ids_last[:, 0], ids_last[:, 1:], n_last)
        else:
            # Verifying needs every fed node's backbone row; the next step's guesses only the accepted node's
            # head rows. A fused one-read-of-W pass (Triton) gets all rows at once; where logit rows cost compute
            # (the CPU reference), the heads run on the accepted nodes alone, and so do top-m lists in tree mode.
            fused_pass = backend.backend_for(hidden.device) == "triton"
            split = heads is not None and mode == "lossless" and (top_m > 1 or not fused_pass)
            ids, conf, n_next = _draft_fed(bb, None if split else heads, hidden, tree.n_fed, mode, policy, threshold)
            if adaptive and dev.type == "cpu":  # the forward and its logit rows, as the cost model measured them
                cost.observe(int(tree.n_fed.sum()), time.perf_counter() - t_fwd)
            best = _verify(ids, tree, mode)  # [B] deepest accepted node
            if split and adaptive and not (heads_worth.want() and spec_worth.winning()):  # lookup guesses only
                none = torch.zeros_like(step.drafts)
                next_step = _Step(ids[rows, best, 0], none, none[:, 0], conf=none.float())
                step_has_heads = False
            elif split:  # the accepted node's backbone row is known: only its head rows are new
                t_heads = time.perf_counter()
                ids_b, conf_b, n_b, *top = _draft(bb, heads, hidden[rows, best], mode, policy, threshold, top_m,
                                                  backbone=(ids[rows, best, 0], conf[rows, best, 0]))
                next_step = _Step(ids_b[:, 0], ids_b[:, 1:], n_b, *top, conf=conf_b[:, 1:])
                if adaptive and dev.type == "cpu":
                    heads_worth.observe_cost(time.perf_counter() - t_heads, cost(int(tree.n_fed.sum())))
                step_has_heads = True
            else:
                next_step = _Step(ids[rows, best, 0], ids[rows, best, 1:], n_next[rows, best],
                                  conf=conf[rows, best, 1:])
        m = tree.depth[rows, best]  # guesses accepted
        stats.drafted += int((tree.n_fed - 1).clamp(min=0).sum())
        _count_accepts(stats, torch.where(active, m, -1))
        # The accepted path's nodes first, root to leaf (parents precede children in index order).
        on_path = tree.anc[rows, best]  # [B, T]
        if adaptive:
            node = torch.arange(tree.tokens.shape[1], device=dev)[None]
            fed = (node < tree.n_fed[:, None]) & (node > 0)
            acceptance.update(tree.prior, tree.src, on_path.gather(1, tree.parent) & fed, on_path & fed, active)
        order = torch.sort((~on_path).to(torch.uint8), dim=1, stable=True).indices
        path = tree.tokens.gather(1, order)
        cnt, hit_eos = _emit(path, torch.where(active, 1 + m, 0), remaining, eos)
        sel = order[None, :, None, :, None]
        backend.commit_kv_span_(cache.k, cache.v, torch.take_along_dim(new_k, sel, dim=3),
                                torch.take_along_dim(new_v, sel, dim=3), cache.lengths, cnt)
        cache.lengths += cnt
        if adaptive:
            spec_worth.observe(bool((tree.n_fed > 1).any()), int(cnt.sum()), time.perf_counter() - t_step)
        _append(out, produced, path, cnt)
        streaming.put_tokens(streamer, path, cnt)
        done |= hit_eos & active | (produced >= max_new_tokens)
        step = next_step
        if prompt_lookup:
            for b, c in enumerate(cnt.tolist()):
                contexts[b] += path[b, :c].tolist()

    streaming.end(streamer)
    gen = int(produced.max())
    result = torch.cat([input_ids.long(), out[:, :gen]], dim=1)
    stats.new_tokens = produced.tolist()
    stats.row_forwards = row_forwards.tolist()
    if adaptive:
        stats.cost_model = cost.to_dict()
    stats.wall_time_s = time.perf_counter() - t0
    return (result, stats) if return_stats else result


def _append(out: torch.Tensor, produced: torch.Tensor, fed: torch.Tensor, cnt: torch.Tensor) -> None:
    """Copy row b's first ``cnt[b]`` fed tokens to ``out[b, produced[b]:]``; mutates ``out``, ``produced``."""
    T = fed.shape[1]
    j = torch.arange(T, device=fed.device)[None]
    keep = j < cnt[:, None]
    cols = (produced[:, None] + j).clamp(max=out.shape[1] - 1)
    rows = torch.arange(fed.shape[0], device=fed.device)[:, None].expand(-1, T)
    out[rows[keep], cols[keep]] = fed[keep]
    produced += cnt


def _count_accepts(stats: DecodeStats, m: torch.Tensor) -> None:
    for v in m.tolist():
        if v >= 0:
            stats.accept_hist[v] += 1
