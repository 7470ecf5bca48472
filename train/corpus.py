"""Training corpus: find documents on disk, split them into train / held-out BY FILE, tokenize.

The split is by file (never by window) so that held-out text shares no file with the
training text: an N-gram memory could otherwise just memorise neighbouring lines of the
same file and the held-out gain would be a leak, not generalisation. The split is a pure
function of each file's path relative to the corpus root it was found under, so it is the
same on every machine (the stdlib lives at different absolute paths) and `engram-eval`
recomputes exactly the split `engram-train` used; `split.json` next to the checkpoint
records it for humans and for a consistency check.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

TEXT_SUFFIXES = frozenset({
    ".txt", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go",
    ".java", ".js", ".ts", ".sh", ".toml", ".yaml", ".yml", ".ini", ".cfg", ".html", ".css",
})
JSONL_SUFFIX = ".jsonl"
SKIP_DIRS = frozenset({"__pycache__", "site-packages", "node_modules", ".git", ".venv"})


class CorpusError(Exception):
    """A corpus path is missing, unreadable or malformed; the message names the path."""


@dataclass(frozen=True)
class CorpusFile:
    path: Path          # absolute path on this machine
    key: str            # path relative to its corpus root: what the split hashes

    @property
    def is_jsonl(self) -> bool:
        return self.path.suffix == JSONL_SUFFIX


@dataclass
class CorpusSplit:
    train: list[CorpusFile]
    heldout: list[CorpusFile]
    heldout_fraction: float
    skipped: list[str] = field(default_factory=list)   # undecodable files met while walking folders

    def to_dict(self) -> dict:
        return {"heldout_fraction": self.heldout_fraction,
                "train": [f.key for f in self.train],
                "heldout": [f.key for f in self.heldout],
                "skipped": self.skipped}

    def write(self, path: str | os.PathLike) -> None:
        """Write split.json atomically (a crash never leaves a half-written record)."""
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)


def discover(paths: Sequence[str | os.PathLike]) -> list[CorpusFile]:
    """All corpus files under `paths`, sorted by key so the order never depends on the filesystem.

    An explicitly named file must have a supported suffix; folders are walked recursively and
    unsupported suffixes in them are ignored.
    """
    if not paths:
        raise CorpusError("no corpus path given")
    found: dict[str, CorpusFile] = {}
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise CorpusError(f"corpus path does not exist: {p}")
        if p.is_file():
            if not _supported(p):
                raise CorpusError(f"unsupported corpus file type {p.suffix!r}: {p} "
                                  f"(use .txt, .md, source code, or .jsonl with a 'text' field)")
            found.setdefault(p.name, CorpusFile(p.resolve(), p.name))
            continue
        root = p.resolve()
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
            for name in sorted(filenames):
                f = Path(dirpath, name)
                if _supported(f):
                    key = f"{root.name}/{f.relative_to(root).as_posix()}"
                    found.setdefault(key, CorpusFile(f, key))
    if not found:
        raise CorpusError(f"no usable corpus files (.txt, .md, source code, .jsonl) under: "
                          f"{', '.join(str(p) for p in paths)}")
    return [found[k] for k in sorted(found)]


def _supported(p: Path) -> bool:
    return p.suffix in TEXT_SUFFIXES or p.suffix == JSONL_SUFFIX


def split_files(files: Sequence[CorpusFile], heldout_fraction: float) -> CorpusSplit:
    """Deterministic by-file split: sha256(key) decides, so adding a file never moves another."""
    if not 0.0 < heldout_fraction < 1.0:
        raise CorpusError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if len(files) < 2:
        raise CorpusError(f"the corpus has {len(files)} file(s); a by-file train/held-out split "
                          f"needs at least 2 ({', '.join(str(f.path) for f in files)})")
    scores = [int.from_bytes(hashlib.sha256(f.key.encode()).digest()[:8], "big") / 2**64
              for f in files]
    heldout = [f for f, s in zip(files, scores) if s < heldout_fraction]
    train = [f for f, s in zip(files, scores) if s >= heldout_fraction]
    if not heldout or not train:   # tiny corpora: move the lowest-scoring file across
        order = sorted(range(len(files)), key=scores.__getitem__)
        heldout = [files[order[0]]]
        train = [files[i] for i in sorted(order[1:])]
    return CorpusSplit(train=train, heldout=heldout, heldout_fraction=heldout_fraction)


def read_documents(f: CorpusFile, strict: bool = True) -> list[str] | None:
    """Documents of one file: the whole text, or one per JSONL line's `text` field.

    strict=False (files met while walking a folder) returns None for a file that is not
    UTF-8, so one odd file in a big tree (the stdlib ships deliberately mis-encoded test
    files) does not stop a run; a file named explicitly, or a malformed JSONL, always raises.
    """
    try:
        text = f.path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        if not strict:
            return None
        raise CorpusError(f"corpus file is not UTF-8 text: {f.path} ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {f.path}: {e.strerror}") from e
    if "\x00" in text:
        if not strict:
            return None
        raise CorpusError(f"corpus file looks binary (contains NUL bytes): {f.path}")
    if not f.is_jsonl:
        return [text] if text.strip() else []
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{f.path}:{lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CorpusError(f"{f.path}:{lineno}: each JSONL line must be an object with a string 'text' field")
        docs.append(obj["text"])
    return docs


Encode = Callable[[list[str]], list[list[int]]]


def tokenize_files(files: Sequence[CorpusFile], encode: Encode, eos_id: int,
                   explicit: frozenset[str] = frozenset(), skipped: list[str] | None = None,
                   max_tokens: int | None = None, per_file_tokens: int | None = None) -> np.ndarray:
    """One int32 token stream: documents in file order, each followed by EOS.

    `explicit` holds keys of files the user named directly (read strictly); undecodable
    files found by walking a folder are appended to `skipped`. Stops after `max_tokens`;
    `per_file_tokens` caps each file's share (so a small sample spans many files).
    """
    parts: list[np.ndarray] = []
    total = 0
    for f in files:
        docs = read_documents(f, strict=f.key in explicit)
        if docs is None:
            if skipped is not None:
                skipped.append(f.key)
            continue
        ids = [t for doc in (encode(docs) if docs else []) for t in [*doc, eos_id]]
        part = np.asarray(ids[:per_file_tokens], dtype=np.int32)
        parts.append(part)
        total += len(part)
        if max_tokens is not None and total >= max_tokens:
            break
    if not parts:
        raise CorpusError(f"the corpus files yield no text ({len(files)} file(s), "
                          f"first: {files[0].path if files else '-'})")
    stream = np.concatenate(parts)
    return stream[:max_tokens] if max_tokens is not None else stream


def heldout_stream(split: CorpusSplit, encode: Encode, eos_id: int, explicit: frozenset[str],
                   max_tokens: int, seq_len: int) -> np.ndarray:
    """The held-out tokens every evaluation scores: the held-out files in a fixed shuffled
    order, at most 1/8 of the budget (and at least one window) from each, so even a small
    evaluation spans several files rather than the first file in alphabetical order."""
    order = np.random.default_rng(0).permutation(len(split.heldout))
    return tokenize_files([split.heldout[i] for i in order], encode, eos_id, explicit, split.skipped,
                          max_tokens=max_tokens + seq_len, per_file_tokens=max(seq_len, max_tokens // 8))


def explicit_keys(paths: Sequence[str | os.PathLike]) -> frozenset[str]:
    """Keys of the files named directly on the command line (they are read strictly)."""
    return frozenset(Path(p).name for p in paths if Path(p).expanduser().is_file())


def default_corpus() -> list[str]:
    """The offline default corpus: this interpreter's own standard library sources.

    Present on every machine that runs the project (it is the Python that runs it), a few
    MB of real code and docstrings, and free of any download.
    """
    import sysconfig
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not stdlib.is_dir():
        raise CorpusError(f"the standard library folder is missing: {stdlib}")
    return [str(stdlib)]
