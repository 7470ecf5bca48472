"""Train / held-out split of a corpus: whole projects held out, files held out, copies removed.

Two held-out sets answer two questions. *In-domain*: files of projects the memory trained
on (does it know its own code bases?). *Cross-project*: every file of projects it never saw
(does it transfer to code it has never met? what a user retrofitting a memory wants). Both
are pure functions of the keys (sha256 of the project name, of the file key), so the split
is the same on every machine and adding a file or a project never moves another.

Held-out text must not be training text under another name: byte-identical files are kept
once, and a held-out file most of whose distinctive lines (`DISTINCT_LINE` characters or
more, stripped) also occur in training files (a fork, a vendored copy, a "Copied from"
model file) is dropped as a near duplicate. `split.json` records all of it.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from train.corpus import CorpusError, CorpusFile, Encode, TokenStream, key_score, tokenize_files

DISTINCT_LINE = 32          # shorter lines ("return self", "else:") are common to all code


@dataclass(frozen=True)
class SplitConfig:
    heldout_fraction: float = 0.05     # share of the trained projects' files held out (in-domain)
    heldout_projects: float = 0.0      # share of projects held out whole (cross-project)
    max_overlap: float = 0.5           # a held-out file sharing more of its distinctive lines is dropped

    def validate(self) -> None:
        if not 0.0 < self.heldout_fraction < 1.0:
            raise CorpusError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if not 0.0 <= self.heldout_projects < 1.0:
            raise CorpusError(f"heldout_projects must be in [0, 1), got {self.heldout_projects}")


@dataclass
class CorpusSplit:
    config: SplitConfig
    train: list[CorpusFile]
    in_domain: list[CorpusFile]                 # held-out files of trained projects
    cross_project: list[CorpusFile]             # files of held-out projects
    duplicates: list[str] = field(default_factory=list)        # byte-identical to an earlier file
    near_duplicates: list[str] = field(default_factory=list)   # held-out files dropped for overlap
    skipped: list[str] = field(default_factory=list)           # undecodable files met while walking

    def heldout(self) -> dict[str, list[CorpusFile]]:
        """The non-empty held-out sets by name."""
        sets = {"in_domain": self.in_domain, "cross_project": self.cross_project}
        return {name: files for name, files in sets.items() if files}

    def to_dict(self) -> dict:
        return {**asdict(self.config),
                "projects": {"train": sorted({f.project for f in self.train}),
                             "heldout": sorted({f.project for f in self.cross_project})},
                "train": [f.key for f in self.train], "in_domain": [f.key for f in self.in_domain],
                "cross_project": [f.key for f in self.cross_project], "duplicates": self.duplicates,
                "near_duplicates": self.near_duplicates, "skipped": self.skipped}

    def write(self, path: str | os.PathLike) -> None:
        """Write split.json atomically (a crash never leaves a half-written record)."""
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)


def _held_side(names: Sequence[str], fraction: float) -> set[str]:
    """The names scoring below `fraction`; with tiny sets at least one on each side."""
    held = {n for n in names if key_score(n) < fraction}
    if len(names) >= 2 and fraction > 0:
        order = sorted(names, key=key_score)
        if not held:
            held = {order[0]}
        elif len(held) == len(names):
            held.discard(order[-1])
    return held


def split_corpus(files: Sequence[CorpusFile], cfg: SplitConfig) -> CorpusSplit:
    """Deduplicate, hold out projects, then files of the trained projects, then drop near copies."""
    cfg.validate()
    if len(files) < 2:
        raise CorpusError(f"the corpus has {len(files)} file(s); a by-file train/held-out split "
                          f"needs at least 2 ({', '.join(str(f.path) for f in files)})")
    texts, duplicates = unique_texts(files)
    files = [f for f in files if f.key in texts]
    projects = sorted({f.project for f in files})
    if cfg.heldout_projects > 0 and len(projects) < 2:
        raise CorpusError(f"holding out projects needs at least 2; the corpus has one ({projects[0]}): "
                          f"name several folders, or set heldout_projects to 0")
    held_projects = _held_side(projects, cfg.heldout_projects)
    cross = [f for f in files if f.project in held_projects]
    rest = [f for f in files if f.project not in held_projects]
    held_files = _held_side([f.key for f in rest], cfg.heldout_fraction)
    train = [f for f in rest if f.key not in held_files]
    in_domain = [f for f in rest if f.key in held_files]
    seen = line_fingerprints(texts[f.key] for f in train)
    near = {f.key for f in (*in_domain, *cross) if overlap(texts[f.key], seen) > cfg.max_overlap}
    return CorpusSplit(cfg, train, [f for f in in_domain if f.key not in near],
                       [f for f in cross if f.key not in near], duplicates, sorted(near))


def unique_texts(files: Sequence[CorpusFile]) -> tuple[dict[str, str], list[str]]:
    """{key: text} of the files, byte-identical copies after the first (in key order) left out,
    and the keys left out. Undecodable bytes are replaced: this text only finds copies."""
    texts: dict[str, str] = {}
    digests: set[bytes] = set()
    duplicates = []
    for f in files:
        try:
            raw = f.path.read_bytes()
        except OSError as e:
            raise CorpusError(f"cannot read corpus file {f.path}: {e.strerror}") from e
        digest = hashlib.sha256(raw).digest()
        if digest in digests:
            duplicates.append(f.key)
            continue
        digests.add(digest)
        texts[f.key] = raw.decode("utf-8", errors="replace")
    return texts, duplicates


def _distinct_lines(text: str) -> list[str]:
    return [s for s in (line.strip() for line in text.splitlines()) if len(s) >= DISTINCT_LINE]


def line_fingerprints(texts) -> np.ndarray:
    """Sorted unique hashes of the distinctive lines of `texts` (hash() is fixed within a process,
    which is all a membership test needs)."""
    hashes = [np.fromiter(map(hash, _distinct_lines(t)), dtype=np.int64) for t in texts]
    return np.unique(np.concatenate(hashes)) if hashes else np.empty(0, np.int64)


def overlap(text: str, seen: np.ndarray) -> float:
    """Share of the text's distinctive lines that occur in `seen` (0 for a text without any)."""
    mine = np.fromiter(map(hash, _distinct_lines(text)), dtype=np.int64)
    if not len(mine) or not len(seen):
        return 0.0
    pos = np.minimum(np.searchsorted(seen, mine), len(seen) - 1)
    return float((seen[pos] == mine).mean())


