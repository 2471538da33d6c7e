"""Run by ``test_hf_start.py`` in a subprocess that has torchvision on its path: transformers' own
``AutoProcessor`` on an exported folder, then ``generate`` on what it builds. Prints one JSON line.

transformers' LLaVA-OneVision video processor imports torchvision: see ``tests/tv_shim.py`` for how it is
imported next to a CPU-only torch.

    python hf_processor_check.py HF_DIR FRAMES.npy MAX_NEW_TOKENS
"""

import json
import sys


def main(hf_dir, frames_path, max_new_tokens):
    import numpy as np
    import torch

    from tests.tv_shim import import_torchvision

    how = import_torchvision()
    import torchvision
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    processor = AutoProcessor.from_pretrained(hf_dir)
    frames = np.load(frames_path)  # [T, H, W, 3] uint8
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what colour is the shape"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, videos=[frames], return_tensors="pt")
    video_id = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(hf_dir)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    ours = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    print(json.dumps({
        "torchvision": f"{torchvision.__version__} ({how})",
        "processor": type(processor).__name__,
        "prompt": prompt,
        "num_video_tokens": int((inputs["input_ids"] == video_id).sum()),
        "pixel_max_diff": float((inputs["pixel_values_videos"][0].float() - ours).abs().max()),
        "new_tokens": out[0, inputs["input_ids"].shape[1]:].tolist(),
        "eos": model.generation_config.eos_token_id,
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
