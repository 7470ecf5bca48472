"""The layering is a contract that can fail: import-linter's contracts in pyproject.toml, checked
here too so that a bare `pytest` catches an import that climbs a layer (server -> engram_runtime
-> offload -> engram_kernels; loadtest imports none of them)."""
from __future__ import annotations

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    exit_code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert exit_code == 0, capsys.readouterr().out
