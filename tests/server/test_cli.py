"""engram-serve's command line: environment variables, startup errors, the default Engram checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from engram_runtime.checkpoint_init import InitOptions, engram_init
from server import default_engram
from server.cli import build_parser, configs, env_name, main, set_compute_threads
from server.default_engram import INIT_NAME, TRAINED_NAME, resolve_default_engram


def test_every_option_has_an_environment_variable(monkeypatch):
    parser = build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    for required in ("--model", "--engram", "--no-engram", "--table-placement", "--table-dtype", "--cache-rows",
                     "--no-prefetch", "--max-num-seqs", "--max-queue", "--dtype", "--host", "--port", "--api-key",
                     "--shutdown-timeout", "--threads"):
        action = next(a for a in options if required in a.option_strings)
        assert f"[env {env_name(required)}]" in action.help
    monkeypatch.setenv("ENGRAM_SERVE_MAX_QUEUE", "7")
    monkeypatch.setenv("ENGRAM_SERVE_NO_PREFETCH", "true")
    monkeypatch.setenv("ENGRAM_SERVE_TABLE_PLACEMENT", "mmap")
    monkeypatch.setenv("ENGRAM_SERVE_API_KEY", "k")
    monkeypatch.setenv("ENGRAM_SERVE_ENGINE_ITERATION_TIMEOUT", "5")
    args = build_parser().parse_args(["--no-engram", "--max-num-seqs", "3"])
    assert (args.max_queue, args.no_prefetch, args.table_placement, args.api_key) == (7, True, "mmap", "k")
    assert build_parser().parse_args(["--max-queue", "9"]).max_queue == 9  # the command line wins
    engine, server = configs(args)
    assert (engine.engram, engine.prefetch, engine.table_placement, engine.max_num_seqs) == (None, False, "mmap", 3)
    assert (server.max_queue, server.api_key, server.engine_iteration_timeout) == (7, "k", 5.0)


@pytest.mark.parametrize("argv, env, message", [
    (["--engram", "/no/such/ckpt"], {}, "/no/such/ckpt"),
    (["--engram", "x", "--no-engram"], {}, "exclude each other"),
    (["--no-engram", "--max-num-seqs", "0"], {}, "--max-num-seqs"),
    (["--no-engram", "--threads", "0"], {}, "--threads"),
    (["--no-engram"], {"ENGRAM_SERVE_DTYPE": "float8"}, "float8"),
    (["--no-engram"], {"ENGRAM_SERVE_PORT": "eighty"}, "eighty"),
    (["--model", "/no/such.gguf", "--no-engram"], {}, "/no/such.gguf"),
])
def test_startup_errors_are_one_line(argv, env, message, monkeypatch, capsys):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_compute_threads_use_every_cpu_by_default():
    import torch

    before = torch.get_num_threads()
    try:
        set_compute_threads(None)
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))
        set_compute_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_corrupt_checkpoint_refused_before_loading(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    engram_init(InitOptions(out=ckpt, rows_per_head=300, dtype="float32", progress=False))
    table = next(ckpt.glob("table_layer*.safetensors"))
    with open(table, "r+b") as f:
        f.truncate(os.path.getsize(table) - 10)
    with pytest.raises(SystemExit) as exit_info:
        main(["--engram", str(ckpt)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert table.name in err and "Traceback" not in err


def test_default_checkpoint_created_once_and_trained_preferred(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_SERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(default_engram, "TRAIN_DEFAULT_OUT", tmp_path / "train-out")
    first = resolve_default_engram(None, rows_per_head=300, dtype="float32")
    assert first == tmp_path / INIT_NAME and (first / "engram.json").is_file()
    stamp = (first / "engram.json").stat().st_mtime_ns
    assert resolve_default_engram(None, rows_per_head=300) == first
    assert (first / "engram.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    shutil.copytree(first, tmp_path / "train-out")  # what `make train-default` writes
    assert resolve_default_engram(None, rows_per_head=300) == tmp_path / "train-out"
    shutil.copytree(first, tmp_path / TRAINED_NAME)  # a trained memory put into the cache wins
    assert resolve_default_engram(None, rows_per_head=300) == Path(tmp_path / TRAINED_NAME)
    args = build_parser().parse_args([])
    assert configs(args)[0].engram == str(tmp_path / TRAINED_NAME)
