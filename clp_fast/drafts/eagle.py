"""An EAGLE-style drafter that reads its own guesses, as a draft source.

The MTP heads guess token ``t + j + 1`` from ``h_t`` alone and must average over every token in between; this
drafter conditions on them. It consumes **pairs** ``(feature h_t, token x_{t+1})``: ``fc([embed(x_{t+1}); h_t])``
(``2H -> H``), one Llama/Qwen decoder layer (attention with RoPE over its own KV cache of earlier pairs, MLP;
no input norm, as EAGLE-1 and vLLM's ``EagleLlamaForCausalLM``), and its output ``f_t`` is a predicted
feature: the backbone's frozen LM head over it (its first ``draft_vocab`` rows) guesses ``x_{t+2}``. Drafting
further feeds ``(f_t, guess)`` back in, so each guess is conditioned on the ones before it.

Features are the backbone's final, post-norm hidden states (what :class:`~clp_fast.models.native.NativeBackbone`
returns), so ``f_t`` lives in the same space and goes to the LM head as it is, as in EAGLE and vLLM.

Pair ``i`` of a row is ``(h_i, x_{i+1})`` at RoPE position ``i``. Only committed tokens' pairs ever enter the
cache (:meth:`EagleSource.advance` queues them, :meth:`EagleSource.catch_up` runs them): a drafted chain's keys
live in temporaries that :meth:`EagleSource.propose` drops, so a rejected guess is never seen again. The network
and its files: :mod:`clp_fast.drafts.eagle_model`.
"""

from __future__ import annotations

import os
import time
import weakref

import torch
import torch.nn.functional as F

from clp_fast import reference
from clp_fast.drafts.base import Accepted, Branch, DraftSource, Proposal
from clp_fast.drafts.calibration import TreeCalibration
from clp_fast.drafts.eagle_model import FORMAT, EagleDrafter
from clp_fast.models import packed

__all__ = ["EagleDrafter", "EagleSource", "use_drafter", "eagle_factory", "DEFAULT_DEPTH", "DEFAULT_STOP_BELOW",
           "FORMAT"]

DEFAULT_DEPTH = 4  # chain length proposed per step (the cost model then picks how much of it to feed)
# use_drafter's: chains stop once every row's chance of all-right guesses is below it. Measured (bf16 Qwen 0.5B
# drafter, 2-core AVX-512 EPYC, 2026-12-07, two runs): 9.9 vs 14.1 and 9.1 vs 12.1 ms per drafted step at the
# same HumanEval tau (1.51 vs 1.50, 1.51 vs 1.52); see docs/drafts.md.
DEFAULT_STOP_BELOW = 0.2


def causal_mask(past_len: torch.Tensor, new_len: torch.Tensor, S: int, T: int) -> torch.Tensor:
    """``[B, 1, T, S + T]`` bool: query ``i`` of row ``b`` sees slots ``< past_len[b]`` and new keys ``j <= i``
    with ``j < new_len[b]``, and always itself (padded queries stay finite; their outputs are dropped)."""
    dev = past_len.device
    old = (torch.arange(S, device=dev)[None] < past_len[:, None])[:, None, :].expand(-1, T, -1)  # [B, T, S]
    i = torch.arange(T, device=dev)
    new = (i[None, :] <= i[:, None])[None] & (i[None, None, :] < new_len[:, None, None])
    new = new | torch.eye(T, dtype=torch.bool, device=dev)[None]
    return torch.cat([old, new], dim=-1)[:, None]


def _pick(t: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """``t [R, m, ...]`` -> its entries at ``parent [R, m]`` along dim 1 (the chosen children's parents)."""
    R, m = parent.shape
    return t.gather(1, parent.view(R, m, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:]))


