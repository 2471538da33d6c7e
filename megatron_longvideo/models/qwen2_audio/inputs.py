"""How Qwen2-Audio wants its inputs: the chat spelling of an audio.

An audio is ``<|audio_bos|><|AUDIO|><|audio_eos|>`` (Qwen2-Audio's chat template writes
``Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>`` and a newline before the turn's text); ``<|AUDIO|>``
is the placeholder the prompt builder repeats
:meth:`~megatron_longvideo.models.qwen2_audio.model.Qwen2AudioConfig.num_audio_tokens` times (what
``Qwen2AudioProcessor`` expands it to). The model needs only the placeholder's id (``audio_token_id``,
transformers' ``audio_token_index``, 151646 in Qwen2-Audio-7B); the delimiters are ordinary tokens of
the text. The features are Whisper's log-mel (``WhisperFeatureExtractor``: 16 kHz, 128
bins, 10 ms hop, 30 s windows).
"""

from __future__ import annotations

from megatron_longvideo.data.tokenizer import SpecialTokens

__all__ = ["SPECIAL_TOKENS", "AUDIO_TOKEN", "AUDIO_BOS", "AUDIO_EOS", "SAMPLING_RATE", "HOP_LENGTH"]

AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
SPECIAL_TOKENS = SpecialTokens(video=AUDIO_TOKEN, vision_start=AUDIO_BOS, vision_end=AUDIO_EOS)
"""The family's tokens in the shared spelling: the media placeholder and its delimiters."""
SAMPLING_RATE = 16000
"""Samples per second the features are computed at."""
HOP_LENGTH = 160
"""Samples per mel frame (10 ms)."""
