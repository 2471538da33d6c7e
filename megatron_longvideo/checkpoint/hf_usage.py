"""What a transformers user needs next to exported weights: the stop and pad ids, the processor, the
chat template.

* ``generation_config.json``: ``eos_token_id`` (the end of an assistant turn, ``<|im_end|>``, plus the
  tokenizer's own eos when it differs) and ``pad_token_id``, so ``generate`` stops where our rollouts stop.
* The family's processor configs (``preprocessor_config.json``, ``video_preprocessor_config.json``,
  ``processor_config.json``), from which transformers' processor expands one video placeholder into the
  count our model takes: :mod:`megatron_longvideo.models.llava_onevision.inputs` (``<video>`` into
  ``frames x ceil(grid / 2)^2 + 1``), :mod:`megatron_longvideo.models.qwen2_5_vl.inputs` (``<|video_pad|>``
  into ``t * h * w / 4``); for Qwen2-Audio ``preprocessor_config.json`` (``WhisperFeatureExtractor`` with
  the tower's mel bins) and ``processor_config.json``, from which ``Qwen2AudioProcessor`` expands
  ``<|AUDIO|>`` into the tower's token count of an audio of up to 30 s. Needs a Hugging Face tokenizer
  (``AutoProcessor`` loads one); a sentencepiece model gets no processor.
* ``chat_template.jinja``: the ChatML turns our prompt builder writes, a video item rendered as the
  family renders it (``<video>`` and a newline; ``<|vision_start|><|video_pad|><|vision_end|>``) before
  the text, unless the tokenizer brought a template of its own. A Qwen2-Audio's items are of type
  ``audio`` (what ``Qwen2AudioProcessor``'s messages hold), rendered ``<|audio_bos|><|AUDIO|><|audio_eos|>``.

Files already present (carried from the Hugging Face checkpoint a run started from) are kept as they are.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from megatron_longvideo.checkpoint.hf_io import is_hf_tokenizer_folder

__all__ = ["chat_template", "write_generation_config", "write_processor_configs", "write_chat_template",
           "PROCESSOR_FILES"]

PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def chat_template(special=None, media: str = "video") -> str:
    """A Jinja chat template that renders messages exactly as :func:`~megatron_longvideo.data.prompts.render_prompt`
    does with the tokens ``special`` (a family's :class:`~megatron_longvideo.data.tokenizer.SpecialTokens`);
    ``media``: the content type of the family's media items ('video', or 'audio' for Qwen2-Audio)."""
    from megatron_longvideo.data.tokenizer import SpecialTokens

    s = special or SpecialTokens()
    return (
        "{% for message in messages %}" + s.im_start + "{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for item in message['content'] %}"
        "{% if item['type'] == '" + media + "' %}" + s.video_item() +
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}" + s.im_end + "\n{% endfor %}"
        "{% if add_generation_prompt %}" + s.im_start + "assistant\n{% endif %}"
    )


def _special_ids(folder: str) -> dict:
    """eos (list), pad and bos ids of the tokenizer saved in ``folder``; {} when it holds none."""
    from megatron_longvideo.data.tokenizer import SpecialTokens

    special = SpecialTokens()
    if is_hf_tokenizer_folder(folder):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)

        def tid(token):
            i = tok.convert_tokens_to_ids(token)
            return None if i is None or (i == tok.unk_token_id and token != tok.unk_token) else i

        eos = [i for i in (tid(special.im_end), tok.eos_token_id) if i is not None]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tid(special.pad)
        bos = tok.bos_token_id
    elif os.path.isfile(os.path.join(folder, "tokenizer.model")):
        from megatron_longvideo.data.tokenizer import SentencePieceTokenizer

        tok = SentencePieceTokenizer(os.path.join(folder, "tokenizer.model"))
        eos, pad, bos = [tok.eos_id], tok.pad_id, None
    else:
        return {}
    eos = list(dict.fromkeys(eos))
    if not eos:
        raise ValueError(f"{folder}: the tokenizer has neither {special.im_end!r} nor an eos token: "
                         "generate would never stop; add the token")
    ids = {"eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": pad if pad is not None else eos[0]}
    if bos is not None:
        ids["bos_token_id"] = bos
    return ids


def write_generation_config(out_dir: str) -> Optional[str]:
    """``generation_config.json`` with the stop and pad ids of the tokenizer already in ``out_dir``; None
    when there is no tokenizer. A file already there keeps its settings; ids it leaves null are filled."""
    from transformers import GenerationConfig

    path = os.path.join(out_dir, "generation_config.json")
    ids = _special_ids(out_dir)
    if os.path.exists(path):
        config = GenerationConfig.from_pretrained(out_dir)
        missing = {k: v for k, v in ids.items() if getattr(config, k, None) is None}
        if missing:
            config.update(**missing)
            config.save_pretrained(out_dir)
        return path
    if not ids:
        return None
    GenerationConfig(**ids).save_pretrained(out_dir)
    return path


def write_chat_template(out_dir: str, special=None, media: str = "video") -> Optional[str]:
    """``chat_template.jinja`` for the tokens ``special`` and media items of type ``media`` unless the
    tokenizer brought one (as a file or inside its config); None when ``out_dir`` holds no tokenizer."""
    if not (is_hf_tokenizer_folder(out_dir) or os.path.isfile(os.path.join(out_dir, "tokenizer.model"))):
        return None
    if any(os.path.exists(os.path.join(out_dir, n)) for n in _TEMPLATE_FILES):
        return None
    config = os.path.join(out_dir, "tokenizer_config.json")
    if os.path.isfile(config):
        with open(config) as f:
            if json.load(f).get("chat_template"):
                return None
    path = os.path.join(out_dir, "chat_template.jinja")
    with open(path, "w") as f:
        f.write(chat_template(special, media))
    return path


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _qwen2_audio_processor_configs(cfg) -> dict[str, dict]:
    """``{file name: JSON object}`` of a Qwen2-Audio's processor: Whisper's log-mel features (25 ms windows,
    10 ms hop, 30 s padded windows) with the tower's mel bins, as Qwen2-Audio-7B's files spell them."""
    from megatron_longvideo.models.qwen2_audio.inputs import HOP_LENGTH, SAMPLING_RATE

    seconds = 30
    features = {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": cfg.audio.num_mel_bins,
                "sampling_rate": SAMPLING_RATE, "hop_length": HOP_LENGTH, "n_fft": 400, "chunk_length": seconds,
                "n_samples": seconds * SAMPLING_RATE, "nb_max_frames": seconds * SAMPLING_RATE // HOP_LENGTH,
                "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True,
                "processor_class": "Qwen2AudioProcessor"}
    return {"preprocessor_config.json": features, "processor_config.json": {"processor_class": "Qwen2AudioProcessor"}}


def write_processor_configs(out_dir: str, cfg) -> list[str]:
    """The processor configs of ``cfg``'s family (see the module docstring); files already present are
    kept. Returns the files written; [] when ``out_dir`` holds no Hugging Face tokenizer."""
    from megatron_longvideo.models import family_of

    if not is_hf_tokenizer_folder(out_dir):
        return []
    if family_of(cfg) == "qwen2_audio":
        processor_configs = _qwen2_audio_processor_configs
    elif family_of(cfg) == "qwen2_5_vl":
        from megatron_longvideo.models.qwen2_5_vl.inputs import processor_configs
    else:
        from megatron_longvideo.models.llava_onevision.inputs import processor_configs
    files = processor_configs(cfg)
    written = []
    for name, obj in files.items():
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            _write_json(path, obj)
            written.append(path)
    return written
