"""The retrieval datastore's corpus and index: which source files it holds, their token stream, the suffix array
over it, and the store's files (built atomically, checked when opened). The draft source that reads it is
:mod:`clp_fast.drafts.datastore`.

The corpus is the Python code that is already on this machine and that the model is likely to write again: the
running interpreter's standard library (without ``test/``, ``tests/``, ``idlelib/``, as
:func:`clp_fast.eval.data.iter_corpus_files` takes it) plus every ``.py`` file of the installed packages
(``site-packages`` of the running environment). It is deterministic for a given environment: the same files in
sorted order, and a fingerprint over their paths, sizes and modification times names it.

Two filters keep it honest:

- files over :data:`MAX_FILE_BYTES` (generated tables) and files that are not UTF-8 are left out;
- **no HumanEval**: a file that holds any line of a HumanEval prompt (every stripped prompt line of at least
  :data:`HE_MIN_LINE` characters that occurs in one prompt only, so ``from typing import List`` does not count),
  or whose path names HumanEval, is left out. The filter reads the cached HumanEval copy
  (:func:`clp_fast.eval.data.humaneval_prompts`); where none is cached it cannot check and says so in the
  fingerprint (``"humaneval": "unchecked"``), so a store built without the check is rebuilt once HumanEval is
  cached.

**The index.** The backbone's tokenizer over the corpus as one int32 stream, *reversed*, with a suffix array over it
sorted by the first :data:`SORT_DEPTH` tokens. The longest suffix of a row's context that occurs in the corpus is
then found by narrowing one SA interval per context token read backwards (each a binary search inside the last
interval), and the tokens that followed its occurrences are read just before them in the reversed stream. Files
under ``<clp_home()>/datastore/<vocab hash>-<corpus fingerprint>/``: ``tokens.npy``, ``sa.npy`` (memory-mapped)
and ``manifest.json``, written into a temporary folder, manifest last, then renamed into place: a killed build
leaves only a ``.tmp-<pid>`` folder that no open takes for a store (and the next build removes).

Index choice (``bench/calibrate_datastore.py --compare-index 2000000``, the store's first 2M tokens, load average ~6 on
the 2 cores, so every time is ~3x slow): this suffix array built in 8.3 s at 8 bytes per token (stream + SA) and
matches up to 23 tokens; hashed n-gram tables (n = 2..8, sorted uint64 keys + int32 positions) built in 16.3 s at 88
bytes per token and match 8 at most. Picked the suffix array for size (the full store is 418 MB; tables would be
~4.6 GB) and match length. Its lookup is the slower one: 2.3 ms per longest match on the full 52M-token store
(Python bisection over memory-mapped arrays, ~50 random reads per matched token) against 0.18 ms for the tables on
the 2M-token subset; that cost, not the size, is what to improve next (a forward-order index narrowed
incrementally as tokens are committed, SuffixDecoding-style, or a C search).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from clp_fast.faults import kill_point, pid_alive

log = logging.getLogger("clp_fast.datastore")

__all__ = ["MAX_FILE_BYTES", "HE_MIN_LINE", "SEP", "corpus_files", "humaneval_lines", "humaneval_free",
           "candidates", "fingerprint", "token_stream", "suffix_array", "Datastore", "DatastoreError", "top_branches",
           "vocab_id", "open_or_build"]

MAX_FILE_BYTES = 1 << 20  # larger .py files are generated tables (unicode data, vendored blobs), not idioms
HE_MIN_LINE = 24  # shorter prompt lines ("def f(x):", "    return") are generic code, not HumanEval text
SEP = -1  # between files in the token stream: no match or continuation runs across it
VERSION = 1
SORT_DEPTH = 24  # the suffix array orders suffixes by their first 24 tokens (3 -> 6 -> 12 -> 24: 4 sorts)
MAX_MATCH = SORT_DEPTH - 1  # longest context suffix matched (narrowing at length L reads token L of a suffix)
MIN_MATCH = 2  # a 1-token match predicts little (a name's next token after "self" is anything)
SAMPLE = 64  # occurrences whose continuations are read per row and step (evenly spaced over the interval)
N_BRANCHES = 3  # REST-style: the top continuations' first tokens
_END = -2  # "past the stream" when reading a suffix's token: below SEP and every token


def default_roots() -> list[Path]:
    """The standard library folder and the environment's ``site-packages`` folders (deduplicated)."""
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"])] + [Path(paths[k]) for k in ("purelib", "platlib")]
    out: list[Path] = []
    for r in roots:
        if r.is_dir() and r.resolve() not in {o.resolve() for o in out}:
            out.append(r)
    return out


