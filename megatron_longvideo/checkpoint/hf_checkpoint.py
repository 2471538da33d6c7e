"""Hugging Face folders <-> this library's dist checkpoints, the two ends of a run that starts from public
weights and hands its result to transformers users.

``import_hf_checkpoint`` (``convert_checkpoint.py from-hf``) writes a dist checkpoint at step 0 that every
entry script takes with ``--load`` (weights only: it holds no optimizer state) and reshards to the run's
TP / PP / CP on load. Each converting rank builds only its shard of the model, on the meta device and
then as uninitialised host memory (no random init of billions of weights), and streams the HF tensors
into it one at a time: memory is one model shard plus one tensor. Under ``torchrun`` with TP / PP the
shards are split over the ranks (a Qwen2.5-VL tower too: it is built sharded over TP, each rank slicing
its part of q/k/v, gate/up and the merger out of the full tensors; a Qwen2-Audio tower is replicated, every
rank loading all of it); one process converts the whole model.
The checkpoint keeps under ``hf/`` what the weights do not carry: the source ``config.json``, the
tokenizer files and chat template, the generation and processor configs, ``unused.safetensors`` (every
source tensor the library does not use: SigLIP's pooling head and post-layernorm) and ``tensor_names.json`` (the source's tensor names, which
transformers versions spell differently); later saves of the run carry them forward.

``export_dist_checkpoint`` (``convert_checkpoint.py to-hf --dist-checkpoint``) rebuilds the model from the
config the checkpoint records, loads it in the dtype it was saved in (no cast), and streams it into the
HF writer with those ``hf/`` files, so HF -> ours -> HF reproduces every tensor bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["ensure_process_group", "build_empty_model", "hf_checkpoint_dtype", "import_hf_checkpoint",
           "export_dist_checkpoint", "load_on_one_process", "saved_dtype", "UNUSED_FILE"]

UNUSED_FILE = "unused.safetensors"
NAMES_FILE = "tensor_names.json"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_CARRIED = ("config.json", "generation_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
            "processor_config.json", "chat_template.json", "chat_template.jinja")


def ensure_process_group() -> None:
    """A gloo process group: the one ``torchrun`` describes, or a group of this process alone (and
    megatron's CPU mode where CUDA is absent)."""
    from megatron_longvideo.platform import enable_cpu_mode

    enable_cpu_mode()
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo")  # the converter moves host tensors only


def build_empty_model(cfg, groups, *, params_dtype=torch.float32):
    """This rank's shard of the model for ``cfg`` (an ``LLMConfig`` or a family's config) in host memory,
    left uninitialised: every parameter is about to be overwritten by a checkpoint."""
    from megatron_longvideo.models import build_model
    from megatron_longvideo.models.llm import LLMConfig, build_llm
    from megatron_longvideo.platform import enable_cpu_mode

    enable_cpu_mode()
    with torch.device("meta"):
        if isinstance(cfg, LLMConfig):
            model = build_llm(cfg, groups, params_dtype=params_dtype, device="cpu")
        else:
            model = build_model(cfg, groups, params_dtype=params_dtype, device="cpu")
    return _materialize(model)


def _materialize(model):
    """Meta tensors -> uninitialised host tensors, keeping each parameter's attributes (megatron marks TP
    sharding on them, which ``Module.to_empty`` would drop by making new parameters) and shared ones
    shared. The rotary frequencies (a non-persistent buffer) are left undefined too: a converter never
    runs the model."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in made:
                new = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                made[id(p)] = new
            module._parameters[name] = made[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    return model


def hf_checkpoint_dtype(hf_dir: str) -> torch.dtype:
    """The dtype most of the checkpoint's floating tensors have (read from the safetensors headers)."""
    from collections import Counter

    from safetensors import safe_open

    from megatron_longvideo.checkpoint.hf_io import _shard_plan

    counts: Counter = Counter()
    for shard in _shard_plan(hf_dir):
        with safe_open(os.path.join(hf_dir, shard), framework="pt") as f:
            for name in f.keys():
                code = f.get_slice(name).get_dtype()
                if code in _DTYPES:
                    counts[_DTYPES[code]] += 1
    return counts.most_common(1)[0][0] if counts else torch.float32


def _assets_of(hf_dir: str, unmapped: dict, tokenizer: Optional[str]) -> dict[str, bytes]:
    """The ``hf/`` files of a converted checkpoint (see the module docstring)."""
    from safetensors.torch import save

    from megatron_longvideo.checkpoint.hf_io import _TOKENIZER_FILES, checkpoint_names

    assets = {}
    for folder in [hf_dir] + ([tokenizer] if tokenizer else []):
        for name in sorted(os.listdir(folder)):
            if name in _CARRIED or name in _TOKENIZER_FILES:
                with open(os.path.join(folder, name), "rb") as f:
                    assets[name] = f.read()
    assets[NAMES_FILE] = json.dumps(checkpoint_names(hf_dir)).encode()  # the export writes the same names back
    if unmapped:
        assets[UNUSED_FILE] = save({k: v.contiguous() for k, v in unmapped.items()}, metadata={"format": "pt"})
    return assets


def _tower_sharding_groups(groups):
    """``groups`` with the encode group left to CP, so that at TP > 1 a Qwen2.5-VL tower is built sharded
    over TP (:func:`~megatron_longvideo.models.qwen2_5_vl.vision.shards_over_tp`): the checkpoint holds
    the same tensors in either tower layout, and sharding divides each converting rank's share of the tower
    by TP. A converter never encodes, so nothing else reads the encode group."""
    import dataclasses

    if groups.config.encode_group == "cp":
        return groups
    return dataclasses.replace(groups, config=dataclasses.replace(groups.config, encode_group="cp"), encode=groups.cp)


def import_hf_checkpoint(hf_dir: str, out: str, *, groups, dtype: Optional[torch.dtype] = None,
                         tokenizer: Optional[str] = None, progress: bool = True) -> str:
    """Convert the HF folder ``hf_dir`` into a dist checkpoint under the save root ``out`` (step 0) in the
    layout of ``groups``; collective over its ranks. ``dtype`` defaults to the checkpoint's own;
    ``tokenizer`` names a tokenizer folder when ``hf_dir`` has none. Returns the ``iter_0000000`` folder."""
    from megatron_longvideo.checkpoint.dist_ckpt import save_checkpoint
    from megatron_longvideo.checkpoint.full_state import load_full_state_items
    from megatron_longvideo.checkpoint.hf_convert import _hf_to_megatron, read_hf_config
    from megatron_longvideo.checkpoint.hf_io import read_checkpoint

    cfg = read_hf_config(hf_dir)
    dtype = dtype or hf_checkpoint_dtype(hf_dir)
    model = build_empty_model(cfg, _tower_sharding_groups(groups), params_dtype=dtype)
    unmapped: dict = {}
    rank0 = dist.get_rank() == 0
    # Qwen2.5-VL and Qwen2-Audio read the files twice: language model, then tower
    items = _hf_to_megatron(cfg, "all", lambda: read_checkpoint(hf_dir, progress=progress and rank0), unmapped)
    load_full_state_items(model, items, groups)
    assets = _assets_of(hf_dir, unmapped, tokenizer) if rank0 else None
    source = {"path": os.path.abspath(hf_dir), "dtype": str(dtype).replace("torch.", "")}
    return save_checkpoint(out, 0, model=model, groups=groups, assets=assets, common={"hf_source": source},
                           run_config={"stage": "from-hf", "hf": source["path"], "dtype": source["dtype"]})


def saved_dtype(ckpt: str) -> torch.dtype:
    """The dtype the model's weights were saved in (the most common one among its tensors)."""
    from collections import Counter

    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    counts = Counter(t.dtype for key, t in load_sharded_metadata(ckpt).items()
                     if key.startswith(("llm.", "vision.", "embedding.", "decoder.", "output_layer."))
                     and getattr(t, "dtype", None) is not None and t.dtype.is_floating_point)
    return counts.most_common(1)[0][0] if counts else torch.float32


@contextlib.contextmanager
def load_on_one_process(path: str):
    """``(config, model, loaded checkpoint, saved dtype, groups)`` of the dist checkpoint at ``path`` (any
    layout it was saved in), rebuilt in this one process in the dtype it was saved in; megatron's groups
    live for the block."""
    from megatron_longvideo.checkpoint.dist_ckpt import CheckpointError, find_checkpoint, load_checkpoint, model_config_of
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path}: no complete checkpoint")
    cfg = model_config_of(ckpt)
    ensure_process_group()
    if dist.get_world_size() != 1:
        raise ValueError("to-hf runs in one process (it reads any layout back into one): do not start it with torchrun")
    groups = initialize_parallel(ParallelConfig())
    try:
        stored = saved_dtype(ckpt)
        model = build_empty_model(cfg, groups, params_dtype=stored)
        loaded = load_checkpoint(ckpt, model=model, groups=groups, weights_only=True)
        yield cfg, model, loaded, stored, groups
    finally:
        destroy_parallel()


