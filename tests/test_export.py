"""clp-fast export --format vllm: the tensors vLLM will read are the heads' and the drafter's own (loading them in
vLLM is make bench-vllm's job: vLLM is not in the test environment)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from clp_fast.drafts.eagle import EagleDrafter
from clp_fast.export import export_vllm
from clp_fast.heads import MTPHeads
from tests.conftest import tiny_model


def _random(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.1)
    return module


def test_medusa_layout_maps_each_head_and_shares_the_lm_head(tmp_path):
    model = tiny_model("qwen2")
    heads = _random(MTPHeads.for_model(model, 3))
    out = export_vllm(model, tmp_path / "medusa", heads=heads, dtype=torch.float32)
    t = load_file(str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_heads"] == 3 and cfg["original_lm_head"] and cfg["medusa_fc_bias"]
    assert cfg["vocab_size"] == cfg["truncated_vocab_size"] == model.config.vocab_size
    assert sorted(t) == sorted([f"blocks.{j}.layers.0.{n}" for j in range(3) for n in ("weight", "bias")]
                               + ["lm_heads.0.weight"])
    h = torch.randn(5, model.config.hidden_size)
    for j in range(3):  # vLLM's ResidualBlock x + SiLU(W x + b) with the exported tensors == head j's hidden
        z = h + torch.nn.functional.silu(h @ t[f"blocks.{j}.layers.0.weight"].T + t[f"blocks.{j}.layers.0.bias"])
        torch.testing.assert_close(z, heads(h)[:, j + 1], rtol=1e-5, atol=1e-5)
    assert torch.equal(t["lm_heads.0.weight"], model.get_output_embeddings().weight.detach())


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_eagle_layout_is_a_one_layer_llama_without_input_norm(tmp_path, arch):
    model = tiny_model(arch)
    d = EagleDrafter.for_model(model, init="random", std=0.1)
    out = export_vllm(model, tmp_path / "eagle", drafter=d, dtype=torch.float32)
    t = load_file(str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["attention_bias"] == (arch == "qwen2")
    assert cfg["hidden_size"] == d.hidden_size and cfg["num_key_value_heads"] == d.kv_heads
    assert not any("input_layernorm" in n or "embed" in n or "lm_head" in n for n in t)
    assert torch.equal(t["fc.weight"], d.fc.weight.detach())
    for name, w in d.layer.state_dict().items():
        assert torch.equal(t[f"layers.0.{name}"], w), name
    assert ("layers.0.self_attn.q_proj.bias" in t) == (arch == "qwen2")
    # Every parameter of the Llama decoder layer the config describes is in the export (none left uninitialised
    # by a loader): Llama's attention_bias also biases o_proj, which Qwen2 has not -- exported as zeros.
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    keys = {f"layers.0.{n}" for n in LlamaDecoderLayer(LlamaConfig(**cfg), 0).state_dict()} - {
        "layers.0.input_layernorm.weight"}
    assert keys == {n for n in t if n.startswith("layers.0.")}, keys ^ set(t)
    if arch == "qwen2":
        assert not t["layers.0.self_attn.o_proj.bias"].any()


def test_export_refuses_a_full_folder_and_ambiguous_input(tmp_path):
    model = tiny_model("qwen2")
    heads = MTPHeads.for_model(model, 2)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        export_vllm(model, tmp_path / "x", heads=heads)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="exactly one of heads= and drafter="):
        export_vllm(model, tmp_path / "y")
    assert not (tmp_path / "y").exists()