class EagleSource(DraftSource):
    """The drafter's chain of guesses after each row's pending token.

    Per row it keeps the drafter's K/V of every committed pair (``[B, KVH, S, D]``, grown as needed) and its
    output at the last one (the feature that guesses the token after the pending one). ``propose`` drafts
    ``depth`` tokens: the first from that output, each next one from a drafter step over ``(previous output,
    previous guess)`` whose K/V is kept only for the chain. A guess's prior is its measured acceptance given its
    parents' at its depth and softmax probability (the calibration table training stored with the drafter), or the
    probability itself for a drafter without one; the loop corrects priors per row by the kind's acceptance.

    With ``top_m > 1`` it drafts a dynamic tree instead (EAGLE-2): per depth, each of the ``top_m`` frontier
    nodes is expanded to its ``top_m`` most likely children in one batched drafter call, and the ``top_m``
    children of highest cumulative probability become the next frontier; the final frontier's paths are proposed
    as ``top_m`` branches (the loop's tree merges their shared prefixes).

    Args:
        bb: the :class:`~clp_fast.models.native.NativeBackbone` (its embedding and LM-head weight).
        drafter: an :class:`EagleDrafter` for this backbone, on its device.
        depth: guesses per chain, ``>= 1``.
        top_m: 1 for a chain, ``> 1`` for a dynamic tree of ``top_m`` paths.
        stop_below: a chain stops growing once every row's chance that all its guesses so far are right (the
            product of its priors) is below this (0: always ``depth`` deep); a deeper guess could add no more.
    """

    kinds = ("eagle",)
    wants_path_hidden = True

    def __init__(self, bb, drafter: EagleDrafter, depth: int = DEFAULT_DEPTH, top_m: int = 1,
                 stop_below: float = 0.0):
        if not isinstance(drafter, EagleDrafter):
            raise TypeError(f"drafter must be an EagleDrafter, got {type(drafter).__name__}")
        for name, val in (("depth", depth), ("top_m", top_m)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}={val!r} must be a positive int")
        if top_m > drafter.draft_vocab:
            raise ValueError(f"top_m={top_m} exceeds the draft vocabulary ({drafter.draft_vocab})")
        if not 0.0 <= stop_below < 1.0:
            raise ValueError(f"stop_below={stop_below!r} must be in [0, 1)")
        self.top_m, self.stop_below = top_m, float(stop_below)
        cal = drafter.extra.get("calibration")  # measured at training (train.eagle), checked as the heads' tables
        cal = TreeCalibration.from_dict(cal) if cal else None
        # per depth: rates [bins] and inner bin edges, as tensors once (prior() runs at every depth of every step)
        self.calib = None if cal is None else ([torch.tensor(r, device=bb.device) for r in cal.rates],
                                               torch.tensor(cal.edges[1:-1], device=bb.device))
        drafter.check_compatible(bb.model)
        dev = next(drafter.parameters()).device
        if dev != bb.device:
            raise ValueError(f"the drafter is on {dev}, the backbone on {bb.device}: move it with .to()")
        self.bb, self.drafter, self.max_depth = bb, drafter, depth
        self.embed = bb.inner.embed_tokens
        self.W = packed.rows(bb.lm_head_weight, drafter.draft_vocab)  # [Vd, H], plain or packed
        self.dtype = next(drafter.parameters()).dtype
        self.k: torch.Tensor | None = None  # [B, KVH, cap, D] committed pairs' keys (after RoPE)
        self.v: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None  # [B] pairs committed
        self.last: torch.Tensor | None = None  # [B, H] the drafter's output at each row's last committed pair
        self.backlog: dict[int, list] = {}  # row -> [(hidden [n, H], tokens)] committed pairs not yet run
        self.rows = 0  # batch size (from the first advance)
        self.hidden: torch.Tensor | None = None  # [B, H] the backbone's hidden state at each row's accepted node
        self.clp_threshold: float | None = None  # set by unverified(): mode="clp"
        self.seconds = 0.0  # time spent drafting and catching up (draft cost per step = seconds / steps)
        self.steps = 0

    @classmethod
    def factory(cls, drafter: EagleDrafter, depth: int = DEFAULT_DEPTH, top_m: int = 1, stop_below: float = 0.0):
        """A ``drafts=[...]`` entry for :func:`clp_fast.generate` that drafts with ``drafter``; the sources it made
        are kept in ``factory.sources`` (their ``seconds`` and ``steps``), as the datastore's factory does."""
        def factory(bb, heads, calib):
            factory.sources.append(cls(bb, drafter, depth, top_m, stop_below))
            return factory.sources[-1]
        factory.sources = []
        return factory

    def _grow(self, B: int, need: int) -> None:
        d = self.drafter
        if self.k is None:
            shape = (B, d.kv_heads, max(need, 64), d.head_dim)
            self.k = torch.zeros(shape, dtype=self.dtype, device=self.bb.device)
            self.v = torch.zeros_like(self.k)
            self.lengths = torch.zeros(B, dtype=torch.long, device=self.bb.device)
            self.last = torch.zeros(B, d.hidden_size, dtype=self.dtype, device=self.bb.device)
        elif need > self.k.shape[2]:
            pad = max(need, 2 * self.k.shape[2]) - self.k.shape[2]
            self.k = F.pad(self.k, (0, 0, 0, pad))
            self.v = F.pad(self.v, (0, 0, 0, pad))

    def advance(self, acc: Accepted) -> None:
        """Queue each live row's new pairs ``(h(c_i), c_{i+1})`` of committed tokens ``c`` (the last pair's token
        is ``pending``). The drafter runs over them at the next :meth:`propose` (:meth:`catch_up`): steps in which
        adaptive speculation does not ask this source for guesses cost it nothing, and the pairs of several such
        steps go through the drafter in one call. The prompt's pairs (the first call) run at once."""
        if acc.path_hidden is None:
            raise ValueError("EagleSource needs Accepted.path_hidden (it declares wants_path_hidden)")
        pending = acc.pending.tolist()
        self.hidden = acc.hidden
        for b, (new, ok) in enumerate(zip(acc.new_tokens, acc.live)):
            if ok and new:
                self.backlog.setdefault(b, []).append((acc.path_hidden[b, : len(new)].clone(), new[1:] + [pending[b]]))
        self.rows = max(self.rows, len(acc.new_tokens))
        if self.k is None:  # the prompt: the drafter's prefill, paid once like the backbone's (not a step's price)
            self.catch_up()

    @torch.inference_mode()
    def catch_up(self) -> None:
        """Run the drafter over every queued pair (per row, in order) and commit their K/V: afterwards ``k``,
        ``v``, ``lengths`` and ``last`` hold every committed pair."""
        if not self.backlog:
            return
        t0 = time.perf_counter()
        B, dev = self.rows, self.bb.device
        n = [sum(len(t) for _, t in self.backlog.get(b, [])) for b in range(B)]
        N = max(n)
        if self.k is None:
            self._grow(B, N)
        S = int(self.lengths.max())
        self._grow(B, S + N)
        toks = torch.zeros(B, N, dtype=torch.long)
        feats = torch.zeros(B, N, self.drafter.hidden_size, dtype=self.dtype, device=dev)
        for b, parts in self.backlog.items():
            toks[b, : n[b]] = torch.tensor([t for _, ts in parts for t in ts])
            feats[b, : n[b]] = torch.cat([h for h, _ in parts]).to(self.dtype)
        self.backlog = {}
        new_len = torch.tensor(n, device=dev)
        pos = self.lengths[:, None] + torch.arange(N, device=dev)[None]
        mask = causal_mask(self.lengths, new_len, S, N)
        out, k, v = self.drafter(feats, self.embed(toks.to(dev)), pos, self.k[:, :, :S], self.v[:, :, :S], mask)
        for b in range(B):
            if n[b]:
                L = int(self.lengths[b])
                self.k[b, :, L : L + n[b]] = k[b, :, : n[b]]
                self.v[b, :, L : L + n[b]] = v[b, :, : n[b]]
                self.last[b] = out[b, n[b] - 1]
        self.lengths += new_len
        self.seconds += time.perf_counter() - t0

    @torch.inference_mode()
    def chains(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The drafted chains of ``rows [R]`` (indices): tokens ``[R, d]``, their probabilities under the drafter
        (softmax) and their priors (:meth:`prior`), each ``[R, d]``, each guess conditioned on the ones before it;
        ``d = depth``, or fewer where ``stop_below`` ended every row's chain early."""
        f = self.last[rows]  # [R, H]
        lengths = self.lengths[rows]
        S = int(lengths.max())
        K, V = self.k[rows, :, :S], self.v[rows, :, :S]
        R = rows.shape[0]
        toks, probs, priors, chain = [], [], [], torch.ones(R, device=f.device)
        for d in range(self.max_depth):
            logits = packed.linear(f.to(self.bb.dtype), self.W).float()  # [R, Vd]
            tok = logits.argmax(-1)  # lowest index on ties, as torch.argmax
            toks.append(tok)
            probs.append(torch.softmax(logits, -1).gather(1, tok[:, None])[:, 0])
            priors.append(self.prior(d + 1, probs[-1]))
            chain = chain * priors[-1]
            if d == self.max_depth - 1 or (self.stop_below > 0 and bool((chain < self.stop_below).all())):
                break
            # the pair (f, tok) at position lengths + d: sees the committed pairs and this chain's earlier ones
            mask = torch.cat([torch.arange(S, device=f.device)[None] < lengths[:, None],
                              torch.ones(R, d + 1, dtype=torch.bool, device=f.device)], dim=1)[:, None, None]
            out, k, v = self.drafter(f[:, None], self.embed(tok[:, None]), (lengths + d)[:, None], K, V, mask)
            K, V = torch.cat([K, k], dim=2), torch.cat([V, v], dim=2)
            f = out[:, 0]
        return torch.stack(toks, 1), torch.stack(probs, 1), torch.stack(priors, 1)

    def prior(self, depth: int, p: torch.Tensor) -> torch.Tensor:
        """Priors of depth-``depth`` guesses of drafter probability ``p [...]``: the calibration's, else ``p``."""
        if self.calib is None:
            return p
        rates, edges = self.calib
        table = rates[min(depth, len(rates)) - 1]
        return table[torch.bucketize(p.float(), edges, right=True)]

    @torch.inference_mode()
    def tree(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """EAGLE-2's dynamic tree for ``rows [R]``: the ``m = top_m`` best paths by cumulative probability, tokens
        ``[R, m, depth]`` and each guess's probability given its parent ``[R, m, depth]``."""
        d_, m = self.drafter, self.top_m
        f = self.last[rows]  # [R, H]
        R, H = f.shape
        lengths = self.lengths[rows]
        S = int(lengths.max())
        K0 = self.k[rows, :, :S].repeat_interleave(m, 0)  # [R * m, KVH, S, D]
        V0 = self.v[rows, :, :S].repeat_interleave(m, 0)
        seen = (torch.arange(S, device=f.device)[None] < lengths[:, None]).repeat_interleave(m, 0)  # [R * m, S]
        pos = lengths.repeat_interleave(m)
        lp = torch.log_softmax(packed.linear(f.to(self.bb.dtype), self.W).float(), -1)
        cum, tok = lp.topk(m, -1)  # [R, m]: the frontier at depth 1
        paths, probs = tok[..., None], self.prior(1, cum.exp())[..., None]  # [R, m, 1]
        feat = f[:, None].expand(R, m, H)
        CK = CV = None  # [R, m, KVH, d, D] each frontier node's chain of drafted pairs
        for d in range(1, self.max_depth):
            past_k = K0 if CK is None else torch.cat([K0, CK.flatten(0, 1)], dim=2)
            past_v = V0 if CV is None else torch.cat([V0, CV.flatten(0, 1)], dim=2)
            mask = torch.cat([seen, torch.ones(R * m, d, dtype=torch.bool, device=f.device)], dim=1)[:, None, None]
            out, k, v = d_(feat.reshape(R * m, 1, H), self.embed(paths[:, :, -1].reshape(R * m, 1)),
                           (pos + d - 1)[:, None], past_k, past_v, mask)
            k, v = k.view(R, m, d_.kv_heads, 1, d_.head_dim), v.view(R, m, d_.kv_heads, 1, d_.head_dim)
            CK = k if CK is None else torch.cat([CK, k], dim=3)
            CV = v if CV is None else torch.cat([CV, v], dim=3)
            out = out.view(R, m, H)
            c_lp, c_tok = torch.log_softmax(packed.linear(out.to(self.bb.dtype), self.W).float(), -1).topk(m, -1)
            score = (cum[..., None] + c_lp).view(R, m * m)
            cum, best = score.topk(m, -1)  # [R, m]
            parent = best // m
            paths = torch.cat([_pick(paths, parent), c_tok.view(R, m * m).gather(1, best)[..., None]], dim=2)
            step_p = self.prior(d + 1, c_lp.view(R, m * m).gather(1, best).exp())
            probs = torch.cat([_pick(probs, parent), step_p[..., None]], dim=2)
            feat, CK, CV = _pick(out, parent), _pick(CK, parent), _pick(CV, parent)
        return paths, probs

    def unverified(self, threshold: float | None) -> None:
        """``mode="clp"``: propose only the chain's first guesses that the drafter's CLP takes at ``threshold``
        (None: the threshold training picked), to be kept without verification."""
        d = self.drafter
        if d.clp is None:
            raise ValueError("mode='clp' takes the drafter's guesses unverified and needs its CLP to decide how "
                             "many; this drafter has none (clp-fast train --drafter eagle fits one)")
        if self.top_m != 1:
            raise ValueError(f"mode='clp' takes one chain; top_m={self.top_m} drafts a tree")
        self.clp_threshold = d.clp_threshold if threshold is None else float(threshold)
        self.max_depth, self.stop_below = d.clp.k, 0.0

    def unverified_chains(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chains of ``rows [R]`` (tokens, probabilities ``[R, depth]``) and how much of each the CLP takes
        ``[R]``."""
        toks, probs, _ = self.chains(rows)
        clp = self.drafter.clp
        return toks, probs, reference.clp_accept_lengths(self.hidden[rows], probs, clp.linear.weight,
                                                         clp.linear.bias, self.clp_threshold)

    def report(self) -> dict:
        """Its own seconds (drafting and catching up) and the steps it drafted in."""
        return {"draft_s": self.seconds, "draft_steps": self.steps}

    def propose(self, live: list[bool]) -> list[list[Proposal]]:
        self.catch_up()
        if self.last is None or not any(live):
            return [[] for _ in live]
        t0 = time.perf_counter()
        idx = [b for b, ok in enumerate(live) if ok]
        rows = torch.tensor(idx, device=self.bb.device)
        out: list[list[Proposal]] = [[] for _ in live]
        if self.clp_threshold is not None:  # mode="clp": only what the CLP takes, possibly nothing
            toks, probs, n = (t.tolist() for t in self.unverified_chains(rows))
            for i, b in enumerate(idx):
                out[b] = [Branch(toks[i][: n[i]], probs[i][: n[i]], "eagle")] if n[i] else []
        else:
            if self.top_m == 1:
                toks, _, priors = self.chains(rows)
                toks, probs = toks[:, None], priors[:, None]  # one branch per row
            else:
                toks, probs = self.tree(rows)
            toks, probs = toks.tolist(), probs.tolist()
            for i, b in enumerate(idx):
                out[b] = [Branch(t, p, "eagle") for t, p in zip(toks[i], probs[i])]
        self.steps += 1
        self.seconds += time.perf_counter() - t0
        return out


# model -> drafter, for drafts=["eagle"] (see use_drafter); weak keys: forgetting the model forgets its drafter.
_DRAFTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def use_drafter(model, drafter: EagleDrafter | str | os.PathLike | None, depth: int = DEFAULT_DEPTH,
                top_m: int = 1, stop_below: float = DEFAULT_STOP_BELOW) -> None:
    """Make ``drafts=["eagle"]`` draft with ``drafter`` (an :class:`EagleDrafter` or a folder it was saved to)
    for this loaded ``model``, ``depth`` deep, as a chain (``top_m = 1``) or a dynamic tree, chains stopping early
    below ``stop_below`` (:class:`EagleSource`); None forgets it."""
    if drafter is None:
        _DRAFTERS.pop(model, None)
        return
    if not isinstance(drafter, EagleDrafter):
        W = model.get_output_embeddings().weight
        drafter = EagleDrafter.from_pretrained(drafter, model=model, dtype=W.dtype, device=W.device)
    drafter.check_compatible(model)
    _DRAFTERS[model] = (drafter, depth, top_m, stop_below)


def eagle_factory(bb, heads, calib) -> EagleSource:
    """The registered ``"eagle"`` source: the drafter given to :func:`use_drafter` for this model, else the shipped
    drafter that fits it (:func:`clp_fast.assets.shipped_drafter_for`)."""
    if bb.model not in _DRAFTERS:
        from clp_fast.assets import shipped_drafter_for, shipped_drafters

        shipped = shipped_drafter_for(bb.model)
        if shipped is None:
            raise ValueError("drafts=['eagle'] needs a drafter for this model: none of the shipped ones fits it "
                             f"({', '.join(shipped_drafters()) or 'none shipped'}); call "
                             "clp_fast.drafts.eagle.use_drafter(model, drafter_or_folder) first")
        use_drafter(bb.model, shipped)
    return EagleSource(bb, *_DRAFTERS[bb.model])
