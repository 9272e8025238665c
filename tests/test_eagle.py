"""The EAGLE-style drafter (clp_fast.drafts.eagle) as a draft source, its training loss and its files.

Lossless output is checked against transformers' greedy, the drafter's cache against a fresh teacher-forced
forward over the committed tokens (nothing drafted may leak into it), acceptance with a drafter overfitted on
the continuation it is asked for, the training step per depth and in bf16 autocast, saved and shipped files.
Training runs (resume, init, CLI): tests/test_eagle_train.py.
"""

from __future__ import annotations

import json

import pytest
import torch

import clp_fast
from clp_fast.drafts import eagle
from clp_fast.drafts.eagle import EagleDrafter, EagleSource
from clp_fast.engine import generate_processed, sampling
from clp_fast.engine.speculation import SourceGate
from clp_fast.heads import MTPHeads
from clp_fast.train.eagle import EagleTrainConfig, step_loss, unrolled, unrolled_loss
from tests.conftest import assert_equal_ids, left_pad, tiny_model
from tests.test_decode import PROMPTS, hf_greedy

N_NEW = 24
ORACLE_PROMPT = [5, 17, 300, 2, 999, 41, 8]


def mute_heads(model):
    """One MTP head whose CLP takes none of its guesses: lossless decoding needs heads, these add no guess in fixed
    speculation (adaptive speculation feeds its depth-1 guess), so deeper accepted guesses are the drafter's."""
    heads = MTPHeads.for_model(model, 1)
    with torch.no_grad():
        heads.clp.linear.bias.fill_(-10.0)
    return heads


def random_drafter(model, std: float = 0.05) -> EagleDrafter:
    torch.manual_seed(7)
    return EagleDrafter.for_model(model, init="random", std=std)


def decode(model, ids, mask, drafter, depth=3, speculation="fixed", n=N_NEW, record=None, top_m=1):
    def factory(bb, heads, calib):
        src = EagleSource(bb, drafter, depth, top_m)
        if record is not None:
            record.append(src)
        return src

    return clp_fast.generate(model, ids, False, attention_mask=mask, max_new_tokens=n, mode="lossless",
                             eos_token_id=[], pad_token_id=0, prompt_lookup=0, drafts=[factory],
                             speculation=speculation, return_stats=True)


def window_data(model, seq: list[int], top_k: int = 32) -> dict:
    """One teacher-forced window as the training shards hold it: hidden, tokens, the backbone's top-k."""
    ids = torch.tensor([seq])
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        logp = torch.log_softmax(model.lm_head(hidden).float(), -1)
    lp, top = logp.topk(top_k, -1)
    return {"hidden": hidden, "tokens": ids, "top_ids": top, "top_logp": lp, "length": torch.tensor([len(seq)]),
            "start": torch.tensor([0]), "argmax": logp.argmax(-1)}


def overfit(model, seq: list[int], steps: int = 250, depth: int = 3) -> EagleDrafter:
    """A drafter trained on one sequence with the training loss (teacher forcing + unrolled own features)."""
    torch.manual_seed(3)
    d = EagleDrafter.for_model(model)
    cfg = EagleTrainConfig(depth=depth, negatives=0, reg_weight=0.1)
    data = window_data(model, seq)
    W = model.lm_head.weight.detach()
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)
    for s in range(steps):
        loss, _ = unrolled_loss(d, model.get_input_embeddings(), W, data, cfg, torch.Generator().manual_seed(s))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return d.eval()


@pytest.fixture(scope="module")
def oracle():
    """The tiny Qwen2 model, its greedy continuation of ORACLE_PROMPT and a drafter overfitted on it."""
    model = tiny_model("qwen2")
    ids = torch.tensor([ORACLE_PROMPT])
    want = hf_greedy(model, ids, torch.ones_like(ids), 40)
    return model, ids, want, overfit(model, want[0].tolist())


