"""Megatron-style command-line flags of the entry scripts, plus ``--config file.json``.

Flag names follow Megatron-LM (``--tensor-model-parallel-size``, ``--micro-batch-size``, ``--save`` ...)
so the scripts fit existing launchers. ``--config`` names a JSON object whose keys are flag names
(``"micro-batch-size"`` or ``"micro_batch_size"``); its values replace the defaults and flags given on the
command line win over it. An unknown key is an error naming the key and the file.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable, Optional, Sequence

from megatron_longvideo.parallel.groups import ParallelConfig
from megatron_longvideo.training.engine import OptimConfig

__all__ = ["build_parser", "parse", "parallel_config", "optim_config", "train_config", "run_config", "model_config",
           "frame_sampling", "model_options", "params_dtype", "resolve_tokenizer", "dataset_media", "audio_sampling",
           "check_family_flags"]


def _kernels() -> tuple:
    from megatron_longvideo.attention.backends import KERNELS

    return KERNELS


def params_dtype(args):
    """The model's parameter dtype from ``--bf16`` / ``--fp16`` (fp32 without either)."""
    import torch

    if args.bf16 and args.fp16:
        raise ValueError("--bf16 and --fp16 are exclusive: choose one")
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def model_options(args) -> dict:
    """``build_llm`` / ``build_vlm`` keyword arguments of the model flags (attention, TE layers, precision)."""
    return {"core_attention": args.core_attention, "attention_kernel": args.attention_kernel,
            "transformer_impl": args.transformer_impl, "params_dtype": params_dtype(args)}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's help with its default shown once: appended unless the help already says what the default
    is, and left out where there is none to show (None, a switch that is off)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--config", help="JSON file of flag values (command-line flags override it)")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="ranks that split each layer's weights (Megatron TP)")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="pipeline stages (SFT / pretraining; GRPO needs 1)")
    g.add_argument("--context-parallel-size", type=int, default=1, help="ranks that split each sequence (CP): long videos' tokens spread over them")
    g.add_argument("--sequence-parallel", action="store_true", help="shard the activations between TP regions over the TP ranks (Megatron SP)")
    g.add_argument("--cp-comm-type", default="all_gather", choices=("all_gather", "a2a", "p2p"), help="how CP ranks exchange keys and values: all_gather, a2a (Ulysses-style) or p2p (ring)")
    g.add_argument("--encode-group", default="tp_cp", choices=("tp_cp", "cp"),
                   help="ranks that split one video's frames (parallel encoding)")
    g = p.add_argument_group("model (defaults: the tiny CPU demo model)")
    g.add_argument("--model-family", default="llava_onevision", choices=("llava_onevision", "qwen2_5_vl", "qwen2_audio"),
                   help="SigLIP + MLP projector + Qwen2 (LLaVA-OneVision), Qwen2.5-VL (window-attention tower, "
                        "multimodal RoPE; its tiny defaults: --patch-size 14, --image-size 56), or Qwen2-Audio "
                        "(Whisper-style audio encoder + Qwen2: audio and text records only)")
    g.add_argument("--vision-window-size", type=int, default=112, help="qwen2_5_vl: window side in pixels")
    g.add_argument("--vision-fullatt-layers", type=int, nargs="*", default=None,
                   help="qwen2_5_vl: tower layers (0-based) with full attention (default: the last)")
    g.add_argument("--mrope-section", type=int, nargs=3, default=None,
                   help="qwen2_5_vl: rotary frequencies per temporal / height / width row (default: 1/4, 3/8, 3/8 of head_dim / 2)")
    g.add_argument("--num-layers", type=int, default=2, help="LLM transformer layers")
    g.add_argument("--hidden-size", type=int, default=64, help="LLM hidden size")
    g.add_argument("--num-attention-heads", type=int, default=4, help="LLM attention heads")
    g.add_argument("--num-query-groups", type=int, default=2, help="LLM key/value heads (grouped-query attention)")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x hidden size")
    g.add_argument("--rotary-base", type=float, default=10000.0, help="RoPE base (Qwen2: 1e6)")
    g.add_argument("--norm-epsilon", type=float, default=1e-6, help="RMSNorm epsilon of the LLM")
    g.add_argument("--max-position-embeddings", type=int, default=32768, help="longest sequence the rotary tables cover")
    tie = g.add_mutually_exclusive_group()
    tie.add_argument("--untie-embeddings-and-output-weights", dest="tie_embeddings", action="store_false",
                     help="separate input embedding and output layer (the default here)")
    tie.add_argument("--tie-embeddings-and-output-weights", dest="tie_embeddings", action="store_true",
                     help="share the input embedding with the output layer")
    g.set_defaults(tie_embeddings=False)
    g.add_argument("--image-size", type=int, default=32, help="frame side in pixels the vision tower takes")
    g.add_argument("--patch-size", type=int, default=8, help="vision tower patch side in pixels")
    g.add_argument("--vision-hidden-size", type=int, default=32,
                   help="media tower hidden size (SigLIP, Qwen2.5-VL's ViT or the audio encoder)")
    g.add_argument("--vision-num-layers", type=int, default=2, help="media tower layers (SigLIP, ViT or audio encoder)")
    g.add_argument("--vision-num-attention-heads", type=int, default=2,
                   help="media tower attention heads (SigLIP, ViT or audio encoder)")
    g.add_argument("--vision-ffn-hidden-size", type=int, default=None,
                   help="media tower MLP width (SigLIP, ViT or audio encoder; default: 4 x its hidden size)")
    g.add_argument("--audio-num-mel-bins", type=int, default=128,
                   help="qwen2_audio: log-mel bins per frame the audio encoder takes (Qwen2-Audio / Whisper large-v3: 128)")
    g.add_argument("--audio-window-seconds", type=int, default=30,
                   help="qwen2_audio: seconds of audio per encoder window (Whisper's 30; 100 mel frames a second); "
                        "--max-frames caps the windows per audio")
    g.add_argument("--hf-config", default=None, metavar="DIR",
                   help="take every model shape from a Hugging Face folder's config.json (LLaVA-OneVision); "
                        "the shape flags above must then be left at their defaults or agree with it")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model shape from the checkpoint --load names (e.g. one written by "
                        "convert_checkpoint.py from-hf), as Megatron-LM's flag does")
    g.add_argument("--train-vision-tower", action="store_true",
                   help="also train the media tower: the ViT, or the audio encoder (frozen by default)")
    g.add_argument("--recompute-activations", action="store_true",
                   help="recompute each transformer layer in backward: activation memory stops growing with depth")
    g.add_argument("--core-attention", default="engine", choices=("engine", "te", "megatron"),
                   help="the LLM's core attention: 'engine' (tiles on fused kernels, every CP mode and packing), "
                        "'te' (TransformerEngine's, plain causal rows only), 'megatron' (dense reference, no CP)")
    g.add_argument("--attention-kernel", default="auto", choices=_kernels(),
                   help="fused kernel the attention engine runs its tiles on ('auto': cpu_flash on CPU; flash_attn, "
                        "torch_flash or torch_efficient on CUDA)")
    g.add_argument("--transformer-impl", default="local", choices=("local", "transformer_engine"),
                   help="layer implementation (Megatron's flag): 'transformer_engine' uses TE's fused norm + linear "
                        "modules (pip install megatron_longvideo[gpu]) with this library's core attention")
    g = p.add_argument_group("mixed precision")
    g.add_argument("--bf16", action="store_true", help="bf16 weights and activations, fp32 main weights and gradients")
    g.add_argument("--fp16", action="store_true", help="fp16 weights and activations with loss scaling")
    g.add_argument("--loss-scale", type=float, default=None, help="fp16: static loss scale (default: dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32, help="fp16: first dynamic loss scale")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", help="records file (.jsonl / .json)")
    g.add_argument("--video-root", help="folder the records' video paths are relative to")
    g.add_argument("--tokenizer", help="sentencepiece .model file or Hugging Face tokenizer folder")
    g.add_argument("--synthetic-data", help="write (once) and use the synthetic dataset and tokenizer in this folder")
    g.add_argument("--num-frames", type=int, default=8, help="frames sampled uniformly per video")
    g.add_argument("--fps", type=float, default=None, help="sample at this rate instead (capped by --max-frames)")
    g.add_argument("--max-frames", type=int, default=512, help="most frames sampled per video (caps --fps sampling; the encoder refuses longer videos; qwen2_audio: most encoder windows per audio)")
    g.add_argument("--seq-length", type=int, default=None, help="pad every micro-batch to this (needed for PP > 1)")
    g.add_argument("--pack-sequences", action="store_true",
                   help="pretrain / SFT: pack each micro-batch's samples into one row (first-fit rows of --seq-length "
                        "when set) instead of padding them, each sample attending to itself only with its positions "
                        "restarting: the loss and gradients of padded rows, without the padding (not with PP > 1)")
    g.add_argument("--num-workers", type=int, default=0,
                   help="worker processes per rank that decode the next samples while a step trains (the SFT / "
                        "pretraining loader and the GRPO prompt stream); at most --prefetch-factor samples each wait")
    g.add_argument("--prefetch-factor", type=int, default=2, help="samples (batches) each worker makes ahead")
    g.add_argument("--decode", default="sharded", choices=("sharded", "full"),
                   help="sharded: each rank of the encode group decodes only the frames it encodes, a video whose "
                        "embedding is cached is not decoded; full: every rank decodes every sampled frame")
    g.add_argument("--probe-cache-dir", default=None,
                   help="with --decode sharded: a folder the ranks of each encode group share (node-local temp is "
                        "enough when TP x CP sits on one node) where the group's rank 0 publishes each video's probe "
                        "and packet table for the others to read, and later epochs find it (VideoDatasetConfig.probe_dir); "
                        "default: <--save>/probe_cache when --save is given, else every rank probes")
    g.add_argument("--on-bad-input", default="skip", choices=["raise", "skip"],
                   help="skip: a bad record or video is dropped, counted by reason and reported; raise: stop at the first")
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1, help="samples per micro-batch on each data-parallel replica")
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x DP (no accumulation)")
    g.add_argument("--train-iters", type=int, default=100, help="optimizer iterations (GRPO: steps) to train for")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="iterations of linear warm-up from 0 to --lr")
    g.add_argument("--lr-decay-style", default="cosine", choices=("constant", "linear", "cosine"), help="learning-rate decay after the warm-up")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="iterations the decay spans (default: --train-iters)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="Adam beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clipping threshold (0: off)")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="shard the optimizer state over data-parallel ranks (Megatron's distributed optimizer)")
    g.add_argument("--seed", type=int, default=1234, help="random seed (weights, sampling, data order)")
    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save", help="checkpoint root to save into (a run resumes from it when it holds one)")
    g.add_argument("--load", help="checkpoint to start from when --save holds none")
    g.add_argument("--finetune", action="store_true", help="with --load: weights only, fresh optimizer, step 0")
    g.add_argument("--save-interval", type=int, default=0, help="0: save at the end only")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="0: keep all")
    g.add_argument("--exit-interval", type=int, default=None, help="stop (after saving) when the iteration is a multiple of this; run again to resume")
    g.add_argument("--no-verify-checksums", action="store_true", help="skip sha256 checks when loading")
    g.add_argument("--log-interval", type=int, default=1, help="iterations between log lines")
    g.add_argument("--tensorboard-dir", default=None, help="write TensorBoard scalars here (rank 0)")
    return p


