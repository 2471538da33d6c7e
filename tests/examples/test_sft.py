"""The entry scripts end to end on the synthetic videos: projector pretraining, then CoT-SFT from it.

2 ranks, context parallelism 2 (parallel frame encoding over both ranks, the merged sequence sharded).
SFT starts from the pretrain checkpoint with ``--finetune`` (weights only: its step count restarts) and
must lower the response loss. The longer run behind the README numbers is in ``examples/sft.py``.
"""

from __future__ import annotations

from tests.dist import run_ranks
from tests.training.helpers import make_data, run_example


def test_pretrain_then_sft_lowers_the_response_loss(tmp_path):
    data = make_data(str(tmp_path / "data"), num_videos=8)
    common = ["--context-parallel-size", "2", "--data-path", None, "--video-root", data["video_root"],
              "--tokenizer", data["tokenizer"], "--num-frames", "4", "--seed", "3", "--log-interval", "5"]
    pretrain = list(common)
    pretrain[3] = data["captions"]
    pretrain += ["--train-iters", "3", "--lr", "1e-3", "--save", str(tmp_path / "pretrain")]
    out = run_ranks(run_example, 2, "pretrain", pretrain)[0]
    assert sorted(out["losses"]) == [1, 2, 3]
    sft = list(common)
    sft[3] = data["qa"]
    sft += ["--train-iters", "12", "--lr", "3e-3", "--recompute-activations", "--lr-decay-style", "constant", "--global-batch-size", "2",
            "--load", str(tmp_path / "pretrain"), "--finetune", "--save", str(tmp_path / "sft"),
            "--tensorboard-dir", str(tmp_path / "tb")]
    out = run_ranks(run_example, 2, "sft", sft)[0]
    losses = [out["losses"][s] for s in sorted(out["losses"])]
    assert out["start"] == 0 and len(losses) == 12 and not out["skipped"]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, f"SFT did not lower the response loss: {losses}"
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
