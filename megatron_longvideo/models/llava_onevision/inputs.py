"""How LLaVA-OneVision wants its inputs: the chat spelling of a video and transformers' processor configs.

* Tokens: ChatML turns, and a video as ``<video>`` and a newline before the turn's text, as
  LLaVA-OneVision's chat template renders a video item; ``<video>`` is the placeholder the prompt builder
  repeats ``frames x ceil(grid / 2)^2 + 1`` times.
* Processor configs for an export, in the layout public checkpoints use (``preprocessor_config.json`` for
  images, ``video_preprocessor_config.json`` for videos, ``processor_config.json`` for the processor):
  frames resized to the tower's size (bilinear, antialiased, as our decoders do), scaled to 0..1 and
  normalised with SigLIP's mean and std of 0.5, and ``num_image_tokens`` = the patch grid squared, from
  which ``LlavaOnevisionProcessor`` expands one ``<video>`` into the count our model takes.
"""

from __future__ import annotations

from megatron_longvideo.data.tokenizer import SpecialTokens

__all__ = ["SPECIAL_TOKENS", "IMAGE_TOKEN", "processor_configs"]

SPECIAL_TOKENS = SpecialTokens()
IMAGE_TOKEN = "<image>"
_BILINEAR = 2  # PIL.Image.BILINEAR, the resample code transformers' processors take


def processor_configs(cfg, image_token: str = IMAGE_TOKEN) -> dict[str, dict]:
    """``{file name: JSON object}`` of the three processor configs for the VLM config ``cfg`` (module docstring)."""
    from megatron_longvideo.models.llava_onevision.hf import grid_pinpoints
    from megatron_longvideo.data.sampling import FrameSamplingConfig

    sampling, v = FrameSamplingConfig(), cfg.vision
    frames = {"do_resize": True, "size": {"height": v.image_size, "width": v.image_size}, "resample": _BILINEAR,
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(sampling.mean),
              "image_std": list(sampling.std), "do_convert_rgb": True, "processor_class": "LlavaOnevisionProcessor"}
    return {
        "preprocessor_config.json": {"image_processor_type": "LlavaOnevisionImageProcessor", "do_pad": True,
                                     "image_grid_pinpoints": grid_pinpoints(v.image_size), **frames},
        "video_preprocessor_config.json": {"video_processor_type": "LlavaOnevisionVideoProcessor",
                                           "do_sample_frames": False, **frames},
        "processor_config.json": {"processor_class": "LlavaOnevisionProcessor", "image_token": image_token,
                                  "video_token": SPECIAL_TOKENS.video, "num_image_tokens": v.grid**2,
                                  "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"},
    }
