"""Process groups for the multimodal sequence-parallel layout.

Megatron-Core's rank grid gives TP, PP, CP and DP. On top of it we name one more group, the
**encode group**: the ranks that hold the same sample and therefore split its video frames between
them. By default that is every tensor-and-context-parallel rank of a pipeline stage (all of them
encode); ``encode_group="cp"`` restricts it to the CP group.

Groups reach our code as one frozen :class:`ParallelGroups` passed explicitly. Nothing here keeps a
module-level global of its own; megatron's ``parallel_state`` keeps its own, and
:func:`destroy_parallel` clears them so a process can initialize again.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["ParallelConfig", "ParallelGroups", "initialize_parallel", "destroy_parallel", "single_rank_groups",
           "solo_collection"]

_CP_COMM_TYPES = ("all_gather", "a2a", "p2p")
_ENCODE_GROUPS = ("tp_cp", "cp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """The parallel layout of a run."""

    tensor_parallel_size: int = 1
    """Megatron tensor-parallel degree (TP)."""
    pipeline_parallel_size: int = 1
    """Megatron pipeline-parallel degree (PP)."""
    context_parallel_size: int = 1
    """Context-parallel degree (CP): the long sequence is sharded over this many ranks."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism inside the TP group (needs TP > 1)."""
    cp_comm_type: str = "all_gather"
    """CP attention communication: 'all_gather' (K/V gathered, exact), 'a2a' (Ulysses: sequence
    sharding swapped for head sharding) or 'p2p' (ring: K/V blocks passed around the CP group)."""
    encode_group: str = "tp_cp"
    """Ranks that split one video's frames: 'tp_cp' (all TP x CP ranks of a stage) or 'cp'."""

    def __post_init__(self):
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.cp_comm_type not in _CP_COMM_TYPES:
            raise ValueError(f"cp_comm_type must be one of {_CP_COMM_TYPES}, got {self.cp_comm_type!r}")
        if self.encode_group not in _ENCODE_GROUPS:
            raise ValueError(f"encode_group must be one of {_ENCODE_GROUPS}, got {self.encode_group!r}")
        if self.sequence_parallel and self.tensor_parallel_size == 1:
            raise ValueError("sequence_parallel needs tensor_parallel_size > 1")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """DP degree for ``world_size`` ranks; raises ValueError when the layout does not divide it."""
        if world_size % self.model_parallel_size != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_parallel_size x "
                f"pipeline_parallel_size x context_parallel_size = {self.tensor_parallel_size} x "
                f"{self.pipeline_parallel_size} x {self.context_parallel_size}"
            )
        return world_size // self.model_parallel_size

    def check_model(self, *, num_attention_heads: int, num_query_groups: Optional[int] = None) -> None:
        """Raise ValueError when the model's heads cannot be split by this layout."""
        groups = num_query_groups or num_attention_heads
        tp = self.tensor_parallel_size
        if num_attention_heads % tp != 0:
            raise ValueError(f"num_attention_heads={num_attention_heads} is not divisible by tensor_parallel_size={tp}")
        if groups % tp != 0:
            raise ValueError(f"num_query_groups={groups} is not divisible by tensor_parallel_size={tp}")
        if self.cp_comm_type == "a2a" and self.context_parallel_size > 1:
            heads_per_tp = num_attention_heads // tp
            if heads_per_tp % self.context_parallel_size != 0:
                raise ValueError(
                    f"cp_comm_type='a2a' (Ulysses) splits heads over CP: num_attention_heads / "
                    f"tensor_parallel_size = {heads_per_tp} is not divisible by "
                    f"context_parallel_size={self.context_parallel_size}"
                )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelGroups:
    """The process groups our code uses, passed explicitly. Sizes and ranks are read from groups."""

    config: ParallelConfig
    """The layout these groups realise."""
    tp: Optional[dist.ProcessGroup]
    """Tensor-parallel group."""
    pp: Optional[dist.ProcessGroup]
    """Pipeline-parallel group."""
    cp: Optional[dist.ProcessGroup]
    """Context-parallel group (the LLM sequence is sharded over it)."""
    dp: Optional[dist.ProcessGroup]
    """Data-parallel group (without CP)."""
    dp_cp: Optional[dist.ProcessGroup]
    """Data x context parallel group: megatron DDP reduces LLM gradients over it."""
    tp_cp: Optional[dist.ProcessGroup]
    """Tensor x context parallel group: the ranks of one pipeline stage that hold the same sample."""
    encode: Optional[dist.ProcessGroup]
    """Ranks that split the frames of one video (``config.encode_group``)."""
    pg_collection: object = None
    """megatron-core ProcessGroupCollection for the same groups (passed to megatron models)."""
    solo: Optional[dist.ProcessGroup] = None
    """A group of this rank alone: modules replicated on every rank (the vision tower, which each
    rank runs on its own frames) are built with it as their TP group."""

    @staticmethod
    def size(group: Optional[dist.ProcessGroup]) -> int:
        return 1 if group is None else dist.get_world_size(group)

    @staticmethod
    def rank(group: Optional[dist.ProcessGroup]) -> int:
        return 0 if group is None else dist.get_rank(group)

    @property
    def tp_size(self) -> int:
        return self.size(self.tp)

    @property
    def cp_size(self) -> int:
        return self.size(self.cp)

    @property
    def cp_rank(self) -> int:
        return self.rank(self.cp)

    @property
    def dp_size(self) -> int:
        return self.size(self.dp)

    @property
    def dp_rank(self) -> int:
        return self.rank(self.dp)

    @property
    def encode_includes_tp(self) -> bool:
        """Whether the encode group spans TP ranks (then TP replicas of the LLM share its frames)."""
        return self.config.encode_group == "tp_cp" and self.tp_size > 1

    @property
    def encode_size(self) -> int:
        return self.size(self.encode)

    @property
    def encode_rank(self) -> int:
        return self.rank(self.encode)


