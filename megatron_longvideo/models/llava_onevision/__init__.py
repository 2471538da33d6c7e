"""LLaVA-OneVision as a model family: the SigLIP tower, token pooling and MLP projector (``vision``), the
model and its forward (``model``), its Hugging Face configs (``hf``; the weight map is
:class:`~megatron_longvideo.checkpoint.hf_map.WeightMap`), and its chat tokens and processor configs
(``inputs``)."""