# ------------------------------------------------------------------------------------ lossless == greedy
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("batch", ["B=1", "ragged B=4"])
@pytest.mark.parametrize("speculation", ["fixed", "adaptive"])
@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_lossless_with_a_random_drafter_equals_transformers_greedy(arch, batch, speculation, shape):
    model = tiny_model(arch)
    rows = PROMPTS[:1] if batch == "B=1" else PROMPTS
    ids, mask = left_pad(rows)
    want = hf_greedy(model, ids, mask, N_NEW)
    top_m = 1 if shape == "chain" else 3
    got, st = decode(model, ids, mask, random_drafter(model), speculation=speculation, top_m=top_m)
    assert_equal_ids(got, want)
    if speculation == "fixed":
        assert st.drafted > 0  # the drafter's chains were fed and verified


def test_overfitted_drafter_guesses_are_accepted_and_output_stays_greedy(oracle):
    """The drafter trained on the very continuation it is asked for: long chains accepted (depth 3 and 4:
    deeper than any one-token guess), output equal to transformers' greedy. A random drafter on the same
    prompt is the control."""
    model, ids, want, d = oracle
    mask = torch.ones_like(ids)
    got, st = decode(model, ids, mask, d, depth=4, n=32)
    assert_equal_ids(got, want[:, : ids.shape[1] + 32])
    assert sum(st.accept_hist[3:]) >= 3, st.accept_hist
    assert st.tau > 2.0, (st.tau, st.accept_hist)
    _, ctrl = decode(model, ids, mask, random_drafter(model), depth=4, n=32)
    assert ctrl.tau < st.tau - 0.5, (ctrl.tau, st.tau)
    tree_out, tree = decode(model, ids, mask, d, depth=4, n=32, top_m=3)  # EAGLE-2 tree: its best path is the chain
    assert_equal_ids(tree_out, want[:, : ids.shape[1] + 32])
    assert sum(tree.accept_hist[3:]) >= 3, tree.accept_hist


def test_training_windows_teach_the_drafter_per_depth(oracle):
    """Teacher-forced, own-feature accuracy of the overfitted drafter at depths 1..3 (the quantity the
    training card reports), against the backbone's argmax at the same positions."""
    model, _, want, d = oracle
    data = window_data(model, want[0].tolist())
    with torch.no_grad():
        outs = unrolled(d, model.get_input_embeddings(), data["hidden"], data["tokens"], 3)
    L = want.shape[1]
    for j, f in enumerate(outs, start=1):
        guess = model.lm_head(f[0, : L - 1 - j]).argmax(-1)
        acc = (guess == data["argmax"][0, j : L - 1]).float().mean()
        assert acc > 0.8, (j, float(acc))  # an untrained (identity) drafter: ~1 / vocab


def test_bf16_autocast_step_follows_the_fp32_step(oracle):
    """``amp="bf16"``: the training step's loss and gradient equal fp32's to bf16 precision (its matmuls round
    their operands to 8 mantissa bits, ~2^-9 relative each, and accumulate in fp32: 2 % on the loss, gradient
    cosine > 0.99), and are not fp32's bits (autocast is on); a bad ``amp`` is named."""
    model, _, want, _ = oracle
    data = window_data(model, want[0].tolist())
    W = model.lm_head.weight.detach()
    losses, grads = {}, {}
    for amp in ("off", "bf16"):
        d = random_drafter(model)  # seeded: the same weights for both
        cfg = EagleTrainConfig(depth=3, negatives=0, amp=amp)
        loss, _ = step_loss(d, model.get_input_embeddings(), W, data, cfg, torch.Generator().manual_seed(0))
        loss.backward()
        losses[amp] = loss.detach()
        grads[amp] = torch.cat([p.grad.flatten() for p in d.parameters()])
    assert not torch.equal(losses["off"], losses["bf16"])
    torch.testing.assert_close(losses["bf16"], losses["off"], rtol=2e-2, atol=0)
    assert torch.nn.functional.cosine_similarity(grads["off"], grads["bf16"], dim=0) > 0.99
    with pytest.raises(ValueError, match="amp='fp16'"):
        EagleTrainConfig(amp="fp16").validate()