def _candidates(roots: list[Path] | None) -> list[Path]:
    if roots is None:
        from clp_fast.eval.data import iter_corpus_files  # the stdlib as the rest of the project cuts it

        files = set(iter_corpus_files())
        paths = sysconfig.get_paths()
        for key in ("purelib", "platlib"):
            root = Path(paths[key])
            if root.is_dir() and Path(sys.prefix) in root.parents:  # the running environment's own packages
                files.update(root.rglob("*.py"))
        return sorted(files)
    files = set()
    for r in roots:
        r = Path(r)
        files.update([r] if r.is_file() else r.rglob("*.py"))
    return sorted(files)


def humaneval_lines() -> frozenset[str] | None:
    """The distinctive stripped lines of the HumanEval prompts (see the module docstring); None where no copy
    of HumanEval is cached (nothing is downloaded here)."""
    from clp_fast.eval import data

    try:
        rows = data._humaneval_rows(download=False)
    except FileNotFoundError:
        return None
    per_prompt = [{ln.strip() for ln in r["prompt"].splitlines() if len(ln.strip()) >= HE_MIN_LINE} for r in rows]
    seen = Counter(ln for lines in per_prompt for ln in lines)
    return frozenset(ln for ln, c in seen.items() if c == 1 and not ln.startswith(("from ", "import ")))


def humaneval_free(text: str, path: Path, lines: frozenset[str] | None) -> bool:
    """Whether a file may enter the corpus: its path does not name HumanEval and no line is a HumanEval
    prompt's (``lines``: :func:`humaneval_lines`)."""
    if "humaneval" in str(path).lower().replace("_", "").replace("-", ""):
        return False
    return lines is None or not any(ln.strip() in lines for ln in text.splitlines())


def corpus_files(roots: list[Path] | None = None, files: list[Path] | None = None) -> tuple[list[Path], dict]:
    """The corpus files (sorted) and what was left out: ``{"too_big", "not_utf8", "humaneval": [paths],
    "humaneval_checked": bool}``. ``roots``: folders or files instead of the default corpus (tests); ``files``:
    the candidates, where :func:`candidates` already listed them."""
    lines = humaneval_lines()
    keep: list[Path] = []
    left: dict = {"too_big": 0, "not_utf8": 0, "humaneval": [], "humaneval_checked": lines is not None}
    for f in files if files is not None else _candidates(roots):
        try:
            if f.stat().st_size > MAX_FILE_BYTES:
                left["too_big"] += 1
                continue
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            left["not_utf8"] += 1
            continue
        if not humaneval_free(text, f, lines):
            left["humaneval"].append(str(f))
            continue
        keep.append(f)
    return keep, left


def candidates(roots: list[Path] | None = None) -> list[Path]:
    """Every file the corpus is chosen from (before the filters), sorted: what :func:`fingerprint` names."""
    return _candidates(roots)


def fingerprint(files: list[Path], humaneval_checked: bool) -> str:
    """SHA-256 over the candidate files' paths, sizes and modification times (:func:`candidates`: stat only, so
    a process names its store in ~0.2 s without reading the corpus) and whether HumanEval can be checked."""
    h = hashlib.sha256(json.dumps({"humaneval": "checked" if humaneval_checked else "unchecked"}).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def token_stream(files: list[Path], encode: Callable[[list[str]], list[list[int]]], batch: int = 64,
                 progress: bool = True) -> np.ndarray:
    """Every file's tokens, in file order, each file preceded by :data:`SEP` and the stream ended by one:
    ``[N]`` int32. ``encode`` maps texts to token-id lists (the backbone's tokenizer, no special tokens)."""
    from tqdm import tqdm

    parts = [np.full(1, SEP, dtype=np.int32)]
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="datastore: tokenizing", disable=not progress,
              file=sys.stderr) as bar:
        for i in range(0, len(files), batch):
            chunk = files[i:i + batch]
            for ids in encode([f.read_text(encoding="utf-8") for f in chunk]):
                parts += [np.asarray(ids, dtype=np.int32), np.full(1, SEP, dtype=np.int32)]
            bar.update(sum(f.stat().st_size for f in chunk))
            kill_point("datastore.tokenize")
    return np.concatenate(parts)


