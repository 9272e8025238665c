"""Training the EAGLE-style drafter (clp_fast.train.eagle): a killed run resumes to the same weights, training on
from a saved drafter, re-fitting only its CLP, the calibration table, and the CLI's data-only build."""

from __future__ import annotations

import json

import pytest
import torch

from clp_fast.train import eagle as train_eagle_mod
from clp_fast.train import eagle_eval
from clp_fast.train.config import DATA_FIELDS
from tests.conftest import tiny_model


class ByteTokenizer:
    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))


DATA = dict(max_tokens=1600, heldout_tokens=300, window=48, skip_first=4, gen_prompts=0, heldout_prompts=2,
            gen_new_tokens=4, prompt_chars=160, batch_size=64, prefill_batch=8, gen_batch=8, max_ram_gb=0.0003,
            stdlib=False, exclude=[])


def _train(model, tmp, name, cache_dir_name=None, **kw):
    from clp_fast.eval.data import stdlib_dir

    data = {**DATA, "tokenizer": ByteTokenizer(), "corpus": [str(stdlib_dir() / "json")],
            **{k: kw.pop(k) for k in list(kw) if k in DATA_FIELDS}}
    opts = dict(depth=3, batch_windows=4, lr=3e-3, warmup_steps=2, checkpoint_every=5, negatives=64, max_steps=12,
                save_dtype=torch.float32)
    cache = tmp / (cache_dir_name or f"{name}-cache")
    return train_eagle_mod.train_eagle(model, tmp / name, cache_dir=cache, data=data, progress=False,
                                       **{**opts, **kw})


def test_training_resumes_to_the_same_weights_after_a_kill(tmp_path, monkeypatch):
    model = tiny_model("qwen2", max_position_embeddings=512)
    ref = _train(model, tmp_path, "ref")
    card = json.loads((tmp_path / "ref" / "training_card.json").read_text())
    assert card["heldout"]["positions"] > 0 and len(card["heldout"]["acc"]) == 3
    assert card["heldout_continuations"]["kind"] == "heldout (greedy part)"
    assert 0 < card["heldout_continuations"]["positions"] < DATA["heldout_prompts"] * DATA["gen_new_tokens"]
    losses = [row[1] for row in card["loss_history"]]
    assert losses[-1] < losses[0], losses  # it trained
    cal = ref.extra["calibration"]  # its priors: measured on the held-out windows the card reports
    assert sum(cal["counts"][0]) == card["heldout"]["positions"]  # depth 1: every held-out guess
    chain = card["heldout"]["chain"]
    for j in (1, 2):  # depth j + 1: only the guesses whose parents were all right
        assert sum(cal["counts"][j]) == round(chain[j - 1] * card["heldout"]["positions"])

    def kill(step):
        if step == 7:  # after the checkpoint at step 5: steps 6-7 are redone on resume
            raise KeyboardInterrupt

    monkeypatch.setattr(train_eagle_mod, "after_step", kill)
    with pytest.raises(KeyboardInterrupt):
        _train(model, tmp_path, "out")
    assert (tmp_path / "out-cache" / train_eagle_mod.CKPT_NAME).is_file()
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="--resume"):
        _train(model, tmp_path, "out")
    got = _train(model, tmp_path, "out", resume=True)
    for (n, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), n


def test_training_on_from_a_saved_drafter_starts_at_its_weights(tmp_path):
    """``init=DIR``: training starts from that drafter (its held-out numbers are the card's "at init", and with a
    vanishing learning rate the result stays at its weights, unlike a fresh start); a draft vocabulary that differs
    from the saved one's and a missing folder are named."""
    model = tiny_model("qwen2", max_position_embeddings=512)
    ref = _train(model, tmp_path, "ref")
    ref_card = json.loads((tmp_path / "ref" / "training_card.json").read_text())
    got = _train(model, tmp_path, "on", init=str(tmp_path / "ref"), lr=1e-12, max_steps=2,
                 cache_dir_name="ref-cache")
    card = json.loads((tmp_path / "on" / "training_card.json").read_text())
    assert card["heldout_at_init"]["acc"] == ref_card["heldout"]["acc"]  # the same weights on the same positions
    assert got.extra["training"]["init"] == str(tmp_path / "ref")
    fresh = _train(model, tmp_path, "fresh", lr=1e-12, max_steps=2, cache_dir_name="ref-cache")
    for (n, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=n)
    assert any(not torch.allclose(a, c, atol=1e-3) for a, c in zip(ref.state_dict().values(),
                                                                     fresh.state_dict().values()))
    with pytest.raises(ValueError, match="draft_vocab=64 differs"):
        _train(model, tmp_path, "bad", init=str(tmp_path / "ref"), draft_vocab=64, cache_dir_name="ref-cache")
    with pytest.raises(FileNotFoundError, match="init='/nowhere'"):
        _train(model, tmp_path, "bad2", init="/nowhere")


