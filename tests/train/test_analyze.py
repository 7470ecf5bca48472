"""engram-analyze: logit lens, CKA and row coverage on a trained tiny checkpoint, and the math under them."""
import json

import numpy as np
import pytest
import torch

from train.analyze import main as analyze_main
from train.probes import linear_cka


def test_linear_cka_sees_through_rotation_and_scale_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 400, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    y = torch.stack([5 * x[0] @ q, x[1] + 3, torch.randn(400, 16, generator=g)])
    cka = linear_cka(x, y)
    assert cka.shape == (3, 3)
    assert cka[0, 0] == pytest.approx(1, abs=1e-5) and cka[1, 1] == pytest.approx(1, abs=1e-5)
    assert cka[2, 2] < 0.2 and cka[0, 1] < 0.2          # unrelated features


def test_engram_analyze_writes_the_probes(trained, tmp_path, capsys):
    cfg, _ = trained
    out = tmp_path / "analysis"
    analyze_main(["--engram", cfg.engram, "--model", cfg.model, "--tokens", "128", "--seq-len", "32",
                  "--out", str(out)])
    assert "logit lens:" in capsys.readouterr().out
    r = json.loads((out / "analysis.json").read_text())
    assert r["set"] == "cross_project" and r["layers"] == 4 and r["positions"] == 4 * 31
    kl = {k: np.asarray(v) for k, v in r["logit_lens_kl"].items()}
    assert kl["backbone"][-1] == 0 == kl["engram"][-1] and (kl["backbone"] >= 0).all() and (kl["engram"] >= 0).all()
    cka = np.asarray(r["cka"])
    # layer 0 runs before the first Engram layer (1): the same states with or without the memory
    assert cka.shape == (4, 4) and cka[0, 0] == pytest.approx(1, abs=1e-4) and (cka <= 1 + 1e-4).all()
    assert len(r["cka_best_backbone_layer"]) == 4
    levels = r["coverage"]
    assert sum(c["positions"] for c in levels) == r["positions"] and sorted(levels[0]["gate"]) == ["1", "2"]
    assert all(0 < g < 1 for c in levels for g in c["gate"].values())
    for name in ("logit_lens", "cka", "coverage"):
        assert (out / f"{name}.png").stat().st_size > 5_000