# ------------------------------------------------------------------------------------ the index and its files
class DatastoreError(ValueError):
    """A store folder that is not a complete, intact store (named in the message with the reason)."""


def suffix_array(stream: np.ndarray, depth: int = SORT_DEPTH) -> np.ndarray:
    """Positions of ``stream [N]`` (int32, tokens >= -1) ordered by their first ``depth`` tokens (ties in any
    order; past the end reads as the smallest value), by prefix doubling from 3 packed tokens: ``[N]`` int32."""
    n = len(stream)
    v = stream.astype(np.int64) + 2  # SEP -> 1, past the end -> 0; tokens < 2**18 (Qwen 151,936)
    if int(v.max(initial=0)) >= 1 << 18:
        raise ValueError(f"token id {int(v.max()) - 2} too large for 18-bit packing")
    key = v << 36
    key[:-1] |= v[1:] << 18
    key[:-2] |= v[2:]
    del v
    h = 3
    while True:
        order = np.argsort(key)
        sk = key[order]
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.concatenate([[1], 1 + np.cumsum(sk[1:] != sk[:-1])])
        del sk
        if h >= depth or int(rank.max(initial=0)) == n:
            return order.astype(np.int32)
        key = rank * (n + 2)
        key[:-h] += rank[h:]
        h *= 2