def test_a_narrower_mlp_is_trained_saved_and_loaded_at_its_width(tmp_path):
    """``intermediate_size``: the drafter's MLP is that wide (not the backbone's), its saved config says so and it
    loads back at that width; training on from it at another width, or a width of 0, is named."""
    model = tiny_model("qwen2", max_position_embeddings=512)
    assert model.config.intermediate_size != 24
    got = _train(model, tmp_path, "narrow", intermediate_size=24, max_steps=2)
    assert got.intermediate_size == 24
    assert got.layer.mlp.up_proj.weight.shape == (24, model.config.hidden_size)
    assert got.layer.mlp.down_proj.weight.shape == (model.config.hidden_size, 24)
    assert json.loads((tmp_path / "narrow" / "config.json").read_text())["intermediate_size"] == 24
    with pytest.raises(ValueError, match="intermediate_size=32 differs"):
        _train(model, tmp_path, "bad", init=str(tmp_path / "narrow"), intermediate_size=32,
               cache_dir_name="narrow-cache")
    with pytest.raises(ValueError, match="intermediate_size=0 must be"):
        _train(model, tmp_path, "bad2", intermediate_size=0, cache_dir_name="narrow-cache")


def test_zero_steps_from_a_saved_drafter_only_refits_its_clp(tmp_path):
    """``init=DIR, max_steps=0`` (``--eagle-init DIR --eagle-max-steps 0``): the saved weights unchanged, the card's
    held-out numbers those of DIR, a CLP fitted and saved; without ``init`` it is refused, naming the value."""
    model = tiny_model("qwen2", max_position_embeddings=512)
    ref = _train(model, tmp_path, "ref")
    got = _train(model, tmp_path, "refit", init=str(tmp_path / "ref"), max_steps=0, cache_dir_name="ref-cache")
    for (n, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items()):
        if not n.startswith("clp."):
            assert torch.equal(a, b), n
    card = json.loads((tmp_path / "refit" / "training_card.json").read_text())
    assert card["fit"]["steps"] == 0 and card["heldout"]["acc"] == card["heldout_at_init"]["acc"]
    assert got.clp is not None and card["clp"]["clp"]["threshold"] == got.clp_threshold
    with pytest.raises(ValueError, match="max_steps=0 trains nothing"):
        _train(model, tmp_path, "none", max_steps=0)
    with pytest.raises(ValueError, match="max_steps=-1"):
        _train(model, tmp_path, "neg", max_steps=-1)


def test_calibration_table_is_hits_over_seen_with_pseudo_counts():
    """Hand-computed: two depths, three anchors; depth 2 counts only anchors whose depth-1 guess was right."""
    binned = torch.zeros(2, 2, eagle_eval.CALIB_BINS)
    hits = torch.tensor([[True, True], [True, False], [False, True]])
    probs = torch.tensor([[0.95, 0.35], [0.91, 0.31], [0.05, 0.99]])
    eagle_eval._bin(binned, hits, probs)
    got = eagle_eval.calibration_table(binned)
    c = eagle_eval.CALIB_PSEUDO
    assert got["counts"][0][9] == 2 and got["counts"][0][0] == 1 and got["counts"][1][3] == 2
    assert sum(got["counts"][1]) == 2  # the third anchor's depth-2 guess (parent wrong) is not counted
    assert got["rates"][0][9] == pytest.approx((2 + c * 0.95) / (2 + c))
    assert got["rates"][1][3] == pytest.approx((1 + c * 0.35) / (2 + c))
    assert got["rates"][1][5] == pytest.approx(0.55)  # unseen: its midpoint


