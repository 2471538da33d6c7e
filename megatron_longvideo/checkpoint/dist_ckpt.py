"""Save and resume training with megatron-core ``dist_checkpointing`` (torch_dist backend).

One checkpoint holds, under one sharded state dict:

- ``model``: the model's ``sharded_state_dict()`` (TP/PP shards as global tensors: reshardable);
- ``optimizer``: megatron's ``optimizer.sharded_state_dict(model_sd)``; the distributed optimizer uses
  the ``fully_reshardable`` format (state gathered per parameter on DP rank 0 at save, sliced per rank at
  load: reshardable). ``fully_sharded_model_space`` fails in megatron-core 0.16.1 ("ShardedTensor.
  flattened_range is not supported"), ``dp_reshardable`` reshards over DP only;
- ``rng``: python / numpy / torch / CUDA generator states and megatron's RNG-tracker states of every
  rank (a ``ShardedObject`` over the world), restored only into the same layout;
- common (rank 0): step, scheduler state, data position (the loader's ``state_dict``), the parallel
  layout and the run's config; ``run_config.json`` repeats the config for people.

The folder protocol (``iter_N.tmp`` -> ``iter_N``, the ``latest`` marker, retention, manifest) is in
:mod:`megatron_longvideo.checkpoint.ckpt_files`. Before loading, the files are checked against the
manifest (each rank hashes a share) and the tensor shapes against this model's, so a missing shard, a
corrupt file or a checkpoint of another model shape is an error naming the file or the tensor.

What reshards (a different TP / PP / CP / DP layout at load): model weights; the optimizer state of the
plain megatron optimizer and of the distributed optimizer (``fully_reshardable``) between layouts with the
same optimizer kind; the scheduler, step and data position (the data position needs ``consumed_samples``
divisible by the new DP size). Tested: TP=2 -> TP=1 (DP=2) and -> CP=2, distributed optimizer DP=2 ->
CP=2. What does not: RNG states (skipped with a log line when the layout differs), and optimizer state
across optimizer kinds (plain <-> distributed use different keys: load with ``weights_only=True``, as
``--finetune`` does).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_longvideo.checkpoint.ckpt_files import (
    ASSETS_DIR,
    CONFIG_FILE,
    MANIFEST_FILE,
    CheckpointError,
    file_digest,
    iter_dir,
    latest_step,
    list_files,
    prune,
    read_assets,
    verify_file,
    write_assets,
    write_json_atomic,
    write_latest,
)
from megatron_longvideo.parallel.groups import ParallelGroups

__all__ = ["CheckpointError", "LoadedCheckpoint", "save_checkpoint", "load_checkpoint", "find_checkpoint",
           "has_training_state", "checkpoint_assets", "rng_state", "set_rng_state", "close_checkpoint_writer"]

log = logging.getLogger(__name__)
OPTIMIZER_FORMAT = "fully_reshardable"


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    """What :func:`load_checkpoint` restored."""

    path: str
    """The ``iter_N`` folder."""
    step: int
    """The step the checkpoint was saved at (0 for ``weights_only``)."""
    run_config: dict
    """The config the saving run recorded."""
    restored: tuple[str, ...]
    """Parts restored: some of model, optimizer, scheduler, data, rng."""
    assets: Optional[dict] = None
    """The checkpoint's ``hf/`` files (see :mod:`~megatron_longvideo.checkpoint.ckpt_files`) on rank 0,
    None elsewhere; pass them to every later :func:`save_checkpoint` of the run."""


# --------------------------------------------------------------------------------------------- #
# RNG
# --------------------------------------------------------------------------------------------- #
def rng_state() -> dict:
    """Every generator state of this rank (python, numpy, torch CPU, CUDA when present, megatron tracker)."""
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# --------------------------------------------------------------------------------------------- #
# state dicts
# --------------------------------------------------------------------------------------------- #
def _layout(groups: ParallelGroups) -> dict:
    c = groups.config
    return {"tp": c.tensor_parallel_size, "pp": c.pipeline_parallel_size, "cp": c.context_parallel_size,
            "dp": groups.dp_size, "world": dist.get_world_size()}


def _model_sd(model, groups: ParallelGroups) -> dict:
    from megatron_longvideo.models.llm import unwrap

    return unwrap(model).sharded_state_dict(metadata={"dp_cp_group": groups.dp_cp})


def _optimizer_sd(optimizer, model_sd: dict, *, is_loading: bool) -> dict:
    if is_loading:
        _init_distributed_optimizer_state(optimizer)
    metadata = {"distrib_optim_sharding_type": OPTIMIZER_FORMAT, "chained_optim_avoid_prefix": True}
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)


def _init_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer its Adam state (with ``step``) before a load request is built.

    Without TE / Apex megatron wraps torch's Adam, whose state appears at the first step, and the
    distributed optimizer's ``state_dict`` asserts a ``step`` entry. Megatron's own dummy step (zero
    gradients) creates it; the loaded values replace it.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer) and len(inner.optimizer.state) == 0:
            inner._init_optimizer_states_with_dummy_values()


def _load_optimizer(optimizer, state) -> None:
    """``optimizer.load_state_dict(state)``, working around megatron 0.16 with torch's Adam (no TE / Apex).

    For the distributed optimizer's ``fully_reshardable`` format, megatron copies every entry of torch
    Adam's per-parameter state from the loaded parameter state, which holds no ``step`` (the step comes
    from the param groups): a KeyError. The two halves are loaded separately, ``step`` set aside between.
    And the restored ``step`` is one tensor shared by all parameters (see below).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [state] if len(inners) == 1 else [state[k] for k in sorted(state)]
    for inner, st in zip(inners, states):
        if isinstance(inner, DistributedOptimizer) and st.get("param_state_sharding_type") == "fully_reshardable":
            param_state = st.pop("param_state")
            st.pop("param_state_sharding_type")
            inner.load_state_dict(st)
            steps = {p: s.pop("step") for p, s in inner.optimizer.state.items() if "step" in s}
            inner.load_parameter_state_from_fully_reshardable(param_state)
            for p, step in steps.items():
                inner.optimizer.state[p]["step"] = step
        else:
            inner.load_state_dict(st)
        # megatron hands every parameter the same ``step`` tensor, which torch's Adam then increments in
        # place once per parameter: each needs its own
        for per_param in inner.optimizer.state.values():
            if torch.is_tensor(per_param.get("step")):
                per_param["step"] = per_param["step"].clone()


