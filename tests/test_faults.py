"""Faults, load and bad input: names resolve offline, arguments are checked before a model loads, the static
cache is sized before it is allocated, corrupt assets are named, killed training runs resume to what an
uninterrupted run gives (killed and concurrent fetches: tests/test_fetch_faults.py)."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import (  # also sets the thread count: a subprocess driver computes the same sums
    DRIVER_DEADLINE_S,
    spawn_driver,
    tiny_model,
)

from clp_fast.cli import main as cli_main
from clp_fast.models import hub


# ------------------------------------------------------------------------------- names resolve offline
@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every DNS lookup or socket connection the code under test attempts."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    return attempts


@pytest.mark.parametrize("name", ["nosuch", "Qwen/Qwen2.5-0.5B", "smollm2"])
def test_unknown_model_is_a_value_error_without_network(name, no_network, tmp_path):
    with pytest.raises(ValueError) as info:
        hub.load_model(name, home=tmp_path)
    assert repr(name) in str(info.value)
    for known in hub.KNOWN_MODELS:
        assert known in str(info.value)
    assert no_network == []


def test_cli_unknown_model_is_one_line_without_network(no_network, capsys):
    assert cli_main(["generate", "--model", "nosuch", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clp-fast: error: unknown model 'nosuch'") and "\n" not in err
    assert "smollm2-135m-instruct" in err
    assert no_network == []


@pytest.fixture
def model_never_loads(monkeypatch):
    """Any model load fails the test: argument errors must come first."""

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(hub, "load_model", loaded)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--prompts-file", "/nonexistent/p.jsonl"], "--prompts-file /nonexistent/p.jsonl does not exist"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
        (["--prompt", "x", "--k", "9"], "--k 9 must be <= 8"),
        (["--prompt", "x", "--k", "0"], "--k 0 must be >= 1"),
        (["--prompt", "x", "--threshold", "1.5"], "--threshold 1.5"),
        (["--prompt", "x", "--threads", "0"], "--threads 0"),
        (["--prompt", "x", "--prompt-lookup", "-1"], "--prompt-lookup -1"),
        (["--prompt", "x", "--max-step-tokens", "-2"], "--max-step-tokens -2"),
        (["--prompt", "x", "--heads", "/nonexistent/heads"], "--heads /nonexistent/heads: config.json is missing"),
        (["--prompt", "x", "--device", "cuda:0"], "no CUDA device"),
    ],
)
def test_cli_checks_arguments_before_loading_a_model(extra, match, model_never_loads, tmp_path, capsys):
    if "cuda" in match and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert cli_main(["generate", "--model", str(tmp_path), *extra]) == 2
    assert match in capsys.readouterr().err


def test_cli_unfetched_model_is_named_before_loading(model_never_loads, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CLP_FAST_HOME", str(tmp_path))
    assert cli_main(["generate", "--model", "smollm2-135m-instruct", "--prompt", "x"]) == 2
    assert "clp-fast fetch smollm2-135m-instruct" in capsys.readouterr().err


# ------------------------------------------------------------------------------- memory before allocation
def _tiny_ids(B: int, P: int = 5) -> torch.Tensor:
    return torch.randint(3, 1000, (B, P))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cache_estimate_equals_the_allocated_bytes(dtype):
    from clp_fast.models.memory import static_cache_bytes
    from clp_fast.models.native import NativeBackbone

    bb = NativeBackbone(tiny_model("qwen2", dtype=dtype))
    cache = bb.allocate_cache(3, 37)
    allocated = cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()
    assert static_cache_bytes(len(bb.layers), 3, bb.kv_heads, 37, bb.head_dim, dtype) == allocated


def _expected_cache(model, B: int, max_len: int) -> int:
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * B * cfg.num_key_value_heads * max_len * head_dim * 2 * 4  # K and V, fp32


def test_generate_refuses_a_cache_over_max_cache_bytes(tiny_qwen2, monkeypatch):
    import clp_fast
    from clp_fast.models.memory import CacheTooLargeError
    from clp_fast.models.native import StaticKVCache

    ids = _tiny_ids(3)
    max_len = 5 + 6 + 0 + 1  # greedy: prompt + max_new_tokens + no guesses + 1
    need = _expected_cache(tiny_qwen2, 3, max_len)
    ok = clp_fast.generate(tiny_qwen2, ids, mode="greedy", max_new_tokens=6, max_cache_bytes=need)
    assert ok.shape == (3, 11)

    def never(*args, **kwargs):
        raise AssertionError("the cache was allocated before its size was checked")

    monkeypatch.setattr(StaticKVCache, "allocate", classmethod(never))
    with pytest.raises(CacheTooLargeError, match=rf"B=3 rows of max length {max_len} needs {need:,} bytes") as info:
        clp_fast.generate(tiny_qwen2, ids, mode="greedy", max_new_tokens=6, max_cache_bytes=need - 1)
    assert "max_cache_bytes" in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="max_cache_bytes=0"):
        clp_fast.generate(tiny_qwen2, ids, mode="greedy", max_new_tokens=6, max_cache_bytes=0)


def test_generate_refuses_a_cache_larger_than_available_memory(tiny_qwen2, monkeypatch):
    import clp_fast
    from clp_fast.models import memory
    from clp_fast.models.memory import CacheTooLargeError
    from clp_fast.models.native import StaticKVCache

    def never(*args, **kwargs):
        raise AssertionError("the cache was allocated before its size was checked")

    monkeypatch.setattr(StaticKVCache, "allocate", classmethod(never))
    monkeypatch.setattr(memory, "available_bytes", lambda device: 100_000)  # a machine with 100 kB free
    need = _expected_cache(tiny_qwen2, 8, 5 + 40 + 1)
    with pytest.raises(CacheTooLargeError, match=rf"B=8 rows of max length 46 needs {need:,} bytes.*memory available"):
        clp_fast.generate(tiny_qwen2, _tiny_ids(8), mode="greedy", max_new_tokens=40)


def test_available_memory_is_read():
    from clp_fast.models.memory import available_bytes

    free = available_bytes("cpu")
    assert free is not None and 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------- corrupt assets
@pytest.fixture
def saved_heads(tiny_qwen2, tmp_path):
    from clp_fast.heads import MTPHeads

    heads = MTPHeads.for_model(tiny_qwen2, 2)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_()
    heads.save_pretrained(tmp_path / "h")
    return tmp_path / "h", heads


def test_edited_heads_weights_are_named(saved_heads):
    from clp_fast.heads import MTPHeads

    folder, _ = saved_heads
    w = folder / "heads.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x40  # one weight's exponent bit: the header, the size and the shapes all stay valid
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"heads.safetensors is corrupted, edited .* sha256"):
        MTPHeads.from_pretrained(folder)


def test_save_killed_between_its_renames_is_named(saved_heads, tiny_qwen2, monkeypatch):
    """Weights replaced, config not yet: the old config's sha256 names the half-replaced pair."""
    import clp_fast.files as files_mod
    from clp_fast.heads import MTPHeads

    folder, old = saved_heads

    def die(point):
        if point == "heads:replaced-heads.safetensors":
            raise KeyboardInterrupt

    new = MTPHeads.for_model(tiny_qwen2, 2)
    monkeypatch.setattr(files_mod, "kill_point", die)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(folder)
    with pytest.raises(ValueError, match="sha256"):
        MTPHeads.from_pretrained(folder)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c.update(k=3), r"heads.safetensors does not match .*config.json"),
        (lambda c: c.update(k=9), r"config.json: k=9"),
        (lambda c: c.update(k="two"), r"config.json: k='two'"),
        (lambda c: c.pop("hidden_size"), r"config.json lacks the field 'hidden_size'"),
        (lambda c: c.update(format="mtp/2"), r"config.json: unknown heads format 'mtp/2'"),
    ],
)
def test_bad_heads_config_is_named(saved_heads, edit, match):
    from clp_fast.heads import MTPHeads

    folder, _ = saved_heads
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        MTPHeads.from_pretrained(folder)


