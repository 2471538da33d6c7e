"""The rollout-engine benchmark runs at smoke size and prints a well-formed table (no timing is asserted;
the script itself asserts that both engines drew the same tokens)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_rollout_engines_smoke(tmp_path):
    out = tmp_path / "report.md"
    # the script's folder, not the checkout, is first on its sys.path: find this checkout's package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "rollout_engines.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert "| model | new tokens | tokens drawn | hf engine (s) | megatron engine (s) |" in report, report
    rows = [line for line in report.splitlines() if line.startswith("| demo |")]
    assert len(rows) == 1 and "nan" not in rows[0] and "inf" not in rows[0], report