def _rng_object(state):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world, rank = dist.get_world_size(), dist.get_rank()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _barrier():
    dist.barrier()


# --------------------------------------------------------------------------------------------- #
# save
# --------------------------------------------------------------------------------------------- #
def save_checkpoint(root: str, step: int, *, model, groups: ParallelGroups, optimizer=None, scheduler=None,
                    loader=None, run_config: Optional[dict] = None, keep: int = 0,
                    assets: Optional[dict] = None, common: Optional[dict] = None) -> str:
    """Save everything at ``step`` into ``root/iter_{step:07d}`` atomically; returns that folder.

    Collective over all ranks. ``keep > 0`` deletes all but the newest ``keep`` checkpoints afterwards.
    ``assets`` (rank 0; :attr:`LoadedCheckpoint.assets`) are written under ``hf/`` and covered by the
    manifest; ``common`` adds entries to the common state (e.g. the source of a converted checkpoint).
    """
    from megatron.core import dist_checkpointing

    from megatron_longvideo.checkpoint.writer import install_writer_queue

    install_writer_queue()  # megatron's writer queue manager, but one that dies with this process
    final = iter_dir(root, step)
    tmp = final + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that died
        os.makedirs(tmp)
    _barrier()

    model_sd = _model_sd(model, groups)
    state = {"model": model_sd, "rng": _rng_object(rng_state()), "step": step, "layout": _layout(groups),
             "run_config": run_config or {}, "model_config": _model_config(model), **(common or {})}
    if optimizer is not None:
        state["optimizer"] = _optimizer_sd(optimizer, model_sd, is_loading=False)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if loader is not None:
        state["data"] = loader.state_dict()
    dist_checkpointing.save(state, tmp)  # ends with a barrier: every rank's files are written
    if rank == 0 and assets:
        write_assets(tmp, assets)
    _barrier()

    manifest = _manifest(tmp)
    if rank == 0:
        write_json_atomic(os.path.join(tmp, CONFIG_FILE), run_config or {})
        write_json_atomic(os.path.join(tmp, MANIFEST_FILE), manifest)  # last: marks the folder complete
        if os.path.isdir(final):  # the same step saved again (e.g. a rerun): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_latest(root, step)
        removed = prune(root, keep)
        if removed:
            log.info("removed checkpoints of steps %s (keeping the newest %d)", removed, keep)
    _barrier()
    return final


