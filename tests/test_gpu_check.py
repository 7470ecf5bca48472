"""scripts/gpu_check.py keeps working between GPU sessions: --smoke runs every stage of it on this
CPU with the device stand-in and tiny shapes, and writes the JSON a GPU run would."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_measures_every_memory_and_mode(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    stages = json.loads(out.read_text())["stages"]
    assert stages["environment"]["ok"] and stages["environment"]["torch"]
    runs = stages["decode/tiny"]["runs"]
    assert set(runs) >= {"no_engram/graphs", "no_engram/eager", "hbm/graphs", "hbm/eager", "host_uva/graphs",
                         "host_uva/eager", "host_staging/eager"}
    for name in ("hbm/graphs", "host_staging/eager"):
        run = runs[name]
        assert [r["batch"] for r in run["by_batch"]] == [1, 4] and len(run["ratio_vs_no_engram"]) == 2
        assert all(r["tokens_per_s"] > 0 and set(r["stall_ms_per_wait"]) == {"1", "2"} for r in run["by_batch"])
