"""Vision side of the video-language model: SigLIP ViT + token merge/pooling + MLP projector.

Built from megatron-core parts: ``CLIPViTModel(model_subtype="siglip")`` with the local ViT layer
spec made bidirectional (megatron's local ViT spec is causal) and its core attention replaced by the
tile engine (:class:`~megatron_longvideo.attention.core.TileCoreAttention`: one full tile per frame
batch on a fused kernel, so no ``[patches, patches]`` score tensor is built for any frame), and
``MultimodalProjector`` (linear, exact GELU, linear). The tower and projector are replicated on every rank (tensor-parallel group of
one rank), because MR-SP splits a video's *frames* over ranks rather than the tower's weights.

Per frame: ViT features of the last layer, without the post-layernorm (as LLaVA-OneVision takes
them) -> optional 2x2 token merge (VILA style: 4 neighbours concatenated along channels, before the
projector) -> projector -> optional bilinear 2x downsampling of the g x g grid to ceil(g/2) x ceil(g/2)
(LLaVA-OneVision's video pooling) . One learned ``image_newline`` vector follows the last frame of
each video when ``newline`` is on.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

__all__ = ["VisionConfig", "VisionEncoder", "build_vision_encoder"]

_POOLING = ("none", "bilinear", "merge2x2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """Shape and behaviour of the vision tower and projector."""

    image_size: int = 32
    """Square frame size in pixels the tower takes."""
    patch_size: int = 8
    """ViT patch size; the grid is image_size / patch_size per side."""
    hidden_size: int = 32
    """ViT width."""
    num_layers: int = 2
    """ViT depth."""
    num_attention_heads: int = 2
    """ViT heads."""
    ffn_hidden_size: int = 64
    """ViT MLP width."""
    norm_eps: float = 1e-6
    """ViT LayerNorm epsilon."""
    pooling: str = "bilinear"
    """Per-frame token reduction: 'none', 'bilinear' (LLaVA-OneVision, after the projector) or
    'merge2x2' (VILA, channels of 2x2 neighbours concatenated before the projector; even grids)."""
    newline: bool = True
    """Append one learned newline embedding after the last frame of each video (LLaVA-OneVision)."""
    max_frames: int = 8192
    """Longest video (in frames) the encoder accepts."""
    freeze: bool = False
    """Freeze the ViT (the usual RL setting): it then runs without an autograd graph."""
    freeze_projector: bool = False
    """Freeze the projector too (and the newline embedding, which it trains with)."""

    def __post_init__(self):
        if not 1 <= self.patch_size <= self.image_size:
            raise ValueError(f"patch_size must be in [1, image_size={self.image_size}], got {self.patch_size}")
        if self.pooling not in _POOLING:
            raise ValueError(f"pooling must be one of {_POOLING}, got {self.pooling!r}")
        if self.pooling == "merge2x2" and self.grid % 2 != 0:
            raise ValueError(f"pooling='merge2x2' needs an even patch grid, got {self.grid}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        if not 1 <= self.max_frames <= 8192:
            raise ValueError(f"max_frames must be in [1, 8192], got {self.max_frames}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        if self.pooling == "none":
            return self.grid**2
        return math.ceil(self.grid / 2) ** 2

    def num_video_tokens(self, num_frames: int) -> int:
        """Placeholder tokens one video of ``num_frames`` frames takes in the LLM sequence."""
        return num_frames * self.tokens_per_frame + (1 if self.newline else 0)

    @classmethod
    def siglip_so400m(cls, **overrides) -> "VisionConfig":
        """SigLIP-so400m/14 at 384 px (LLaVA-OneVision's tower): 27x27 patches, 196 tokens per frame."""
        base = dict(image_size=384, patch_size=14, hidden_size=1152, num_layers=26, num_attention_heads=16,
                    ffn_hidden_size=4304, norm_eps=1e-6)
        base.update(overrides)
        return cls(**base)


def _vit_config(vcfg: VisionConfig, params_dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=vcfg.num_layers,
        hidden_size=vcfg.hidden_size,
        num_attention_heads=vcfg.num_attention_heads,
        ffn_hidden_size=vcfg.ffn_hidden_size,
        kv_channels=vcfg.hidden_size // vcfg.num_attention_heads,
        normalization="LayerNorm",
        layernorm_epsilon=vcfg.norm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=lambda x: F.gelu(x, approximate="tanh"),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        params_dtype=params_dtype,
        use_cpu_initialization=True,
        pipeline_dtype=params_dtype,
    )


def _projector_config(vcfg: VisionConfig, llm_hidden: int, params_dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=llm_hidden,
        ffn_hidden_size=llm_hidden,
        num_attention_heads=1,
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=F.gelu,  # exact erf GELU, as LLaVA-OneVision's projector
        bias_activation_fusion=False,
        gradient_accumulation_fusion=False,
        params_dtype=params_dtype,
        use_cpu_initialization=True,
    )


class VisionEncoder(torch.nn.Module):
    """Frames ``[n, 3, H, W]`` -> LLM-space tokens ``[n, tokens_per_frame, llm_hidden]``."""

    def __init__(self, vcfg: VisionConfig, llm_hidden: int, groups, *, params_dtype=torch.float32,
                 attention_kernel: str = "auto"):
        super().__init__()
        import functools

        from megatron_longvideo.attention.core import TileCoreAttention
        from megatron_longvideo.parallel.groups import solo_collection
        from megatron.core.models.vision.clip_vit_model import CLIPViTModel
        from megatron.core.models.vision.multimodal_projector import MultimodalProjector
        from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.identity_op import IdentityOp
        from megatron.core.transformer.mlp import MLPSubmodules

        self.vcfg = vcfg
        self.llm_hidden = llm_hidden
        pgs = solo_collection(groups)
        spec = get_vit_layer_with_local_spec()
        spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.no_mask}  # the local ViT spec is causal
        spec.submodules.self_attention.submodules.core_attention = functools.partial(TileCoreAttention, kernel=attention_kernel)
        self.vit = CLIPViTModel(
            _vit_config(vcfg, params_dtype),
            spec,
            ln_post_impl=IdentityOp,  # features before the post-layernorm
            add_class_token=False,
            class_token_len=0,
            patch_dim=vcfg.patch_size,
            # the stride-patch conv drops the image_size % patch_size edge pixels (SigLIP 384 px / 14: 27 x 27);
            # megatron asserts divisibility, so it is given the size the patches cover
            img_h=vcfg.grid * vcfg.patch_size,
            img_w=vcfg.grid * vcfg.patch_size,
            model_subtype="siglip",
            pg_collection=pgs,
        )
        proj_in = vcfg.hidden_size * (4 if vcfg.pooling == "merge2x2" else 1)
        self.projector = MultimodalProjector(
            _projector_config(vcfg, llm_hidden, params_dtype),
            MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            projector_type="mlp",
            input_size=proj_in,
            tp_group=pgs.tp,
        )
        self.image_newline = None
        if vcfg.newline:  # initialised on the CPU like the rest, moved with the module
            self.image_newline = torch.nn.Parameter(torch.randn(llm_hidden, dtype=params_dtype, device="cpu") * 0.02)
        # Parameters applied to each rank's own frames: their gradients are partial per rank.
        from megatron_longvideo.models.encode import mark_encode_replica

        mark_encode_replica(list(self.vit.parameters()) + list(self.projector.parameters()))
        if vcfg.freeze:
            self.vit.requires_grad_(False)
        if vcfg.freeze_projector:
            self.projector.requires_grad_(False)
            if self.image_newline is not None:
                self.image_newline.requires_grad_(False)

    @property
    def tokens_per_frame(self) -> int:
        return self.vcfg.tokens_per_frame

    def check_frames(self, frames: torch.Tensor, what: str = "frames") -> None:
        size = self.vcfg.image_size
        if frames.dim() != 4 or frames.shape[1] != 3 or frames.shape[2] != size or frames.shape[3] != size:
            raise ValueError(f"{what}: expected a float tensor [num_frames, 3, {size}, {size}], got shape {tuple(frames.shape)}")
        if not frames.is_floating_point():
            raise ValueError(f"{what}: expected normalised float frames, got dtype {frames.dtype}")

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``[n, 3, H, W]`` -> ``[n, tokens_per_frame, llm_hidden]`` (no newline; see encode)."""
        self.check_frames(frames)
        g = self.vcfg.grid
        if self.vcfg.freeze:
            with torch.no_grad():
                feats = self.vit(frames.to(self.vit.conv1.weight.dtype))  # [n, g*g, c]
        else:
            feats = self.vit(frames.to(self.vit.conv1.weight.dtype))
        n, _, c = feats.shape
        if self.vcfg.pooling == "merge2x2":
            # [n, g, g, c] -> [n, g/2, 2, g/2, 2, c] -> [n, g/2, g/2, 4c]
            feats = feats.reshape(n, g // 2, 2, g // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, (g // 2) ** 2, 4 * c)
        tokens = self._project(feats)  # [n, t, h]
        if self.vcfg.pooling == "bilinear":
            h = tokens.shape[-1]
            grid = tokens.reshape(n, g, g, h).permute(0, 3, 1, 2)  # [n, h, g, g]
            out = math.ceil(g / 2)
            grid = F.interpolate(grid, size=(out, out), mode="bilinear", align_corners=False)
            tokens = grid.permute(0, 2, 3, 1).reshape(n, out * out, h)
        return tokens

    def _project(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.transpose(0, 1)  # megatron MLP works on [s, b, h]
        if self.vcfg.freeze_projector:
            with torch.no_grad():
                x = self.projector(x)
        else:
            x = self.projector(x)
        return x.transpose(0, 1)


def build_vision_encoder(vcfg: VisionConfig, llm_hidden: int, groups, *, params_dtype=torch.float32, seed: int = 0,
                         attention_kernel: str = "auto", device=None) -> VisionEncoder:
    """The replicated vision encoder, initialised on the CPU from ``seed`` alone so that every rank
    (whatever its pipeline stage or TP layout consumed from the RNG before) holds the same weights, then
    moved to ``device`` (default: the rank's compute device)."""
    from megatron_longvideo.platform.device import to_compute_device

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = VisionEncoder(vcfg, llm_hidden, groups, params_dtype=params_dtype, attention_kernel=attention_kernel)
    return to_compute_device(encoder, device)
