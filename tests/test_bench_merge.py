"""scripts/bench_merge.py runs end to end on a small model and reports every target.

Only the report's form is checked: times depend on the machine (and tests never assert on
wall time), but the masks' storage does not.
"""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_merge.py"
TARGETS = ("tatr_vs_floor", "tatr_rss_models", "tall_vs_floor", "tall_rss_models")
TARGETS += ("ties_vs_floor", "ties_rss_models", "dare_vs_floor", "dare_rss_models")
# the SVD methods' workloads take minutes even on ViT-S-32 (hundreds of SVDs): by hand,
# python scripts/bench_merge.py --methods tsv iso_c iso_cts
METHODS = ("task_arithmetic", "tatr", "tall", "ties", "dare")


def test_bench_merge_reports_every_target(tmp_path):
    options = ["--model", "ViT-S-32", "--tasks", "2", "--workdir", tmp_path]
    run = subprocess.run(
        [sys.executable, str(SCRIPT), *options, "--methods", *METHODS],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    values = dict(pair.split("=") for pair in last.split()[1:])
    for key in TARGETS:
        assert float(values[key]) > 0, key
    # one bit per parameter and task, padded to whole bytes per tensor
    assert 1.0 <= float(values["mask_bits_per_param"]) <= 1.01
    assert re.search(r"^tall phases \(s\): build [\d.]+, retrieve task0 ", run.stdout, re.M)
    assert not list((tmp_path / "out").glob("*.safetensors"))  # outputs removed unless --keep
