"""Cache of video embeddings, so a video is encoded once and reused by every pass that needs it.

An entry is the gathered per-frame embedding of one video ``[num_frames * tokens_per_frame, h]``
(without the newline, which is a trainable parameter applied after the cache). Its key binds:

* the video's content (:func:`content_id_of_file` hashes the file bytes, :func:`content_id_of_frames`
  the decoded frames),
* the frame-sampling parameters (fps, number of frames, size, normalisation: any dict),
* the vision tower + projector weights (:func:`weights_version`, a fingerprint of their values),

so an entry can only be served for the same frames encoded by the same weights: after a weight
update the key changes and stale entries are never returned (they age out of the LRU).

Two tiers: memory, bounded in bytes with LRU eviction; and an optional persistent tier on disk
(safetensors, one file per entry, written to a temporary name and renamed into place), meant for a
frozen tower across epochs and runs. Counters: hits (memory and disk), misses, evictions, writes.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Optional

import torch

__all__ = [
    "VideoEmbeddingCache",
    "CacheStats",
    "content_id_of_file",
    "content_id_of_frames",
    "weights_version",
    "cache_key",
]


def content_id_of_file(path: str, *, chunk_bytes: int = 1 << 22) -> str:
    """sha1 of a file's bytes (streamed; memory stays at ``chunk_bytes``)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def content_id_of_frames(frames: torch.Tensor) -> str:
    """sha1 of decoded frames (shape, dtype and values)."""
    t = frames.detach().contiguous().cpu()
    h = hashlib.sha1(f"{tuple(t.shape)}|{t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def weights_version(module: torch.nn.Module) -> str:
    """Fingerprint of a module's parameter and buffer values.

    CPU tensors are hashed byte for byte. CUDA tensors are reduced on the device to two float64
    checksums each (plain sum and a position-weighted sum), so a multi-GB tower is fingerprinted
    without copying it to the host; any real update changes them.
    """
    h = hashlib.sha1()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        if t.device.type == "cpu":
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            flat = t.detach().reshape(-1).double()
            ramp = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64).remainder_(1009.0)
            h.update(repr((flat.sum().item(), (flat * ramp).sum().item())).encode())
    return h.hexdigest()


def cache_key(content_id: str, sampling: dict, version: str) -> str:
    """Key of one video's embedding: content, sampling parameters and weights version."""
    payload = json.dumps({"content": content_id, "sampling": sampling, "weights": version}, sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()


@dataclasses.dataclass
class CacheStats:
    """Counters of a :class:`VideoEmbeddingCache`."""

    hits: int = 0
    """Lookups served from memory."""
    disk_hits: int = 0
    """Lookups served from the persistent tier."""
    misses: int = 0
    """Lookups that found nothing."""
    evictions: int = 0
    """Entries dropped from memory to stay under the byte bound."""
    writes: int = 0
    """Entries written to the persistent tier."""

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.disk_hits + self.misses
        return (self.hits + self.disk_hits) / total if total else 0.0


class VideoEmbeddingCache:
    """Byte-bounded LRU of video embeddings with an optional on-disk tier (see module docstring)."""

    def __init__(self, *, max_bytes: int = 2 << 30, persist_dir: Optional[str] = None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.persist_dir = persist_dir
        if persist_dir:
            os.makedirs(persist_dir, exist_ok=True)
        self._entries: "collections.OrderedDict[str, torch.Tensor]" = collections.OrderedDict()
        self._bytes = 0
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _path(self, key: str) -> str:
        return os.path.join(self.persist_dir, f"{key}.safetensors")

    def contains(self, key: str) -> bool:
        """Whether ``key`` would be served (memory or disk), without touching counters or LRU order."""
        return key in self._entries or bool(self.persist_dir and os.path.exists(self._path(key)))

    def get(self, key: str, device=None) -> Optional[torch.Tensor]:
        """The cached embedding for ``key`` (moved to ``device``), or None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry.to(device) if device is not None else entry
        if self.persist_dir and os.path.exists(self._path(key)):
            from safetensors.torch import load_file

            entry = load_file(self._path(key))["embedding"]
            self.stats.disk_hits += 1
            self._insert(key, entry)
            return entry.to(device) if device is not None else entry
        self.stats.misses += 1
        return None

    def put(self, key: str, embedding: torch.Tensor, *, persist: bool = True) -> None:
        """Store a (detached) embedding; also on disk when the persistent tier is on and ``persist``."""
        embedding = embedding.detach()
        self._insert(key, embedding)
        if self.persist_dir and persist and not os.path.exists(self._path(key)):
            from safetensors.torch import save_file

            fd, tmp = tempfile.mkstemp(dir=self.persist_dir, prefix=".tmp-", suffix=".safetensors")
            os.close(fd)
            try:
                save_file({"embedding": embedding.contiguous().cpu()}, tmp)
                os.replace(tmp, self._path(key))  # atomic: readers see the whole file or none
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            self.stats.writes += 1

    def _insert(self, key: str, embedding: torch.Tensor) -> None:
        size = embedding.numel() * embedding.element_size()
        if key in self._entries:
            old = self._entries.pop(key)
            self._bytes -= old.numel() * old.element_size()
        if size > self.max_bytes:
            return  # larger than the whole budget: served from disk only, if persisted
        self._entries[key] = embedding
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.numel() * evicted.element_size()
            self.stats.evictions += 1

    def clear(self) -> None:
        """Drop the memory tier (the disk tier stays)."""
        self._entries.clear()
        self._bytes = 0
