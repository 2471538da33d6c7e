"""Models built from megatron-core parts: the Qwen2-style LLM (``llm``), its norm and rotary
embedding, the vision tower and projector, and the video-language model."""