def test_cli_data_only_builds_the_cache_and_trains_nothing(tmp_path, monkeypatch, capsys):
    """``clp-fast train --drafter eagle --data-only``: the shards are written, no drafter and no checkpoint."""
    from clp_fast.cli import build_parser
    from clp_fast.eval.data import stdlib_dir
    from clp_fast.models import hub

    model = tiny_model("qwen2", max_position_embeddings=512)
    monkeypatch.setattr(hub, "load_model", lambda name, dtype=None: (model, ByteTokenizer()))
    args = build_parser().parse_args(
        ["train", "--drafter", "eagle", "--model", "tiny", "--out", str(tmp_path / "out"), "--cache-dir",
         str(tmp_path / "cache"), "--data-only", "--no-stdlib", "--corpus", str(stdlib_dir() / "json"),
         "--max-tokens", "800", "--window", "48", "--gen-prompts", "0", "--heldout-prompts", "0", "--dtype", "fp32"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["tf"]["tokens_this_run"] > 0
    assert list((tmp_path / "cache" / "tf").glob("shard-*.safetensors"))
    assert not (tmp_path / "cache" / train_eagle_mod.CKPT_NAME).exists()
    assert not (tmp_path / "out" / "drafter.safetensors").exists()


def test_docstring_prompts_are_planned_and_continued_after_the_docstring(tmp_path):
    """``prompt_style="docstring"``: the continuations start after a def and its docstring (HumanEval's shape),
    and the shard marks the greedy part from there."""
    from clp_fast.eval.data import stdlib_dir
    from clp_fast.train import shards

    src = tmp_path / "corpus" / "short.py"
    src.parent.mkdir()
    src.write_text("".join(f"def f{i}(x):\n    '''Doc {i}.'''\n    return x + {i}\n\n\n" for i in range(12)))
    model = tiny_model("qwen2", max_position_embeddings=512)
    _train(model, tmp_path, "doc", data_only=True, gen_prompts=3, prompt_style="docstring", gen_new_tokens=6,
           corpus=[str(stdlib_dir() / "json"), str(src.parent)])
    plan = json.loads((tmp_path / "doc-cache" / "plan.json").read_text())
    assert len(plan["gen"]) == 3 and len(plan["heldout"]) == DATA["heldout_prompts"]
    for ids in plan["gen"] + plan["heldout"]:  # whole prompts: json's longer ones are skipped, not cut
        text = bytes(ids).decode()
        assert text.startswith("def f") and text.endswith("'''\n"), text
    got = shards.load_shard(next((tmp_path / "doc-cache" / "gen").glob("shard-*.safetensors")))
    lens = [len(p) for p in plan["gen"][: got["length"].shape[0]]]
    assert got["gen_start"].tolist() == [n - 1 for n in lens]
    assert all(int(n) > p for n, p in zip(got["length"], lens))  # the backbone's continuation follows
    held = shards.load_shard(next((tmp_path / "doc-cache" / "heldout").glob("shard-*.safetensors")))

    def argmax_guesses(data, w, L):  # always right: every masked-in position counts once
        am = data["argmax"][w, :L].long()
        return torch.stack([am[(torch.arange(L - 1) + j).clamp(max=L - 1)] for j in (1, 2)], 1)

    for greedy_only, first in ((False, held["start"]), (True, held["gen_start"])):
        ev = eagle_eval.heldout_accuracy(tmp_path / "doc-cache", 2, argmax_guesses, "heldout", greedy_only=greedy_only)
        want = sum(max(0, int(n) - 2 - int(f)) for n, f in zip(held["length"], first))  # anchors f .. L - 3
        assert ev["positions"] == want and ev["tau"] == 3.0, (ev, want)


def test_a_cache_from_before_a_new_data_field_is_kept(tmp_path):
    """A run.json written before a data option existed holds that option's default: no re-plan, no rebuild."""
    model = tiny_model("qwen2", max_position_embeddings=512)
    _train(model, tmp_path, "old", data_only=True)
    cache = tmp_path / "old-cache"
    run = json.loads((cache / "run.json").read_text())
    del run["config"]["prompt_style"]
    (cache / "run.json").write_text(json.dumps(run))
    stamps = {p: p.stat().st_mtime_ns for p in [cache / "plan.json", *cache.rglob("shard-*.safetensors")]}
    _train(model, tmp_path, "old", data_only=True, resume=True)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_gen_repeat_visits_continuation_shards_that_many_times_per_epoch():
    cfg = train_eagle_mod.EagleTrainConfig(epochs=2, batch_windows=4, gen_repeat=3)
    steps = train_eagle_mod._schedule([8, 5, 4], [False, True, False], cfg)
    assert len(steps) == 2 * (2 + 3 * 2 + 1)
    assert len(set(steps)) == len(steps)
    for e in (0, 1):
        assert sorted(r for ep, s, _, r in steps if ep == e and s == 1) == [0, 0, 1, 1, 2, 2]
        assert {r for ep, s, _, r in steps if ep == e and s != 1} == {0}
    assert steps == train_eagle_mod._schedule([8, 5, 4], [False, True, False], cfg)
    with pytest.raises(ValueError, match="gen_repeat=0"):
        train_eagle_mod.EagleTrainConfig(gen_repeat=0).validate()
