"""Qwen2.5-VL as a model family (issue 14, in progress): multimodal RoPE positions and the language
model's Hugging Face map so far; the window-attention vision tower follows."""
