"""The entry scripts with ``--model-family qwen2_audio`` (the flags' Qwen2-Audio: the ``--vision-*`` flags shape
its encoder, ``--audio-*`` its input), and ``--probe-cache-dir`` reaching the datasets.

* ``tools/make_synthetic_dataset.py --tasks audio,text`` writes a tone beside each video and asks whether
  it is high or low, plus text-only sums, and a tokenizer with Qwen2-Audio's chat tokens. On it, at CP=2:
  CoT-SFT with ``--pack-sequences`` lowers the response loss; GRPO trains two steps and evaluates the same
  file in place, every record scored and counted. (1 s windows of 16 mel bins keep the CPU cost low; the
  exactness of CP=2 against world=1 on audio is in ``tests/rl/test_audio_records.py``.)
* What the family cannot take is refused with one message: frame flags, the caption stage, a video record
  (and an audio record for a video family), naming the record.
* ``sft.py --decode sharded --probe-cache-dir DIR`` at CP=2 on videos: the encode group's probes are in DIR.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os

import pytest

from tests.dist import run_ranks
from tests.examples.test_grpo_resume import _scalars
from tests.training.helpers import make_data, run_example, run_grpo_example

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_AUDIO = ["--model-family", "qwen2_audio", "--audio-num-mel-bins", "16", "--audio-window-seconds", "1",
              "--vision-hidden-size", "16", "--vision-num-layers", "1", "--vision-num-attention-heads", "2",
              "--vision-ffn-hidden-size", "32"]


def _script(name: str, folder: str = "examples"):
    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _audio_data(root: str) -> dict:
    tool = _script("make_synthetic_dataset", "tools")
    assert tool.main(["--out", root, "--num-videos", "3", "--min-frames", "16", "--max-frames", "24", "--seed", "5",
                      "--tasks", "audio,text", "--vocab-size", "400"]) == 0
    tokenizer = os.path.join(root, "tokenizer_qwen2_audio.model")
    assert os.path.isfile(tokenizer), sorted(os.listdir(root))
    return {"qa": os.path.join(root, "qa.jsonl"), "video_root": os.path.join(root, "videos"), "tokenizer": tokenizer}


def test_audio_family_through_sft_and_grpo_with_evaluation_at_cp2(tmp_path):
    data = _audio_data(str(tmp_path / "data"))
    with open(data["qa"]) as f:
        rows = [json.loads(line) for line in f]
    assert collections.Counter(r["data_type"] for r in rows) == {"audio": 3, "text": 3}
    audio = [r for r in rows if r["data_type"] == "audio"]
    assert all(r["problem"] == "Is the tone high or low?\nA. low\nB. high" and r["answer"] in "AB" and r["reasoning"]
               and r["audios"].endswith(".wav") and os.path.isfile(os.path.join(data["video_root"], r["audios"]))
               for r in audio), audio
    common = TINY_AUDIO + ["--context-parallel-size", "2", "--data-path", data["qa"], "--video-root", data["video_root"],
                           "--tokenizer", data["tokenizer"], "--seed", "3"]
    sft = common + ["--train-iters", "10", "--lr", "3e-3", "--lr-decay-style", "constant", "--micro-batch-size", "2",
                    "--global-batch-size", "2", "--pack-sequences", "--log-interval", "5"]
    out = run_ranks(run_example, 2, "sft", sft)[0]
    losses = [out["losses"][s] for s in sorted(out["losses"])]
    assert len(losses) == 10 and not out["skipped"] and all(l == l and abs(l) < 1e3 for l in losses), out
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"SFT on the audio records did not lower the loss: {losses}"

    history = run_ranks(run_grpo_example, 2, common + [
        "--group-size", "2", "--prompts-per-step", "2", "--train-iters", "2", "--max-new-tokens", "8", "--lr", "1e-3",
        "--eval-data", data["qa"], "--eval-interval", "2", "--tensorboard-dir", str(tmp_path / "tb")])[0]
    assert len(history) == 2
    logged = _scalars(str(tmp_path / "tb"))
    assert logged["eval/num_records"][2] == len(rows), logged["eval/num_records"]
    assert {"eval/accuracy", "eval/format_rate", "train/loss", "reward/mean"} <= set(logged)


def test_what_the_audio_family_cannot_take_is_refused(tmp_path):
    from megatron_longvideo.data.dataset import LongVideoDataset, VideoDatasetConfig
    from megatron_longvideo.data.tokenizer import load_tokenizer
    from megatron_longvideo.models import special_tokens
    from megatron_longvideo.models.qwen2_audio.model import Qwen2AudioConfig
    from megatron_longvideo.training.args import dataset_media, model_config, parse

    data = make_data(str(tmp_path / "data"), num_videos=1, family="qwen2_audio")
    tok = load_tokenizer(data["tokenizer"], special=special_tokens("qwen2_audio"))
    grpo = _script("train_grpo")
    args = grpo.parse_args(TINY_AUDIO + ["--data-path", data["qa"], "--video-root", data["video_root"], "--tokenizer",
                                         data["tokenizer"], "--fps", "2", "--rollout-max-frames", "4"])
    with pytest.raises(ValueError, match=r"^--fps, --rollout-max-frames: the qwen2_audio family takes audio"):
        model_config(args, tok)
    with pytest.raises(ValueError, match="these flags need --model-family qwen2_audio"):
        model_config(parse(["--audio-window-seconds", "10"]), tok)
    args = parse(TINY_AUDIO + ["--max-frames", "6", "--probe-cache-dir", str(tmp_path / "probes")])
    cfg = model_config(args, tok)
    assert isinstance(cfg, Qwen2AudioConfig) and cfg.audio_token_id == tok.video_id
    assert (cfg.audio.num_mel_bins, cfg.audio.max_source_positions, cfg.audio.max_windows) == (16, 50, 6)
    media = dataset_media(args, cfg)
    assert (media["audio"].n_mels, media["audio"].window_seconds, media["probe_dir"]) == (16, 1, str(tmp_path / "probes"))

    def dataset(media):
        config = VideoDatasetConfig(mode="rl", video_root=data["video_root"], audio=media["audio"])
        return LongVideoDataset.from_file(data["qa"], tokenizer=tok, num_video_tokens=media["num_video_tokens"],
                                          num_audio_tokens=media["num_audio_tokens"], config=config)

    with pytest.raises(ValueError, match=r"record 'synth00000-colour' .*: video 'synth00000.mp4': the qwen2_audio "
                                         r"family takes audio and text only"):
        dataset(media)[0]
    with open(data["qa"], "w") as f:  # an audio record for a video family: the video's own audio track is none
        f.write(json.dumps({"problem_id": "heard", "audios": "tone.wav", "problem": "high?\nA. no\nB. yes",
                            "answer": "A"}) + "\n")
    from megatron_longvideo.data.synthetic_audio import make_tone_audio

    make_tone_audio(os.path.join(data["video_root"], "tone.wav"), seconds=1.0)
    video_args = parse([])
    with pytest.raises(ValueError, match=r"record 'heard' .*: the llava_onevision family has no audio encoder: an "
                                         r"audio record needs --model-family qwen2_audio"):
        dataset(dataset_media(video_args, model_config(video_args, tok)))[0]
    with pytest.raises(ValueError, match=r"^pretrain: its caption records describe videos"):
        _script("pretrain").main(TINY_AUDIO + ["--data-path", data["captions"], "--video-root", data["video_root"],
                                               "--tokenizer", data["tokenizer"]])


def test_probe_cache_dir_reaches_the_datasets(tmp_path):
    data = make_data(str(tmp_path / "data"), num_videos=2)
    probes = tmp_path / "probes"
    argv = ["--context-parallel-size", "2", "--data-path", data["qa"], "--video-root", data["video_root"], "--tokenizer",
            data["tokenizer"], "--num-frames", "4", "--train-iters", "2", "--decode", "sharded",
            "--probe-cache-dir", str(probes)]
    out = run_ranks(run_example, 2, "sft", argv)[0]
    assert sorted(out["losses"]) == [1, 2] and not out["skipped"]
    entries = [n for n in os.listdir(probes) if n.endswith(".probe")]
    assert len(entries) == 2, sorted(os.listdir(probes))  # one per video, published by the encode group's rank 0
