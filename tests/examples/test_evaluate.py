"""Evaluation (``megatron_longvideo.rl.evaluation``, ``examples/evaluate.py``, ``train_grpo.py --eval-data``).

* The scoring functions on hand-written responses equal a hand count (per category, overall, format
  rate), and a public-style test file (the perspective in ``problem_type``, integer ids, wrapped answers)
  loads with its categories.
* One GRPO run (2 ranks, CP=2, a short format warm-up so the answers are tagged) evaluates in place every
  step and logs ``eval/*``; its checkpoint is then evaluated by ``evaluate.py`` at CP=2 and at CP=1 (DP=2,
  each rank its share of the records): the predictions and metrics are identical, equal a recount from
  ``predictions.jsonl``, and equal what the run logged at that step (in place = reloaded) and what the
  checkpoint exported to a Hugging Face folder gives with ``--hf``. An untrained model, whose answers
  differ from record to record, gives the same predictions at CP=2 and CP=1 too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.dist import run_ranks
from tests.training.helpers import make_data, run_grpo_example

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PERSPECTIVES = ("temporal", "goal", "plot", "spatial")


def _write_eval_file(data: dict, path: str) -> str:
    """A LongVideo-Reason-style test file on the synthetic videos: the colour questions with a perspective
    in ``problem_type`` and wrapped answers, integer ids; count questions (numerical, inferred); one
    record without ``problem_type`` (category 'all')."""
    with open(data["qa"]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out = []
    for i, r in enumerate(rows):  # the options rotated by i, so the prompts differ
        question, *lines = r["problem"].split("\n")
        colours = [line[3:] for line in lines]
        colour = colours["ABCD".index(r["answer"])]
        colours = colours[i:] + colours[:i]
        problem = "\n".join([question] + [f"{'ABCD'[k]}. {c}" for k, c in enumerate(colours)])
        out.append({"problem_id": len(out), "videos": [r["videos"]], "problem": problem, "problem_type": PERSPECTIVES[i % 4],
                    "answer": f"<answer>{'ABCD'[colours.index(colour)]}</answer>"})
    for i, r in enumerate(rows[:3]):
        out.append({"problem_id": len(out), "videos": r["videos"], "problem": "How many shapes appear in the video?",
                    "problem_type": ("temporal", "temporal", "goal")[i], "answer": "1"})
    out.append({"problem_id": len(out), "videos": rows[-1]["videos"], "problem": rows[-1]["problem"],
                "answer": rows[-1]["answer"]})
    with open(path, "w") as f:
        for o in out:
            f.write(json.dumps(o) + "\n")
    return path


def test_scores_and_summary_equal_a_hand_count(tmp_path):
    from megatron_longvideo.rl.evaluation import (eval_scalars, format_table, load_eval_records, score_prediction,
                                                  summarize)
    from megatron_longvideo.rl.rewards import GroundTruth

    mc = GroundTruth(answer="B", options=("red", "green", "blue"))
    num = GroundTruth(answer="3", problem_type="numeric")
    free = GroundTruth(answer="a red disc", problem_type="free_form")
    cases = [  # (category, truth, response, extracted, correct, formatted) written out by hand
        ("temporal", mc, "<think>it is green</think><answer>B</answer>", "B", True, True),
        ("temporal", mc, "<think>hm</think> <answer>green</answer>", "green", True, True),
        ("temporal", mc, "<answer>C</answer>", "C", False, False),
        ("goal", mc, "<think>x</think><answer>(b)</answer>", "(b)", True, True),
        ("goal", num, "<think>count</think><answer>3 times</answer>", "3 times", True, True),
        ("goal", num, "<think>count</think><answer>4</answer>", "4", False, True),
        ("plot", free, "the answer is a red disc", None, False, False),
        ("plot", free, "<think></think><answer>A red disc.</answer>", "A red disc.", True, True),
        ("all", mc, "<think>a</think><answer>B</answer><answer>A</answer>", "A", False, False),
    ]
    rows = []
    for category, truth, text, extracted, correct, formatted in cases:
        s = score_prediction(text, truth)
        assert (s.extracted, s.correct, s.formatted) == (extracted, correct, formatted), text
        rows.append({"category": category, "correct": s.correct, "formatted": s.formatted})
    rows.append({"category": "goal", "correct": False, "formatted": False, "skipped": "video: unreadable"})
    m = summarize(rows)
    assert m["num_skipped"] == 1
    assert m["overall"] == {"num_records": 9, "num_correct": 5, "num_formatted": 6, "accuracy": 5 / 9, "format_rate": 6 / 9}
    assert list(m["categories"]) == ["all", "goal", "plot", "temporal"]
    hand = {"temporal": (3, 2, 2), "goal": (3, 2, 3), "plot": (2, 1, 1), "all": (1, 0, 0)}
    for name, (n, c, f) in hand.items():
        assert m["categories"][name] == {"num_records": n, "num_correct": c, "num_formatted": f,
                                         "accuracy": c / n, "format_rate": f / n}, name
    scalars = eval_scalars(m)
    assert scalars["eval/accuracy"] == 5 / 9 and scalars["eval/format_rate"] == 6 / 9 and scalars["eval/num_records"] == 9
    assert scalars["eval/goal/accuracy"] == 2 / 3 and "eval/all/accuracy" in scalars
    assert "overall" in format_table(m) and "skipped" in format_table(m)

    data = make_data(str(tmp_path / "data"), num_videos=4)
    path = _write_eval_file(data, str(tmp_path / "test.jsonl"))
    records, categories = load_eval_records(path, video_root=data["video_root"])
    assert categories == ["temporal", "goal", "plot", "spatial", "temporal", "temporal", "goal", "all"]
    assert [r.problem_type for r in records] == ["multiple choice"] * 4 + ["numerical"] * 3 + ["multiple choice"]
    assert [r.problem_id for r in records] == [str(i) for i in range(8)]
    assert records[0].answer in "ABCD" and records[4].answer == "1"
    _, by_type = load_eval_records(path, category_field="answer_kind")  # a field no record has: one category
    assert set(by_type) == {"all"}


def _save_untrained(path: str, like: str, seed: int) -> None:
    """An untrained model of the checkpoint ``like``'s shape saved at ``path`` (its answers are not all alike)."""
    import torch

    from megatron_longvideo.checkpoint.dist_ckpt import model_config_of, save_checkpoint
    from megatron_longvideo.models import build_model
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.platform import enable_cpu_mode

    enable_cpu_mode()
    groups = initialize_parallel(ParallelConfig(), seed=seed)
    torch.manual_seed(seed)
    save_checkpoint(path, 0, model=build_model(model_config_of(like), groups, seed=seed), groups=groups,
                    run_config={"stage": "test"})
    destroy_parallel()


