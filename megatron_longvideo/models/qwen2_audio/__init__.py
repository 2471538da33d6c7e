"""Qwen2-Audio as a model family: the Whisper-style audio tower and its linear projector (``audio``), the
model and its forward (``model``), its Hugging Face configs and weight maps (``hf``), and its chat tokens
(``inputs``). The unit of parallel encoding is one 30 s window of log-mel features."""
