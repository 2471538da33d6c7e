"""Answer video questions with an exported model in plain transformers: the last step of the pipeline.

Loads a folder written by ``tools/convert_checkpoint.py to-hf`` as transformers'
``LlavaOnevisionForConditionalGeneration`` and its tokenizer, and for the first ``--max-records`` records
of a question file decodes the video (this library's frame sampling: the frames the model was trained
on), builds the prompt the training used (the chat template, the question with its options, the answer
hint and format instruction; the video placeholder expanded to the tower's token count) and runs
``model.generate`` (greedy). Prints one line per record and the accuracy of the extracted answers.

    python tools/generate_hf.py --hf demo/hf_grpo --data-path demo/data/qa.jsonl \\
        --video-root demo/data/videos --num-frames 8 --max-records 8

Leaves out: Qwen2.5-VL folders (transformers' own ``Qwen2_5_VLProcessor`` path serves them), batching.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", required=True, metavar="DIR", help="a Hugging Face folder (convert_checkpoint.py to-hf)")
    p.add_argument("--data-path", required=True, help="question records (.jsonl / .json)")
    p.add_argument("--video-root", required=True, help="folder the records' video paths are relative to")
    p.add_argument("--num-frames", type=int, default=8, help="frames sampled uniformly per video (as in training) "
                                                              "(default: 8)")
    p.add_argument("--max-records", type=int, default=8, help="answer the first N records (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer generated (default: 64)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from megatron_longvideo.checkpoint.hf_config import config_from_hf
    from megatron_longvideo.data.prompts import build_rl_prompt
    from megatron_longvideo.data.records import load_records
    from megatron_longvideo.data.sampling import FrameSamplingConfig
    from megatron_longvideo.data.tokenizer import load_tokenizer
    from megatron_longvideo.data.video import decode_image, decode_video
    from megatron_longvideo.models import special_tokens
    from megatron_longvideo.rl.rewards import GroundTruth, RewardInput, accuracy_reward, extract_answer

    with open(os.path.join(args.hf, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") != "llava_onevision":
        raise SystemExit(f"generate_hf.py: {args.hf} holds a {config.get('model_type')!r} model; this tool runs "
                         "LLaVA-OneVision folders")
    cfg = config_from_hf(config)
    tok = load_tokenizer(args.hf, special=special_tokens("llava_onevision"))
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(args.hf, dtype=torch.float32).eval()
    sampling = FrameSamplingConfig(num_frames=args.num_frames, image_size=cfg.vision.image_size)
    records = load_records(args.data_path, video_root=args.video_root).records[: args.max_records]
    several = [r for r in records if len(r.visuals) > 1]
    if several:  # transformers takes one batch of equal-length videos per call: this tool gives one at a time
        print(f"generate_hf.py: {len(several)} record(s) with several visual inputs left out (first: "
              f"{several[0].problem_id!r}); this tool runs records with one video or image, or none", flush=True)
        records = [r for r in records if len(r.visuals) <= 1]
    correct = 0
    for record in records:
        visual = {}
        counts = []
        for kind, path in record.visuals:  # an image is a one-frame video
            full = os.path.join(args.video_root, path)
            frames = (decode_image(full, sampling) if kind == "image" else decode_video(full, sampling)).frames  # [T, 3, S, S]
            visual = {"pixel_values_videos": frames[None]}
            counts.append(cfg.vision.num_video_tokens(frames.shape[0]))
        example = build_rl_prompt(record, tok, counts)
        ids = example.input_ids[None]  # [1, P]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **visual,
                                 max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=tok.eos_id,
                                 pad_token_id=tok.pad_id)
        new = [t for t in out[0, ids.shape[1]:].tolist() if t != tok.eos_id]
        text = tok.decode(new)
        truth = GroundTruth.from_record(example.ground_truth)
        right = accuracy_reward(RewardInput.of(text, truth)) > 0
        correct += right
        print(f"{record.problem_id}: answer {record.answer} | predicted {extract_answer(text)!r} "
              f"({'right' if right else 'wrong'}) | {text!r}", flush=True)
    accuracy = correct / max(len(records), 1)
    print(f"accuracy {accuracy:.3f} on {len(records)} records ({args.hf})", flush=True)
    return {"accuracy": accuracy, "records": len(records)}


if __name__ == "__main__":
    main()