def _model_config(model) -> Optional[dict]:
    """The model's config as a dict (a VLM's ``cfg``), so a converter can rebuild the model; else None."""
    from megatron_longvideo.checkpoint.hf_convert import _config_to_dict
    from megatron_longvideo.models.llm import unwrap

    cfg = getattr(unwrap(model), "cfg", None)
    return None if cfg is None else _config_to_dict(cfg)


def model_config_of(path: str):
    """The model config (an ``LLMConfig``, ``VLMConfig``, ``Qwen25VLConfig`` or ``Qwen2AudioConfig``) recorded in
    the checkpoint at ``path`` (a folder or a save root)."""
    from megatron.core import dist_checkpointing

    from megatron_longvideo.checkpoint.hf_convert import _config_from_dict

    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path}: no complete checkpoint")
    recorded = dist_checkpointing.load_common_state_dict(ckpt).get("model_config")
    if recorded is None:
        raise CheckpointError(f"{ckpt}: the checkpoint records no model config (saved by an older version)")
    return _config_from_dict(recorded)


def _manifest(tmp: str) -> dict:
    """Size and sha256 of every file of ``tmp``; each rank hashes every world-size-th file."""
    names = [list_files(tmp) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(names, src=0)
    mine = {n: file_digest(os.path.join(tmp, n)) for n in names[0][dist.get_rank() :: dist.get_world_size()]}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {"files": {k: v for part in gathered for k, v in part.items()}}


# --------------------------------------------------------------------------------------------- #
# load
# --------------------------------------------------------------------------------------------- #
def find_checkpoint(path: str) -> Optional[str]:
    """An ``iter_N`` folder for ``path``: itself if it is a checkpoint, else the latest under it; None if none."""
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    step = latest_step(path)
    return None if step is None else iter_dir(path, step)


def has_training_state(path: str) -> bool:
    """Whether the checkpoint at ``path`` holds optimizer state (a converted one, e.g. ``from-hf``, does not)."""
    from megatron.core import dist_checkpointing

    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path}: no complete checkpoint")
    return "optimizer" in dist_checkpointing.load_common_state_dict(ckpt)


def checkpoint_assets(path: str) -> Optional[str]:
    """The ``hf/`` folder of the checkpoint at ``path`` (a folder or a save root), or None."""
    ckpt = find_checkpoint(path) if path else None
    folder = None if ckpt is None else os.path.join(ckpt, ASSETS_DIR)
    return folder if folder is not None and os.path.isdir(folder) else None


def _verify_files(ckpt: str, *, checksum: bool) -> None:
    """Check the files against the manifest, a share per rank; raise the same error on every rank."""
    import json

    manifest_path = os.path.join(ckpt, MANIFEST_FILE)
    problems = []
    if not os.path.isfile(manifest_path):
        problems.append(f"missing file {manifest_path}: not a complete checkpoint of this library")
    else:
        try:
            with open(manifest_path) as f:
                files = json.load(f)["files"]
        except (ValueError, KeyError) as e:
            files = {}
            problems.append(f"corrupt file {manifest_path}: {e}")
        names = sorted(files)
        for name in names[dist.get_rank() :: dist.get_world_size()]:
            problem = verify_file(ckpt, name, files[name], checksum=checksum)
            if problem:
                problems.append(problem)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    problems = sorted({p for part in gathered for p in part})
    if problems:
        raise CheckpointError("cannot load checkpoint: " + "; ".join(problems))


