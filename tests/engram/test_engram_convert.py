"""engram-convert: rewrite tables in another dtype, update the manifest, report the error."""
import json

import numpy as np
import pytest

from engram_runtime.checkpoint import init_checkpoint, load_checkpoint, normal_rows
from engram_runtime.checkpoint_convert import main
from engram_runtime.checkpoint_format import read_manifest
from engram_runtime.engram_config import EngramConfig
from offload.store import TableSet
from offload.tablefile import check_table

BACKBONE = {"name": "tiny", "hidden_size": 32, "num_hidden_layers": 16, "vocab_size": 100}
CFG = EngramConfig(engram_vocab_size=[101, 103], n_embed_per_ngram=128, n_head_per_ngram=2, layer_ids=[1, 15])


@pytest.fixture
def ckpt(tmp_path):
    """A fresh float32 checkpoint (engram-init's tables) each test may convert or damage."""
    init_checkpoint(tmp_path / "engram", CFG, BACKBONE, dtype="float32", progress=False)
    return tmp_path / "engram"


def test_convert_to_fp8_and_back(ckpt, capsys):
    before, _ = read_manifest(ckpt)
    values = {layer: normal_rows(CFG.seed, layer, CFG.head_dim)(0, before["tables"][str(layer)]["shape"][0])
              for layer in (1, 15)}  # what engram-init wrote
    assert main([str(ckpt), "--dtype", "fp8", "--json", "--quiet"]) == 0
    reports = {r["layer_id"]: r for r in json.loads(capsys.readouterr().out)}
    manifest, _ = read_manifest(ckpt)
    for layer in (1, 15):
        entry = manifest["tables"][str(layer)]
        assert entry["dtype"] == "fp8_e4m3" and entry["file"] == f"table_layer{layer}.fp8_e4m3.safetensors"
        assert entry["head_offsets"] == before["tables"][str(layer)]["head_offsets"]
        assert not (ckpt / before["tables"][str(layer)]["file"]).exists()
        check_table(ckpt / entry["file"], entry, verify_hash=True)
        r = reports[layer]
        assert 0.01 < r["relative_rms_error"] < 0.03 and r["dst_nbytes"] < r["src_nbytes"] * 0.27
    assert {k: v for k, v in manifest.items() if k != "tables"} == {k: v for k, v in before.items() if k != "tables"}
    load_checkpoint(ckpt, verify_tables=True)
    tables = TableSet.open(ckpt, manifest["tables"], placement="mmap", progress=False)
    for layer in (1, 15):
        got = tables[layer].gather(np.arange(values[layer].shape[0]))
        err = got - values[layer]
        assert float(err.abs().max()) == pytest.approx(reports[layer]["max_abs_error"])
        assert float(err.norm() / values[layer].norm()) == pytest.approx(reports[layer]["relative_rms_error"], rel=1e-4)
    # fp8 -> bf16 is exact for e4m3 values with power-of-two scales in range
    assert main([str(ckpt), "--dtype", "bf16", "--layers", "15", "--keep-old", "--quiet"]) == 0
    assert "relative RMS error 0" in capsys.readouterr().out
    manifest, _ = read_manifest(ckpt)
    assert manifest["tables"]["15"]["dtype"] == "bfloat16" and manifest["tables"]["1"]["dtype"] == "fp8_e4m3"
    assert (ckpt / "table_layer15.fp8_e4m3.safetensors").exists()


def test_convert_errors_are_one_line(ckpt, tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--dtype", "fp8"]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    assert main([str(ckpt), "--dtype", "int3"]) == 2
    assert "unknown table dtype 'int3'" in capsys.readouterr().err
    assert main([str(ckpt), "--dtype", "bf16", "--layers", "7"]) == 2
    assert "no tables for layers ['7']" in capsys.readouterr().err
    with open(ckpt / "table_layer1.safetensors", "r+b") as f:
        f.truncate(500)
    assert main([str(ckpt), "--dtype", "bf16"]) == 2
    assert "truncated" in capsys.readouterr().err
    (ckpt / "engram.json").write_text("{}")
    assert main([str(ckpt), "--dtype", "bf16"]) == 2
    assert "engram.json: format" in capsys.readouterr().err
