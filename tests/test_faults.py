"""Faults, load and bad input: names resolve offline, arguments are checked before a model loads, the static
cache is sized before it is allocated, corrupt assets are named, concurrent and killed fetches / data builds /
training runs end as an uninterrupted run would."""

from __future__ import annotations

import socket

import pytest
import torch

from clp_fast import hub
from clp_fast.cli import main as cli_main


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