@pytest.mark.parametrize("drafter_kind", ["random", "overfitted", "overfitted tree", "overfitted, asked 1 step in 3"])
def test_drafter_cache_holds_only_committed_pairs(oracle, drafter_kind, monkeypatch):
    """After decoding (ragged B = 4 with the random drafter; B = 1 with accepted and rejected chains for the
    overfitted one), each row's drafter K/V and last output equal a fresh teacher-forced forward over the pairs
    of the tokens it committed, computed from transformers' hidden states: no drafted pair leaked in. With the
    source asked for guesses only one step in three (as SourceGate skips a source that does not pay), the
    queued pairs of the skipped steps go through the drafter together and give the same cache."""
    model, ids, want, d = oracle
    if "1 step in 3" in drafter_kind:
        steps = iter(range(10**6))
        monkeypatch.setattr(SourceGate, "asks", lambda self, i: next(steps) % 3 == 0)
    if drafter_kind == "random":
        d = random_drafter(model)
        ids, mask = left_pad(PROMPTS)
    else:
        mask = torch.ones_like(ids)
    made = []
    out, st = decode(model, ids, mask, d, depth=4, n=N_NEW, record=made, top_m=3 if "tree" in drafter_kind else 1)
    (src,) = made
    if "1 step in 3" in drafter_kind:
        assert_equal_ids(out, want[:, : ids.shape[1] + N_NEW])
        assert 0 < src.steps < st.forward_passes / 2, (src.steps, st.forward_passes)  # it drafted 1 step in 3
    src.catch_up()  # the last step's pairs wait for a next propose()
    for b in range(ids.shape[0]):
        seq = out[b][torch.cat([mask[b].bool(), torch.ones(N_NEW, dtype=torch.bool)])]
        m = int(src.lengths[b])
        assert len(ORACLE_PROMPT if drafter_kind != "random" else PROMPTS[b]) <= m < len(seq)
        with torch.no_grad():
            h = model.model(seq[None]).last_hidden_state
            mask_full = torch.ones(1, 1, m, m, dtype=torch.bool).tril()
            f, k, _ = d(h[:, :m], model.get_input_embeddings()(seq[None, 1 : m + 1]), torch.arange(m)[None], None,
                        None, mask_full)
        torch.testing.assert_close(src.k[b, :, :m], k[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(src.last[b], f[0, m - 1], atol=1e-4, rtol=1e-4)


def test_sampling_with_the_drafter_matches_enumeration():
    """generate_processed with the drafter's chains: the first three sampled tokens follow the processed
    distribution (chi-square against exact enumeration, as tests/test_sampling.py), the drafts were accepted and
    rejected; a rule that accepts every draft is rejected by the same check."""
    from tests.test_sampling import PROMPT, SMALL_V, chi2_pvalue, exact_first3, processors

    model = tiny_model("qwen2", vocab_size=SMALL_V)
    d = EagleDrafter.for_model(model)  # identity init: guesses the backbone's own argmax again

    def sample(seed, n=8000):
        ids = torch.tensor([PROMPT] * n)
        g = torch.Generator().manual_seed(seed)
        out, st = generate_processed(model, ids, mute_heads(model), max_new_tokens=3, mode="lossless",
                                     logits_processor=processors(), do_sample=True, generator=g, eos_token_id=[],
                                     max_step_tokens=None, prompt_lookup=0, drafts=[EagleSource.factory(d, 2)],
                                     return_stats=True)
        new = out[:, len(PROMPT):]
        return (new[:, 0] * SMALL_V + new[:, 1]) * SMALL_V + new[:, 2], st

    exact = exact_first3(model)
    codes, st = sample(11)
    assert min(st.accept_hist[:2]) > 200, st.accept_hist
    p = chi2_pvalue(torch.bincount(codes, minlength=SMALL_V ** 3), exact)
    assert p > 1e-3, f"chi-square p={p:.2e}"
    original = sampling.accept_draft
    try:
        sampling.accept_draft = lambda p_x, u: torch.ones_like(u, dtype=torch.bool)
        bad, _ = sample(11)
    finally:
        sampling.accept_draft = original
    assert chi2_pvalue(torch.bincount(bad, minlength=SMALL_V ** 3), exact) < 1e-6


# ------------------------------------------------------------------------------------ persistence, errors
def test_int8_rowwise_file_is_half_the_bytes_and_within_half_a_step(tmp_path):
    """``save_pretrained(quantize="int8-rowwise")``: every matrix within half a quantisation step (its row's
    max / 127 / 2) of the original, vectors and the CLP exact, about half the bf16 file; fp32 lossless decoding
    with it still equals transformers' greedy; an unknown quantisation, in the call or in a config, is named."""
    from clp_fast.drafts.eagle_model import quantize_rows

    w = torch.randn(6, 40)
    w[2] = 0.0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and bool((q[2] == 0).all())
    assert bool(((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all())
    model = tiny_model("qwen2")
    d = random_drafter(model)
    d.attach_clp(3, 0.7)
    d.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    d.save_pretrained(tmp_path / "int8", dtype=torch.bfloat16, quantize="int8-rowwise")
    size = {k: (tmp_path / k / "drafter.safetensors").stat().st_size for k in ("bf16", "int8")}
    assert size["int8"] < 0.6 * size["bf16"], size
    back = EagleDrafter.from_pretrained(tmp_path / "int8", model=model)
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["quantization"] == "int8-rowwise"
    for (n, a), (_, b) in zip(d.state_dict().items(), back.state_dict().items()):
        if a.dim() == 2 and not n.startswith("clp."):
            step = a.abs().amax(1, keepdim=True) / 127
            assert bool(((a - b).abs() <= step / 2 + 1e-6).all()), n
            assert not torch.equal(a, b), n  # quantised, not stored as it was
        elif n.startswith("clp."):
            assert torch.equal(a, b), n
        else:
            assert torch.equal(a.bfloat16().float(), b), n
    ids, mask = left_pad(PROMPTS)
    got, st = decode(model, ids, mask, back)
    assert_equal_ids(got, hf_greedy(model, ids, mask, N_NEW))
    assert st.drafted > 0
    with pytest.raises(ValueError, match="quantize='int4'"):
        d.save_pretrained(tmp_path / "bad", quantize="int4")
    cfg = json.loads((tmp_path / "int8" / "config.json").read_text())
    (tmp_path / "int8" / "config.json").write_text(json.dumps({**cfg, "quantization": "int4"}))
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        EagleDrafter.from_pretrained(tmp_path / "int8")


def test_save_load_round_trip_and_registered_name(tmp_path):
    model = tiny_model("llama")
    d = random_drafter(model)
    d.save_pretrained(tmp_path / "d")
    back = EagleDrafter.from_pretrained(tmp_path / "d", model=model)
    for (n, a), (_, b) in zip(d.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    ids, mask = left_pad(PROMPTS)
    want = hf_greedy(model, ids, mask, 12)
    with pytest.raises(ValueError, match="use_drafter"):
        clp_fast.generate(model, ids, mute_heads(model), attention_mask=mask, max_new_tokens=12, eos_token_id=[],
                          pad_token_id=0, drafts=["eagle"])
    eagle.use_drafter(model, tmp_path / "d", depth=3)
    try:
        got = clp_fast.generate(model, ids, mute_heads(model), attention_mask=mask, max_new_tokens=12, eos_token_id=[],
                                pad_token_id=0, prompt_lookup=0, drafts=["eagle"], speculation="fixed")
    finally:
        eagle.use_drafter(model, None)
    assert_equal_ids(got, want)


def test_bad_drafters_and_files_are_named(tmp_path):
    qwen, llama = tiny_model("qwen2"), tiny_model("llama")
    d = random_drafter(llama)
    d.save_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="another backbone"):
        EagleDrafter.from_pretrained(tmp_path / "d", model=qwen)
    with pytest.raises(ValueError, match="depth=0"):
        decode(llama, *left_pad(PROMPTS[:1]), d, depth=0)
    with pytest.raises(TypeError, match="EagleDrafter"):
        EagleSource(None, object())
    with pytest.raises(ValueError, match="draft_vocab=2000"):
        EagleDrafter.for_model(llama, draft_vocab=2000)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        EagleDrafter.from_pretrained(tmp_path / "nowhere")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    w = tmp_path / "d" / "drafter.safetensors"
    saved = w.read_bytes()
    w.unlink()
    with pytest.raises(FileNotFoundError, match="drafter.safetensors is missing"):
        EagleDrafter.from_pretrained(tmp_path / "d")
    w.write_bytes(saved)
    w.write_bytes(w.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(ValueError, match="sha256"):
        EagleDrafter.from_pretrained(tmp_path / "d")
    del cfg["head_dim"]
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lacks the field 'head_dim'"):
        EagleDrafter.from_pretrained(tmp_path / "d")


def test_calibrated_priors_and_chains_that_stop_early(oracle, tmp_path):
    """A drafter saved with a calibration table proposes the table's rates as priors, and with ``stop_below``
    each chain ends at the first depth where the product of its priors falls below it; output stays greedy."""
    import copy

    model, ids, want, d = oracle
    d = copy.deepcopy(d)
    table = {"edges": [0.0, 0.5, 1.0], "rates": [[0.2, 0.9], [0.1, 0.6]]}
    d.extra = {"calibration": table}
    d.save_pretrained(tmp_path / "d")
    d = EagleDrafter.from_pretrained(tmp_path / "d", model=model)
    assert d.extra["calibration"] == table
    seen = []

    class Spy(EagleSource):
        def propose(self, live):
            out = super().propose(live)
            seen.extend(br for row in out for br in row)
            return out

    got, _ = clp_fast.generate(model, ids, False, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                               mode="lossless", eos_token_id=[], pad_token_id=0, prompt_lookup=0,
                               drafts=[lambda bb, h, c: Spy(bb, d, 4, 1, stop_below=0.5)], speculation="fixed",
                               return_stats=True)
    assert_equal_ids(got, want[:, : ids.shape[1] + 32])
    assert seen
    for br in seen:
        for j, p in enumerate(br.priors):
            assert any(p == pytest.approx(r) for r in table["rates"][min(j, 1)]), (j, p)
        chain = torch.tensor(br.priors).cumprod(0)
        stop = next((j + 1 for j, c in enumerate(chain.tolist()) if c < 0.5), 4)
        assert len(br.tokens) == stop, (br.priors, len(br.tokens))
    assert any(len(br.tokens) > 1 for br in seen)


def test_drafts_eagle_takes_the_shipped_drafter_that_fits(tmp_path, monkeypatch):
    """``drafts=["eagle"]`` without use_drafter: the shipped drafter whose LM-head fingerprint fits the model (here
    a folder standing in for clp_fast/assets/drafters), else an error naming the shipped ones."""
    from clp_fast import assets

    model = tiny_model("qwen2")
    ids, mask = left_pad(PROMPTS[:1])
    want = hf_greedy(model, ids, mask, 12)
    monkeypatch.setattr(assets, "DRAFTERS_DIR", tmp_path / "drafters")
    kw = dict(attention_mask=mask, max_new_tokens=12, mode="lossless", eos_token_id=[], pad_token_id=0,
              prompt_lookup=0, drafts=["eagle"], speculation="fixed")
    with pytest.raises(ValueError, match="none shipped"):
        clp_fast.generate(model, ids, False, **kw)
    random_drafter(tiny_model("llama")).save_pretrained(tmp_path / "drafters" / "other")  # another backbone
    with pytest.raises(ValueError, match="other"):
        clp_fast.generate(model, ids, False, **kw)
    random_drafter(model).save_pretrained(tmp_path / "drafters" / "tiny")
    got, st = clp_fast.generate(model, ids, False, return_stats=True, **kw)
    assert_equal_ids(got, want)
    assert st.drafted > 0
    eagle.use_drafter(model, None)


def test_every_shipped_drafter_loads_with_its_card_and_calibration():
    """The shipped drafter files are whole (the loader checks the weights' sha256 against the config), stored
    int8-rowwise (under the 20 MB a tracked file may take), and each carries its training card, its calibration
    table (its priors in the decode loop) and its CLP (``mode="clp"``)."""
    from clp_fast.assets import shipped_drafters

    shipped = shipped_drafters()
    assert "qwen2.5-coder-0.5b-instruct" in shipped
    for name, folder in shipped.items():
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["quantization"] == "int8-rowwise", name
        assert (folder / "drafter.safetensors").stat().st_size < 20 * 2**20, name
        d = EagleDrafter.from_pretrained(folder)
        assert d.fingerprint and d.draft_vocab <= d.vocab_size and d.clp is not None, name
        cal = d.extra["calibration"]
        assert len(cal["rates"]) >= 1 and all(len(r) == len(cal["edges"]) - 1 for r in cal["rates"]), name
        assert (folder / "training_card.md").is_file() and (folder / "training_card.json").is_file(), name
