"""Qwen2.5-VL's vision tower from megatron-core layers, with its window attention on the attention engine.

Patches: a video of ``T`` frames ``[T, 3, H, W]`` (``H, W`` multiples of 28) becomes ``t = ceil(T / 2)``
temporal patches (an odd last frame is repeated, as transformers' processors do) of ``h x w = H/14 x
W/14`` spatial patches, each flattened to ``3 * 2 * 14 * 14`` values, in the order transformers uses:
temporal patch, then 2 x 2 merge blocks row by row, then the four patches of a block.

Tower (``[N, 3*2*14*14]`` patches and ``grid_thw`` -> ``[N / 4, out_hidden]``):

1. Conv3d patch embedding (kernel = stride = (2, 14, 14), no bias), as a matmul on the flat patches.
2. 2-D rotary positions: each patch's (row, column) in its frame; half the rotary frequencies follow the
   row, half the column (``head_dim / 4`` each, base 10000).
3. Window order: merge blocks are regrouped into windows of ``window_size / 28`` blocks per side (112 px:
   4 x 4 blocks; edge windows are smaller), within one temporal patch.
4. megatron ``TransformerLayer``s (RMSNorm, q/k/v with bias, SwiGLU MLP with biases). Window layers attend
   within a window; the layers in ``fullatt_block_indexes`` attend within a whole temporal patch. Both are
   bidirectional segment layouts of the attention engine: no ``[N, N]`` tensor is built.
5. Merger: RMSNorm, the 4 patches of each merge block concatenated, Linear - exact GELU - Linear.
6. Back from window order to merge-block order.

No attention crosses a temporal patch, so splitting a video's temporal patches over the encode group is
exact. With ``encode_group="tp_cp"`` every TP rank encodes units of its own, so the tower is replicated over
TP (like the SigLIP one; :func:`~megatron_longvideo.models.encode.reduce_encode_replica_grads` sums its
gradients). With ``encode_group="cp"`` and TP > 1 the TP ranks of one CP rank encode the same units, so
the tower is sharded over TP instead (:func:`shards_over_tp`): attention heads (``linear_qkv`` column-,
``linear_proj`` row-parallel), the SwiGLU MLP and the merger's fc1 / fc2 (column / row). What stays
replicated, the patch embedding, the norms, the 2-D rotary and the row-parallel biases, acts on the full
residual stream, which every TP rank holds whole; the column-parallel inputs' backward all-reduces their
gradient over TP, so each rank's gradient of a replicated tensor is already the full one and no extra
reduction is needed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["QwenVisionConfig", "QwenVisionTower", "frames_to_patches", "rotary_positions", "window_order", "shards_over_tp"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class QwenVisionConfig:
    """Shape of the Qwen2.5-VL vision tower (defaults: a tiny one; Qwen2.5-VL-7B: depth 32, hidden 1280,
    intermediate 3420, 16 heads, out 3584, full attention at 7, 15, 23, 31)."""

    depth: int = 2
    hidden_size: int = 32
    intermediate_size: int = 48
    num_heads: int = 2
    out_hidden_size: int = 64
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    """Window side in pixels."""
    fullatt_block_indexes: tuple[int, ...] = (1,)
    """Layers (0-based) attending within a whole temporal patch instead of a window."""
    tokens_per_second: float = 2.0
    """Temporal position step of multimodal RoPE per second of video."""
    norm_eps: float = 1e-6
    max_frames: int = 8192
    """Longest video (in frames) the encoder accepts."""
    freeze: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"hidden_size / num_heads must be a multiple of 4 (2-D rotary), got "
                             f"{self.hidden_size} / {self.num_heads}")
        if any(not 0 <= i < self.depth for i in self.fullatt_block_indexes):
            raise ValueError(f"fullatt_block_indexes {self.fullatt_block_indexes} must lie in [0, depth={self.depth})")
        if self.window_size % (self.spatial_merge_size * self.patch_size):
            raise ValueError(f"window_size={self.window_size} must be a multiple of spatial_merge_size x patch_size")
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


def frames_to_patches(frames: torch.Tensor, cfg: QwenVisionConfig) -> tuple[torch.Tensor, list[int]]:
    """Normalised frames ``[T, 3, H, W]`` -> (patches ``[N, 3*2*14*14]`` in transformers' order, grid (t, h, w))."""
    T, C, H, W = frames.shape
    p, tp, m = cfg.patch_size, cfg.temporal_patch_size, cfg.spatial_merge_size
    if C != 3 or H % (p * m) or W % (p * m):
        raise ValueError(f"frames: expected [T, 3, H, W] with H and W multiples of {p * m}, got {tuple(frames.shape)}")
    if T % tp:  # an odd last frame is repeated, as transformers' Qwen2-VL processors do
        frames = torch.cat([frames, frames[-1:].expand(tp - T % tp, -1, -1, -1)])
    t, h, w = frames.shape[0] // tp, H // p, W // p
    x = frames.reshape(t, tp, C, h // m, m, p, w // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, h/m, w/m, m, m, C, tp, p, p]
    return x.reshape(t * h * w, C * tp * p * p), [t, h, w]


def rotary_positions(grid_thw: Sequence[Sequence[int]], spatial_merge_size: int = 2) -> torch.Tensor:
    """``[N, 2]`` (row, column) of every patch, in merge-block order."""
    m, out = spatial_merge_size, []
    for t, h, w in grid_thw:
        rows = torch.arange(h, device="cpu")[:, None].expand(h, w).reshape(h // m, m, w // m, m).permute(0, 2, 1, 3)
        cols = torch.arange(w, device="cpu")[None, :].expand(h, w).reshape(h // m, m, w // m, m).permute(0, 2, 1, 3)
        out.append(torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1).repeat(int(t), 1))
    return torch.cat(out)


def window_order(grid_thw: Sequence[Sequence[int]], cfg: QwenVisionConfig):
    """``(order [N / 4], window_ids [N], frame_ids [N])``: merge blocks in window order (an index into
    merge-block order), and per patch in that order the window and the temporal patch it belongs to."""
    side = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
    order, windows, frames, base, n_windows, n_frames = [], [], [], 0, 0, 0
    for t, h, w in grid_thw:
        gh, gw = h // cfg.spatial_merge_size, w // cfg.spatial_merge_size
        index = torch.arange(t * gh * gw, device="cpu").reshape(t, gh, gw)
        for f in range(t):
            for r0 in range(0, gh, side):
                for c0 in range(0, gw, side):
                    block = index[f, r0:r0 + side, c0:c0 + side].reshape(-1)
                    order.append(block + base)
                    windows += [n_windows] * (block.numel() * cfg.merge_unit)
                    frames += [n_frames] * (block.numel() * cfg.merge_unit)
                    n_windows += 1
            n_frames += 1
        base += t * gh * gw
    return (torch.cat(order), torch.tensor(windows, device="cpu"), torch.tensor(frames, device="cpu"))


def shards_over_tp(groups) -> bool:
    """Whether the tower is sharded over TP: the encode group leaves TP out (``encode_group="cp"``) and
    TP > 1, so the TP ranks of one CP rank encode the same units (see the module docstring)."""
    return groups.tp_size > 1 and groups.config.encode_group == "cp"


def _layer_config(cfg: QwenVisionConfig, params_dtype, tp: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=cfg.depth, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
        ffn_hidden_size=cfg.intermediate_size, kv_channels=cfg.head_dim, normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps, add_bias_linear=True, add_qkv_bias=True, gated_linear_unit=True,
        activation_func=F.silu, hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False, params_dtype=params_dtype,
        use_cpu_initialization=True, pipeline_dtype=params_dtype, tensor_model_parallel_size=tp)


def _merger_config(cfg: QwenVisionConfig, params_dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    width = cfg.hidden_size * cfg.merge_unit
    return TransformerConfig(num_layers=1, hidden_size=cfg.out_hidden_size, ffn_hidden_size=width, num_attention_heads=1,
                             add_bias_linear=True, gated_linear_unit=False, activation_func=F.gelu,
                             bias_activation_fusion=False, gradient_accumulation_fusion=False, params_dtype=params_dtype,
                             use_cpu_initialization=True)  # TP: the projector's tp_group


def _tower_collection(groups, sharded: bool):
    """The tower's process groups: the real TP group when sharded, else this rank alone; never CP (each
    rank encodes whole units) nor PP (the tower lives on the first stage)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_longvideo.parallel.groups import solo_collection

    solo = solo_collection(groups)
    if not sharded:
        return solo
    return ProcessGroupCollection(tp=groups.tp, cp=solo.cp, pp=solo.pp, dp=solo.dp, dp_cp=solo.dp_cp, tp_cp=solo.tp_cp,
                                  embd=None, pos_embd=None)


def _check_divisible(cfg: QwenVisionConfig, tp: int) -> None:
    for name in ("num_heads", "intermediate_size"):  # hidden_size * merge_unit follows from num_heads
        if getattr(cfg, name) % tp:
            raise ValueError(f"vision.{name}={getattr(cfg, name)} is not divisible by tensor_parallel_size={tp}: "
                             f"with encode_group='cp' the Qwen2.5-VL tower is sharded over TP (encode_group='tp_cp' "
                             f"replicates it instead)")


class QwenVisionTower(torch.nn.Module):
    """Patches ``[N, patch_dim]`` and their grids -> LLM-space tokens ``[N / 4, out_hidden_size]``.

    Replicated over TP, or sharded over it when :func:`shards_over_tp` (see the module docstring); the
    output is whole on every rank either way."""

    def __init__(self, cfg: QwenVisionConfig, groups, *, params_dtype=torch.float32, attention_kernel: str = "auto"):
        super().__init__()
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.models.vision.multimodal_projector import MultimodalProjector
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.mlp import MLPSubmodules
        from megatron.core.transformer.spec_utils import build_module

        from megatron_longvideo.attention.core import TileCoreAttention
        from megatron_longvideo.models.norm import RMSNorm
        from megatron_longvideo.parallel.context import SequenceContext

        self.cfg = cfg
        self.sharded = shards_over_tp(groups)
        tp = groups.tp_size if self.sharded else 1
        if self.sharded:
            _check_divisible(cfg, tp)
        self.tp_group = groups.tp  # sharded over it, or replicated over it (checkpoint replica ids)
        pgs = _tower_collection(groups, self.sharded)
        self.sequence_context = SequenceContext()
        config = _layer_config(cfg, params_dtype, tp)
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
        # checkpoint keys are the state-dict names in both layouts (the local spec renames norms to TE's names)
        spec.submodules.sharded_state_dict_keys_map = {}
        spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.no_mask}
        # the core gets pg_collection's TP group from SelfAttention, hence this rank's heads only
        spec.submodules.self_attention.submodules.core_attention = functools.partial(
            TileCoreAttention, sequence_context=self.sequence_context, kernel=attention_kernel)
        self.patch_embed = torch.nn.Linear(cfg.patch_dim, cfg.hidden_size, bias=False, dtype=params_dtype, device="cpu")
        self.layers = torch.nn.ModuleList(
            build_module(spec, config=config, layer_number=i + 1, pg_collection=pgs) for i in range(cfg.depth))
        self.merger_norm = RMSNorm(config, cfg.hidden_size, eps=cfg.norm_eps)
        self.merger = MultimodalProjector(_merger_config(cfg, params_dtype),
                                          MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                                          projector_type="mlp", input_size=cfg.hidden_size * cfg.merge_unit, tp_group=pgs.tp)
        half = cfg.head_dim // 2
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, half, 2, dtype=torch.float32, device="cpu") / half),
                             persistent=False)
        if not self.sharded:  # replicated over TP, applied to each rank's own frames
            from megatron_longvideo.models.encode import mark_encode_replica

            mark_encode_replica(self.parameters())
        if cfg.freeze:
            self.requires_grad_(False)
        self.image_newline = None  # the encode path's hooks (models/encode.py): no newline token

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """The tower for ``dist_checkpointing``: the same keys and full global shapes whether it is sharded
        or replicated (a checkpoint of either layout loads into the other). Replicated: one main replica
        over TP x DP x CP. Sharded: megatron's TP layers give their shards (SwiGLU's ``linear_fc1`` as
        gate and up fragments of cat(gate, up)); the rest is replicated over TP."""
        from megatron.core.transformer.utils import (ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint,
                                                     sharded_state_dict_default)

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        if not self.sharded:
            return make_sharded_tensors_for_checkpoint(self.state_dict(keep_vars=True), prefix, {}, sharded_offsets,
                                                       tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        sd = {}
        for name, module in self.named_children():
            if name == "layers":
                for i, layer in enumerate(module):
                    sd.update(layer.sharded_state_dict(f"{prefix}layers.{i}.", sharded_offsets, metadata))
            else:
                sd.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                     tp_group=self.tp_group))
        return sd

    @property
    def vcfg(self) -> QwenVisionConfig:
        return self.cfg

    def per_frame_parameters(self):
        return self.parameters()

    def check_frames(self, frames: torch.Tensor, what: str = "frames") -> None:
        q = self.cfg.patch_size * self.cfg.spatial_merge_size
        if frames.dim() != 4 or frames.shape[1] != 3 or frames.shape[2] % q or frames.shape[3] % q:
            raise ValueError(f"{what}: expected a float tensor [num_frames, 3, H, W] with H and W multiples of {q}, "
                             f"got shape {tuple(frames.shape)}")
        if not frames.is_floating_point():
            raise ValueError(f"{what}: expected normalised float frames, got dtype {frames.dtype}")

    def video_units(self, frames: torch.Tensor) -> torch.Tensor:
        """The units parallel encoding splits: ``[t, h / 2, w / 2, 4, patch_dim]``, one per temporal patch
        (no attention crosses one, so encoding them apart is exact)."""
        patches, (t, h, w) = frames_to_patches(frames, self.cfg)
        m = self.cfg.spatial_merge_size
        return patches.reshape(t, h // m, w // m, m * m, self.cfg.patch_dim)

    def encode_units(self, units: torch.Tensor) -> torch.Tensor:
        """``[k, h / 2, w / 2, 4, patch_dim]`` -> ``[k, h * w / 4, out_hidden]``."""
        k, gh, gw = units.shape[:3]
        m = self.cfg.spatial_merge_size
        tokens = self(units.reshape(-1, self.cfg.patch_dim), [[1, gh * m, gw * m]] * k)
        return tokens.reshape(k, gh * gw, -1)

    def forward(self, patches: torch.Tensor, grid_thw: Sequence[Sequence[int]]) -> torch.Tensor:
        from megatron_longvideo.attention.layout import SequenceLayout

        cfg, unit = self.cfg, self.cfg.merge_unit
        grid_thw = [[int(x) for x in g] for g in grid_thw]
        n = patches.shape[0]
        if n != sum(t * h * w for t, h, w in grid_thw) or patches.shape[1] != cfg.patch_dim:
            raise ValueError(f"patches: expected [{sum(t * h * w for t, h, w in grid_thw)}, {cfg.patch_dim}] for grids "
                             f"{grid_thw}, got {tuple(patches.shape)}")
        device = patches.device
        order, window_ids, frame_ids = window_order(grid_thw, cfg)
        order = order.to(device)
        x = self.patch_embed(patches.to(self.patch_embed.weight.dtype))  # [N, c]
        x = x.reshape(n // unit, unit, -1)[order].reshape(n, -1)
        rc = rotary_positions(grid_thw, cfg.spatial_merge_size).to(device)  # [N, 2]
        freqs = (rc[..., None].float() * self.inv_freq).flatten(1)  # [N, head_dim / 2]: rows, then columns
        freqs = freqs.reshape(n // unit, unit, -1)[order].reshape(n, -1)
        rotary = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]  # [N, 1, 1, head_dim]
        layouts = {full: SequenceLayout.from_segments(ids[None], causal=False, shared_segment=None)  # no shared segment
                   for full, ids in ((False, window_ids), (True, frame_ids))}
        hidden = x[:, None, :]  # [N, 1, c]: megatron layers take [s, b, h]
        grad = torch.is_grad_enabled() and not cfg.freeze
        with torch.set_grad_enabled(grad):
            for i, layer in enumerate(self.layers):
                with self.sequence_context.use(layout=layouts[i in cfg.fullatt_block_indexes]):
                    hidden, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary)
            merged = self.merger_norm(hidden).reshape(n // unit, 1, unit * cfg.hidden_size)
            out = self.merger(merged)[:, 0]  # [N / 4, out_hidden]
        return out[torch.argsort(order)]


def build_qwen_vision_tower(cfg: QwenVisionConfig, groups, *, params_dtype=torch.float32, seed: int = 0,
                            attention_kernel: str = "auto", device=None) -> QwenVisionTower:
    """The tower, initialised on the CPU from ``seed`` alone, then moved. Replicated: every rank the same;
    sharded: each rank keeps its slice of the same full tower (megatron's CPU initialisation draws the
    full weight and slices it, SwiGLU's fc1 with stride 2), so a seed gives the world=1 tower in any layout."""
    from megatron_longvideo.platform.device import to_compute_device

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = QwenVisionTower(cfg, groups, params_dtype=params_dtype, attention_kernel=attention_kernel)
    return to_compute_device(tower, device)

