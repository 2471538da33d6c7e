"""megatron_longvideo: long-video RL (GRPO) for video-language models on Megatron-Core.

Importing the package is cheap and imports no optional heavy dependency (TransformerEngine, vLLM,
DALI, Apex); each subpackage imports what it needs when it is used.
"""

__version__ = "0.1.0"
