"""The weight-sync benchmark runs at smoke size and prints a well-formed table (no timing is asserted)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_weight_sync_benchmark_smoke(tmp_path):
    out = tmp_path / "report.md"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "weight_sync.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert "| dtype | path | sync (s) | vs full |" in report, report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 6 and all("nan" not in row for row in rows), report
    for dtype in ("fp32", "bf16"):
        for path in ("full gather (today)", "bucket 0.0625 MB", "bucket 1 MB"):
            assert f"| {dtype} | {path} |" in report, report
