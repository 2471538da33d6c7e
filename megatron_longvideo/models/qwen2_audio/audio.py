"""Qwen2-Audio's audio tower (a Whisper-style encoder) and projector, from megatron-core layers.

Input, one tensor per audio: ``[num_windows, num_mel_bins + 1, window_frames]`` (:func:`pack_windows`).
Rows ``0 .. num_mel_bins - 1`` are the log-mel features of one encoder window (Whisper's: 30 s = 3000
frames of 10 ms, padded past the audio's end as ``WhisperFeatureExtractor`` pads); the last row is the
window's frame mask (1 on real frames, then 0: transformers' ``feature_attention_mask``). A long audio is
its windows in order; only the last may be partial. The mask rides in the tensor so that the encode
path (sharding, padding units, the embedding cache) treats audio exactly as it treats frames.

Per window (transformers' ``Qwen2AudioEncoder`` + ``Qwen2AudioMultiModalProjector``):

1. Conv1d(num_mel_bins -> d, kernel 3, padding 1) - exact GELU - Conv1d(d -> d, kernel 3, stride 2,
   padding 1) - exact GELU: ``window_frames / 2 = max_source_positions`` positions (1500).
2. plus the stored position table ``[max_source_positions, d]`` (never trained, as in transformers).
3. pre-LN megatron ``TransformerLayer``s (LayerNorm, q/k/v with bias, Linear - exact GELU - Linear with
   biases), bidirectional. Keys past the window's real length ``(L - 1) // 2 + 1`` are hidden from
   the real positions: the real positions are one segment of the attention engine's layout, the padding
   another (no ``[P, P]`` mask is built). transformers lets padding positions see the real keys instead;
   nothing kept depends on the padding positions, so the kept tokens are the same.
4. AvgPool1d(2, 2) over positions, final LayerNorm, Linear into the LLM width.

Tokens of a window with ``L`` real mel frames: ``((L - 1) // 2 + 1 - 2) // 2 + 1`` (:func:`window_tokens`;
750 for a full window), the count transformers' processor expands ``<|AUDIO|>`` to; the rest of the
window's ``max_source_positions // 2`` pooled tokens are dropped (:meth:`AudioTower.num_real_tokens`). No
attention crosses a window, so windows split over the encode group give exactly the tokens of one rank.

transformers' ``k_proj`` has no bias: megatron's fused ``linear_qkv`` has one, held at zero (its
gradient is masked to zero; a key bias adds ``q . b`` to every score of a query, which the softmax
ignores, so this is exact either way). The tower and projector are replicated on every rank
(:func:`~megatron_longvideo.models.encode.mark_encode_replica`), like the SigLIP tower.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

from megatron_longvideo.data.audio import pack_windows, unpack_windows  # the tower's input format, made by the data pipeline
from megatron_longvideo.data.audio import audio_token_counts as window_tokens  # tokens of one window (one formula)

__all__ = ["AudioConfig", "AudioTower", "build_audio_tower", "pack_windows", "unpack_windows", "window_tokens"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AudioConfig:
    """Shape of the audio tower and projector (defaults: a tiny tower on Whisper's 30 s window;
    Qwen2-Audio-7B: 128 mel bins, d 1280, 32 layers, 20 heads, ffn 5120)."""

    num_mel_bins: int = 16
    """Log-mel bins per frame (Qwen2-Audio / Whisper large-v3: 128)."""
    hidden_size: int = 32
    """Encoder width (transformers' ``d_model``)."""
    num_layers: int = 2
    """Encoder depth."""
    num_attention_heads: int = 2
    """Encoder heads."""
    ffn_hidden_size: int = 64
    """Encoder MLP width."""
    max_source_positions: int = 1500
    """Positions after the stride-2 convolution; one window is twice as many mel frames (1500: 3000
    frames, 30 s at Whisper's 10 ms hop)."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon (transformers' default for this tower)."""
    max_windows: int = 1024
    """Longest audio the tower accepts, in windows (1024 x 30 s: 8.5 hours)."""
    freeze: bool = False
    """Freeze the encoder (convolutions, layers, final norm): it then runs without an autograd graph."""
    freeze_projector: bool = False
    """Freeze the projector too."""

    def __post_init__(self):
        for name in ("num_mel_bins", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                     "max_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_source_positions < 2:
            raise ValueError(f"max_source_positions must be at least 2 (one pooled token), got {self.max_source_positions}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")

    @property
    def window_frames(self) -> int:
        """Mel frames of one window (3000)."""
        return 2 * self.max_source_positions

    @property
    def tokens_per_window(self) -> int:
        """Tokens of a full window (750)."""
        return window_tokens(self.window_frames)

    @property
    def max_frames(self) -> int:
        """``max_windows`` under the name the encode path reads (its units are windows here)."""
        return self.max_windows

    def num_audio_tokens(self, num_mel_frames: int) -> int:
        """Placeholder tokens of an audio of ``num_mel_frames`` real mel frames cut into windows (all full
        but the last)."""
        if num_mel_frames < 1:
            raise ValueError(f"num_mel_frames must be positive, got {num_mel_frames}")
        full, rest = divmod(num_mel_frames, self.window_frames)
        return full * self.tokens_per_window + window_tokens(rest)

    @classmethod
    def qwen2_audio_7b(cls, **overrides) -> "AudioConfig":
        """The tower of Qwen2-Audio-7B (described, not run on CPU)."""
        base = dict(num_mel_bins=128, hidden_size=1280, num_layers=32, num_attention_heads=20, ffn_hidden_size=5120)
        base.update(overrides)
        return cls(**base)


def _layer_config(cfg: AudioConfig, params_dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size, kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        normalization="LayerNorm", layernorm_epsilon=cfg.norm_eps, add_bias_linear=True, add_qkv_bias=True,
        gated_linear_unit=False, activation_func=F.gelu, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False, params_dtype=params_dtype,
        use_cpu_initialization=True, pipeline_dtype=params_dtype)


def _projector_config(llm_hidden: int, params_dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=llm_hidden, num_attention_heads=1, add_bias_linear=True,
                             gradient_accumulation_fusion=False, params_dtype=params_dtype, use_cpu_initialization=True)


def _sinusoids(positions: int, dim: int) -> torch.Tensor:
    """Whisper's fixed position table ``[positions, dim]`` (sin half, cos half): our initial value."""
    half = dim // 2
    scale = torch.exp(-torch.arange(half, dtype=torch.float64, device="cpu") * (math.log(10000.0) / max(half - 1, 1)))
    angles = torch.arange(positions, dtype=torch.float64, device="cpu")[:, None] * scale[None, :]  # [P, d / 2]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(table, (0, dim - 2 * half)).float()


class AudioTower(torch.nn.Module):
    """Windows ``[k, num_mel_bins + 1, window_frames]`` -> LLM-space tokens ``[k, tokens_per_window,
    llm_hidden]`` (see the module docstring); the unit of parallel encoding is one window."""

    def __init__(self, cfg: AudioConfig, llm_hidden: int, groups, *, params_dtype=torch.float32,
                 attention_kernel: str = "auto"):
        super().__init__()
        from megatron.core.models.vision.multimodal_projector import MultimodalProjector
        from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
        from megatron.core.tensor_parallel import ColumnParallelLinear
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.mlp import MLPSubmodules
        from megatron.core.transformer.transformer_block import TransformerBlock

        from megatron_longvideo.attention.core import TileCoreAttention
        from megatron_longvideo.models.encode import mark_encode_replica
        from megatron_longvideo.parallel.context import SequenceContext
        from megatron_longvideo.parallel.groups import solo_collection

        self.cfg = cfg
        self.llm_hidden = llm_hidden
        pgs = solo_collection(groups)
        self.sequence_context = SequenceContext()
        d, kw = cfg.hidden_size, dict(dtype=params_dtype, device="cpu")
        self.conv1 = torch.nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1, **kw)
        self.conv2 = torch.nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1, **kw)
        self.position_embeddings = torch.nn.Parameter(_sinusoids(cfg.max_source_positions, d).to(params_dtype),
                                                      requires_grad=False)  # [P, d], stored, never trained
        spec = get_vit_layer_with_local_spec()
        spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.no_mask}  # the local ViT spec is causal
        spec.submodules.self_attention.submodules.core_attention = functools.partial(
            TileCoreAttention, sequence_context=self.sequence_context, kernel=attention_kernel)
        self.encoder = TransformerBlock(_layer_config(cfg, params_dtype), spec, post_layer_norm=False, pre_process=True,
                                        post_process=False, pg_collection=pgs)
        self.final_layernorm = torch.nn.LayerNorm(d, eps=cfg.norm_eps, **kw)
        self.projector = MultimodalProjector(_projector_config(llm_hidden, params_dtype),
                                             MLPSubmodules(linear_fc1=ColumnParallelLinear), projector_type="affine",
                                             input_size=d, tp_group=pgs.tp)
        head_dim = d // cfg.num_attention_heads
        is_key = torch.zeros(cfg.num_attention_heads, 3, head_dim, dtype=torch.bool, device="cpu")  # [q | k | v] per head
        is_key[:, 1] = True
        self.register_buffer("_key_bias", is_key.reshape(-1), persistent=False)
        for layer in self.encoder.layers:
            bias = layer.self_attention.linear_qkv.bias
            with torch.no_grad():
                bias.masked_fill_(self._key_bias, 0.0)
            bias.register_hook(self._mask_key_bias_grad)
        mark_encode_replica(self.parameters())
        if cfg.freeze:
            for module in (self.conv1, self.conv2, self.encoder, self.final_layernorm):
                module.requires_grad_(False)
        if cfg.freeze_projector:
            self.projector.requires_grad_(False)
        self.image_newline = None  # the encode path's hooks (models/encode.py): no separator token

    def _mask_key_bias_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(self._key_bias.to(grad.device), 0.0)

    # -- the encode path's protocol (models/encode.py) ------------------------------------------------
    @property
    def vcfg(self) -> AudioConfig:
        return self.cfg

    def per_frame_parameters(self):
        return self.parameters()

    def check_frames(self, windows: torch.Tensor, what: str = "audio") -> None:
        """Raise ``ValueError`` unless ``windows`` is one audio's packed windows (:func:`pack_windows`)."""
        cfg = self.cfg
        shape = (cfg.num_mel_bins + 1, cfg.window_frames)
        if windows.dim() != 3 or tuple(windows.shape[1:]) != shape:
            raise ValueError(f"{what}: expected packed windows [num_windows, {shape[0]}, {shape[1]}] (log-mel "
                             f"features plus the frame mask, see pack_windows), got shape {tuple(windows.shape)}")
        if not windows.is_floating_point():
            raise ValueError(f"{what}: expected float log-mel features, got dtype {windows.dtype}")
        mask = windows[:, -1]
        lengths = mask.sum(-1)
        prefix = torch.arange(shape[1], device=mask.device)[None, :] < lengths[:, None]
        if not torch.equal(mask, prefix.to(mask.dtype)):
            raise ValueError(f"{what}: the last row of each window must be its frame mask, ones then zeros")
        if windows.shape[0] and (bool((lengths[:-1] != shape[1]).any()) or float(lengths[-1]) < 1):
            raise ValueError(f"{what}: every window but the last must be full ({shape[1]} frames) and the last "
                             f"non-empty; got lengths {lengths.long().tolist()}")

    def video_units(self, windows: torch.Tensor) -> torch.Tensor:
        """The units parallel encoding splits: the windows themselves (no attention crosses one)."""
        return windows

    def num_real_tokens(self, windows: torch.Tensor) -> int:
        """Tokens an audio really gives: full windows' and its last window's real ones."""
        last = int(round(float(windows[-1, -1].sum())))
        return (windows.shape[0] - 1) * self.cfg.tokens_per_window + window_tokens(last)

    def encode_units(self, windows: torch.Tensor) -> torch.Tensor:
        return self(windows)

    # -- the tower ------------------------------------------------------------------------------------
    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """``[k, num_mel_bins + 1, window_frames]`` -> ``[k, tokens_per_window, llm_hidden]`` (every
        window's pooled tokens; past a partial window's real ones they are padding)."""
        from megatron_longvideo.attention.layout import SequenceLayout

        cfg = self.cfg
        positions = cfg.max_source_positions
        # host lengths for the layout: one small device-to-host copy per call
        lengths = windows[:, -1].detach().sum(-1).round().long().cpu()  # [k] real mel frames
        real = ((lengths - 1).div(2, rounding_mode="floor") + 1).tolist()  # real positions after the stride-2 conv
        # per window: segment 0 the real positions, segment 1 the padding (each run non-empty)
        rows = tuple(tuple(run for run in ((0, n, 0), (n, positions, 1)) if run[1] > run[0]) for n in real)
        layout = SequenceLayout(seq_len=positions, rows=rows, causal=False, shared_segment=None)
        features = windows[:, :-1].to(self.conv1.weight.dtype)  # [k, n_mels, F]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not cfg.freeze):
            x = F.gelu(self.conv1(features))  # [k, d, F]
            x = F.gelu(self.conv2(x))  # [k, d, P]
            x = x.permute(2, 0, 1) + self.position_embeddings[:, None, :]  # [P, k, d]: megatron's [s, b, h]
            with self.sequence_context.use(layout=layout):
                x = self.encoder(hidden_states=x, attention_mask=None)  # [P, k, d]
            x = F.avg_pool1d(x.permute(1, 2, 0), kernel_size=2, stride=2)  # [k, d, P // 2]
            x = self.final_layernorm(x.transpose(1, 2))  # [k, P // 2, d]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not cfg.freeze_projector):
            out = self.projector(x.transpose(0, 1).contiguous())  # [P // 2, k, llm_hidden]
        return out.transpose(0, 1)  # [k, P // 2, llm_hidden]


def build_audio_tower(cfg: AudioConfig, llm_hidden: int, groups, *, params_dtype=torch.float32, seed: int = 0,
                      attention_kernel: str = "auto", device=None) -> AudioTower:
    """The replicated tower, initialised on the CPU from ``seed`` alone (every rank the same weights,
    whatever its layout drew from the RNG before), then moved to ``device`` (default: the compute device)."""
    from megatron_longvideo.platform.device import to_compute_device

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = AudioTower(cfg, llm_hidden, groups, params_dtype=params_dtype, attention_kernel=attention_kernel)
    return to_compute_device(tower, device)
