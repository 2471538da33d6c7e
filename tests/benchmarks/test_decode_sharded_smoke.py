"""The sharded-decoding and prefetch benchmark at smoke size: it runs, prints three well-formed tables, every
group size's shards equal ``decode_video`` (with the probe shared too, the ranks that read it probing and
demuxing nothing) and every prefetch configuration draws the same prompts and frames as no prefetching
(no timing is asserted)."""

import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _table(report: str, first_column: str) -> list[dict]:
    """The markdown table whose header starts with ``first_column``, as one dict per row."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    header = [cell.strip() for cell in lines[start].strip().strip("|").split("|")]
    assert lines[start + 1].startswith("|---") and lines[start + 1].count("|") == len(header) + 1, report
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells)))
    return rows


def _finite(rows: list[dict], skip: tuple[str, ...]) -> None:
    for row in rows:
        for name, cell in row.items():
            if name not in skip and cell != "-":
                assert math.isfinite(float(cell.rstrip("x"))), row


def test_decode_sharded_smoke(tmp_path):
    out = tmp_path / "report.md"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "decode_sharded.py"), "--quick",
                           "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()

    shards = _table(report, "E")
    assert [row["E"] for row in shards] == ["1", "2", "4", "8"], report
    assert all(row["shards equal decode_video"] == "yes" for row in shards), report
    _finite(shards, skip=("shards equal decode_video",))
    frames = [int(row["frames per rank (max)"]) for row in shards]
    assert frames == sorted(frames, reverse=True) and frames[0] >= 4 * frames[-1], report
    assert shards[0]["slowest vs E=1"] == "1.00", report  # E=1 against itself

    shared = _table(report, "group size")  # the probe shared by the group: read, never made again
    assert [row["group size"] for row in shared] == ["1", "2", "4", "8"], report
    assert all(row["shards equal decode_video"] == "yes" and row["probes + tables by readers"] == "0"
               for row in shared), report
    _finite(shared, skip=("shards equal decode_video",))

    prefetch = _table(report, "prefetch workers")
    assert [row["prefetch workers"] for row in prefetch] == ["0", "1", "2"], report
    assert all(row["same prompts and frames as 0 workers"] == "yes" for row in prefetch), report
    _finite(prefetch, skip=("same prompts and frames as 0 workers",))
    assert prefetch[0]["vs 0 workers"] == "1.00", report
