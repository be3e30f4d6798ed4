"""benchmarks/gpu_check.py in its CPU smoke mode: every check runs and passes, so it cannot rot
before a GPU run."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke_mode_passes(demo_root, tiny_model_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    report = json.loads(run.stdout.strip().splitlines()[-1])
    failed = {k: v for k, v in report.items() if isinstance(v, dict) and v.get("ok") is False}
    assert run.returncode == 0 and report["ok"], (failed, run.stderr[-2000:])
    assert report["smoke"] and report["training"]["losses"][1] < report["training"]["losses"][0]
    assert len(report["training"]["losses"]) == 3
    assert set(report["decoding"]) == {"greedy", "iterative_greedy", "nucleus", "reverse_annealed", "beam"}
    assert report["throughput"]["batch_8"]["docids_per_query"] == 10
