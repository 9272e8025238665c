"""Bad input gets a clear exception naming the offending value, and nothing is left half-written."""

from __future__ import annotations

import json
import os

import pytest
import torch

import clp_fast
from clp_fast.cli import main as cli_main
from clp_fast.heads import MTPHeads
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def heads(model):
    return MTPHeads.for_model(model, 2)


def gen(model, ids, heads=None, **kw):
    kw.setdefault("max_new_tokens", 4)
    kw.setdefault("mode", "lossless" if heads is not None else "greedy")
    return clp_fast.generate(model, ids, heads, **kw)


@pytest.mark.parametrize(
    "ids,kw,exc,match",
    [
        (torch.zeros(1, 0, dtype=torch.long), {}, ValueError, "empty prompt"),
        (torch.zeros(2, 3, dtype=torch.long), {"attention_mask": torch.tensor([[1, 1, 1], [0, 0, 0]])}, ValueError,
         r"rows \[1\]"),
        (torch.ones(1, 3, dtype=torch.long), {"max_new_tokens": 0}, ValueError, "max_new_tokens=0"),
        (torch.ones(1, 3, dtype=torch.long), {"max_new_tokens": -2}, ValueError, "max_new_tokens=-2"),
        (torch.ones(1, 3, dtype=torch.long), {"max_new_tokens": 2.5}, ValueError, "max_new_tokens=2.5"),
        (torch.ones(1, 3, dtype=torch.long), {"max_new_tokens": 254}, ValueError, "exceeds the model's context of 256"),
        (torch.ones(1, 3, dtype=torch.long), {"mode": "fast"}, ValueError, "mode='fast'"),
        (torch.tensor([[1, 1000]]), {}, ValueError, "token id 1000 is outside the vocabulary"),
        (torch.tensor([[-1, 5]]), {}, ValueError, "token id -1"),
        (torch.tensor([[1.0, 2.0]]), {}, TypeError, "integer token ids"),
        (torch.tensor([1, 2, 3]), {}, ValueError, r"\[batch, seq\]"),
        ([[1, 2, 3]], {}, TypeError, "torch.Tensor"),
        (torch.ones(2, 3, dtype=torch.long), {"attention_mask": torch.ones(2, 4, dtype=torch.long)}, ValueError,
         r"attention_mask shape \(2, 4\) does not match input_ids shape \(2, 3\)"),
        (torch.ones(1, 3, dtype=torch.long), {"attention_mask": torch.tensor([[0, 2, 1]])}, ValueError, "only 0 and 1"),
        (torch.ones(1, 3, dtype=torch.long), {"max_step_tokens": -1}, ValueError, "max_step_tokens=-1"),
        (torch.ones(1, 3, dtype=torch.long), {"max_step_tokens": 2.5}, ValueError, "max_step_tokens=2.5"),
    ],
)
def test_generate_rejects_bad_input(model, ids, kw, exc, match):
    with pytest.raises(exc, match=match):
        gen(model, ids, **kw)


def test_modes_and_policies_are_checked(model, heads):
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="no shipped MTP heads fit this backbone"):
        gen(model, ids, None, mode="clp")
    with pytest.raises(ValueError, match="needs heads saved with a gate"):
        gen(model, ids, heads, mode="clp", policy="gate")
    with pytest.raises(ValueError, match="policy='best'"):
        gen(model, ids, heads, policy="best")
    with pytest.raises(ValueError, match="clp_threshold=1.5"):
        gen(model, ids, heads, clp_threshold=1.5)
    with pytest.raises(TypeError, match="MTPHeads"):
        gen(model, ids, heads="my heads")


def test_device_mismatch_is_named(model):
    ids = torch.ones(1, 3, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="input_ids are on meta but the model is on cpu"):
        gen(model, ids)


@pytest.mark.parametrize("k", [0, 9, -1, 2.0, True])
def test_k_out_of_range(model, k):
    with pytest.raises(ValueError, match=f"k={k!r}"):
        MTPHeads.for_model(model, k)


def test_truncated_needs_fewer_heads(heads):
    with pytest.raises(ValueError, match="cannot take 3 heads from a set of k=2"):
        heads.truncated(3)


def test_heads_for_another_backbone(model, tmp_path):
    other_h = tiny_model("qwen2", hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="hidden size 48, the model has 96"):
        gen(model, torch.ones(1, 3, dtype=torch.long), MTPHeads.for_model(other_h, 2))
    other_v = tiny_model("qwen2", vocab_size=1200)
    with pytest.raises(ValueError, match="vocab size 1200, the model has 1000"):
        gen(model, torch.ones(1, 3, dtype=torch.long), MTPHeads.for_model(other_v, 2))
    torch.manual_seed(99)
    other_w = tiny_model("qwen2")
    with torch.no_grad():
        other_w.lm_head.weight.mul_(1.5)
    h = MTPHeads.for_model(other_w, 2)
    h.save_pretrained(tmp_path / "h")
    with pytest.raises(ValueError, match="LM-head fingerprint"):
        MTPHeads.from_pretrained(tmp_path / "h", model=model)


def test_heads_round_trip_is_exact(model, tmp_path):
    h = MTPHeads.for_model(model, 3, with_gate=True, thresholds={"clp": 0.8}, draft_vocab=77)
    with torch.no_grad():
        for p in h.parameters():
            p.normal_()
    h.save_pretrained(tmp_path / "h")
    back = MTPHeads.from_pretrained(tmp_path / "h", model=model)
    for (n, a), (_, b) in zip(h.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    assert back.thresholds["clp"] == 0.8 and back.k == 3 and back.draft_vocab == 77
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "h" / "heads.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not 0600
    assert back.truncated(2).draft_vocab == 77
    assert json.loads((tmp_path / "h" / "config.json").read_text())["parameters"]["clp"] == (96 + 3) * 3 + 3


@pytest.mark.parametrize("bad", [0, -1, 1001, 2.0, True])
def test_bad_draft_vocab(model, bad):
    with pytest.raises(ValueError, match=f"draft_vocab={bad!r}"):
        MTPHeads.for_model(model, 2, draft_vocab=bad)


def test_truncated_or_corrupted_heads_file(model, tmp_path):
    MTPHeads.for_model(model, 2).save_pretrained(tmp_path / "h")
    w = tmp_path / "h" / "heads.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ValueError, match="heads.safetensors is truncated or corrupted"):
        MTPHeads.from_pretrained(tmp_path / "h")
    (tmp_path / "h" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MTPHeads.from_pretrained(tmp_path / "h")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        MTPHeads.from_pretrained(tmp_path / "nothing")


def test_save_is_atomic_on_failure(model, tmp_path, monkeypatch):
    import clp_fast.files as files_mod

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files_mod, "save_file", boom)
    with pytest.raises(OSError, match="No space"):
        MTPHeads.for_model(model, 2).save_pretrained(tmp_path / "h")
    assert not (tmp_path / "h").exists()
    assert list(tmp_path.iterdir()) == []  # no temp folder left behind


def test_cli_errors_are_clear(capsys, tmp_path):
    assert cli_main(["fetch", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "smollm2-135m-instruct" in err and "qwen2.5-coder-0.5b-instruct" in err
    assert cli_main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "p.jsonl"
    empty.write_text("\n")
    from clp_fast.cli import _read_prompts, build_parser

    args = build_parser().parse_args(["generate", "--model", "m", "--prompts-file", str(empty)])
    with pytest.raises(ValueError, match="holds no prompts"):
        _read_prompts(args)
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "   "])
    with pytest.raises(ValueError, match="empty prompt"):
        _read_prompts(args)
