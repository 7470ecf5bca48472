"""bench.train --add: which earlier runs a merged results file keeps."""
from __future__ import annotations

import json

import pytest

from bench.train import kept_runs


RECIPE = {"dense_lr": 1e-2, "table_lr": 0.03}


def _results(path, tokens, names, recipe=RECIPE):
    path.write_text(json.dumps({"tokens_per_run": tokens, "recipe": recipe, "runs": [{"name": n} for n in names]}))
    return path


def test_add_keeps_the_runs_of_other_names(tmp_path):
    path = _results(tmp_path / "train.json", 1024, ["recipe", "init-0", "dense-lr-5e-3"])
    assert [r["name"] for r in kept_runs(path, 1024, RECIPE, {"init-0"})] == ["recipe", "dense-lr-5e-3"]


def test_add_refuses_runs_of_another_length(tmp_path):
    path = _results(tmp_path / "train.json", 2048, ["recipe"])
    with pytest.raises(SystemExit, match="2048 tokens, not 1024"):
        kept_runs(path, 1024, RECIPE, set())


def test_add_refuses_runs_of_another_recipe(tmp_path):
    path = _results(tmp_path / "train.json", 1024, ["recipe"], {"dense_lr": 2e-3, "table_lr": 0.1})
    with pytest.raises(SystemExit, match="another recipe"):
        kept_runs(path, 1024, RECIPE, set())


def test_add_without_an_earlier_file_keeps_nothing(tmp_path):
    assert kept_runs(tmp_path / "missing.json", 1024, RECIPE, set()) == []
