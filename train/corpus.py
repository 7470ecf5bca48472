"""Training corpus: find documents on disk, read them, tokenize them into one stream.

A corpus is files and folders. Every file belongs to a *project*: the top-level folder it
sits in below the corpus path it was found under (`site-packages/numpy/...` is project
`site-packages/numpy`), or, for loose files at that level, the corpus path itself. Projects
are what `train.split` can hold out whole, so that held-out text shares no code base with
the training text. Keys are paths relative to the corpus root's parent, the same on every
machine (the stdlib lives at different absolute paths), which keeps the split a pure
function of the corpus.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

TEXT_SUFFIXES = frozenset({
    ".txt", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go",
    ".java", ".js", ".ts", ".sh", ".toml", ".yaml", ".yml", ".ini", ".cfg", ".html", ".css",
})
JSONL_SUFFIX = ".jsonl"
# The default corpus's share of TEXT_SUFFIXES: Python sources and their docs. Installed packages
# also ship C++ headers (torch alone: thousands), minified JavaScript and data tables.
PYTHON_SUFFIXES = frozenset({".py", ".pyi", ".md", ".rst", ".txt"})
# Vendored copies (`_vendor`) are other projects' code inside a project: a held-out project's
# own sources would otherwise sit in the training text under another name.
SKIP_DIRS = frozenset({"__pycache__", "site-packages", "node_modules", ".git", ".venv", "_vendor"})


class CorpusError(Exception):
    """A corpus path is missing, unreadable or malformed; the message names the path."""


@dataclass(frozen=True)
class CorpusFile:
    path: Path          # absolute path on this machine
    key: str            # path relative to its corpus root's parent: what the split hashes
    project: str        # the top-level folder below the corpus root (or the root: loose files)

    @property
    def is_jsonl(self) -> bool:
        return self.path.suffix == JSONL_SUFFIX


def key_score(name: str) -> float:
    """A stable uniform number in [0, 1) per name: what decides a file's or project's side of the
    split, and where a capped file's share starts."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def discover(paths: Sequence[str | os.PathLike], suffixes: frozenset[str] = TEXT_SUFFIXES) -> list[CorpusFile]:
    """All corpus files under `paths`, sorted by key so the order never depends on the filesystem.

    An explicitly named file must have a supported suffix (it is its own project); folders are
    walked recursively, and files with other suffixes in them are ignored.
    """
    if not paths:
        raise CorpusError("no corpus path given")
    supported = suffixes | {JSONL_SUFFIX}
    found: dict[str, CorpusFile] = {}
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise CorpusError(f"corpus path does not exist: {p}")
        if p.is_file():
            if p.suffix not in supported:
                raise CorpusError(f"unsupported corpus file type {p.suffix!r}: {p} "
                                  f"(use .txt, .md, source code, or .jsonl with a 'text' field)")
            found.setdefault(p.name, CorpusFile(p.resolve(), p.name, p.name))
            continue
        root = p.resolve()
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not _skipped_dir(d))
            for name in sorted(filenames):
                f = Path(dirpath, name)
                if f.suffix in supported:
                    rel = f.relative_to(root).parts
                    key = "/".join((root.name, *rel))
                    project = root.name if len(rel) == 1 else f"{root.name}/{rel[0]}"
                    found.setdefault(key, CorpusFile(f, key, project))
    if not found:
        raise CorpusError(f"no usable corpus files (.txt, .md, source code, .jsonl) under: "
                          f"{', '.join(str(p) for p in paths)}")
    return [found[k] for k in sorted(found)]


def _skipped_dir(name: str) -> bool:
    return name in SKIP_DIRS or name.startswith(".") or name.endswith(".dist-info")


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


@dataclass
class TokenStream:
    """Documents in file order, each followed by EOS, and where each token came from."""
    tokens: np.ndarray          # int32 [n]
    source: np.ndarray          # int32 [n]: index into `files` of each token's file
    files: list[CorpusFile]     # the files that gave tokens, in stream order

    def __len__(self) -> int:
        return len(self.tokens)

    def projects(self) -> list[str]:
        return sorted({f.project for f in self.files})


def tokenize_files(files: Sequence[CorpusFile], encode: Encode, eos_id: int,
                   explicit: frozenset[str] = frozenset(), skipped: list[str] | None = None,
                   max_tokens: int | None = None, per_file_tokens: int | None = None) -> TokenStream:
    """One token stream of `files` in the order given, at most `max_tokens` tokens.

    `explicit` holds keys of files the user named directly (read strictly); undecodable
    files found by walking a folder are appended to `skipped`. `per_file_tokens` caps each
    file's share: a run of that many tokens starting at a fixed place drawn from the file's key
    (a file's start alone is licence headers and imports), so a small sample spans many files.
    """
    parts: list[np.ndarray] = []
    used: list[CorpusFile] = []
    total = 0
    for f in files:
        docs = read_documents(f, strict=f.key in explicit)
        if docs is None:
            if skipped is not None:
                skipped.append(f.key)
            continue
        ids = [t for doc in (encode(docs) if docs else []) for t in [*doc, eos_id]]
        start = int(key_score(f.key) * max(0, len(ids) - per_file_tokens)) if per_file_tokens else 0
        part = np.asarray(ids[start:start + per_file_tokens if per_file_tokens else None], dtype=np.int32)
        if not len(part):
            continue
        parts.append(part)
        used.append(f)
        total += len(part)
        if max_tokens is not None and total >= max_tokens:
            break
    if not parts:
        raise CorpusError(f"the corpus files yield no text ({len(files)} file(s), "
                          f"first: {files[0].path if files else '-'})")
    source = np.concatenate([np.full(len(p), i, dtype=np.int32) for i, p in enumerate(parts)])
    stream = TokenStream(np.concatenate(parts), source, used)
    if max_tokens is not None:
        stream.tokens, stream.source = stream.tokens[:max_tokens], stream.source[:max_tokens]
    return stream


def explicit_keys(paths: Sequence[str | os.PathLike]) -> frozenset[str]:
    """Keys of the files named directly on the command line (they are read strictly)."""
    return frozenset(Path(p).name for p in paths if Path(p).expanduser().is_file())


def default_corpus() -> list[str]:
    """The offline default corpus: this interpreter's standard library and the packages
    installed in its environment (site-packages), each package a project.

    Both exist on every machine that runs the project (the Python that runs it and the
    packages `make setup` installed), tens of MB of real code and docs by many authors,
    and free of any download.
    """
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"])
    if not stdlib.is_dir():
        raise CorpusError(f"the standard library folder is missing: {stdlib}")
    packages = sorted({Path(paths[k]) for k in ("purelib", "platlib") if Path(paths[k]).is_dir()})
    return [str(stdlib), *(str(p) for p in packages)]