def test_heads_config_with_another_fingerprint_names_the_folder(saved_heads, tiny_qwen2):
    from clp_fast.heads import MTPHeads

    folder, _ = saved_heads
    cfg = json.loads((folder / "config.json").read_text())
    cfg["lm_head_fingerprint"] = "0123456789abcdef"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{folder}: .*fingerprint 0123456789abcdef != the model's"):
        MTPHeads.from_pretrained(folder, model=tiny_qwen2)


@pytest.mark.parametrize(("tensor", "index", "where"), [("weight", (1, 5, 7), "head 2, row 5"),
                                                       ("bias", (0, 3), "head 1, row 3"),
                                                       ("clp.linear.weight", (1, 0), "head 2, row 0")])
def test_nan_heads_are_named_by_head_and_row(saved_heads, tensor, index, where):
    from safetensors.torch import load_file

    from clp_fast.heads import MTPHeads

    folder, heads = saved_heads
    state = load_file(str(folder / "heads.safetensors"))
    state[tensor][index] = float("nan")
    heads.load_state_dict(state)
    heads.save_pretrained(folder)  # a diverged run's heads, saved with a matching sha256
    with pytest.raises(ValueError, match=rf"{tensor} holds NaN or inf at {where}"):
        MTPHeads.from_pretrained(folder)


# ------------------------------------------------------------------------------- training: killed, resumed
# A run of a few seconds (1-layer model, ~384 tokens, two epochs) whose tiny max_ram_gb cuts the data into many
# shards and whose checkpoint_every=3 checkpoints several times.
FAST_TRAIN = dict(k=2, max_tokens=384, window=32, skip_first=4, gen_prompts=2, heldout_prompts=4, gen_new_tokens=6,
                  prompt_chars=120, batch_size=32, epochs=1, lr=1e-2, warmup_steps=2, checkpoint_every=3,
                  prefill_batch=4, gen_batch=4, max_ram_gb=0.00005, stdlib=False, exclude=[], progress=False,
                  top_k=8, kl_topk=8, ce_negatives=64, with_gate=False)