def parse(argv: Optional[Sequence[str]] = None, *, description: str = "", defaults: Optional[dict] = None,
          extend: Optional[Callable[[argparse.ArgumentParser], None]] = None):
    """Flags -> namespace: parser defaults < ``defaults`` (the stage's) < ``--config`` JSON < command line.

    ``extend(parser)`` adds a script's own flags (the GRPO ones) to the shared ones."""
    parser = build_parser(description)
    if extend is not None:
        extend(parser)
    if defaults:
        parser.set_defaults(**defaults)
    known, _ = parser.parse_known_args(argv)
    if known.config:
        with open(known.config) as f:
            try:
                values = json.load(f)
            except ValueError as e:
                raise ValueError(f"{known.config}: not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{known.config}: expected a JSON object of flag values, got {type(values).__name__}")
        dests = {a.dest for a in parser._actions}
        for key in values:
            if key.replace("-", "_") not in dests or key == "config":
                raise ValueError(f"{known.config}: unknown key {key!r} (keys are the flag names, e.g. 'micro-batch-size')")
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in values.items()})
    return parser.parse_args(argv)


_SHAPE_FLAGS = {  # flag dest -> (part, field) of the VLMConfig it sets
    "num_layers": ("llm", "num_layers"), "hidden_size": ("llm", "hidden_size"),
    "num_attention_heads": ("llm", "num_attention_heads"), "num_query_groups": ("llm", "num_query_groups"),
    "ffn_hidden_size": ("llm", "ffn_hidden_size"), "rotary_base": ("llm", "rotary_base"),
    "norm_epsilon": ("llm", "norm_eps"), "max_position_embeddings": ("llm", "max_position_embeddings"),
    "tie_embeddings": ("llm", "tie_word_embeddings"), "image_size": ("vision", "image_size"),
    "patch_size": ("vision", "patch_size"), "vision_hidden_size": ("vision", "hidden_size"),
    "vision_num_layers": ("vision", "num_layers"), "vision_num_attention_heads": ("vision", "num_attention_heads"),
    "vision_ffn_hidden_size": ("vision", "ffn_hidden_size"),
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _given_shapes(args) -> dict:
    """The shape flags whose value differs from the parser's default (given on the command line or in --config)."""
    defaults = build_parser()
    return {d: getattr(args, d) for d in _SHAPE_FLAGS if hasattr(args, d) and getattr(args, d) != defaults.get_default(d)}


_QWEN_VISION_FLAGS = {"vision_hidden_size": "hidden_size", "vision_num_layers": "depth", "patch_size": "patch_size",
                      "vision_num_attention_heads": "num_heads", "vision_ffn_hidden_size": "intermediate_size"}
_AUDIO_TOWER_FLAGS = {"vision_hidden_size": "hidden_size", "vision_num_layers": "num_layers",
                      "vision_num_attention_heads": "num_attention_heads", "vision_ffn_hidden_size": "ffn_hidden_size"}
_VIDEO_ONLY_FLAGS = ("num_frames", "fps", "image_size", "patch_size", "vision_window_size", "vision_fullatt_layers",
                     "mrope_section", "rollout_max_frames")
"""Flags that shape frames or their tokens: meaningless for the audio family."""
_AUDIO_ONLY_FLAGS = ("audio_num_mel_bins", "audio_window_seconds")


def check_family_flags(args, family: str) -> None:
    """One ``ValueError`` naming every flag given (not at its default) that ``family`` has no use for."""
    defaults = build_parser()
    unused = _VIDEO_ONLY_FLAGS if family == "qwen2_audio" else _AUDIO_ONLY_FLAGS
    given = [d for d in unused if hasattr(args, d) and getattr(args, d) != defaults.get_default(d)]
    if not given:
        return
    flags = ", ".join(_flag(d) for d in given)
    if family == "qwen2_audio":
        raise ValueError(f"{flags}: the qwen2_audio family takes audio (log-mel windows) and text, not frames; "
                         "leave these flags out (--audio-window-seconds and --max-frames shape its windows)")
    raise ValueError(f"{flags}: the {family} family has no audio encoder; these flags need --model-family qwen2_audio")


def _config_from_source(args):
    """``(config, where it came from)`` of ``--hf-config`` or ``--use-checkpoint-args``; (None, None) without."""
    import dataclasses

    from megatron_longvideo.models import family_of, replace_tower
    from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig
    from megatron_longvideo.models.qwen2_audio.model import Qwen2AudioConfig
    from megatron_longvideo.models.llava_onevision.model import VLMConfig

    if args.hf_config and getattr(args, "use_checkpoint_args", False):
        raise ValueError("--hf-config and --use-checkpoint-args both name the model shape: give one")
    if args.hf_config:
        from megatron_longvideo.checkpoint.hf_convert import read_hf_config

        cfg, source = read_hf_config(args.hf_config), f"--hf-config {args.hf_config}"
    elif getattr(args, "use_checkpoint_args", False):
        from megatron_longvideo.checkpoint.dist_ckpt import find_checkpoint, model_config_of

        path = (args.save if args.save and find_checkpoint(args.save) else None) or args.load
        if not path:
            raise ValueError("--use-checkpoint-args needs --load (or a --save that holds a checkpoint)")
        cfg, source = model_config_of(path), f"the checkpoint {path}"
    else:
        return None, None
    if not isinstance(cfg, (VLMConfig, Qwen25VLConfig, Qwen2AudioConfig)):
        raise ValueError(f"{source}: describes a language model alone (Qwen2); the entry scripts train a "
                         "video-language model (LLaVA-OneVision): build one with load_hf(part='language_model')")
    family = family_of(cfg)
    if getattr(args, "model_family", family) != family and args.model_family != build_parser().get_default("model_family"):
        raise ValueError(f"--model-family {args.model_family} disagrees with {source} ({family})")
    args.model_family = family
    given = _given_shapes(args)
    if family == "qwen2_audio":
        defaults = build_parser()
        given.update({d: getattr(args, d) for d in _AUDIO_ONLY_FLAGS
                      if hasattr(args, d) and getattr(args, d) != defaults.get_default(d)})
    for dest, value in given.items():
        part, field = _SHAPE_FLAGS.get(dest, ("audio", None))
        if family == "qwen2_5_vl" and part == "vision":
            if dest not in _QWEN_VISION_FLAGS:
                continue  # the frame size is the data's choice for this family
            field = _QWEN_VISION_FLAGS[dest]
        if family == "qwen2_audio" and part in ("vision", "audio"):
            if dest in _VIDEO_ONLY_FLAGS:
                continue  # refused by check_family_flags
            part = "audio"
            if dest == "audio_window_seconds":
                held = audio_sampling(cfg.audio).window_seconds
                if held != value:
                    raise ValueError(f"--audio-window-seconds={value} disagrees with {source} ({held} s windows: "
                                     f"audio.max_source_positions={cfg.audio.max_source_positions}): leave it out")
                continue
            field = "num_mel_bins" if dest == "audio_num_mel_bins" else _AUDIO_TOWER_FLAGS[dest]
        if getattr(getattr(cfg, part), field) != value:
            raise ValueError(f"{_flag(dest)}={value} disagrees with {source} ({part}.{field}="
                             f"{getattr(getattr(cfg, part), field)}): leave the shape flags out")
    if family == "qwen2_audio":
        return replace_tower(cfg, max_windows=args.max_frames), source
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, max_frames=args.max_frames)), source


