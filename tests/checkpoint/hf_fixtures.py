"""A tiny public-style LLaVA-OneVision folder made by transformers and tokenizers alone (random weights,
a byte-level BPE tokenizer with the chat tokens), as a new user would download one.

The model is nudged to end its answers: every token embedding carries a constant in channel 0 and the
output row of ``<|im_end|>`` reads it, so ``<|im_end|>`` is the most likely next token after text
(greedy decoding stops at once) while sampling still draws other tokens most of the time (rollouts of
varying length, so GRPO has rewards to rank).
"""

from __future__ import annotations

import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<video>", "<image>", "<think>", "</think>", "<answer>",
           "</answer>"]
# Qwen2.5-VL's public tokenizers: the vision tokens, and no response tags (they are plain text there)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
IMAGE_SIZE, PATCH, FRAMES = 32, 8, 4
EOS_LOGIT = 4.0


def make_tokenizer(texts, out_dir: str, special=SPECIAL):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` with the tokens ``special`` (pad
    first), saved to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=list(special), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(special[1:]))
    fast.save_pretrained(out_dir)
    return fast


def make_llava_onevision(tokenizer, out_dir: str, *, seed: int = 0, dtype=torch.float32):
    """A random tiny ``LlavaOnevisionForConditionalGeneration`` saved by transformers (SigLIP's pooling head
    included, the tower's FFN not 4x its width, a non-default rope theta); returns the model."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    vocab = -(-len(tokenizer) // 8) * 8
    text = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, rope_theta=5e5, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                image_size=IMAGE_SIZE, patch_size=PATCH)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, vision_feature_select_strategy="full",
                                  vision_feature_layer=-1, video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                  image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).to(dtype)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms and biases off their 1 / 0 init, so a swapped one shows
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.05)
        model.get_input_embeddings().weight[:, 0] = 1.0
        model.get_output_embeddings().weight[eos, 0] = EOS_LOGIT / 8.0  # the normed channel 0 is about sqrt(64)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model