def _evaluate_at_cp2_and_cp1(rank, world_size, argv: list, ckpt: str, hf: str, out: str) -> list:
    """Spawned rank: ``examples/evaluate.py`` on ``ckpt`` and on an untrained model, each at CP=2 and at
    CP=1 (DP=2), and on ``hf`` (``ckpt`` exported) at CP=2, in the same processes."""
    import importlib.util

    from megatron_longvideo.checkpoint.dist_ckpt import close_checkpoint_writer

    spec = importlib.util.spec_from_file_location("example_evaluate", os.path.join(ROOT, "examples", "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    untrained = os.path.join(out, "untrained_ckpt")
    _save_untrained(untrained, ckpt, seed=11)
    close_checkpoint_writer()
    results = []
    runs = (("trained", ["--load", ckpt, "--use-checkpoint-args"], (2, 1)),
            ("untrained", ["--load", untrained, "--use-checkpoint-args"], (2, 1)), ("hf", ["--hf", hf], (2,)))
    for name, model, layouts in runs:
        for cp in layouts:
            result = module.main(argv + model + ["--context-parallel-size", str(cp),
                                                 "--out", os.path.join(out, f"{name}_cp{cp}")])
            results.append(result.metrics)
    return results


def _scalars(tb_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir)
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _read(path: str) -> tuple[dict, list]:
    with open(os.path.join(path, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(path, "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return metrics, rows


def test_grpo_evaluates_in_place_and_evaluate_at_cp2_equals_cp1(tmp_path):
    from megatron_longvideo.rl.evaluation import load_eval_records
    from megatron_longvideo.rl.rewards import GroundTruth, RewardInput, accuracy_reward, format_reward

    data = make_data(str(tmp_path / "data"), num_videos=4)
    test_file = _write_eval_file(data, str(tmp_path / "test.jsonl"))
    common = ["--video-root", data["video_root"], "--tokenizer", data["tokenizer"], "--num-frames", "4",
              "--max-new-tokens", "12", "--seed", "3"]
    history = run_ranks(run_grpo_example, 2, common + [
        "--context-parallel-size", "2", "--data-path", data["qa"], "--group-size", "2", "--prompts-per-step", "2",
        "--train-iters", "2", "--sft-warmup-steps", "30", "--lr", "1e-3", "--eval-data", test_file, "--eval-interval", "1",
        "--tensorboard-dir", str(tmp_path / "tb"), "--save", str(tmp_path / "ckpt")])[0]
    assert len(history) == 2
    logged = _scalars(str(tmp_path / "tb"))
    assert {"eval/accuracy", "eval/format_rate", "eval/num_records", "eval/temporal/accuracy", "eval/all/accuracy"} <= set(logged)
    assert set(logged["eval/accuracy"]) == {1, 2} and logged["eval/num_records"][2] == 8

    hf = str(tmp_path / "hf")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "to-hf", "--dist-checkpoint",
                           str(tmp_path / "ckpt"), "--out", hf, "--tokenizer", data["tokenizer"], "--no-progress"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = str(tmp_path / "eval")
    returned = run_ranks(_evaluate_at_cp2_and_cp1, 2, common + ["--data-path", test_file], str(tmp_path / "ckpt"), hf, out)
    assert returned[0] == returned[1]  # every rank holds the gathered metrics
    (u2, urows2), (u1, urows1) = _read(os.path.join(out, "untrained_cp2")), _read(os.path.join(out, "untrained_cp1"))
    assert urows2 == urows1 and u2 == u1
    assert len({r["prediction"] for r in urows1}) > 2, urows1  # answers that differ: a misplaced one would show
    (m2, rows2), (m1, rows1) = _read(os.path.join(out, "trained_cp2")), _read(os.path.join(out, "trained_cp1"))
    assert rows2 == rows1 and m2 == m1
    mh, rows_hf = _read(os.path.join(out, "hf_cp2"))  # the same weights from a Hugging Face folder
    assert rows_hf == rows1 and mh["overall"] == m1["overall"] and mh["categories"] == m1["categories"]
    assert [r["id"] for r in rows1] == [str(i) for i in range(8)]
    assert [r["category"] for r in rows1] == ["temporal", "goal", "plot", "spatial", "temporal", "temporal", "goal", "all"]
    assert m1["overall"]["format_rate"] > 0, rows1  # the warm-up taught the tags: the counts are not all zero

    # the metrics are a recount of the predictions, each judged again from its text
    types = {"multiple choice": "multiple_choice", "numerical": "numeric", "free-form": "free_form"}
    options = {rec.problem_id: tuple(text for _, text in rec.options) for rec in load_eval_records(test_file)[0]}
    recount: dict = {}
    for r in rows1:
        truth = GroundTruth(answer=r["answer"], problem_type=types[r["problem_type"]], options=options[r["id"]])
        inp = RewardInput.of(r["prediction"], truth)
        assert (r["correct"], r["formatted"]) == (accuracy_reward(inp) == 1.0, format_reward(inp) == 1.0), r
        for key in ("overall", r["category"]):
            n, c, f = recount.get(key, (0, 0, 0))
            recount[key] = (n + 1, c + r["correct"], f + r["formatted"])
    for key, (n, c, f) in recount.items():
        counts = m1["overall"] if key == "overall" else m1["categories"][key]
        assert (counts["num_records"], counts["num_correct"], counts["num_formatted"]) == (n, c, f), key
        assert counts["accuracy"] == c / n and counts["format_rate"] == f / n
    assert set(m1["categories"]) == set(recount) - {"overall"}

    # the run's in-place evaluation after step 2 saw the weights of the step-2 checkpoint
    assert logged["eval/accuracy"][2] == pytest.approx(m1["overall"]["accuracy"])
    assert logged["eval/format_rate"][2] == pytest.approx(m1["overall"]["format_rate"])
    assert logged["eval/temporal/accuracy"][2] == pytest.approx(m1["categories"]["temporal"]["accuracy"])