class ByteTokenizer:
    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))


def _train(tmp: Path, resume: bool):
    from clp_fast import train
    from clp_fast.eval.data import stdlib_dir

    model = tiny_model("qwen2", vocab_size=300, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same in every driver and in this process; 2 threads spin on a shared machine
    try:
        return train.train_heads(model, tmp / "out", tokenizer=ByteTokenizer(), corpus=[str(stdlib_dir() / "json")],
                                 cache_dir=tmp / "cache", resume=resume, **FAST_TRAIN)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted_heads(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("uninterrupted"), resume=False)


def _temps(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp-*"))


def test_training_killed_at_each_stage_resumes_to_the_same_heads(uninterrupted_heads, tmp_path):
    """SIGKILLed while writing a data shard, then while writing a checkpoint, then after writing the heads but
    before marking the run done: each resume picks up, and the last one ends with the uninterrupted run's heads."""
    import clp_fast.train as train_pkg

    out, cache = tmp_path / "out", tmp_path / "cache"
    for i, point in enumerate(["build:shard-tmp@3", "checkpoint-tmp@2", "finish:saved"]):
        proc = spawn_driver(__file__, ["train", str(tmp_path), "resume" if i else "fresh"], tmp_path / "home",
                            CLP_FAST_KILL_AT=point)
        _, err = proc.communicate(timeout=DRIVER_DEADLINE_S)
        assert proc.returncode == -9, f"{point}: exit {proc.returncode}\n{err[-3000:]}"
        assert (out / train_pkg.RUN_MARKER).is_file(), point  # the run is not marked done ...
        if point != "finish:saved":
            assert not (out / "heads.safetensors").exists(), point  # ... and left no heads to load
        if point.startswith("build"):
            assert any(name.endswith(f".tmp-{proc.pid}") for name in _temps(cache)), _temps(cache)
        if point.startswith("checkpoint"):  # the first checkpoint is intact; the second was never renamed in
            assert torch.load(cache / train_pkg.CKPT_NAME, weights_only=False)["step"] == FAST_TRAIN["checkpoint_every"]
    heads = _train(tmp_path, resume=True)
    expected, got = uninterrupted_heads.state_dict(), heads.state_dict()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert heads.thresholds == uninterrupted_heads.thresholds
    assert not (out / train_pkg.RUN_MARKER).exists() and _temps(tmp_path) == []



# ------------------------------------------------------------------------------- soak (the short variant)
SOAK_LIMITS = {"max_batch": 2, "max_prompt": 12, "max_budget": 5}  # bench/soak.py's defaults are 8, 48, 24


@pytest.fixture
def one_thread():
    """The soak tests run on one thread: on a shared 2-core machine two OpenMP threads spin against other jobs
    (the same three small calls took 45 s on 2 threads, 6.6 s on 1, at load average 7). Both sides of every
    comparison run in the same setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _soak_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("soak", Path(__file__).resolve().parents[1] / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_soak_equals_transformers_greedy(smollm2, one_thread):
    from clp_fast.assets import default_heads_for

    model, tok = smollm2
    result = _soak_module().soak(model, tok, default_heads_for(model), seconds=3, seed=1, limits=SOAK_LIMITS)
    assert result["calls"] >= 1 and result["checked"] >= 2  # the warm-up alone checks greedy and lossless
    assert result["mismatches"] == 0, [r for r in result["records"] if not r["ok"]][:3]
    assert result["rss_growth"] < 0.05, result["rss_samples"]


def test_soak_counts_a_wrong_token_as_a_mismatch(smollm2, one_thread):
    import clp_fast
    from clp_fast.assets import default_heads_for

    model, tok = smollm2
    real = clp_fast.generate

    def one_token_off(*args, **kwargs):
        out = real(*args, **kwargs)
        if kwargs["mode"] == "lossless":
            out = out.clone()
            out[0, -1] = (out[0, -1] + 1) % model.config.vocab_size
        return out

    result = _soak_module().soak(model, tok, default_heads_for(model), seconds=0, limits=SOAK_LIMITS,
                                 generate=one_token_off)
    assert result["calls"] == 0 and result["warmup_calls"] == 3  # greedy, lossless, clp
    assert [r["mode"] for r in result["records"] if not r["ok"]] == ["lossless"]


if __name__ == "__main__":  # the subprocess driver of the training tests
    if sys.argv[1] == "train":
        _train(Path(sys.argv[2]), resume=sys.argv[3] == "resume")
        sys.exit(0)
    raise SystemExit(f"unknown driver {sys.argv[1]!r}")
