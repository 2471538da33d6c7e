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


def _grpo_step(tmp_path, *extra):
    import json

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "grpo_step.py"), "--quick", "--out-dir", str(tmp_path), *extra],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (tmp_path / "report.md").read_text(), json.loads((tmp_path / "results.json").read_text())


def _check_rows(results, modes, frames=("2", "4")):
    for mode in modes:
        per_frames = results[mode]
        assert set(per_frames) == set(frames), (mode, per_frames)
        for row in per_frames.values():
            assert row["measured"] and row["step"] > 0 and row["peak_mb"] >= 0, (mode, row)
            assert row["rollout"] > 0 and row["update"] > 0 and row["old"] > 0 and row["ref"] > 0, (mode, row)
            assert row["prefill"] > 0 and row["decode"] >= 0 and row["encode"] > 0, (mode, row)


def test_grpo_step_smoke(tmp_path):
    """The GRPO step benchmark at smoke size: every mode (naive, without MR-SP, the three MR-SP layouts, and stage
    1+2 + packing with every rank generating) runs every frame count, the report, results and plot are written
    and well formed, the split rollouts drew the tokens the first rank alone drew, and without MR-SP encodes once
    per pass (rollout, old, reference, update: 4 encodes a rank), fewer than the naive mode's once per use and
    more than stage 1's once a step (counted from the phases' encode times being non-zero; no timing asserted).
    With a cap every step exceeds and ``--run-over-cap``, every step is marked OOM and still measured at every
    frame count, its ratios starred."""
    report, saved = _grpo_step(tmp_path, "--memory-cap-mb", "0.001", "--run-over-cap")
    assert "\\* one of the two modes is over the memory cap" in report, report
    for header in ("| frames | naive (re-encode per use, n=1) (s) | without MR-SP (published) (s) |",
                   "| frames | naive (re-encode per use, n=1) | MR-SP stage 1 |",  # speed-up over mrsp_off
                   "| mode | frames | encode | rollout prefill | rollout decode | old log-probs |", "Memory model check",
                   "| frames | first rank draws all (s) | every rank draws its share (s) |",
                   "## Cost ratios", "| LLaVA-OneVision-7B | 196 |", "Command: `python benchmarks/grpo_step.py --quick"):
        assert header in report, report
    results = saved["results"]
    assert set(results) == {"naive", "mrsp_off", "stage1", "stage12", "stage12_packed", "stage12_packed_all"}
    for f in ("2", "4"):
        assert results["stage12_packed"][f]["tokens"] == results["stage12_packed_all"][f]["tokens"]
        passes = results["mrsp_off"][f]["phase_encode"]
        assert all(passes[p] > 0 for p in ("rollout", "old", "ref", "update")), passes  # each pass encodes
        cached = results["stage1"][f]["phase_encode"]
        assert cached["rollout"] > 0 and all(cached[p] == 0 for p in ("old", "ref", "update")), cached  # once a step
    _check_rows(results, results)
    assert all(row["oom"] for per in results.values() for row in per.values()), results
    assert (tmp_path / "step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grpo_step_cost_matched_qwen_smoke(tmp_path):
    """``--cost-match qwen-split`` with ``--memory-cap-scaled`` and ``--run-over-cap``: the Qwen2.5-VL family's
    split-matched model (4.5 tokens per frame) runs the fair baseline and the packed layout; the report states both
    models' cost ratios and the scaled cap; with ``--launches 2`` each cell is the median of two launches and the
    report gives their spread; the old results' "baseline" key reads back as the naive mode, and
    ``--from-json`` recomputes the scaled cap with the memory model as it stands and re-flags the measured cells
    against it (here a saved cap every cell was over)."""
    import json

    report, saved = _grpo_step(tmp_path, "--cost-match", "qwen-split", "--memory-cap-scaled", "80", "--run-over-cap",
                               "--modes", "mrsp_off", "stage12_packed", "--frames", "2", "--launches", "2")
    assert "in each of 2 launches of every mode" in report and "Launch spread of that speed-up" in report, report
    for mode in ("mrsp_off", "stage12_packed"):  # the medians of the launches, which are kept
        row = saved["results"][mode]["2"]
        assert len(row["launch_steps"]) == 2 and row["step"] == pytest.approx(sum(row["launch_steps"]) / 2), row
    assert "(4.5 tokens per frame)" in report and "| Qwen2.5-VL-7B (448 px) | 128 |" in report, report
    assert "scaled to the model" in report and saved["options"]["memory_cap_mb"] > 0
    assert saved["options"]["run_over_cap"] is True
    _check_rows(saved["results"], ("mrsp_off", "stage12_packed"), frames=("2",))
    results = {("baseline" if m == "mrsp_off" else m): {f: dict(row, oom=True) for f, row in per.items()}
               for m, per in saved["results"].items()}
    old = dict(saved, options=dict(saved["options"], memory_cap_mb=0.001), results=results)
    (tmp_path / "old.json").write_text(json.dumps(old))
    redone = tmp_path / "redone"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "grpo_step.py"), "--from-json", str(tmp_path / "old.json"),
                           "--out-dir", str(redone)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "naive (re-encode per use, n=1) (s)" in proc.stdout, proc.stderr[-3000:]
    again = json.loads((redone / "results.json").read_text())
    assert again["options"]["memory_cap_mb"] == pytest.approx(saved["options"]["memory_cap_mb"])
    for mode in ("naive", "stage12_packed"):  # a 2-frame step is far under the scaled cap
        row = again["results"][mode]["2"]
        assert row["measured"] and row["oom"] is (row["peak_mb"] > again["options"]["memory_cap_mb"]) and not row["oom"], row


@pytest.mark.parametrize("family, names", [
    ("llava_onevision", ("LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration", "build_vlm")),
    ("qwen2_5_vl", ("Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "build_qwen25vl", "multimodal RoPE")),
], ids=["llava_onevision", "qwen2_5_vl"])
def test_peer_trl_smoke(family, names, tmp_path):
    """TRL's way against ours at smoke size, for each family: both sides run every pass at every frame count,
    the log-probs of the G separate transformers rows equal our packed, CP=2 ones (the script fails above 1e-4),
    and the report names the family and holds every row (no timing asserted)."""
    import json

    out = tmp_path / "peer.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "peer_trl.py"), "--quick", "--family", family,
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    saved = json.loads((tmp_path / "peer.json").read_text())
    assert saved["options"]["family"] == family, saved["options"]
    assert set(saved["max_logp_diff"]) == {"2", "4"} and max(saved["max_logp_diff"].values()) <= 1e-4, saved
    for frames in ("2", "4"):
        for side in ("ours", "trl"):
            assert all(saved[side][frames]["time"][p] > 0 for p in ("old", "ref", "update")), saved
        assert saved["trl"][frames]["encode"]["update"] > 0 and saved["ours"][frames]["encode"]["update"] == 0, saved
        for label in ("old-policy log-probs", "reference log-probs", "update (fwd + bwd + step)", "all three"):
            assert f"| {frames} | {label} |" in report, report
    assert report.count("| yes (") == 2, report
    assert f"## Peer, {names[0]}:" in report and all(name in report for name in names[1:]), report
