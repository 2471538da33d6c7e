"""examples/adopt/: the plain Megatron-Core script and the same script adopted for the video-language model.

* ``train_gpt.py`` (megatron's GPTModel, DDP, optimizer, schedule; the user's tokens) trains on 2 ranks.
* ``train_video_lm.py`` (which packs each micro-batch into one row) at CP=2 on 2 ranks gives
  ``examples/sft.py --pack-sequences``' per-step losses on the same data, seed, model shape and batch
  sizes (two samples a micro-batch, so rows really hold several samples): it builds the model, the data
  order and the loss normalisation from the library's public pieces the way the entry script does. Both
  equal ``examples/sft.py``'s padded rows.
* With the projector frozen, the embedding cache serves the second epoch's videos and the losses are
  those of the same run without the cache.
* The diff between the two scripts stays short, and ``examples/adopt/README.md`` shows it as it is.
"""

from __future__ import annotations

import difflib
import math
import os
import re

import pytest

from tests.dist import run_ranks
from tests.training.helpers import make_data, run_example

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADOPT = os.path.join(ROOT, "examples", "adopt")
STEP_LINE = re.compile(r"^step (\d+) \| loss ([0-9.eE+-]+|nan|inf) \|", re.M)
MAX_CHANGED_LINES = 90
"""Bound on the lines the diff removes plus those it adds (82 when written: 33 removed, 49 added)."""


