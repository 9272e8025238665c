"""The EAGLE-style drafter's network and its files: ``fc([embed(x_{t+1}); h_t])`` (``2H -> H``) and one Llama/Qwen
decoder layer without its input norm (EAGLE-1's layout, vLLM's ``EagleLlamaForCausalLM``), over pairs
``(feature h_t, token x_{t+1})``; the backbone's embedding and LM head are used, never stored. Drafting with it is
:mod:`clp_fast.drafts.eagle`; training, :mod:`clp_fast.train.eagle`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from clp_fast.files import save_weights, sha256
from clp_fast.models import packed

__all__ = ["EagleDrafter", "FORMAT", "CONFIG_NAME", "WEIGHTS_NAME", "QUANTIZATIONS", "quantize_rows"]

FORMAT = "clp_fast.eagle_drafter/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "drafter.safetensors"
# How the saved file may store the matrices: "int8-rowwise" keeps each 2-D weight as int8 with one fp32 scale per
# output row (``w ≈ q * scale``, ``|q| <= 127``), half of bf16's bytes: how a drafter ships inside the package.
QUANTIZATIONS = ("int8-rowwise",)
SCALE_SUFFIX = ".scale"


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> int8 ``q [N, K]`` and fp32 ``scale [N]`` with ``w ≈ q * scale[:, None]`` (symmetric, per row,
    round to nearest: error at most ``scale / 2`` per entry; an all-zero row gets scale 1)."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _dequantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fp32 state of a file saved with ``quantize="int8-rowwise"``: each ``name`` + ``name.scale`` pair back to one
    matrix, everything else as stored."""
    out = {}
    for name, t in state.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = state.get(name + SCALE_SUFFIX)
        if (scale is None) != (t.dtype != torch.int8):
            raise ValueError(f"{name}: an int8 matrix needs its {name + SCALE_SUFFIX} and only int8 ones have one")
        out[name] = t.float() if scale is None else t.float() * scale.float()[:, None]
    return out


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

    ``clp`` (None until :meth:`attach_clp`): the drafter's collocation-length predictor for ``mode="clp"``, a
    :class:`clp_fast.heads.CLP` over ``[h_t, conf_1..conf_k]`` (the backbone's hidden state at the accepted node
    and the chain's per-depth probabilities) at ``clp_threshold``; kept in fp32 whatever the drafter's dtype.
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
        self.clp, self.clp_threshold = None, None

    def attach_clp(self, depth: int, threshold: float = 0.9):
        """A CLP (zero-initialised, fp32) deciding how many of a ``depth``-deep chain to take unverified."""
        from clp_fast.heads import CLP

        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold={threshold!r} must be a probability in [0, 1]")
        self.clp = CLP(self.hidden_size, depth).to(self.fc.weight.device)
        self.clp_threshold = float(threshold)
        return self.clp

    @classmethod
    def for_model(cls, model, *, draft_vocab: int | None = None, backbone: str = "", init: str = "identity",
                  std: float = 0.02, intermediate_size: int | None = None) -> EagleDrafter:
        """A drafter shaped like ``model``'s decoder layers (a loaded Qwen2 / Llama causal LM); its MLP
        ``intermediate_size`` wide (None: the backbone's).

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
        inter = cfg.intermediate_size if intermediate_size is None else intermediate_size
        d = cls(H, W.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, inter,
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
        pw = None if torch.is_grad_enabled() else packed.drafter_weights(self)  # drafting on a packing CPU
        fc, attn = (self.fc if pw is None else pw.fc), self.layer.self_attn
        x = fc(torch.cat([emb.to(feature.dtype), feature], dim=-1))
        q, k, v = self._qkv(x, pw)
        q = q.view(B, T, self.num_heads, D).transpose(1, 2)
        k = k.view(B, T, self.kv_heads, D).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, D).transpose(1, 2)
        ang = pos.float()[..., None] * self.inv_freq  # [B, T, D/2]
        ang = torch.cat([ang, ang], dim=-1)[:, None]  # [B, 1, T, D]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys = k if past_k is None else torch.cat([past_k, k], dim=2)
        vals = v if past_v is None else torch.cat([past_v, v], dim=2)
        o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=D**-0.5,
                                           enable_gqa=self.num_heads != self.kv_heads)
        x = x + (attn.o_proj if pw is None else pw.layer.o)(o.transpose(1, 2).reshape(B, T, self.num_heads * D))
        return x + self._mlp(self.layer.post_attention_layernorm(x), pw), k, v

    def _qkv(self, x: torch.Tensor, pw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``[B, T, heads * D]`` / ``[B, T, kv_heads * D]``: three products, or one packed q|k|v."""
        attn = self.layer.self_attn
        if pw is None:
            return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        kv = self.kv_heads * self.head_dim
        return pw.layer.qkv(x).split([self.num_heads * self.head_dim, kv, kv], dim=-1)

    def _mlp(self, x: torch.Tensor, pw) -> torch.Tensor:
        """The MLP; packed, one gate|up product (the down projection stays plain, as in the backbone's step)."""
        mlp = self.layer.mlp
        if pw is None:
            return mlp(x)
        gate, up = pw.layer.gate_up(x).chunk(2, dim=-1)
        return mlp.down_proj(F.silu(gate) * up)

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
                **({"clp": {"depth": self.clp.k, "threshold": self.clp_threshold}} if self.clp is not None else {}),
                **({"extra": self.extra} if self.extra else {})}

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None,
                        quantize: str | None = None) -> Path:
        """Write ``drafter.safetensors`` + ``config.json`` to ``directory`` atomically (temp dir, then renames:
        weights first, config last, the config naming the weights' sha256). ``dtype``: the stored dtype of the
        network's tensors (the CLP stays fp32); ``quantize="int8-rowwise"``: its matrices as int8 + row scales
        (:func:`quantize_rows`; loading dequantizes them)."""
        if quantize is not None and quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize={quantize!r} must be None or one of {QUANTIZATIONS}")
        tensors = {}
        for n, t in self.state_dict().items():
            t = t.detach().cpu()
            if quantize and t.dim() == 2 and not n.startswith("clp."):
                tensors[n], tensors[n + SCALE_SUFFIX] = quantize_rows(t)
            else:
                tensors[n] = (t.to(dtype) if dtype and not n.startswith("clp.") else t).contiguous()
        config = {**self.config_dict(), **({"quantization": quantize} if quantize else {})}
        return save_weights(directory, tensors, config, WEIGHTS_NAME, CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, model=None, dtype=torch.float32,
                        device="cpu") -> EagleDrafter:
        """Load a drafter saved by :meth:`save_pretrained`; with ``model``, check it fits.

        Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for anything else:
        bad or incomplete config, weights truncated, edited or not matching the config, NaN / inf weights,
        another backbone.
        """
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
        if cfg.get("quantization", None) not in (None, *QUANTIZATIONS):
            raise ValueError(f"{cfg_path}: unknown quantization {cfg['quantization']!r} (known: {QUANTIZATIONS})")
        try:
            d = cls(cfg["hidden_size"], cfg["vocab_size"], cfg["num_heads"], cfg["kv_heads"], cfg["head_dim"],
                    cfg["intermediate_size"], cfg["rms_norm_eps"], cfg["rope_theta"], cfg["attention_bias"],
                    draft_vocab=cfg.get("draft_vocab"), backbone=cfg.get("backbone", ""),
                    fingerprint=cfg.get("lm_head_fingerprint", ""), extra=cfg.get("extra"))
            if "clp" in cfg:
                d.attach_clp(cfg["clp"]["depth"], cfg["clp"]["threshold"])
        except KeyError as e:
            raise ValueError(f"{cfg_path} lacks the field {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise ValueError(f"{cfg_path}: {e}") from e
        try:
            state = load_file(str(w_path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{w_path} is truncated or corrupted: {e}") from e
        if sha256(w_path) != cfg.get("weights_sha256"):
            raise ValueError(f"{w_path} is corrupted, edited or from another save: its sha256 is not the one "
                             f"recorded in {CONFIG_NAME}")
        for name, t in state.items():
            if not bool(torch.isfinite(t.float()).all()):
                raise ValueError(f"{w_path}: {name} holds NaN or inf; the drafter was saved from a diverged run")
        if cfg.get("quantization"):
            try:
                state = _dequantized(state)
            except ValueError as e:
                raise ValueError(f"{w_path}: {e}") from e
        try:
            d.load_state_dict({n: t.float() for n, t in state.items()}, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{w_path} does not match {cfg_path}: {e}") from e
        clp, d.clp = d.clp, None  # the CLP stays fp32 whatever the drafter's dtype
        d = d.to(device=device, dtype=dtype).eval()
        d.clp = None if clp is None else clp.to(device).eval()
        if model is not None:
            try:
                d.check_compatible(model)
            except ValueError as e:
                raise ValueError(f"{directory}: {e}") from e
        return d
