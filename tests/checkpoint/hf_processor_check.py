"""Run in a subprocess that has torchvision on its path: transformers' own ``AutoProcessor`` on an exported
folder, then ``generate`` on what it builds. Prints one JSON line. Used by ``test_hf_start.py``
(LLaVA-OneVision) and ``tests/examples/test_model_family.py`` (Qwen2.5-VL).

transformers' video processors import torchvision: see ``tests/tv_shim.py`` for how it is imported next to
a CPU-only torch.

    python hf_processor_check.py HF_DIR FRAMES.npy MAX_NEW_TOKENS [SYSTEM_PROMPT]
"""

import json
import sys


def main(hf_dir, frames_path, max_new_tokens, system=None):
    import numpy as np
    import torch

    from tests.tv_shim import import_torchvision

    how = import_torchvision()
    import torchvision
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(hf_dir)
    frames = np.load(frames_path)  # [T, H, W, 3] uint8
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what colour is the shape"}]}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, videos=[frames], return_tensors="pt")
    video_id = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    qwen = AutoConfig.from_pretrained(hf_dir).model_type == "qwen2_5_vl"
    model = AutoModelForImageTextToText.from_pretrained(hf_dir)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255  # [T, 3, H, W]
    if qwen:  # our tower's input: CLIP-normalised frames cut into patches as our encoder cuts them
        from megatron_longvideo.models.qwen2_5_vl.inputs import CLIP_MEAN, CLIP_STD
        from megatron_longvideo.models.qwen2_5_vl.model import qwen25vl_config_from_hf
        from megatron_longvideo.models.qwen2_5_vl.vision import frames_to_patches

        mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
        ours, grid = frames_to_patches((pixels - mean) / std, qwen25vl_config_from_hf(model.config).vision)
        theirs, their_grid = inputs["pixel_values_videos"].float(), inputs["video_grid_thw"][0].tolist()
    else:
        ours, grid = (pixels - 0.5) / 0.5, None
        theirs, their_grid = inputs["pixel_values_videos"][0].float(), None
    print(json.dumps({
        "torchvision": f"{torchvision.__version__} ({how})",
        "processor": type(processor).__name__,
        "prompt": prompt,
        "input_ids": inputs["input_ids"][0].tolist(),
        "num_video_tokens": int((inputs["input_ids"] == video_id).sum()),
        "pixel_max_diff": float((theirs - ours).abs().max()) if theirs.shape == ours.shape else None,
        "grid": grid, "processor_grid": their_grid,
        "new_tokens": out[0, inputs["input_ids"].shape[1]:].tolist(),
        "eos": model.generation_config.eos_token_id,
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
