"""Safetensors shards on disk: a bounded-memory writer with an index, a one-tensor-at-a-time reader,
and tokenizer file copying. Errors name the file: a missing shard, a corrupt file, an index entry
that its shard does not hold.

Layout (what ``save_pretrained`` writes): one shard is ``model.safetensors``; several are
``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json`` (``metadata.total_size``
in bytes and ``weight_map``: tensor name -> shard file).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Iterable, Iterator, Optional, Union

import torch

__all__ = ["parse_size", "write_shards", "read_checkpoint", "checkpoint_names", "copy_tokenizer",
           "is_hf_tokenizer_folder", "SINGLE_FILE", "INDEX_FILE"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: Union[int, str]) -> int:
    """Bytes of ``size``: an int, or a string such as ``"5GB"``, ``"500MiB"``, ``"123"``."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"max_shard_size: expected bytes or a size like '5GB' / '500MiB', got {size!r}")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _progress(total: Optional[int], desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # a counter without a bar
        class _Plain:
            def __init__(self):
                self.n = 0

            def update(self, k=1):
                self.n += k
                if enabled and (total is None or self.n == total or self.n % 100 == 0):
                    print(f"{desc}: {self.n}/{total if total is not None else '?'}", flush=True)

            def close(self):
                pass

        return _Plain()
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


def write_shards(items: Iterable[tuple[str, torch.Tensor]], out_dir: str, *, max_shard_size: Union[int, str] = "5GB",
                 dtype: Optional[torch.dtype] = None, total: Optional[int] = None, progress: bool = True) -> list[str]:
    """Write ``(name, tensor)`` pairs as safetensors shards of at most ``max_shard_size`` bytes each
    (a single bigger tensor gets a shard of its own). Holds one shard in memory. Returns the files."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    os.makedirs(out_dir, exist_ok=True)
    for stale in [f for f in os.listdir(out_dir) if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", f)]:
        os.remove(os.path.join(out_dir, stale))  # a previous export's shards would be mixed with ours
    temp_files, weight_map, total_size = [], {}, 0
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    bar = _progress(total, "writing HF shards", progress)

    def flush():
        nonlocal shard, shard_bytes
        if not shard:
            return
        path = os.path.join(out_dir, f".partial-{len(temp_files):05d}.safetensors")
        save_file(shard, path, metadata={"format": "pt"})
        temp_files.append((path, list(shard)))
        shard, shard_bytes = {}, 0

    for name, t in items:
        if name in weight_map or name in shard:
            raise ValueError(f"{name}: written twice")
        t = t.detach().to("cpu", dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype).contiguous()
        size = t.numel() * t.element_size()
        if shard and shard_bytes + size > limit:
            flush()
        shard[name] = t
        shard_bytes += size
        total_size += size
        weight_map[name] = None
        bar.update(1)
    flush()
    bar.close()
    if not temp_files:
        raise ValueError("nothing to write: the state holds no tensors")
    files = []
    n = len(temp_files)
    for i, (path, names) in enumerate(temp_files):
        final = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(path, os.path.join(out_dir, final))
        files.append(final)
        for name in names:
            weight_map[name] = final
    if n > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    return files


def _shard_plan(hf_dir: str) -> dict[str, list[str]]:
    """shard file -> tensor names it should hold (empty list: all of the single file)."""
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: not a directory")
    index_path = os.path.join(hf_dir, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: corrupt safetensors index ({e})") from e
        plan: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            plan.setdefault(shard, []).append(name)
        missing = [s for s in plan if not os.path.exists(os.path.join(hf_dir, s))]
        if missing:
            raise FileNotFoundError(f"{os.path.join(hf_dir, missing[0])}: shard listed in {INDEX_FILE} is missing"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return plan
    if os.path.exists(os.path.join(hf_dir, SINGLE_FILE)):
        return {SINGLE_FILE: []}
    bins = [f for f in os.listdir(hf_dir) if f.endswith(".bin")]
    hint = f" (found {bins[0]}: PyTorch .bin checkpoints are not read; re-save with safe_serialization=True)" if bins else ""
    raise FileNotFoundError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _open(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error type for a bad header / truncated file
        raise ValueError(f"{path}: corrupt or unreadable safetensors file ({e})") from e


def checkpoint_names(hf_dir: str) -> list[str]:
    """Every tensor name of the checkpoint in ``hf_dir`` (reads headers only)."""
    names = []
    for shard, listed in _shard_plan(hf_dir).items():
        if listed:
            names += listed
        else:
            with _open(os.path.join(hf_dir, shard)) as f:
                names += list(f.keys())
    return names


def read_checkpoint(hf_dir: str, *, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the safetensors checkpoint in ``hf_dir``, one tensor at a time."""
    plan = _shard_plan(hf_dir)
    total = sum(len(v) for v in plan.values()) or None
    bar = _progress(total, "reading HF shards", progress)
    for shard, listed in plan.items():
        path = os.path.join(hf_dir, shard)
        with _open(path) as f:
            keys = set(f.keys())
            names = listed or sorted(keys)
            absent = [n for n in names if n not in keys]
            if absent:
                raise ValueError(f"{path}: {INDEX_FILE} lists {absent[0]} in this shard, but the shard does not hold it")
            for name in names:
                try:
                    t = f.get_tensor(name)
                except Exception as e:
                    raise ValueError(f"{path}: corrupt tensor {name} ({e})") from e
                bar.update(1)
                yield name, t
    bar.close()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.json", "chat_template.jinja",
                    "generation_config.json")


def is_hf_tokenizer_folder(folder) -> bool:
    """Whether ``folder`` holds a Hugging Face tokenizer (what ``AutoTokenizer`` and vLLM load by path)."""
    return any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer_config.json"))


def copy_tokenizer(tokenizer, out_dir: str) -> list[str]:
    """Put a tokenizer next to the weights: a HF tokenizer folder (its tokenizer files are copied), a
    sentencepiece ``.model`` file (copied as ``tokenizer.model``) or an object with ``save_pretrained``."""
    os.makedirs(out_dir, exist_ok=True)
    if hasattr(tokenizer, "save_pretrained"):
        return list(tokenizer.save_pretrained(out_dir))
    path = os.fspath(tokenizer)
    if os.path.isdir(path):
        names = [f for f in sorted(os.listdir(path)) if f in _TOKENIZER_FILES or (f.startswith("tokenizer") and os.path.isfile(os.path.join(path, f)))]
        if not any(n != "generation_config.json" for n in names):
            raise FileNotFoundError(f"{path}: no tokenizer files (expected one of {list(_TOKENIZER_FILES[:7])})")
        for n in names:
            shutil.copyfile(os.path.join(path, n), os.path.join(out_dir, n))
        return [os.path.join(out_dir, n) for n in names]
    if os.path.isfile(path):
        if not path.endswith(".model"):
            raise ValueError(f"{path}: expected a tokenizer folder or a sentencepiece .model file")
        dest = os.path.join(out_dir, "tokenizer.model")
        shutil.copyfile(path, dest)
        return [dest]
    raise FileNotFoundError(f"{path}: tokenizer not found")
