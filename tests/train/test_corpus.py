"""Corpus discovery, by-file split and tokenization: deterministic, and clear errors."""
import json

import numpy as np
import pytest

from train.batches import WindowSchedule, eval_windows
from train.corpus import CorpusError, discover, explicit_keys, read_documents, tokenize_files
from train.split import SplitConfig, split_corpus


def _encode(texts):
    return [[ord(c) % 100 + 3 for c in t] for t in texts]


def _tree(tmp_path, n=20):
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    for i in range(n):
        (root / "pkg" / f"m{i}.py").write_text(f"def f{i}():\n    return {i}\n")
    (root / "notes.md").write_text("# notes\nhello\n")
    (root / "image.png").write_bytes(b"\x89PNG\x00")   # unsupported suffix: ignored in folders
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.py").write_text("ignored")
    return root


def test_discover_and_split_are_deterministic_and_by_file(tmp_path):
    root = _tree(tmp_path)
    files = discover([root])
    keys = [f.key for f in files]
    assert keys == sorted(keys) and len(keys) == 21
    assert all(k.startswith("src/") for k in keys) and not any("__pycache__" in k for k in keys)
    assert {f.project for f in files} == {"src", "src/pkg"}        # loose files belong to the root
    s1 = split_corpus(files, SplitConfig(0.2))
    s2 = split_corpus(discover([str(root)]), SplitConfig(0.2))
    assert [f.key for f in s1.in_domain] == [f.key for f in s2.in_domain] and not s1.cross_project
    assert set(f.key for f in s1.train).isdisjoint(f.key for f in s1.in_domain)
    assert len(s1.train) + len(s1.in_domain) == 21 and s1.in_domain and s1.train
    # adding a file never moves an existing one across the split
    (root / "pkg" / "new.py").write_text("x = 1\n")
    s3 = split_corpus(discover([root]), SplitConfig(0.2))
    assert {f.key for f in s1.in_domain} <= {f.key for f in s3.in_domain}
    s1.write(tmp_path / "split.json")
    assert json.loads((tmp_path / "split.json").read_text())["in_domain"] == [f.key for f in s1.in_domain]


def test_missing_and_unsupported_paths_are_clear_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist: .*nowhere"):
        discover([tmp_path / "nowhere"])
    (tmp_path / "a.bin").write_bytes(b"\x00\x01")
    with pytest.raises(CorpusError, match="unsupported corpus file type '.bin'"):
        discover([tmp_path / "a.bin"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no usable corpus files"):
        discover([tmp_path / "empty"])
    only = tmp_path / "only.txt"
    only.write_text("x")
    with pytest.raises(CorpusError, match="at least 2"):
        split_corpus(discover([only]), SplitConfig(0.1))


def test_corrupted_files(tmp_path):
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"ok \xff\xfe broken")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\n{"text": 3}\n')
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"text": "fine"}\n{"text": "cut')
    (f_utf8,) = discover([bad_utf8])
    with pytest.raises(CorpusError, match=r"not UTF-8 text: .*bad.txt"):
        read_documents(f_utf8)
    assert read_documents(f_utf8, strict=False) is None      # met while walking a folder: skipped
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: .*'text' field"):
        read_documents(discover([bad_jsonl])[0])
    with pytest.raises(CorpusError, match=r"torn.jsonl:2: invalid JSON"):
        read_documents(discover([torn])[0])


def test_tokenize_jsonl_and_skip_undecodable_in_folders(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_text('{"text": "ab"}\n\n{"text": "c", "meta": 1}\n')
    (d / "b.txt").write_bytes(b"\xff\xff")
    (d / "c.txt").write_text("xyz")
    files = discover([d])
    skipped = []
    stream = tokenize_files(files, _encode, eos_id=2, explicit=explicit_keys([d]), skipped=skipped)
    assert skipped == ["d/b.txt"]
    assert stream.tokens.tolist() == [ord("a") % 100 + 3, ord("b") % 100 + 3, 2, ord("c") % 100 + 3, 2,
                               *(ord(c) % 100 + 3 for c in "xyz"), 2]
    assert [f.key for f in stream.files] == ["d/a.jsonl", "d/c.txt"] and stream.source.tolist() == [0] * 5 + [1] * 4
    with pytest.raises(CorpusError, match="not UTF-8"):
        tokenize_files(discover([d / "b.txt"]), _encode, 2, explicit=explicit_keys([d / "b.txt"]))


def test_window_schedule_is_a_pure_function_of_the_step():
    stream = np.arange(1000, dtype=np.int32)
    a = WindowSchedule(stream, seq_len=10, batch_size=4, seed=3)
    b = WindowSchedule(stream, seq_len=10, batch_size=4, seed=3)
    seen = np.concatenate([a.batch(s)[:, 0] for s in range(25)])       # exactly one epoch
    assert sorted(seen.tolist()) == list(range(0, 1000, 10))
    assert np.array_equal(a.batch(30), b.batch(30)) and np.array_equal(a.batch(7), b.batch(7))
    assert not np.array_equal(a.batch(0), a.batch(25))                  # a new permutation per epoch
    assert eval_windows(stream, 100, 250).shape == (2, 100)


def test_a_capped_file_gives_a_fixed_run_from_anywhere_in_it(tmp_path):
    files = []
    for i in range(8):
        (tmp_path / f"f{i}.txt").write_text(" ".join(str(k) for k in range(100)))
        files += discover([tmp_path / f"f{i}.txt"])
    full = _encode([files[0].path.read_text()])[0] + [2]
    starts = set()
    for f in files:
        part = tokenize_files([f], _encode, 2, per_file_tokens=10).tokens.tolist()
        start = next(s for s in range(len(full) - 9) if full[s:s + 10] == part)
        assert part == tokenize_files([f], _encode, 2, per_file_tokens=10).tokens.tolist()
        starts.add(start)
    assert len(starts) > 4 and max(starts) > 100           # not every file's first tokens
