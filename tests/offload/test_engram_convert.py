"""engram-convert: rewrite tables in another dtype, update the manifest, report the error."""
import json

import numpy as np
import pytest
import torch

from offload.convert import main
from offload.store import TableSet
from offload.tablefile import check_table


def test_convert_to_fp8_and_back(ckpt_factory, capsys):
    ckpt = ckpt_factory(dtype="float32")
    old_files = {layer: e["file"] for layer, e in ckpt.tables.items()}
    assert main([str(ckpt.path), "--dtype", "fp8", "--json", "--quiet"]) == 0
    reports = {r["layer_id"]: r for r in json.loads(capsys.readouterr().out)}
    manifest = ckpt.manifest()
    for layer in (1, 15):
        entry = manifest["tables"][str(layer)]
        assert entry["dtype"] == "fp8_e4m3" and entry["file"] == f"table_layer{layer}.fp8_e4m3.safetensors"
        assert entry["head_offsets"] == ckpt.tables[str(layer)]["head_offsets"]
        assert not (ckpt.path / old_files[str(layer)]).exists()
        check_table(ckpt.path / entry["file"], entry, verify_hash=True)
        r = reports[layer]
        assert 0.01 < r["relative_rms_error"] < 0.03 and r["dst_nbytes"] < r["src_nbytes"] * 0.27
    tables = TableSet.open(ckpt.path, manifest["tables"], placement="mmap", progress=False)
    for layer in (1, 15):
        got = tables[layer].gather(np.arange(ckpt.values[layer].shape[0]))
        err = got - ckpt.values[layer]
        assert float(err.abs().max()) == pytest.approx(reports[layer]["max_abs_error"])
        assert float(err.norm() / ckpt.values[layer].norm()) == pytest.approx(reports[layer]["relative_rms_error"], rel=1e-4)
    # fp8 -> bf16 is exact for e4m3 values with power-of-two scales in range
    assert main([str(ckpt.path), "--dtype", "bf16", "--layers", "15", "--keep-old", "--quiet"]) == 0
    assert "relative RMS error 0" in capsys.readouterr().out
    manifest = ckpt.manifest()
    assert manifest["tables"]["15"]["dtype"] == "bfloat16" and manifest["tables"]["1"]["dtype"] == "fp8_e4m3"
    assert (ckpt.path / "table_layer15.fp8_e4m3.safetensors").exists()


def test_convert_errors_are_one_line(ckpt_factory, tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--dtype", "fp8"]) == 2
    assert "engram.json does not exist" in capsys.readouterr().err
    ckpt = ckpt_factory()
    assert main([str(ckpt.path), "--dtype", "int3"]) == 2
    assert "unknown table dtype 'int3'" in capsys.readouterr().err
    assert main([str(ckpt.path), "--dtype", "bf16", "--layers", "7"]) == 2
    assert "no tables for layers ['7']" in capsys.readouterr().err
    with open(ckpt.path / ckpt.tables["1"]["file"], "r+b") as f:
        f.truncate(500)
    assert main([str(ckpt.path), "--dtype", "bf16"]) == 2
    assert "truncated" in capsys.readouterr().err
