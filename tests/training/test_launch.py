"""``run_script``: one stderr line per failed run, a traceback file per failing rank, exit status 1; and
``quiet_warnings`` silences megatron-core's import-time noise."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MULTILINE = """
import sys
from megatron_longvideo.training.launch import run_script

def main(argv):
    raise ValueError("--num-frames must be positive, got -3\\nsecond line\\nthird line")

sys.exit(run_script(main, name="tiny"))
"""

BAD_VIDEO = """
import sys
from megatron_longvideo.data.errors import VideoDecodeError
from megatron_longvideo.training.launch import run_script

def main(argv):
    raise VideoDecodeError("/data/clip.mp4", "truncated or corrupt file")

sys.exit(run_script(main, name="tiny"))
"""

OK = """
import sys
from megatron_longvideo.training.launch import run_script
sys.exit(run_script(lambda argv: print("ran", argv), ["--x"], name="tiny"))
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "TORCHELASTIC_RUN_ID", "MASTER_PORT", "MLV_LOG_DIR")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _script(tmp_path, text: str) -> str:
    path = tmp_path / "script.py"
    path.write_text(text)
    return str(path)


def _run_ranks(script: str, logs: str, world: int = 2, run_id: str = "run-1") -> list:
    """Start ``world`` ranks of ``script`` at once; their (returncode, stderr)."""
    procs = [subprocess.Popen([sys.executable, script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), TORCHELASTIC_RUN_ID=run_id, MLV_LOG_DIR=logs))
             for r in range(world)]
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank of {script} did not exit in 120 s")
        out.append((p.returncode, err))
    return out


def test_one_line_per_run_and_a_traceback_per_rank(tmp_path):
    logs = str(tmp_path / "logs")
    script = _script(tmp_path, MULTILINE)
    results = _run_ranks(script, logs)
    assert [rc for rc, _ in results] == [1, 1], results
    lines = [line for _, err in results for line in err.splitlines()]
    assert len(lines) == 1, f"exactly one stderr line across both ranks expected, got: {lines}"
    line = lines[0]
    assert line.startswith("tiny: error on rank "), line
    assert ("ValueError: --num-frames must be positive, got -3 (+2 more lines) -- see --help for the flag. "
            "Full traceback: ") in line, line
    path = line.rsplit("Full traceback: ", 1)[1]
    assert os.path.isfile(path) and os.path.dirname(path) == logs, path
    for rank in (0, 1):
        text = open(os.path.join(logs, f"tiny.rank{rank}.log")).read()
        assert "Traceback (most recent call last)" in text and "raise ValueError" in text, text
        assert "third line" in text, text

    # the same run id again (torchrun without --standalone reuses "none"): the old claim is an earlier run's
    for claim in glob.glob(os.path.join(logs, "tiny.run-1.first_error.*")):
        old = time.time() - 60
        os.utime(claim, (old, old))
    again = _run_ranks(script, logs)
    lines = [line for _, err in again for line in err.splitlines()]
    assert len(lines) == 1 and lines[0].startswith("tiny: error on rank "), lines


def test_bad_input_gets_its_hint(tmp_path):
    proc = subprocess.run([sys.executable, _script(tmp_path, BAD_VIDEO)], capture_output=True, text=True, timeout=120,
                          env=_env(), cwd=str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    expected = ("tiny: error on rank 0: VideoDecodeError: /data/clip.mp4: cannot decode video: truncated or "
                "corrupt file -- fix or remove that input, or pass --on-bad-input skip. Full traceback: "
                + str(tmp_path / "logs" / "tiny.rank0.log"))
    assert last == expected, last


def test_success_returns_zero(tmp_path):
    proc = subprocess.run([sys.executable, _script(tmp_path, OK)], capture_output=True, text=True, timeout=120,
                          env=_env(), cwd=str(tmp_path))
    assert proc.returncode == 0 and "ran ['--x']" in proc.stdout, proc.stderr
    assert not (tmp_path / "logs").exists()


def test_log_dir_follows_save(tmp_path, monkeypatch):
    from megatron_longvideo.training.launch import log_dir

    monkeypatch.delenv("MLV_LOG_DIR", raising=False)
    assert log_dir(["--lr", "1", "--save", "/ckpt/run"]) == "/ckpt/run/logs"
    assert log_dir(["--save=/a", "--save", "/b"]) == "/b/logs"
    config = tmp_path / "run.json"
    config.write_text('{"save": "/from/config"}')
    assert log_dir(["--config", str(config)]) == "/from/config/logs"
    monkeypatch.chdir(tmp_path)
    assert log_dir([]) == str(tmp_path / "logs")
    monkeypatch.setenv("MLV_LOG_DIR", str(tmp_path / "x"))
    assert log_dir(["--save", "/b"]) == str(tmp_path / "x")


IMPORTS = ("import megatron.core; from megatron.core import parallel_state, tensor_parallel; "
           "from megatron.core.optimizer import get_megatron_optimizer; "
           "from megatron.core.distributed import DistributedDataParallel; "
           "import megatron.core.models.gpt.gpt_layer_specs, megatron.core.transformer.multi_latent_attention")
NOISE = ("Transformer Engine and Apex are not installed", "Apex is not installed",
         "The following imports from `dynamic_context.py` will be removed",
         "megatron.core.transformer.custom_layers.transformer_engine", "`torch.jit.script_method` is deprecated")


def _import_stderr(prefix: str) -> str:
    proc = subprocess.run([sys.executable, "-W", "default", "-c", prefix + IMPORTS], capture_output=True, text=True,
                          timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_quiet_warnings_silences_megatron_import_noise():
    loud = _import_stderr("")
    assert all(n in loud for n in NOISE), f"the control import should show every warning: {loud}"
    quiet = _import_stderr(
        "import sys; from megatron_longvideo.training.launch import quiet_warnings; quiet_warnings(); "
        "assert 'megatron.core' not in sys.modules and 'torch' not in sys.modules; ")
    assert not [n for n in NOISE if n in quiet], quiet