def single_rank_groups(config: Optional[ParallelConfig] = None) -> ParallelGroups:
    """Groups for code that runs without torch.distributed (every group has one rank)."""
    config = config or ParallelConfig()
    if config.model_parallel_size != 1:
        raise ValueError("single_rank_groups needs a layout with every parallel size equal to 1")
    return ParallelGroups(config=config, tp=None, pp=None, cp=None, dp=None, dp_cp=None, tp_cp=None, encode=None)


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize_parallel(
    config: ParallelConfig,
    *,
    seed: int = 1234,
    backend: Optional[str] = None,
    num_attention_heads: Optional[int] = None,
    num_query_groups: Optional[int] = None,
) -> ParallelGroups:
    """Initialize torch.distributed (if needed) and megatron's model parallelism; return the groups.

    Uses the environment set by torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) when the default
    process group does not exist yet. On a CPU-only torch call
    :func:`megatron_longvideo.platform.enable_cpu_mode` first.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    if not dist.is_initialized():
        backend = backend or _default_backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    world_size = dist.get_world_size()
    config.data_parallel_size(world_size)  # validates divisibility
    if num_attention_heads is not None:
        config.check_model(num_attention_heads=num_attention_heads, num_query_groups=num_query_groups)
    if ps.model_parallel_is_initialized():
        raise RuntimeError("megatron model parallelism is already initialized: call destroy_parallel() first")

    ps.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_parallel_size,
        pipeline_model_parallel_size=config.pipeline_parallel_size,
        context_parallel_size=config.context_parallel_size,
        create_gloo_process_groups=dist.get_backend() != "gloo",
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)

    tp_cp = ps.get_tensor_and_context_parallel_group()
    cp = ps.get_context_parallel_group()
    solo, _ = dist.new_subgroups(group_size=1)
    return ParallelGroups(
        config=config,
        tp=ps.get_tensor_model_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        cp=cp,
        dp=ps.get_data_parallel_group(),
        dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
        tp_cp=tp_cp,
        encode=tp_cp if config.encode_group == "tp_cp" else cp,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        solo=solo,
    )


def destroy_parallel(*, destroy_process_group: bool = False) -> None:
    """Tear down megatron's model-parallel state (and optionally the default process group)."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()


def solo_collection(groups: ParallelGroups):
    """A megatron ``ProcessGroupCollection`` of this rank alone on every axis, for modules replicated on
    every rank but built from megatron layers that take process groups (the vision towers)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    solo = groups.solo
    if solo is None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError("solo_collection: needs torch.distributed initialized (initialize_parallel)")
        solo, _ = dist.new_subgroups(group_size=1)
    return ProcessGroupCollection(tp=solo, cp=solo, pp=solo, dp=solo, dp_cp=solo, tp_cp=solo, embd=None, pos_embd=None)
