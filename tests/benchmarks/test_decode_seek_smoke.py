"""The seek-decoding benchmark at smoke size: it runs, prints a well-formed table, and every path's frames
equal sequential decoding's (no timing is asserted)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_decode_seek_smoke(tmp_path):
    out = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "decode_seek.py"), "--quick",
                           "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert "| GOP | path | seconds |" in report, report
    rows = [line for line in report.splitlines() if line.startswith("| 30 |")]
    assert {row.split("|")[2].strip() for row in rows} >= {"pyav sequential", "pyav seek"}, report
    assert all(row.rstrip().endswith("| yes |") and "nan" not in row for row in rows), report