def export_dist_checkpoint(path: str, out_dir: str, *, part: str = "all", dtype: Optional[torch.dtype] = None,
                           tokenizer=None, max_shard_size="5GB", progress: bool = True) -> list[str]:
    """Write the dist checkpoint at ``path`` (any layout it was saved in) as a HF folder, on one process.

    ``dtype`` defaults to the saved one. The tokenizer is ``tokenizer`` if given, else the one the
    checkpoint carries under ``hf/``, else the ``--tokenizer`` its run recorded (when that path exists)."""
    from safetensors.torch import load as load_safetensors

    from megatron_longvideo.checkpoint.full_state import iter_full_state
    from megatron_longvideo.checkpoint.hf_convert import save_hf
    from megatron_longvideo.checkpoint.hf_io import _TOKENIZER_FILES

    with load_on_one_process(path) as (cfg, model, loaded, stored, _):
        assets = loaded.assets or {}
        passthrough = load_safetensors(assets[UNUSED_FILE]) if UNUSED_FILE in assets else {}
        source_config = json.loads(assets["config.json"]) if "config.json" in assets else None
        source_names = json.loads(assets[NAMES_FILE]) if NAMES_FILE in assets else None
        os.makedirs(out_dir, exist_ok=True)
        carried = [n for n in assets if n not in (UNUSED_FILE, NAMES_FILE, "config.json")
                   and (part == "all" or n not in ("preprocessor_config.json", "video_preprocessor_config.json",
                                                   "processor_config.json"))]
        if tokenizer is None and not any(n in _TOKENIZER_FILES and n != "generation_config.json" for n in carried):
            recorded = (loaded.run_config or {}).get("tokenizer")
            if recorded and os.path.exists(recorded):
                tokenizer = recorded
        for name in carried:
            with open(os.path.join(out_dir, name), "wb") as f:
                f.write(assets[name])
        files = save_hf(lambda: iter_full_state(model), cfg, out_dir, part=part, dtype=dtype or stored, tokenizer=tokenizer,
                        extra_tensors=passthrough, passthrough=passthrough, source_config=source_config,
                        source_names=source_names,
                        max_shard_size=max_shard_size, progress=progress)
        return sorted(set(files) | set(carried))
