"""Held-out projects and files: whole projects out, copies out, deterministic; streams span projects."""
from pathlib import Path

import pytest

from train.corpus import PYTHON_SUFFIXES, CorpusError, default_corpus, discover
from train.split import SplitConfig, heldout_stream, interleave_projects, split_corpus


def _encode(texts):
    return [[ord(c) % 100 + 3 for c in t] for t in texts]


def _line(project: str, i: int) -> str:
    return f"result_{project}_{i} = compute_something_long(argument_{i}, option={i})\n"


def _projects(root: Path, n: int = 10, files: int = 4) -> Path:
    for p in range(n):
        d = root / f"proj{p}"
        d.mkdir(parents=True, exist_ok=True)
        for k in range(files):
            (d / f"m{k}.py").write_text("".join(_line(f"{p}_{k}", i) for i in range(20)))
    return root


def test_whole_projects_are_held_out_deterministically(tmp_path):
    root = _projects(tmp_path / "site")
    s = split_corpus(discover([root]), SplitConfig(heldout_fraction=0.25, heldout_projects=0.3))
    held = {f.project for f in s.cross_project}
    assert held and held.isdisjoint(f.project for f in s.train + s.in_domain)
    assert all(len([f for f in s.cross_project if f.project == p]) == 4 for p in held)   # every file of them
    assert s.in_domain and {f.project for f in s.in_domain} <= {f.project for f in s.train}
    # adding a project never moves another across the split
    _projects(tmp_path / "site", n=14)
    s2 = split_corpus(discover([root]), SplitConfig(heldout_fraction=0.25, heldout_projects=0.3))
    assert held <= {f.project for f in s2.cross_project}
    assert [f.key for f in s.in_domain] == [f.key for f in s2.in_domain if f.project in {g.project for g in s.in_domain}]
    d = s.to_dict()
    assert sorted(d["projects"]["heldout"]) == sorted(held) and d["heldout_projects"] == 0.3
    with pytest.raises(CorpusError, match="at least 2"):
        split_corpus(discover([root / "proj0"]), SplitConfig(heldout_projects=0.2))


def test_copies_never_reach_a_held_out_set(tmp_path):
    root = _projects(tmp_path / "site", n=6)
    cfg = SplitConfig(heldout_fraction=0.2, heldout_projects=0.4)
    s = split_corpus(discover([root]), cfg)
    target = s.cross_project[0].path.parent
    src, other = s.train[0], s.train[1]
    (target / "exact.py").write_bytes(src.path.read_bytes())                   # byte-identical copy
    lines = other.path.read_text().splitlines(keepends=True)
    (target / "fork.py").write_text("".join(lines[:15]) + "".join(_line("fork", i) for i in range(5)))
    (target / "borrows.py").write_text("".join(lines[:3]) + "".join(_line("own", i) for i in range(17)))
    s = split_corpus(discover([root]), cfg)
    copy_key, fork_key, own_key = (f"site/{target.name}/{n}" for n in ("exact.py", "fork.py", "borrows.py"))
    kept = {f.key for f in s.train + s.in_domain + s.cross_project}
    assert (copy_key in s.duplicates) != (src.key in s.duplicates)              # kept once, wherever
    assert (copy_key in kept) != (src.key in kept)
    assert fork_key in s.near_duplicates and fork_key not in kept              # 75% of its lines are trained text
    assert own_key in {f.key for f in s.cross_project}                         # 15%: its own code, kept


def test_streams_take_projects_in_rounds(tmp_path):
    root = _projects(tmp_path / "site", n=5, files=3)
    files = discover([root])
    order = interleave_projects(files, seed=1)
    assert len(order) == 15 and len({f.project for f in order[:5]}) == 5 and len({f.project for f in order[5:10]}) == 5
    assert order == interleave_projects(files, seed=1) != interleave_projects(files, seed=2)
    stream = heldout_stream(files, _encode, 2, frozenset(), [], max_tokens=200, seq_len=20)
    assert len(stream.projects()) == 5 and len(stream) == 220
    assert len(heldout_stream(files, _encode, 2, frozenset(), [], None, 20)) == sum(
        len(f.path.read_text()) + 1 for f in files)


def test_default_corpus_is_the_stdlib_and_installed_packages(tmp_path):
    paths = default_corpus()
    assert len(paths) >= 2 and Path(paths[0], "os.py").is_file() and Path(paths[1]).name == "site-packages"
    site = tmp_path / "site-packages"
    for rel in ("pkg/a.py", "pkg/_vendor/dep/b.py", "pkg-1.0.dist-info/LICENSE.txt", "pkg/include/c.h", "pkg/README.md"):
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text("x = 1\n")
    assert [f.key for f in discover([site], PYTHON_SUFFIXES)] == ["site-packages/pkg/README.md", "site-packages/pkg/a.py"]
