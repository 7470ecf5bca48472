"""The data-parallel and shared-table options, without starting a server: which placement
`--data-parallel-size` implies, the workers' core sets, and `--drop-shared-tables`."""
from __future__ import annotations

import pytest

from offload.shared import DIR_ENV
from offload.store import TableSet
from server import cli
from server.data_parallel import core_sets


def _placement(*argv: str) -> str:
    args = cli.build_parser().parse_args(list(argv))
    return cli._placement(args)


def test_data_parallel_implies_shared_tables_unless_placed_elsewhere():
    assert _placement() == "host"
    assert _placement("--data-parallel-size", "2") == "shared"
    assert _placement("--data-parallel-size", "2", "--table-placement", "device") == "device"
    assert _placement("--data-parallel-size", "2", "--table-placement", "mmap") == "mmap"
    assert _placement("--table-placement", "shared") == "shared"


def test_workers_get_disjoint_cores():
    assert core_sets(2, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3]]
    assert core_sets(3, [5, 7]) == [None, None, None]  # fewer cores than workers: no pinning


def test_bad_data_parallel_size_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--data-parallel-size", "0"])
    assert exit_info.value.code == 2 and "--data-parallel-size must be at least 1" in capsys.readouterr().err


def test_drop_shared_tables_removes_unused_copies_and_exits(ckpt_factory, tmp_path, monkeypatch, capsys):
    shared = tmp_path / "shared"
    monkeypatch.setenv(DIR_ENV, str(shared))
    ckpt = ckpt_factory()
    TableSet.open(ckpt.path, ckpt.tables, placement="shared", progress=False).close()
    held_ckpt = ckpt_factory(seed=1)
    held = TableSet.open(held_ckpt.path, held_ckpt.tables, placement="shared", progress=False)
    assert cli.main(["--drop-shared-tables", "--shared-table-dir", str(shared)]) == 0
    out = capsys.readouterr().out
    assert out.count("removed ") == len(ckpt.tables) and out.count("kept ") == len(held_ckpt.tables)
    assert len(list(shared.glob("*.safetensors"))) == len(held_ckpt.tables)
    held.close()
