"""Table size -> engram_vocab_size, and which checkpoints a comparison needs."""
from __future__ import annotations

import argparse

import pytest

from loadtest.checkpoints import resolve_checkpoints, vocab_for_table_gb


def test_table_gb_to_engram_vocab_size():
    # 2 layers x 2 orders x 8 heads rows of 64 bf16 values = 4096 bytes per vocab entry
    assert vocab_for_table_gb(8.0) == 8_000_000_000 // 4096
    assert vocab_for_table_gb(1.0, "float32") == 1_000_000_000 // 8192
    with pytest.raises(ValueError, match="fp8"):
        vocab_for_table_gb(1.0, "fp8")


def _args(**kw) -> argparse.Namespace:
    base = dict(engram=None, engram_fp8=None, engram_vocab_size=None, table_gb=None,
                table_dtype="bfloat16", ckpt_dir=None)
    return argparse.Namespace(**{**base, **kw})


def test_given_checkpoints_are_checked_not_created(tmp_path):
    assert resolve_checkpoints(_args(), "--no-engram") == {}
    (tmp_path / "engram.json").write_text("{}")
    assert resolve_checkpoints(_args(engram=str(tmp_path)), "--engram {engram}") == {"engram": str(tmp_path)}
    with pytest.raises(ValueError, match="no engram.json"):
        resolve_checkpoints(_args(engram=str(tmp_path / "nope")), "--engram {engram}")
    with pytest.raises(ValueError, match="need a table"):
        resolve_checkpoints(_args(), "--engram {engram}")
    with pytest.raises(ValueError, match="--engram-fp8"):
        resolve_checkpoints(_args(engram=str(tmp_path)), "--engram {engram} --engram {engram_fp8}")