def interleave_projects(files: Sequence[CorpusFile], seed: int) -> list[CorpusFile]:
    """The files in rounds: one file of every project per round, projects and each project's
    files in a seeded order. A token budget read from the front then spans every project
    evenly instead of the few with the most files."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[CorpusFile]] = defaultdict(list)
    for f in files:
        groups[f.project].append(f)
    names = sorted(groups)
    shuffled = [[groups[n][i] for i in rng.permutation(len(groups[n]))] for n in names]
    order = [shuffled[i] for i in rng.permutation(len(names))]
    longest = max((len(g) for g in order), default=0)
    return [g[r] for r in range(longest) for g in order if r < len(g)]


def train_stream(split: CorpusSplit, encode: Encode, eos_id: int, explicit: frozenset[str], tokens: int,
                 seed: int, file_tokens: int | None) -> TokenStream:
    """The training tokens: the train files with projects in rounds (seeded), at most `file_tokens`
    of each (None: whole files), read only up to the `tokens` the run needs."""
    return tokenize_files(interleave_projects(split.train, seed), encode, eos_id, explicit, split.skipped,
                          max_tokens=tokens, per_file_tokens=file_tokens)


def heldout_stream(files: Sequence[CorpusFile], encode: Encode, eos_id: int, explicit: frozenset[str],
                   skipped: list[str], max_tokens: int | None, seq_len: int) -> TokenStream:
    """The held-out tokens an evaluation scores: projects in rounds in a fixed order, and from each
    file at most 1/32 of the budget (or its share among fewer files; at least one window), so even
    a small evaluation spans many files and projects. max_tokens None: every token of every file."""
    order = interleave_projects(files, seed=0)
    if max_tokens is None:
        return tokenize_files(order, encode, eos_id, explicit, skipped)
    per_file = max(seq_len, -(-max_tokens // max(1, min(32, len(order)))))
    return tokenize_files(order, encode, eos_id, explicit, skipped, max_tokens=max_tokens + seq_len,
                          per_file_tokens=per_file)
