"""The benchmark scripts run at smoke size and print well-formed tables (no timing is asserted)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("script, headers", [
    ("encode.py", ["| frames | encode world=1 (s) |"]),
    ("prefill.py", ["| log-prob pass (forward) |", "| merge |", "| CP | max over ranks | vs CP=1 |"]),
    ("attention.py", ["| layout | CP | mode | kernel calls (busiest rank) |", "| packed | 2 | p2p |", "dense (oracle)"]),
    ("gpu_check.py", ["| cpu_flash | bfloat16 |", "| shard |", "| engine | step (s) | encode | sync | rollout |",
                      "| megatron |", "| hf |", "all checks passed"]),
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


def test_grpo_step_smoke(tmp_path):
    """The GRPO step benchmark at smoke size: every mode (the four, and stage 1+2 + packing with every rank
    generating) runs every frame count, the report, results and plot are written and well formed, and the
    split rollouts drew the tokens the first rank alone drew (no timing asserted)."""
    import json

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "grpo_step.py"), "--quick", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    for header in ("| frames | baseline (s) |", "| mode | frames | encode | rollout | old log-probs |", "Memory model check",
                   "| frames | first rank draws all (s) | every rank draws its share (s) |"):
        assert header in report, report
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(results) == {"baseline", "stage1", "stage12", "stage12_packed", "stage12_packed_all"}
    for f in ("4", "8"):
        assert results["stage12_packed"][f]["tokens"] == results["stage12_packed_all"][f]["tokens"]
    for mode, per_frames in results.items():
        assert set(per_frames) == {"4", "8"}, (mode, per_frames)
        for row in per_frames.values():
            assert row["measured"] and row["step"] > 0 and row["peak_mb"] >= 0, (mode, row)
            assert row["rollout"] > 0 and row["update"] > 0 and row["old"] > 0 and row["ref"] > 0, (mode, row)
    assert (tmp_path / "step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
