"""How Qwen2.5-VL wants its inputs: the chat spelling of a video and transformers' processor configs.

* Tokens: ChatML turns, and a video as ``<|vision_start|><|video_pad|><|vision_end|>`` with the turn's
  text straight after it, the way Qwen2.5-VL's published chat template renders a video item followed by
  a text item. ``<|video_pad|>`` is the placeholder the prompt builder repeats ``t * h * w / 4`` times
  (what ``Qwen2_5_VLProcessor`` expands it to). The public tokenizers hold these tokens; the response
  tags ``<think>`` / ``<answer>`` are plain text in them (the reward reads decoded text).
* Processor configs for an export (``Qwen2VLImageProcessor``, ``Qwen2VLVideoProcessor``,
  ``Qwen2_5_VLProcessor``): patch 14, temporal patch 2, merge 2, the CLIP mean and std our frame sampling
  normalises with, bicubic resizing to multiples of 28 within ``[min_pixels, max_pixels]``. Frames the
  training data produced (square ``--image-size`` frames from 56 px, or the ``qwen_vl`` style's) lie in
  those bounds already, so the processor keeps their size and only patches them: it gives the pixels and
  grid our tower took. The video processor samples no frames (``do_sample_frames`` off): frames are chosen
  by the caller, as qwen-vl-utils' ``fetch_video`` does.
"""

from __future__ import annotations

from megatron_longvideo.data.tokenizer import SpecialTokens

__all__ = ["SPECIAL_TOKENS", "IMAGE_TOKEN", "CLIP_MEAN", "CLIP_STD", "processor_configs"]

SPECIAL_TOKENS = SpecialTokens(video="<|video_pad|>", vision_start="<|vision_start|>", vision_end="<|vision_end|>")
IMAGE_TOKEN = "<|image_pad|>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_BICUBIC = 3  # PIL.Image.BICUBIC, the resample code transformers' processors take
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 56 * 56, 28 * 28 * 1280  # Qwen2VLImageProcessor's own bounds
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 56 * 56, 28 * 28 * 768  # the video bound qwen-vl-utils and transformers use


def processor_configs(cfg) -> dict[str, dict]:
    """``{file name: JSON object}`` of the three processor configs for the Qwen2.5-VL config ``cfg``."""
    v = cfg.vision
    common = {"do_resize": True, "resample": _BICUBIC, "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True,
              "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
              "merge_size": v.spatial_merge_size, "processor_class": "Qwen2_5_VLProcessor"}
    return {
        "preprocessor_config.json": {"image_processor_type": "Qwen2VLImageProcessor",
                                     "size": {"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS},
                                     **common},
        "video_preprocessor_config.json": {"video_processor_type": "Qwen2VLVideoProcessor", "do_sample_frames": False,
                                           "cap_pixels_per_frame": False,
                                           "size": {"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS},
                                           **common},
        "processor_config.json": {"processor_class": "Qwen2_5_VLProcessor"},
    }
