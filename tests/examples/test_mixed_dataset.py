"""The entry scripts on a mixed dataset (issue 18): video, image, two-video and text-only records in one file
(``tools/make_synthetic_dataset.py --tasks colour,image,two_videos,text``), at CP=2 on the CPU demo model.

CoT-SFT with ``--pack-sequences`` lowers the response loss; GRPO (shared-prefix packing, frame-sharded
decoding) trains two steps and evaluates the same file in place, every record scored and counted. The
exactness of these paths (CP=2 packed equal to world=1 unpacked) is in ``tests/rl/test_mixed_modalities.py``
and ``tests/training/test_packing.py``.
"""

from __future__ import annotations

import collections
import json
import os

from tests.dist import run_ranks
from tests.examples.test_grpo_resume import _scalars
from tests.training.helpers import run_example, run_grpo_example


def _mixed_data(root: str) -> dict:
    from megatron_longvideo.data import SyntheticDatasetConfig, load_records, make_synthetic_dataset
    from megatron_longvideo.data import train_tokenizer_for_records

    ds = make_synthetic_dataset(root, SyntheticDatasetConfig(num_videos=3, min_frames=16, max_frames=24, seed=5,
                                                             tasks=("colour", "image", "two_videos", "text")))
    records = load_records(ds.qa_path).records + load_records(ds.caption_path, kind="caption").records
    tokenizer = train_tokenizer_for_records(records, os.path.join(root, "tokenizer"), vocab_size=400)
    return {"qa": ds.qa_path, "video_root": ds.video_root, "tokenizer": tokenizer}


def test_mixed_records_through_sft_grpo_and_evaluation_at_cp2(tmp_path):
    data = _mixed_data(str(tmp_path / "data"))
    with open(data["qa"]) as f:
        rows = [json.loads(line) for line in f]
    kinds = collections.Counter((r["data_type"], len(r.get("videos", [])) if isinstance(r.get("videos"), list) else 1)
                                for r in rows)
    assert kinds == {("video", 1): 3, ("image", 1): 3, ("video", 2): 3, ("text", 1): 3}, kinds
    common = ["--context-parallel-size", "2", "--data-path", data["qa"], "--video-root", data["video_root"],
              "--tokenizer", data["tokenizer"], "--num-frames", "4", "--seed", "3"]
    sft = common + ["--train-iters", "10", "--lr", "3e-3", "--lr-decay-style", "constant", "--micro-batch-size", "2",
                    "--global-batch-size", "2", "--pack-sequences", "--log-interval", "5"]
    out = run_ranks(run_example, 2, "sft", sft)[0]
    losses = [out["losses"][s] for s in sorted(out["losses"])]
    assert len(losses) == 10 and not out["skipped"], out
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"SFT on the mixed records did not lower the loss: {losses}"

    history = run_ranks(run_grpo_example, 2, common + [
        "--group-size", "2", "--prompts-per-step", "2", "--train-iters", "2", "--max-new-tokens", "8", "--lr", "1e-3",
        "--eval-data", data["qa"], "--eval-interval", "2", "--tensorboard-dir", str(tmp_path / "tb")])[0]
    assert len(history) == 2
    logged = _scalars(str(tmp_path / "tb"))
    assert logged["eval/num_records"][2] == len(rows), logged["eval/num_records"]
    assert {"eval/accuracy", "eval/format_rate", "train/loss", "reward/mean"} <= set(logged)
