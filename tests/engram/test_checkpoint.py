"""Engram checkpoints: engram-init's layout, round trip through load_checkpoint, refusal of bad files."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from engram_runtime.checkpoint import init_checkpoint, load_checkpoint, normal_rows, rows_per_head_for_size
from engram_runtime.checkpoint_format import (EngramCheckpointError, read_manifest, table_file_name, with_files,
                                              write_manifest)
from engram_runtime.checkpoint_init import InitOptions, engram_init
from engram_runtime.checkpoint_init import main as init_main
from engram_runtime.engram_config import EngramConfig
from engram_runtime.hashing import table_sizes_for
from offload.tablefile import map_rows, read_header

BACKBONE = {"name": "tiny", "hidden_size": 32, "num_hidden_layers": 4, "vocab_size": 100}
CFG = EngramConfig(engram_vocab_size=[60, 50], n_embed_per_ngram=32, n_head_per_ngram=2, layer_ids=[0, 2])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "engram"
    init_checkpoint(path, CFG, BACKBONE, dtype="float32", progress=False)
    return path


@pytest.fixture
def ckpt(pristine, tmp_path):
    """A private copy each test may damage."""
    return shutil.copytree(pristine, tmp_path / "engram")


def test_round_trip(ckpt):
    loaded = load_checkpoint(ckpt, verify_tables=True)
    assert loaded.config == CFG
    assert loaded.manifest["verification"].startswith("file size is checked at every load")
    sizes = table_sizes_for(CFG)
    for lid in CFG.layer_ids:
        entry = loaded.tables_manifest[str(lid)]
        assert entry["file"] == table_file_name(lid)
        assert entry["shape"] == [sum(map(sum, sizes[lid])), CFG.head_dim]
        assert loaded.head_offsets[lid].tolist() == [0] + np.cumsum(sum(sizes[lid], []))[:-1].tolist()
    layers = loaded.build_layers(dtype=torch.bfloat16)
    assert set(layers) == {0, 2} and layers[2].value_proj.weight.dtype == torch.bfloat16
    assert not layers[2].training and not any(p.requires_grad for p in layers[2].parameters())
    hidden = torch.randn(2, 5, 1, 32, dtype=torch.bfloat16)
    emb = torch.randn(2, 5, CFG.heads_total, CFG.head_dim, dtype=torch.bfloat16)
    assert layers[0](hidden, emb).abs().max().item() == 0.0  # value projection zeroed
    assert layers[0].key_projs[0].weight.std().item() > 0.01  # gate path is not degenerate


def test_tables_are_standard_normal_and_independent_of_chunking(ckpt):
    header = read_header(ckpt / table_file_name(2))
    rows = torch.from_numpy(np.array(map_rows(header)))
    assert abs(rows.mean().item()) < 0.05 and abs(rows.std().item() - 1.0) < 0.05
    fill = normal_rows(CFG.seed, 2, CFG.head_dim)
    assert torch.equal(fill(0, header.num_rows), rows)
    big = normal_rows(0, 1, 8)
    whole = big(0, 70_000)  # crosses the 65536-row seeding block
    assert torch.equal(torch.cat([big(0, 3), big(3, 65_540), big(65_540, 70_000)]), whole)
    assert not torch.equal(normal_rows(0, 2, 8)(0, 10), whole[:10])


def test_missing_truncated_and_corrupted_tables_are_named(ckpt):
    table = ckpt / table_file_name(2)
    data = bytearray(table.read_bytes())
    data[-5] ^= 0xFF  # same size, different content: only the sha256 can tell
    table.write_bytes(bytes(data))
    load_checkpoint(ckpt)  # size-only check passes, as the manifest promises
    with pytest.raises(EngramCheckpointError, match=f"{table}.*sha256"):
        load_checkpoint(ckpt, verify_tables=True)
    table.write_bytes(bytes(data[:-64]))
    with pytest.raises(EngramCheckpointError, match=str(table)):
        load_checkpoint(ckpt)
    table.unlink()
    with pytest.raises(EngramCheckpointError, match=f"{table}.*does not exist"):
        load_checkpoint(ckpt)


def test_bad_manifest_and_dense_file_are_refused(ckpt, tmp_path):
    with pytest.raises(EngramCheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    manifest_path = ckpt / "engram.json"
    manifest = json.loads(manifest_path.read_text())
    for damage, message in [({"format": "other/9"}, "format"),
                            ({"config": {**manifest["config"], "n_heads": 2}}, "unknown field"),
                            ({"config": {**manifest["config"], "engram_vocab_size": [70, 50]}}, "shape"),
                            ({"tables": {"0": manifest["tables"]["0"]}}, "layer"),
                            ({"backbone": {**manifest["backbone"], "vocab_size": "100"}}, "vocab_size"),
                            ({"dense": {"file": "dense.safetensors"}}, "sha256"),
                            ({"tables": {**manifest["tables"], "2": {**manifest["tables"]["2"], "nbytes": None}}},
                             "layer 2.*nbytes"),
                            ({"tables": {**manifest["tables"], "2": {**manifest["tables"]["2"], "dtype": "int3"}}},
                             "layer 2.*int3")]:
        manifest_path.write_text(json.dumps({**manifest, **damage}))
        with pytest.raises(EngramCheckpointError, match=message):
            load_checkpoint(ckpt)
    manifest_path.write_text("{not json")
    with pytest.raises(EngramCheckpointError, match="engram.json.*JSON"):
        load_checkpoint(ckpt)
    manifest_path.write_text(json.dumps(manifest))
    dense = ckpt / "dense.safetensors"
    raw = bytearray(dense.read_bytes())
    raw[-1] ^= 0xFF
    dense.write_bytes(bytes(raw))
    with pytest.raises(EngramCheckpointError, match="dense.safetensors.*sha256"):
        load_checkpoint(ckpt)


def test_rewritten_files_keep_the_rest_and_bad_manifests_are_not_written(ckpt):
    manifest, _ = read_manifest(ckpt)
    entry = {"file": "table_layer2.x.safetensors", "dtype": "bfloat16", "nbytes": 1, "sha256": "0" * 64}
    new = with_files(manifest, tables={2: entry})
    assert new["tables"]["2"] == {**manifest["tables"]["2"], **entry}  # head offsets and shape kept
    assert new["tables"]["0"] == manifest["tables"]["0"] and manifest["tables"]["2"]["dtype"] == "float32"
    with pytest.raises(EngramCheckpointError, match="layer 2.*shape"):
        write_manifest(ckpt, with_files(manifest, tables={2: {"shape": [1, 16]}}))
    assert read_manifest(ckpt)[0] == manifest  # the refused manifest did not replace the good one


def test_backbone_mismatch_is_refused(ckpt):
    loaded = load_checkpoint(ckpt)
    loaded.check_backbone(32, 4, 100)
    with pytest.raises(EngramCheckpointError, match="hidden_size 32 .checkpoint. vs 576"):
        loaded.check_backbone(576, 4, 100)
    with pytest.raises(EngramCheckpointError, match="already exists"):
        init_checkpoint(ckpt, CFG, BACKBONE, progress=False)


def test_engram_init_default_layout_for_smollm2(tmp_path, capsys):
    out = tmp_path / "smol"
    assert init_main([str(out), "--rows-per-head", "300", "--quiet"]) == 0
    loaded = load_checkpoint(out, verify_tables=True)
    cfg = loaded.config
    assert (cfg.layer_ids, cfg.max_ngram_size, cfg.n_head_per_ngram, cfg.head_dim, cfg.hc_mult) == ([1, 15], 3, 8, 64, 1)
    assert loaded.backbone == {"name": "SmolLM2-135M-Instruct.Q4_1.gguf", "hidden_size": 576,
                               "num_hidden_layers": 30, "vocab_size": 49152}
    assert loaded.tables_manifest["1"]["dtype"] == "bfloat16"
    assert all(float(v.abs().max()) == 0.0 for k, v in loaded.dense[15].items() if k.startswith("value_proj"))
    assert "layer 15" in capsys.readouterr().out
    assert init_main([str(out), "--quiet"]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err
    assert init_main([str(tmp_path / "x"), "--layers", "1", "40", "--quiet"]) == 2
    assert "do not fit" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    assert init_main([str(tmp_path / "y"), "--table-gb", "0", "--quiet"]) == 2
    assert "--table-gb must be positive" in capsys.readouterr().err


def test_engram_init_as_a_function_matches_the_command(tmp_path):
    engram_init(InitOptions(out=tmp_path / "f", rows_per_head=300, layers=[1], progress=False))
    assert init_main([str(tmp_path / "c"), "--rows-per-head", "300", "--layers", "1", "--quiet"]) == 0
    assert read_manifest(tmp_path / "f")[0] == read_manifest(tmp_path / "c")[0]
    with pytest.raises(ValueError, match="not both"):
        InitOptions(out=tmp_path / "g", rows_per_head=300, table_gb=1.0).config(BACKBONE)


def test_table_size_target():
    rows = rows_per_head_for_size(10.0, heads_total=16, head_dim=64, dtype="bfloat16")
    assert rows == 10 * 10**9 // (16 * 128)
    cfg = EngramConfig(engram_vocab_size=[rows, rows], layer_ids=[1])
    nbytes = sum(map(sum, table_sizes_for(cfg)[1])) * 128
    assert abs(nbytes / 1e10 - 1) < 1e-3