def _check_shapes(ckpt: str, request: dict) -> None:
    """Every requested tensor exists in the checkpoint with the same global shape, or an error naming it."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    saved = load_sharded_metadata(ckpt)
    missing = []
    for item in nested_values(request):
        if not isinstance(item, (ShardedTensor, ShardedObject)):
            continue
        key = item.unique_key if isinstance(item, ShardedObject) else item.key  # objects: one entry per shard
        if key not in saved:
            missing.append(key)
            continue
        if isinstance(item, ShardedTensor) and tuple(saved[item.key].global_shape) != tuple(item.global_shape):
            raise CheckpointError(
                f"{ckpt}: tensor {item.key!r} has shape {tuple(saved[item.key].global_shape)} in the checkpoint "
                f"but {tuple(item.global_shape)} in this model: the checkpoint is from another model shape")
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{ckpt}: this model's {missing[:3]}{more} not in the checkpoint: it is from "
                              "another model, or saved with another optimizer (load weights only)")


def load_checkpoint(path: str, *, model, groups: ParallelGroups, optimizer=None, scheduler=None, loader=None,
                    weights_only: bool = False, verify_checksums: bool = True) -> LoadedCheckpoint:
    """Restore from ``path`` (an ``iter_N`` folder, or a save root: its latest complete checkpoint).

    ``weights_only`` restores the model alone (a finetune start: fresh optimizer, scheduler, data, step 0).
    Collective over all ranks.
    """
    from megatron.core import dist_checkpointing

    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path}: no complete checkpoint (no iter_* folder with a manifest, "
                              "and no checkpoint files)")
    _verify_files(ckpt, checksum=verify_checksums)
    common = dist_checkpointing.load_common_state_dict(ckpt)
    same_layout = common.get("layout") == _layout(groups)
    model_sd = _model_sd(model, groups)
    request = {"model": model_sd}
    restored = ["model"]
    if not weights_only:
        if optimizer is not None:
            if "optimizer" not in common:
                raise CheckpointError(f"{ckpt}: holds no optimizer state (saved without one); load weights only")
            request["optimizer"] = _optimizer_sd(optimizer, model_sd, is_loading=True)
        if same_layout:
            request["rng"] = _rng_object(rng_state())
        else:
            log.info("%s: saved with layout %s, loading into %s: RNG states are not restored",
                     ckpt, common.get("layout"), _layout(groups))
    _check_shapes(ckpt, request)
    loaded = dist_checkpointing.load(request, ckpt)

    from megatron_longvideo.models.llm import unwrap

    unwrap(model).load_state_dict(loaded["model"], strict=True)
    assets = read_assets(ckpt) if dist.get_rank() == 0 else None
    if weights_only:
        return LoadedCheckpoint(ckpt, 0, common.get("run_config", {}), tuple(restored), assets)
    if optimizer is not None:
        _load_optimizer(optimizer, loaded["optimizer"])
        restored.append("optimizer")
    if scheduler is not None and "scheduler" in common:
        scheduler.load_state_dict(common["scheduler"])
        restored.append("scheduler")
    if loader is not None and "data" in common:
        loader.load_state_dict(common["data"])
        restored.append("data")
    if "rng" in request:
        set_rng_state(loaded["rng"])
        restored.append("rng")
    return LoadedCheckpoint(ckpt, int(common["step"]), common.get("run_config", {}), tuple(restored), assets)


def close_checkpoint_writer() -> None:
    """Stop the queue-manager process megatron's torch_dist writer starts on the first save.

    It lives until the interpreter exits normally; a process that ends with ``os._exit`` (spawned test
    ranks) would leave it orphaned. Harmless to call when no save happened; the next save starts a new one.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = filesystem_async._results_queue
    manager = getattr(queue, "_manager", None)
    if manager is not None:
        manager.shutdown()
    filesystem_async._results_queue = None
