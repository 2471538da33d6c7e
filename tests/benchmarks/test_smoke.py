"""The benchmark scripts run at smoke size and print well-formed tables (no timing is asserted)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("script, headers", [
    ("encode.py", ["| frames | encode world=1 (s) |"]),
    ("prefill.py", ["| log-prob pass (forward) |", "| merge |", "| CP | max over ranks | vs CP=1 |"]),
])
def test_benchmark_smoke(script, headers, tmp_path):
    out = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    for header in headers:
        assert header in report, report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    assert all("nan" not in row for row in rows), report
