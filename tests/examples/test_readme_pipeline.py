"""The README's pipeline section runs as written: its shell block is read from README.md and run, command
by command, at a tiny size (every ``--train-iters N`` lowered, fewer records answered), in a scratch folder
with ``examples/`` and ``tools/`` linked in. Pretraining, SFT, GRPO with ``--save``, the export of the GRPO
result and generation with transformers must each succeed and leave what the next step reads.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECTION = "## The two-stage pipeline"
TINY = {"--train-iters": "3", "--max-records": "2", "--sft-warmup-steps": "0"}


def readme_pipeline() -> list[str]:
    """The commands of the first ``bash`` block under the pipeline heading (continuation lines joined)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index(SECTION)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            commands.append(line)
    return commands


def tiny(command: str) -> list[str]:
    words = shlex.split(command)
    for i, word in enumerate(words[:-1]):
        if word in TINY:
            words[i + 1] = TINY[word]
    if words[0] == "torchrun":  # the same launcher, from this interpreter
        words = [sys.executable, "-m", "torch.distributed.run", "--master-port", str(29500 + os.getpid() % 1000)] + words[1:]
    elif words[0] == "python":
        words[0] = sys.executable
    return words


def test_the_readme_pipeline_has_every_stage():
    commands = readme_pipeline()
    joined = "\n".join(commands)
    for stage in ("examples/pretrain.py", "examples/sft.py", "examples/train_grpo.py", "convert_checkpoint.py to-hf",
                  "tools/generate_hf.py"):
        assert stage in joined, f"the README pipeline lost its {stage} step"
    grpo = next(c for c in commands if "train_grpo.py" in c)
    export = next(c for c in commands if "to-hf" in c)
    save = re.search(r"--save (\S+)", grpo).group(1)
    assert "..." not in joined and f"--dist-checkpoint {save}" in export, "the export must take the GRPO result"


def test_the_readme_pipeline_runs_as_written_at_a_tiny_size(tmp_path):
    for name in ("examples", "tools"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for command in readme_pipeline():
        words = tiny(command)
        proc = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{command}\nfailed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if "generate_hf.py" in command:
            assert re.search(r"accuracy [0-9.]+ on 2 records", proc.stdout), proc.stdout
    assert os.path.isfile(tmp_path / "demo" / "hf" / "config.json")


def test_the_usage_snippet_runs_with_the_launch_line_the_readme_gives(tmp_path):
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index("## Using it from a Megatron codebase")
    snippet = re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)
    launch = re.search(r"`(torchrun --nproc-per-node (\d+) snippet\.py)`", text[start:])
    assert launch, "the README must say how to launch the snippet"
    path = tmp_path / "snippet.py"
    # each rank writes a file of its own (the ranks' prints share one pipe and may interleave)
    path.write_text(snippet + "\nimport os as _os\nopen(f\"ran.{_os.environ['RANK']}\", 'w').write("
                    "f'snippet ran {groups.tp_size} {groups.cp_size}')\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    words = [sys.executable, "-m", "torch.distributed.run", "--master-port", str(30500 + os.getpid() % 1000),
             "--nproc-per-node", launch.group(2), str(path)]
    proc = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ranks = int(launch.group(2))
    ran = {rank: (tmp_path / f"ran.{rank}").read_text() if (tmp_path / f"ran.{rank}").exists() else None
           for rank in range(ranks)}
    assert all(v == "snippet ran 2 2" for v in ran.values()), (ran, proc.stdout[-2000:])
