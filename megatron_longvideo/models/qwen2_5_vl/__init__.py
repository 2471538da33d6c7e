"""Qwen2.5-VL as a model family: the window-attention vision tower (``vision``), multimodal RoPE positions
(``rope``), the model and its forward (``model``), the Hugging Face config and weight maps (``hf``), and
its chat tokens and processor configs (``inputs``)."""
