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
cache (:meth:`EagleSource.advance`): a drafted chain's keys live in temporaries that :meth:`EagleSource.propose`
drops, so a rejected guess is never seen again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clp_fast.drafts.base import Accepted, Branch, DraftSource, Proposal
from clp_fast.models import packed

__all__ = ["EagleDrafter", "EagleSource", "use_drafter", "eagle_factory", "DEFAULT_DEPTH", "FORMAT"]

FORMAT = "clp_fast.eagle_drafter/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "drafter.safetensors"
DEFAULT_DEPTH = 4  # chain length proposed per step (the cost model then picks how much of it to feed)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


class _Attention(nn.Module):
    def __init__(self, H: int, heads: int, kv_heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.q_proj = nn.Linear(H, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(H, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(H, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, H, bias=False)


class _MLP(nn.Module):
    def __init__(self, H: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(H, inter, bias=False)
        self.up_proj = nn.Linear(H, inter, bias=False)
        self.down_proj = nn.Linear(inter, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    """A Llama/Qwen decoder layer without its input norm (parameter names as transformers', for export)."""

    def __init__(self, H: int, heads: int, kv_heads: int, head_dim: int, inter: int, eps: float, bias: bool):
        super().__init__()
        self.self_attn = _Attention(H, heads, kv_heads, head_dim, bias)
        self.mlp = _MLP(H, inter)
        self.post_attention_layernorm = _RMSNorm(H, eps)


class EagleDrafter(nn.Module):
    """``fc`` + one decoder layer; the backbone's embedding and LM head are used, never stored.

    Args:
        hidden_size, num_heads, kv_heads, head_dim, intermediate_size, rms_norm_eps, rope_theta, attention_bias:
            the decoder layer's shape (:meth:`for_model` copies the backbone's).
        vocab_size: the backbone's LM-head rows ``V``.
        draft_vocab: the drafter guesses among the LM head's first ``draft_vocab`` rows (None: all ``V``).
        backbone, fingerprint: recorded; loading onto a backbone with another LM-head fingerprint raises.
        extra: free-form metadata saved in the config (training command, figures).
    """

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int, kv_heads: int, head_dim: int,
                 intermediate_size: int, rms_norm_eps: float = 1e-6, rope_theta: float = 10000.0,
                 attention_bias: bool = False, *, draft_vocab: int | None = None, backbone: str = "",
                 fingerprint: str = "", extra: dict | None = None):
        super().__init__()
        for name, val in (("hidden_size", hidden_size), ("vocab_size", vocab_size), ("num_heads", num_heads),
                          ("kv_heads", kv_heads), ("head_dim", head_dim), ("intermediate_size", intermediate_size)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name}={val!r} must be a positive int")
        if num_heads % kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of kv_heads={kv_heads}")
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even (RoPE rotates pairs)")
        draft_vocab = vocab_size if draft_vocab is None else draft_vocab
        if isinstance(draft_vocab, bool) or not isinstance(draft_vocab, int) or not 1 <= draft_vocab <= vocab_size:
            raise ValueError(f"draft_vocab={draft_vocab!r} must be an int in [1, vocab_size={vocab_size}]")
        self.hidden_size, self.vocab_size, self.draft_vocab = hidden_size, vocab_size, draft_vocab
        self.num_heads, self.kv_heads, self.head_dim = num_heads, kv_heads, head_dim
        self.intermediate_size, self.rms_norm_eps = intermediate_size, float(rms_norm_eps)
        self.rope_theta, self.attention_bias = float(rope_theta), bool(attention_bias)
        self.backbone, self.fingerprint, self.extra = backbone, fingerprint, dict(extra or {})
        self.fc = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.layer = _Layer(hidden_size, num_heads, kv_heads, head_dim, intermediate_size, rms_norm_eps,
                            attention_bias)
        self.register_buffer("inv_freq", 1.0 / self.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim),
                             persistent=False)

    @classmethod
    def for_model(cls, model, *, draft_vocab: int | None = None, backbone: str = "", init: str = "identity",
                  std: float = 0.02) -> EagleDrafter:
        """A drafter shaped like ``model``'s decoder layers (a loaded Qwen2 / Llama causal LM).

        ``init="identity"``: ``f_t = h_t`` at first (``fc`` passes the feature, attention and MLP outputs are
        zero), so an untrained drafter guesses what the backbone just chose; ``"random"``: every weight
        ``N(0, std)`` (tests).
        """
        from clp_fast.heads import lm_head_fingerprint

        cfg = model.config
        if getattr(cfg, "model_type", None) not in ("qwen2", "llama"):
            raise ValueError(f"model_type={getattr(cfg, 'model_type', None)!r}: the drafter copies a Qwen2 or "
                             f"Llama decoder layer")
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type={rope.get('rope_type')!r}: the drafter implements default RoPE only")
        H = cfg.hidden_size
        W = model.get_output_embeddings().weight
        head_dim = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
        bias = model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2: biased q/k/v, Llama: not
        d = cls(H, W.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, cfg.intermediate_size,
                cfg.rms_norm_eps, theta, bias, draft_vocab=draft_vocab, backbone=backbone,
                fingerprint=lm_head_fingerprint(W))
        with torch.no_grad():
            if init == "random":
                for p in d.parameters():
                    p.normal_(std=std)
            elif init == "identity":
                for p in d.parameters():
                    p.normal_(std=std)
                d.fc.weight.zero_()
                d.fc.weight[:, H:].copy_(torch.eye(H))
                d.layer.self_attn.o_proj.weight.zero_()
                d.layer.mlp.down_proj.weight.zero_()
                d.layer.post_attention_layernorm.weight.fill_(1.0)
            else:
                raise ValueError(f"init={init!r} must be 'identity' or 'random'")
        return d.to(W.dtype if W.dtype.is_floating_point else torch.float32)

    def forward(self, feature: torch.Tensor, emb: torch.Tensor, pos: torch.Tensor, past_k: torch.Tensor | None,
                past_v: torch.Tensor | None, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The drafter over ``T`` pairs per row.

        Args:
            feature: ``[B, T, H]`` the pairs' features (backbone hidden states, or the drafter's own outputs).
            emb: ``[B, T, H]`` the embeddings of the pairs' tokens.
            pos: ``[B, T]`` int64 RoPE positions.
            past_k, past_v: ``[B, KVH, S, D]`` keys (after RoPE) / values the pairs may attend to, or None (S = 0).
            mask: ``[B, 1, T, S + T]`` bool, True where query ``i`` sees a key (past ones, then the new ones).

        Returns:
            out ``[B, T, H]`` predicted features, and the new pairs' k, v ``[B, KVH, T, D]`` (k after RoPE).
        """
        B, T, _ = feature.shape
        D = self.head_dim
        x = self.fc(torch.cat([emb.to(feature.dtype), feature], dim=-1))
        attn = self.layer.self_attn
        q = attn.q_proj(x).view(B, T, self.num_heads, D).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, self.kv_heads, D).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, self.kv_heads, D).transpose(1, 2)
        ang = pos.float()[..., None] * self.inv_freq  # [B, T, D/2]
        ang = torch.cat([ang, ang], dim=-1)[:, None]  # [B, 1, T, D]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys = k if past_k is None else torch.cat([past_k, k], dim=2)
        vals = v if past_v is None else torch.cat([past_v, v], dim=2)
        o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=D**-0.5,
                                           enable_gqa=self.num_heads != self.kv_heads)
        x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * D))
        x = x + self.layer.mlp(self.layer.post_attention_layernorm(x))
        return x, k, v

    # ---------------------------------------------------------------- compatibility and persistence
    def check_compatible(self, model) -> None:
        """Raise ``ValueError`` if this drafter was built for another backbone than ``model``."""
        from clp_fast.heads import lm_head_fingerprint

        W = model.get_output_embeddings().weight
        V, H = W.shape
        if H != self.hidden_size:
            raise ValueError(f"the drafter was built for hidden size {self.hidden_size}, the model has {H}")
        if V != self.vocab_size:
            raise ValueError(f"the drafter was built for vocab size {self.vocab_size}, the model has {V}")
        if self.fingerprint and self.fingerprint != lm_head_fingerprint(W):
            raise ValueError(f"the drafter was trained for another backbone ({self.backbone or 'unnamed'}): LM-head "
                             f"fingerprint {self.fingerprint} != the model's {lm_head_fingerprint(W)}")

    def config_dict(self) -> dict:
        return {"format": FORMAT, "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "num_heads": self.num_heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "intermediate_size": self.intermediate_size, "rms_norm_eps": self.rms_norm_eps,
                "rope_theta": self.rope_theta, "attention_bias": self.attention_bias,
                "draft_vocab": self.draft_vocab, "backbone": self.backbone, "lm_head_fingerprint": self.fingerprint,
                "parameters": sum(p.numel() for p in self.parameters()),
                **({"extra": self.extra} if self.extra else {})}

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write ``drafter.safetensors`` + ``config.json`` to ``directory`` atomically (temp dir, then renames:
        weights first, config last, the config naming the weights' sha256)."""
        from clp_fast.heads import _sha256

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tensors = {n: (t.detach().to(dtype) if dtype else t.detach()).contiguous().cpu()
                   for n, t in self.state_dict().items()}
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            save_file(tensors, str(tmp / WEIGHTS_NAME))
            config = {**self.config_dict(), "weights_sha256": _sha256(tmp / WEIGHTS_NAME)}
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            directory.mkdir(exist_ok=True)
            umask = os.umask(0)
            os.umask(umask)
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                os.chmod(tmp / name, 0o666 & ~umask)
                os.replace(tmp / name, directory / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, model=None, dtype=torch.float32,
                        device="cpu") -> EagleDrafter:
        """Load a drafter saved by :meth:`save_pretrained`; with ``model``, check it fits.

        Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for anything else:
        bad or incomplete config, weights truncated, edited or not matching the config, NaN / inf weights,
        another backbone.
        """
        from clp_fast.heads import _sha256

        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"no EAGLE drafter at {directory}: {p.name} is missing")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            fmt = cfg.get("format") if isinstance(cfg, dict) else cfg
            raise ValueError(f"{cfg_path}: unknown drafter format {fmt!r}")
        try:
            d = cls(cfg["hidden_size"], cfg["vocab_size"], cfg["num_heads"], cfg["kv_heads"], cfg["head_dim"],
                    cfg["intermediate_size"], cfg["rms_norm_eps"], cfg["rope_theta"], cfg["attention_bias"],
                    draft_vocab=cfg.get("draft_vocab"), backbone=cfg.get("backbone", ""),
                    fingerprint=cfg.get("lm_head_fingerprint", ""), extra=cfg.get("extra"))
        except KeyError as e:
            raise ValueError(f"{cfg_path} lacks the field {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise ValueError(f"{cfg_path}: {e}") from e
        try:
            state = load_file(str(w_path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{w_path} is truncated or corrupted: {e}") from e
        if _sha256(w_path) != cfg.get("weights_sha256"):
            raise ValueError(f"{w_path} is corrupted, edited or from another save: its sha256 is not the one "
                             f"recorded in {CONFIG_NAME}")
        for name, t in state.items():
            if not bool(torch.isfinite(t.float()).all()):
                raise ValueError(f"{w_path}: {name} holds NaN or inf; the drafter was saved from a diverged run")
        try:
            d.load_state_dict({n: t.float() for n, t in state.items()}, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{w_path} does not match {cfg_path}: {e}") from e
        d = d.to(device=device, dtype=dtype).eval()
        if model is not None:
            try:
                d.check_compatible(model)
            except ValueError as e:
                raise ValueError(f"{directory}: {e}") from e
        return d


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
    previous guess)`` whose K/V is kept only for the chain. Priors are the drafter's softmax probability of each
    guess (uncalibrated: the loop corrects them per row by the kind's acceptance).

    With ``top_m > 1`` it drafts a dynamic tree instead (EAGLE-2): per depth, each of the ``top_m`` frontier
    nodes is expanded to its ``top_m`` most likely children in one batched drafter call, and the ``top_m``
    children of highest cumulative probability become the next frontier; the final frontier's paths are proposed
    as ``top_m`` branches (the loop's tree merges their shared prefixes).

    Args:
        bb: the :class:`~clp_fast.models.native.NativeBackbone` (its embedding and LM-head weight).
        drafter: an :class:`EagleDrafter` for this backbone, on its device.
        depth: guesses per chain, ``>= 1``.
        top_m: 1 for a chain, ``> 1`` for a dynamic tree of ``top_m`` paths.
    """

    kinds = ("eagle",)
    wants_path_hidden = True

    def __init__(self, bb, drafter: EagleDrafter, depth: int = DEFAULT_DEPTH, top_m: int = 1):
        if not isinstance(drafter, EagleDrafter):
            raise TypeError(f"drafter must be an EagleDrafter, got {type(drafter).__name__}")
        for name, val in (("depth", depth), ("top_m", top_m)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}={val!r} must be a positive int")
        if top_m > drafter.draft_vocab:
            raise ValueError(f"top_m={top_m} exceeds the draft vocabulary ({drafter.draft_vocab})")
        self.top_m = top_m
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
        self.seconds = 0.0  # time spent in advance() and propose() (draft cost per step = seconds / steps)
        self.steps = 0

    @classmethod
    def factory(cls, drafter: EagleDrafter, depth: int = DEFAULT_DEPTH, top_m: int = 1):
        """A ``drafts=[...]`` entry for :func:`clp_fast.generate` that drafts with ``drafter``."""
        return lambda bb, heads, calib: cls(bb, drafter, depth, top_m)

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

    @torch.inference_mode()
    def advance(self, acc: Accepted) -> None:
        """Run the drafter over each live row's new pairs ``(h(c_i), c_{i+1})`` of committed tokens ``c`` (the
        last pair's token is ``pending``) and commit their K/V."""
        if acc.path_hidden is None:
            raise ValueError("EagleSource needs Accepted.path_hidden (it declares wants_path_hidden)")
        t0 = time.perf_counter()
        B = len(acc.new_tokens)
        pending = acc.pending.tolist()
        n = [len(t) if ok else 0 for t, ok in zip(acc.new_tokens, acc.live)]
        N = max(n)
        if N == 0:
            return
        dev = self.bb.device
        if self.k is None:
            self._grow(B, N)
        S = int(self.lengths.max())
        self._grow(B, S + N)
        toks = torch.zeros(B, N, dtype=torch.long)
        for b in range(B):
            if n[b]:
                toks[b, : n[b]] = torch.tensor(acc.new_tokens[b][1 : n[b]] + [pending[b]])
        toks = toks.to(dev)
        new_len = torch.tensor(n, device=dev)
        feats = acc.path_hidden[:, :N].to(self.dtype)  # [B, N, H]
        pos = self.lengths[:, None] + torch.arange(N, device=dev)[None]
        mask = causal_mask(self.lengths, new_len, S, N)
        out, k, v = self.drafter(feats, self.embed(toks), pos, self.k[:, :, :S], self.v[:, :, :S], mask)
        for b in range(B):
            if n[b]:
                L = int(self.lengths[b])
                self.k[b, :, L : L + n[b]] = k[b, :, : n[b]]
                self.v[b, :, L : L + n[b]] = v[b, :, : n[b]]
                self.last[b] = out[b, n[b] - 1]
        self.lengths += new_len
        self.seconds += time.perf_counter() - t0

    @torch.inference_mode()
    def chains(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The drafted chains of ``rows [R]`` (indices): tokens ``[R, depth]`` and their probabilities
        ``[R, depth]`` under the drafter, each guess conditioned on the ones before it."""
        f = self.last[rows]  # [R, H]
        lengths = self.lengths[rows]
        S = int(lengths.max())
        K, V = self.k[rows, :, :S], self.v[rows, :, :S]
        R = rows.shape[0]
        toks, probs = [], []
        for d in range(self.max_depth):
            logits = packed.linear(f.to(self.bb.dtype), self.W).float()  # [R, Vd]
            tok = logits.argmax(-1)  # lowest index on ties, as torch.argmax
            toks.append(tok)
            probs.append(torch.softmax(logits, -1).gather(1, tok[:, None])[:, 0])
            if d == self.max_depth - 1:
                break
            # the pair (f, tok) at position lengths + d: sees the committed pairs and this chain's earlier ones
            mask = torch.cat([torch.arange(S, device=f.device)[None] < lengths[:, None],
                              torch.ones(R, d + 1, dtype=torch.bool, device=f.device)], dim=1)[:, None, None]
            out, k, v = self.drafter(f[:, None], self.embed(tok[:, None]), (lengths + d)[:, None], K, V, mask)
            K, V = torch.cat([K, k], dim=2), torch.cat([V, v], dim=2)
            f = out[:, 0]
        return torch.stack(toks, 1), torch.stack(probs, 1)

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
        paths, probs = tok[..., None], cum.exp()[..., None]  # [R, m, 1]
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
            probs = torch.cat([_pick(probs, parent), c_lp.view(R, m * m).gather(1, best).exp()[..., None]], dim=2)
            feat, CK, CV = _pick(out, parent), _pick(CK, parent), _pick(CV, parent)
        return paths, probs

    def propose(self, live: list[bool]) -> list[list[Proposal]]:
        if self.last is None or not any(live):
            return [[] for _ in live]
        t0 = time.perf_counter()
        idx = [b for b, ok in enumerate(live) if ok]
        rows = torch.tensor(idx, device=self.bb.device)
        if self.top_m == 1:
            toks, probs = (t[:, None] for t in self.chains(rows))
        else:
            toks, probs = self.tree(rows)
        toks, probs = toks.tolist(), probs.tolist()
        out: list[list[Proposal]] = [[] for _ in live]
        for i, b in enumerate(idx):
            out[b] = [Branch(t, p, "eagle") for t, p in zip(toks[i], probs[i])]
        self.steps += 1
        self.seconds += time.perf_counter() - t0
        return out


# model -> drafter, for drafts=["eagle"] (see use_drafter); weak keys: forgetting the model forgets its drafter.
_DRAFTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def use_drafter(model, drafter: EagleDrafter | str | os.PathLike | None, depth: int = DEFAULT_DEPTH,
                top_m: int = 1) -> None:
    """Make ``drafts=["eagle"]`` draft with ``drafter`` (an :class:`EagleDrafter` or a folder it was saved to)
    for this loaded ``model``, ``depth`` deep, as a chain (``top_m = 1``) or a dynamic tree; None forgets it."""
    if drafter is None:
        _DRAFTERS.pop(model, None)
        return
    if not isinstance(drafter, EagleDrafter):
        W = model.get_output_embeddings().weight
        drafter = EagleDrafter.from_pretrained(drafter, model=model, dtype=W.dtype, device=W.device)
    drafter.check_compatible(model)
    _DRAFTERS[model] = (drafter, depth, top_m)


def eagle_factory(bb, heads, calib) -> EagleSource:
    """The registered ``"eagle"`` source: the drafter given to :func:`use_drafter` for this model."""
    if bb.model not in _DRAFTERS:
        raise ValueError("drafts=['eagle'] needs a drafter for this model: call "
                         "clp_fast.drafts.eagle.use_drafter(model, drafter_or_folder) first")
    return EagleSource(bb, *_DRAFTERS[bb.model])