def _family_defaults(args) -> None:
    """The Qwen2.5-VL family's tiny defaults where the LLaVA-OneVision ones were left (patch 8, 32 px)."""
    if getattr(args, "model_family", "llava_onevision") != "qwen2_5_vl":
        return
    parser = build_parser()
    if args.patch_size == parser.get_default("patch_size"):
        args.patch_size = 14
    if args.image_size == parser.get_default("image_size"):
        args.image_size = 56


def _qwen_config(args, tokenizer):
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig
    from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig

    q = args.patch_size * 2
    if args.image_size % q:
        raise ValueError(f"--image-size {args.image_size}: Qwen2.5-VL frames must be a multiple of 2 x --patch-size = {q}")
    depth = args.vision_num_layers
    vision = QwenVisionConfig(depth=depth, hidden_size=args.vision_hidden_size, num_heads=args.vision_num_attention_heads,
                              intermediate_size=args.vision_ffn_hidden_size or 4 * args.vision_hidden_size,
                              out_hidden_size=args.hidden_size, patch_size=args.patch_size,
                              window_size=args.vision_window_size, max_frames=args.max_frames,
                              fullatt_block_indexes=tuple(args.vision_fullatt_layers if args.vision_fullatt_layers is not None
                                                          else (depth - 1,)))
    half = args.hidden_size // args.num_attention_heads // 2
    section = tuple(args.mrope_section) if args.mrope_section else (half // 4, (half - half // 4) // 2,
                                                                    half - half // 4 - (half - half // 4) // 2)
    tp = args.tensor_model_parallel_size
    llm = LLMConfig(vocab_size=-(-tokenizer.vocab_size // tp) * tp, hidden_size=args.hidden_size, num_layers=args.num_layers,
                    num_attention_heads=args.num_attention_heads,
                    num_query_groups=args.num_query_groups or args.num_attention_heads,
                    ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size, rotary_base=args.rotary_base,
                    norm_eps=args.norm_epsilon, max_position_embeddings=args.max_position_embeddings,
                    tie_word_embeddings=args.tie_embeddings, mrope_section=section)
    return Qwen25VLConfig(llm=llm, vision=vision, video_token_id=tokenizer.video_id)


def audio_sampling(audio_config):
    """The audio decoding and features (:class:`~megatron_longvideo.data.audio.AudioSamplingConfig`) an audio
    tower's config takes: its mel bins, and its window (``2 x max_source_positions`` mel frames of 10 ms)
    in seconds."""
    from megatron_longvideo.data.audio import AudioSamplingConfig
    from megatron_longvideo.models.qwen2_audio.inputs import HOP_LENGTH, SAMPLING_RATE

    seconds, rest = divmod(audio_config.window_frames * HOP_LENGTH, SAMPLING_RATE)
    if rest or not seconds:
        raise ValueError(f"audio.max_source_positions={audio_config.max_source_positions}: a window of "
                         f"{audio_config.window_frames} mel frames is not a whole number of seconds")
    return AudioSamplingConfig(n_mels=audio_config.num_mel_bins, window_seconds=seconds,
                               sampling_rate=SAMPLING_RATE, hop_length=HOP_LENGTH)


def _audio_config(args, tokenizer):
    """The Qwen2-Audio config of the flags: the ``--vision-*`` flags shape its encoder, ``--audio-*`` its
    input, ``--max-frames`` caps the windows of one audio."""
    from megatron_longvideo.data.audio import AudioSamplingConfig
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.qwen2_audio.audio import AudioConfig
    from megatron_longvideo.models.qwen2_audio.model import Qwen2AudioConfig

    try:
        window = AudioSamplingConfig(n_mels=args.audio_num_mel_bins, window_seconds=args.audio_window_seconds)
        audio = AudioConfig(num_mel_bins=args.audio_num_mel_bins, hidden_size=args.vision_hidden_size,
                            num_layers=args.vision_num_layers, num_attention_heads=args.vision_num_attention_heads,
                            ffn_hidden_size=args.vision_ffn_hidden_size or 4 * args.vision_hidden_size,
                            max_source_positions=window.window_frames // 2, max_windows=args.max_frames)
    except ValueError as e:
        raise ValueError(f"--model-family qwen2_audio: the audio flags (--audio-*, --vision-*, --max-frames) do not "
                         f"make an audio encoder: {e}") from None
    tp = args.tensor_model_parallel_size
    llm = LLMConfig(vocab_size=-(-tokenizer.vocab_size // tp) * tp, hidden_size=args.hidden_size, num_layers=args.num_layers,
                    num_attention_heads=args.num_attention_heads,
                    num_query_groups=args.num_query_groups or args.num_attention_heads,
                    ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size, rotary_base=args.rotary_base,
                    norm_eps=args.norm_epsilon, max_position_embeddings=args.max_position_embeddings,
                    tie_word_embeddings=args.tie_embeddings)
    return Qwen2AudioConfig(llm=llm, audio=audio, audio_token_id=tokenizer.video_id)


def model_config(args, tokenizer):
    """The VLMConfig the model flags describe, for ``tokenizer`` (its vocabulary rounded up to a multiple
    of TP, its video placeholder id). Every stage builds its model here, so a stage's checkpoint fits
    the next stage given the same model flags. With ``--hf-config`` / ``--use-checkpoint-args`` the
    shape is that config's, which must hold the tokenizer (vocabulary, video id) and split over TP."""
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig
    from megatron_longvideo.training.stage import vlm_config_for

    cfg, source = _config_from_source(args)
    check_family_flags(args, getattr(args, "model_family", "llava_onevision"))
    _family_defaults(args)
    tp = args.tensor_model_parallel_size
    if cfg is not None:
        if cfg.llm.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"{source}: vocab_size={cfg.llm.vocab_size} is smaller than the tokenizer's "
                             f"{tokenizer.vocab_size} ({tokenizer.source}): another tokenizer?")
        if cfg.video_token_id != tokenizer.video_id:
            raise ValueError(f"{source}: video token id {cfg.video_token_id} differs from the tokenizer's "
                             f"{tokenizer.special.video!r} id {tokenizer.video_id} ({tokenizer.source})")
        if cfg.llm.vocab_size % tp:
            raise ValueError(f"{source}: vocab_size={cfg.llm.vocab_size} does not split over "
                             f"--tensor-model-parallel-size {tp}")
        return cfg
    if getattr(args, "model_family", "llava_onevision") == "qwen2_5_vl":
        return _qwen_config(args, tokenizer)
    if args.model_family == "qwen2_audio":
        return _audio_config(args, tokenizer)
    vision = VisionConfig(image_size=args.image_size, patch_size=args.patch_size, hidden_size=args.vision_hidden_size,
                          num_layers=args.vision_num_layers, num_attention_heads=args.vision_num_attention_heads,
                          ffn_hidden_size=args.vision_ffn_hidden_size or 4 * args.vision_hidden_size,
                          max_frames=args.max_frames)
    llm = LLMConfig(hidden_size=args.hidden_size, num_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
                    num_query_groups=args.num_query_groups or args.num_attention_heads,
                    ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size, rotary_base=args.rotary_base,
                    norm_eps=args.norm_epsilon, max_position_embeddings=args.max_position_embeddings,
                    tie_word_embeddings=args.tie_embeddings)
    return vlm_config_for(tokenizer, llm=llm, vision=vision, tensor_parallel_size=tp)


def _no_video_tokens(family: str, num_frames: int) -> int:
    raise ValueError(f"the {family} family takes audio and text only, not a video or an image ({num_frames} "
                     "frames): drop such records, or use --model-family llava_onevision / qwen2_5_vl")


def _no_audio_tokens(family: str, num_mel_frames: int) -> int:
    raise ValueError(f"the {family} family has no audio encoder: an audio record needs --model-family qwen2_audio")


def dataset_media(args, cfg) -> dict:
    """What every dataset a script builds takes from the model ``cfg``: ``num_video_tokens`` and
    ``num_audio_tokens`` (placeholders per input; for a family without such a tower, a counter that raises
    naming the family), ``audio`` (the :class:`~megatron_longvideo.data.audio.AudioSamplingConfig` the audio
    tower takes) and ``probe_dir`` (``--probe-cache-dir``). The keys are keyword arguments of
    :func:`~megatron_longvideo.training.stage.build_data_loader` and
    :func:`~megatron_longvideo.rl.evaluation.build_eval_set`."""
    import functools

    from megatron_longvideo.data.audio import AudioSamplingConfig
    from megatron_longvideo.models import audio_token_counter, family_of, video_token_counter

    family = family_of(cfg)
    probe_dir = getattr(args, "probe_cache_dir", None)
    if probe_dir is None and getattr(args, "save", None) and getattr(args, "decode", "full") == "sharded":
        probe_dir = os.path.join(args.save, "probe_cache")  # a checkpoint folder is shared by every rank
    media = {"probe_dir": probe_dir}
    if family == "qwen2_audio":  # picklable counters: the loader's workers take the dataset
        return {**media, "num_video_tokens": functools.partial(_no_video_tokens, family),
                "num_audio_tokens": audio_token_counter(cfg), "audio": audio_sampling(cfg.audio)}
    return {**media, "num_video_tokens": video_token_counter(cfg, args.image_size),
            "num_audio_tokens": functools.partial(_no_audio_tokens, family), "audio": AudioSamplingConfig()}


def resolve_tokenizer(args) -> None:
    """Without ``--tokenizer``, use the one the checkpoint to start from carries (``hf/``; written by
    ``convert_checkpoint.py from-hf``): this run's own checkpoint under ``--save`` first, else ``--load``."""
    if args.tokenizer:
        return
    from megatron_longvideo.checkpoint.dist_ckpt import checkpoint_assets, find_checkpoint

    for path in (args.save, args.load):
        if path and find_checkpoint(path):
            folder = checkpoint_assets(path)
            if folder and any(n in os.listdir(folder) for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
                args.tokenizer = folder
            return


def resolve_family(args) -> str:
    """The model family: that of ``--hf-config`` / ``--use-checkpoint-args`` when a config names the shape
    (``--model-family`` must agree), else ``--model-family``."""
    _config_from_source(args)
    return getattr(args, "model_family", "llava_onevision")


def load_tokenizer_for(args):
    """The tokenizer ``--tokenizer`` names, read with the chat tokens of the model family: ``--model-family``,
    or the family of ``--hf-config`` / ``--use-checkpoint-args`` (LLaVA-OneVision's ``<video>``; Qwen2.5-VL's
    ``<|vision_start|><|video_pad|><|vision_end|>``, which its public tokenizers hold)."""
    from megatron_longvideo.data.tokenizer import load_tokenizer
    from megatron_longvideo.models import special_tokens

    family = resolve_family(args)
    try:
        return load_tokenizer(args.tokenizer, special=special_tokens(family))
    except ValueError as e:
        if "is not in the tokenizer's vocabulary" not in str(e):
            raise
        raise ValueError(f"--tokenizer {args.tokenizer}: the {family} family's prompts need its chat tokens "
                         f"{special_tokens(family).structural()}: {e}") from None


def frame_sampling(args):
    """Frame sampling from the flags (uniform ``--num-frames``, or ``--fps`` capped by ``--max-frames``);
    Qwen2.5-VL frames are normalised with its CLIP mean and std."""
    from megatron_longvideo.data.sampling import FrameSamplingConfig

    _family_defaults(args)
    norm = {}
    if getattr(args, "model_family", "llava_onevision") == "qwen2_5_vl":
        from megatron_longvideo.models.qwen2_5_vl.inputs import CLIP_MEAN, CLIP_STD

        norm = dict(mean=CLIP_MEAN, std=CLIP_STD)
    return FrameSamplingConfig(num_frames=None if args.fps else args.num_frames, fps=args.fps,
                               max_frames=args.max_frames, image_size=args.image_size, **norm)


def parallel_config(args) -> ParallelConfig:
    return ParallelConfig(tensor_parallel_size=args.tensor_model_parallel_size,
                          pipeline_parallel_size=args.pipeline_model_parallel_size,
                          context_parallel_size=args.context_parallel_size, sequence_parallel=args.sequence_parallel,
                          cp_comm_type=args.cp_comm_type, encode_group=args.encode_group)


def optim_config(args) -> OptimConfig:
    return OptimConfig(lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
                       adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
                       use_distributed_optimizer=args.use_distributed_optimizer, loss_scale=args.loss_scale,
                       initial_loss_scale=args.initial_loss_scale)


def train_config(args):
    from megatron_longvideo.training.loop import TrainConfig

    return TrainConfig(train_iters=args.train_iters, micro_batch_size=args.micro_batch_size,
                       global_batch_size=args.global_batch_size, seq_length=args.seq_length,
                       lr_warmup_iters=args.lr_warmup_iters, lr_decay_style=args.lr_decay_style,
                       lr_decay_iters=args.lr_decay_iters, save=args.save, load=args.load, finetune=args.finetune,
                       save_interval=args.save_interval, keep_checkpoints=args.keep_checkpoints,
                       exit_interval=args.exit_interval, log_interval=args.log_interval,
                       tensorboard_dir=args.tensorboard_dir, verify_checksums=not args.no_verify_checksums)


def run_config(args, stage: str) -> dict:
    """The run's flags as a JSON-able dict (saved with every checkpoint)."""
    return {"stage": stage, **{k: v for k, v in vars(args).items()}}


def validate_inputs(args, *, data_flags=("data_path",), checkpoint_flags=("load",)) -> None:
    """Check, before any model is built, that the files a run reads exist: the records file(s), the video
    root, the tokenizer and the checkpoints to start from. One ``ValueError`` lists every problem, a line
    each naming the flag, the path and what was expected (not the first alone: a run that will fail on
    its third path should not take three restarts to say so)."""
    from megatron_longvideo.checkpoint.dist_ckpt import find_checkpoint

    problems = []

    def flag(name):
        return "--" + name.replace("_", "-")

    for name in data_flags:
        path = getattr(args, name, None)
        if path and not os.path.isfile(path):
            what = "is a directory" if os.path.isdir(path) else "does not exist"
            problems.append(f"{flag(name)} {path}: {what}; expected a records file (.jsonl or .json)")
    root = getattr(args, "video_root", None)
    if root and not os.path.isdir(root):
        problems.append(f"--video-root {root}: {'is a file' if os.path.exists(root) else 'does not exist'}; "
                        "expected the folder the records' video paths are relative to")
    tok = getattr(args, "tokenizer", None)
    if tok and tok != "bytes" and not os.path.exists(tok):
        problems.append(f"--tokenizer {tok}: does not exist; expected a sentencepiece .model file or a Hugging Face "
                        "tokenizer folder")
    for name in checkpoint_flags:
        path = getattr(args, name, None)
        if path and find_checkpoint(path) is None:
            what = "does not exist" if not os.path.exists(path) else "holds no complete checkpoint"
            problems.append(f"{flag(name)} {path}: {what}; expected a checkpoint folder (iter_* with a manifest) "
                            "or a save root holding one")
    if problems:
        raise ValueError("; ".join(problems) if len(problems) == 1 else
                         f"{len(problems)} inputs are wrong: " + "; ".join(problems))
