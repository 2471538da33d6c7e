"""The checkpoint folder on disk: atomic directories, the ``latest`` marker, retention, a checksum manifest.

No torch.distributed here; :mod:`megatron_longvideo.checkpoint.dist_ckpt` decides which rank calls what.

Layout of a save root (Megatron-LM's names, so its tools find the latest step)::

    root/iter_0000100/              a complete checkpoint (dist_checkpointing torch_dist files,
                                    run_config.json, manifest.json, and hf/ when the run started
                                    from a Hugging Face checkpoint: see below)
    root/iter_0000200.tmp/          a save in progress, or one that died: never loaded
    root/latest_checkpointed_iteration.txt   the step of the newest complete checkpoint

A save writes into ``iter_N.tmp/``, adds ``manifest.json`` (size and sha256 of every file) last, renames
the folder to ``iter_N/`` and only then replaces the marker (write to a temporary file, ``os.replace``).
A crash at any point leaves the previous marker pointing at the previous complete checkpoint.

``hf/`` holds what a Hugging Face export needs beyond the weights, as ``from-hf`` found it: the source
``config.json``, tokenizer files and chat template, generation and processor configs, and
``unused.safetensors`` (tensors the library does not use, such as SigLIP's pooling head). Every later
save of a run that loaded such a checkpoint writes the same files again (:func:`read_assets`,
:func:`write_assets`), so the export at the end of SFT or RL still has them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Optional

__all__ = [
    "CheckpointError", "LATEST_FILE", "MANIFEST_FILE", "CONFIG_FILE", "iter_dir", "complete_steps",
    "latest_step", "write_latest", "prune", "list_files", "file_digest", "write_json_atomic", "verify_file",
    "ASSETS_DIR", "read_assets", "write_assets",
]

LATEST_FILE = "latest_checkpointed_iteration.txt"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "run_config.json"
ASSETS_DIR = "hf"
_ITER = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete, corrupt or from another model shape."""


def iter_dir(root: str, step: int) -> str:
    """``root/iter_{step:07d}``."""
    return os.path.join(root, f"iter_{step:07d}")


def _is_complete(path: str) -> bool:
    # manifest.json is written last, inside the .tmp folder, before the rename
    return os.path.isfile(os.path.join(path, MANIFEST_FILE))


def complete_steps(root: str) -> list[int]:
    """Steps of the complete checkpoints under ``root``, ascending (``.tmp`` folders are ignored)."""
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        m = _ITER.match(name)
        if m and _is_complete(os.path.join(root, name)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_step(root: str) -> Optional[int]:
    """The step the marker names, if its folder is complete; else the newest complete folder; else None."""
    marker = os.path.join(root, LATEST_FILE)
    if os.path.isfile(marker):
        with open(marker) as f:
            text = f.read().strip()
        if text.isdigit() and _is_complete(iter_dir(root, int(text))):
            return int(text)
    steps = complete_steps(root)
    return steps[-1] if steps else None


def write_json_atomic(path: str, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace`` (never half written)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_latest(root: str, step: int) -> None:
    """Point the marker at ``step`` atomically."""
    tmp = os.path.join(root, f"{LATEST_FILE}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(str(step))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST_FILE))


def prune(root: str, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` complete checkpoints and every stale ``.tmp`` folder older than
    the newest complete one; returns the deleted steps. ``keep <= 0`` keeps everything."""
    steps = complete_steps(root)
    if keep <= 0 or not steps:
        return []
    doomed = steps[:-keep]
    for step in doomed:
        shutil.rmtree(iter_dir(root, step), ignore_errors=True)
    for name in os.listdir(root):
        if name.endswith(".tmp") and _ITER.match(name[:-4]) and int(name[5:-4]) < steps[-1]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return doomed


def list_files(path: str) -> list[str]:
    """Every file under ``path``, as sorted relative paths (the manifest's keys)."""
    out = []
    for base, _, names in os.walk(path):
        for name in names:
            out.append(os.path.relpath(os.path.join(base, name), path))
    return sorted(out)


def file_digest(path: str, chunk: int = 1 << 22) -> dict:
    """``{"size": bytes, "sha256": hex}`` of one file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            size += len(block)
            h.update(block)
    return {"size": size, "sha256": h.hexdigest()}


def verify_file(ckpt: str, name: str, expected: dict, *, checksum: bool = True) -> Optional[str]:
    """None if ``ckpt/name`` matches its manifest entry, else a message naming the file and the problem."""
    path = os.path.join(ckpt, name)
    if not os.path.isfile(path):
        return f"missing file {path} (listed in {MANIFEST_FILE}): the checkpoint is incomplete"
    size = os.path.getsize(path)
    if size != expected["size"]:
        return f"corrupt file {path}: {size} bytes, the manifest says {expected['size']} (truncated or overwritten)"
    if checksum and file_digest(path)["sha256"] != expected["sha256"]:
        return f"corrupt file {path}: sha256 differs from {MANIFEST_FILE} (the bytes changed after the save)"
    return None


def read_assets(ckpt: str) -> dict[str, bytes]:
    """The files of ``ckpt/hf/`` (relative path -> bytes); empty when the checkpoint has none. They are
    small (tokenizer, configs, a few unused tensors), so a run holds them in memory between saves."""
    base = os.path.join(ckpt, ASSETS_DIR)
    if not os.path.isdir(base):
        return {}
    out = {}
    for name in list_files(base):
        with open(os.path.join(base, name), "rb") as f:
            out[name] = f.read()
    return out


def write_assets(folder: str, assets: dict[str, bytes]) -> None:
    """Write ``assets`` (from :func:`read_assets`) under ``folder/hf/``."""
    for name, data in assets.items():
        path = os.path.join(folder, ASSETS_DIR, name)
        if os.path.isabs(name) or os.path.normpath(name).startswith(".."):
            raise CheckpointError(f"asset name {name!r} leaves the {ASSETS_DIR}/ folder")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