def run_adopt_script(rank, world_size, name: str, argv: list) -> dict:
    """Spawned rank: ``examples/adopt/<name>.py``'s ``main(argv)``; its per-step losses and what it printed."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location(f"adopt_{name}", os.path.join(ADOPT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        losses = module.main(argv)
    return {"losses": losses, "stdout": out.getvalue()}


def with_pack_counts(rank, world_size, run, *args) -> dict:
    """Spawned rank: ``run(rank, world_size, *args)``, with ``(samples, rows)`` of every micro-batch that
    :func:`~megatron_longvideo.training.packing.pack_vlm_batch` packed (``"packs"``)."""
    from megatron_longvideo.training import packing

    packs, pack = [], packing.pack_vlm_batch

    def counted(batch, **kwargs):
        out = pack(batch, **kwargs)
        packs.append((len(batch["videos"]), len(out["rows"])))
        return out

    packing.pack_vlm_batch = counted
    try:
        return dict(run(rank, world_size, *args), packs=packs)
    finally:
        packing.pack_vlm_batch = pack


def printed_losses(stdout: str) -> dict:
    return {int(step): float(loss) for step, loss in STEP_LINE.findall(stdout)}


def ordered(losses: dict) -> list:
    return [losses[s] for s in sorted(losses)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(str(tmp_path_factory.mktemp("adopt") / "data"), num_videos=8)


def video_flags(data: dict) -> list:
    """Flags both train_video_lm.py and examples/sft.py take, with the same meaning."""
    return ["--context-parallel-size", "2", "--data-path", data["qa"], "--video-root", data["video_root"],
            "--tokenizer", data["tokenizer"], "--num-frames", "4", "--seed", "3", "--lr", "1e-3",
            "--global-batch-size", "2", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--num-query-groups", "2"]


def test_plain_megatron_script_trains_on_two_ranks():
    outs = run_ranks(run_adopt_script, 2, "train_gpt", ["--train-iters", "8", "--seed", "3"])
    losses = ordered(outs[0]["losses"])
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses), losses
    assert outs[1]["losses"] == outs[0]["losses"]  # reduced over the DP ranks: one number per step
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"the loss did not fall: {losses}"
    printed = printed_losses(outs[0]["stdout"])
    assert sorted(printed) == list(range(1, 9))
    assert all(abs(printed[s] - outs[0]["losses"][s]) < 1e-6 for s in printed)
    assert outs[1]["stdout"] == ""  # rank 0 prints


def test_plain_megatron_script_refuses_context_parallelism():
    import importlib.util

    spec = importlib.util.spec_from_file_location("adopt_train_gpt", os.path.join(ADOPT, "train_gpt.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit, match="TransformerEngine"):
        module.main(["--context-parallel-size", "2"])


def test_adopted_script_gives_the_sft_entry_script_losses_at_cp2(data):
    steps = ["--train-iters", "4", "--micro-batch-size", "2", "--global-batch-size", "4"]  # 2 samples a row
    adopted = run_ranks(with_pack_counts, 2, run_adopt_script, "train_video_lm", video_flags(data) + steps)
    # sft.py's tower MLP defaults to 4 x its width; train_video_lm.py builds VisionConfig()'s (64)
    sft_flags = video_flags(data) + steps + ["--vision-ffn-hidden-size", "64"]
    sft = run_ranks(with_pack_counts, 2, run_example, "sft", sft_flags + ["--pack-sequences"])
    padded = run_ranks(with_pack_counts, 2, run_example, "sft", sft_flags)
    # 4 steps x 2 micro-batches, each of 2 samples in 1 row; padded rows pack nothing
    assert adopted[0]["packs"] == sft[0]["packs"] == [(2, 1)] * 8 and padded[0]["packs"] == []
    ours, theirs, unpacked = ordered(adopted[0]["losses"]), ordered(sft[0]["losses"]), ordered(padded[0]["losses"])
    assert len(ours) == len(theirs) == len(unpacked) == 4 and not sft[0]["skipped"]
    for step, (a, b, c) in enumerate(zip(ours, theirs, unpacked), 1):
        assert math.isfinite(a) and abs(a - b) <= 1e-5 * abs(b), f"step {step}: adopted {ours} vs sft.py {theirs}"
        assert abs(b - c) <= 1e-5 * abs(c), f"step {step}: sft.py --pack-sequences {theirs} vs padded {unpacked}"
    assert adopted[1]["losses"] == adopted[0]["losses"]
    assert sorted(printed_losses(adopted[0]["stdout"])) == [1, 2, 3, 4]
    # the projector trains: training forwards need its gradient, so they never ask the cache
    assert "video cache: 0 hits, 0 misses" in adopted[0]["stdout"]


def test_embedding_cache_serves_the_second_epoch_with_the_projector_frozen(data):
    # 8 records, DP=1, 2 micro-batches a step: the second epoch starts at step 5
    flags = video_flags(data) + ["--train-iters", "6", "--freeze-projector"]
    cached = run_ranks(run_adopt_script, 2, "train_video_lm", flags)[0]
    plain = run_ranks(run_adopt_script, 2, "train_video_lm", flags + ["--video-cache-mb", "0"])[0]
    hits, misses = map(int, re.search(r"video cache: (\d+) hits, (\d+) misses", cached["stdout"]).groups())
    assert (hits, misses) == (4, 8), cached["stdout"]
    assert "video cache: 0 hits, 12 misses" in plain["stdout"]
    for step in cached["losses"]:
        a, b = cached["losses"][step], plain["losses"][step]
        assert abs(a - b) <= 1e-6 * abs(b), f"step {step}: cached {a} vs uncached {b}"


def script_diff() -> list:
    with open(os.path.join(ADOPT, "train_gpt.py")) as f:
        before = f.read().splitlines()
    with open(os.path.join(ADOPT, "train_video_lm.py")) as f:
        after = f.read().splitlines()
    return list(difflib.unified_diff(before, after, "examples/adopt/train_gpt.py", "examples/adopt/train_video_lm.py",
                                     lineterm="", n=1))


def test_the_diff_stays_short_and_the_readme_shows_it():
    diff = script_diff()
    removed = sum(1 for line in diff if line.startswith("-") and not line.startswith("---"))
    added = sum(1 for line in diff if line.startswith("+") and not line.startswith("+++"))
    assert removed + added <= MAX_CHANGED_LINES, (
        f"train_gpt.py -> train_video_lm.py now changes {removed} + {added} lines (bound {MAX_CHANGED_LINES}): "
        "the adoption diff is meant to be short")
    with open(os.path.join(ROOT, "README.md")) as f:  # the top-level README shows it too
        assert "\n".join(diff) in f.read(), "README.md does not show the adoption scripts' current diff"
    with open(os.path.join(ADOPT, "README.md")) as f:
        readme = f.read()
    assert "\n".join(diff) in readme, ("examples/adopt/README.md does not show the scripts' current diff; "
                                       "paste the output of: python -c 'from tests.examples.test_adopt import "
                                       "script_diff; print(chr(10).join(script_diff()))'")
