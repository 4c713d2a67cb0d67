"""scripts/bench_data.py runs end to end on a few small tasks and reports every target.

Only the report's form is checked (tests never assert on wall time); the data it writes
is read back through the real data module, decoded and from the cache, in the same run.
"""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_data.py"
TARGETS = ("cache_vs_decoding", "loop_vs_forward", "decoding_share")


def test_bench_data_reports_every_target(tmp_path):
    options = ["--model", "ViT-S-32", "--tasks", "2", "--per-task", "24", "--scored-per-task",
               "8", "--batch-size", "4", "--workers", "0", "--folder", str(tmp_path)]  # fmt: skip
    run = subprocess.run(
        [sys.executable, str(SCRIPT), *options], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    values = dict(pair.split("=") for pair in last.split()[1:])
    assert set(values) == set(TARGETS)
    assert float(values["cache_vs_decoding"]) > 0 and float(values["loop_vs_forward"]) > 0
    assert "48 images" in run.stdout  # every image of both tasks was read
    assert sorted(p.name for p in tmp_path.glob("task*.yaml")) == ["task0.yaml", "task1.yaml"]