def _checksum(path: Path, blocks: int = 32, size: int = 4096) -> str:
    """SHA-256 of ``blocks`` evenly spaced ``size``-byte blocks of a file (a cheap corruption check)."""
    total = path.stat().st_size
    h = hashlib.sha256(str(total).encode())
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek(i * max(total - size, 0) // max(blocks - 1, 1))
            h.update(f.read(size))
    return h.hexdigest()


class Datastore:
    """An opened store: the reversed token stream and its suffix array, memory-mapped.

    Args:
        folder: a complete store folder (:meth:`open` checks it).
    """

    ARRAYS = ("tokens", "sa")

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = folder, manifest
        self.rev = np.load(folder / "tokens.npy", mmap_mode="r").view(np.ndarray)  # [N] int32, reversed
        self.sa = np.load(folder / "sa.npy", mmap_mode="r").view(np.ndarray)  # [N] int32
        self.n = len(self.rev)
        counts = np.bincount(self.rev + 2)  # 0.2 s for 60M tokens, once per process
        self.starts = np.concatenate([[0], np.cumsum(counts)]).tolist()  # SA interval of first token t: t+2, t+3

    @classmethod
    def open(cls, folder: str | Path) -> Datastore:
        """Open a store folder; :class:`DatastoreError` naming the folder and what is wrong otherwise."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError) as err:
            raise DatastoreError(f"datastore {folder} has no readable manifest (an unfinished build?): {err}") from None
        if manifest.get("version") != VERSION:
            raise DatastoreError(f"datastore {folder} has version {manifest.get('version')!r}, expected {VERSION}")
        for name in cls.ARRAYS:
            path, want = folder / f"{name}.npy", manifest.get("files", {}).get(name, {})
            if not path.is_file() or path.stat().st_size != want.get("bytes"):
                raise DatastoreError(f"datastore {folder}: {path.name} is missing or has the wrong size")
            if _checksum(path) != want.get("checksum"):
                raise DatastoreError(f"datastore {folder}: {path.name} fails its checksum (corrupt)")
        store = cls(folder, manifest)
        if len(store.sa) != store.n or store.n != manifest.get("n_tokens"):
            raise DatastoreError(f"datastore {folder}: arrays hold {store.n} / {len(store.sa)} tokens, manifest "
                                 f"{manifest.get('n_tokens')}")
        return store

    @classmethod
    def build(cls, folder: str | Path, stream: np.ndarray, meta: dict) -> Datastore:
        """Write a store of the token ``stream [N]`` (forward order, files separated by SEP) into ``folder``
        (which must not exist): arrays into a temporary folder, the manifest last, then one rename."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_builds(folder)
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        t0 = time.perf_counter()
        rev = np.ascontiguousarray(stream[::-1])
        np.save(tmp / "tokens.npy", rev)
        kill_point("datastore.tokens")
        np.save(tmp / "sa.npy", suffix_array(rev))
        kill_point("datastore.sa")
        files = {n: {"bytes": (tmp / f"{n}.npy").stat().st_size, "checksum": _checksum(tmp / f"{n}.npy")}
                 for n in cls.ARRAYS}
        manifest = {"version": VERSION, **meta, "n_tokens": int(len(rev)), "files": files,
                    "index_seconds": round(time.perf_counter() - t0, 1),
                    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        kill_point("datastore.manifest")
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same store first: keep its
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(folder)

    # ------------------------------------------------------------------------------------------- queries
    def _at(self, i: int, offset: int) -> int:
        p = int(self.sa[i]) + offset
        return int(self.rev[p]) if p < self.n else _END

    def _narrow(self, lo: int, hi: int, offset: int, tok: int) -> tuple[int, int]:
        """The part of SA interval ``[lo, hi)`` whose suffixes hold ``tok`` at ``offset``."""
        if hi - lo <= 64:
            p = self.sa[lo:hi].astype(np.int64) + offset
            vals = np.where(p < self.n, self.rev[np.minimum(p, self.n - 1)], _END)
            return lo + int(np.searchsorted(vals, tok, "left")), lo + int(np.searchsorted(vals, tok, "right"))
        a, b = lo, hi
        while a < b:  # first index whose value >= tok
            m = (a + b) // 2
            if self._at(m, offset) < tok:
                a = m + 1
            else:
                b = m
        c, b = a, hi
        while c < b:  # first index whose value > tok
            m = (c + b) // 2
            if self._at(m, offset) <= tok:
                c = m + 1
            else:
                b = m
        return a, c

    def match(self, context: list[int]) -> tuple[int, int, int]:
        """The longest suffix of ``context`` (up to :data:`MAX_MATCH` tokens) that occurs in the corpus: its SA
        interval and length ``(lo, hi, L)``; ``L = 0`` where not even the last token occurs."""
        if not context:
            return 0, 0, 0
        t = context[-1] + 2
        if not 0 <= t < len(self.starts) - 1 or self.starts[t] == self.starts[t + 1]:
            return 0, 0, 0
        lo, hi, L = self.starts[t], self.starts[t + 1], 1
        while L < min(MAX_MATCH, len(context)):
            a, b = self._narrow(lo, hi, L, context[-1 - L])
            if a == b:
                break
            lo, hi, L = a, b, L + 1
        return lo, hi, L

    def continuations(self, lo: int, hi: int, depth: int) -> np.ndarray:
        """The ``depth`` tokens that followed up to :data:`SAMPLE` occurrences evenly spaced over ``[lo, hi)``:
        ``[S, depth]`` int32, SEP from a file's end on."""
        n = hi - lo
        idx = lo + (np.arange(min(n, SAMPLE)) * n) // min(n, SAMPLE)
        pos = self.sa[idx].astype(np.int64)[:, None] - 1 - np.arange(depth)[None]  # forward = backwards in rev
        cont = np.where(pos >= 0, self.rev[np.maximum(pos, 0)], SEP)
        cont[np.cumsum(cont == SEP, axis=1) > 0] = SEP
        return cont

    def propose(self, context: list[int], width: int, branches: int = N_BRANCHES
                ) -> list[tuple[list[int], list[float]]]:
        """Up to ``branches`` continuations of ``context`` (each up to ``width`` tokens) with each token's
        support ``k / (n + 1)``: its count among the ``n`` sampled occurrences through its parent."""
        lo, hi, L = self.match(context)
        if L < MIN_MATCH or width < 1:
            return []
        return top_branches(self.continuations(lo, hi, width).tolist(), branches)


def top_branches(rows: list[list[int]], branches: int) -> list[tuple[list[int], list[float]]]:
    """The ``branches`` most frequent first tokens of ``rows`` (continuations, SEP-padded), each followed by its
    most frequent continuation; supports ``k / (n + 1)`` per token."""
    first = Counter(r[0] for r in rows if r[0] != SEP)
    out = []
    for tok, k in first.most_common(branches):
        group = [r for r in rows if r[0] == tok]
        toks, sup = [tok], [k / (len(rows) + 1)]
        for d in range(1, len(rows[0])):
            nxt = Counter(r[d] for r in group if r[d] != SEP)
            if not nxt:
                break
            t, c = nxt.most_common(1)[0]
            toks.append(t)
            sup.append(c / (len(group) + 1))
            group = [r for r in group if r[d] == t]
        out.append((toks, sup))
    return out


def _remove_dead_builds(folder: Path) -> None:
    """Remove temporary folders of builds of ``folder`` whose process is gone (killed builds)."""
    for tmp in folder.parent.glob(f".{folder.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def vocab_id(tok) -> str:
    """SHA-256 of a tokenizer's vocabulary (token -> id, added tokens included): a store's tokenizer key."""
    items = sorted(tok.get_vocab().items())
    return hashlib.sha256(json.dumps([type(tok).__name__, items]).encode()).hexdigest()


def _encoder(tok):
    """texts -> token-id lists, no special tokens (the fast tokenizer's own batch call where there is one)."""
    fast = getattr(tok, "backend_tokenizer", None)
    if fast is not None:
        return lambda texts: [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]
    return lambda texts: tok(texts, add_special_tokens=False)["input_ids"]


def open_or_build(tok=None, *, encode=None, vocab: str | None = None, roots: list[Path] | None = None,
                  home: str | Path | None = None, progress: bool = True) -> Datastore:
    """The store for this tokenizer and corpus: opened where a complete one exists, else built (minutes for the
    default corpus; a tqdm bar on stderr). A corrupt or unfinished store is named in a warning and rebuilt.

    Args:
        tok: the backbone's tokenizer (or ``encode`` + ``vocab``: a texts -> ids function and a vocabulary key).
        roots: folders or files instead of the default corpus (:mod:`clp_fast.drafts.corpus`).
        home: the cache home (default :func:`clp_fast.models.hub.clp_home`).
    """
    from clp_fast.models.fetch import clp_home

    if tok is not None:
        encode, vocab = encode or _encoder(tok), vocab or vocab_id(tok)
    if encode is None or vocab is None:
        raise ValueError("open_or_build needs a tokenizer, or encode= and vocab=")
    cands = candidates(roots)
    checked = humaneval_lines() is not None
    fp = fingerprint(cands, checked)
    folder = (Path(home) if home else clp_home()) / "datastore" / f"{vocab[:16]}-{fp[:16]}"
    if folder.exists():
        try:
            return Datastore.open(folder)
        except DatastoreError as err:
            log.warning("%s; rebuilding it", err)
            bad = folder.with_name(f".{folder.name}.bad-{os.getpid()}")
            os.rename(folder, bad)
            shutil.rmtree(bad, ignore_errors=True)
    t0 = time.perf_counter()
    files, left = corpus_files(files=cands)
    if not files:
        raise ValueError(f"datastore: no corpus files under {roots or default_roots()}")
    stream = token_stream(files, encode, progress=progress)
    meta = {"vocab": vocab, "corpus_fingerprint": fp, "n_files": len(files), "left_out": left,
            "corpus_bytes": sum(f.stat().st_size for f in files),
            "tokenize_seconds": round(time.perf_counter() - t0, 1),
            "roots": [str(r) for r in (roots or default_roots())], "files_list": [str(f) for f in files]}
    store = Datastore.build(folder, stream, meta)
    log.info("datastore %s: %d files, %d tokens in %.0f s", folder, len(files), store.n, time.perf_counter() - t0)
    return store
