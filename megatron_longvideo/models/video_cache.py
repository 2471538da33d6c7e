"""Cache of video embeddings, so a video is encoded once and reused by every pass that needs it.

An entry is the gathered per-frame embedding of one video ``[num_frames * tokens_per_frame, h]``
(without the newline, which is a trainable parameter applied after the cache). Its key binds:

* the video's content (:func:`content_id_of_file` hashes the file bytes, :func:`content_id_of_frames`
  the decoded frames),
* the frame-sampling parameters (fps, number of frames, size, normalisation: any dict),
* the vision tower + projector weights (:func:`weights_version`, a fingerprint of their values),

so an entry can only be served for the same frames encoded by the same weights: after a weight
update the key changes and stale entries are never returned (they age out of the LRU).

Three tiers: memory on the device the embeddings were computed on (the GPU in training), bounded
in bytes with LRU eviction; an optional host tier (``host_bytes``: what the device tier evicts is
kept in CPU memory, pinned where CUDA exists, and moved back to the device when asked for again);
and an optional persistent tier on disk (safetensors, one file per entry, written to a temporary
name and renamed into place), meant for a frozen tower across epochs and runs. Counters: hits
(device, host and disk), misses, evictions (to the host tier or dropped), writes.
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

    CPU tensors are hashed byte for byte. Device tensors are reduced on the device to two float64
    checksums each (plain sum and a position-weighted sum), so a multi-GB tower is fingerprinted
    without copying it to the host; any real update changes them. All checksums come back to the host
    in one copy (one device sync per fingerprint, i.e. per model and step).
    """
    h = hashlib.sha1()
    sums = []
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        if t.device.type == "cpu":
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            flat = t.detach().reshape(-1).double()
            ramp = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64).remainder_(1009.0)
            sums.append(torch.stack([flat.sum(), (flat * ramp).sum()]))
    if sums:
        h.update(repr(torch.stack(sums).cpu().tolist()).encode())
    return h.hexdigest()


def cache_key(content_id: str, sampling: dict, version: str) -> str:
    """Key of one video's embedding: content, sampling parameters and weights version."""
    payload = json.dumps({"content": content_id, "sampling": sampling, "weights": version}, sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()


@dataclasses.dataclass
class CacheStats:
    """Counters of a :class:`VideoEmbeddingCache`."""

    hits: int = 0
    """Lookups served from memory (the device tier, or the host tier: see ``host_hits``)."""
    host_hits: int = 0
    """Of ``hits``, those served from the host tier (moved back to the device)."""
    disk_hits: int = 0
    """Lookups served from the persistent tier."""
    misses: int = 0
    """Lookups that found nothing."""
    evictions: int = 0
    """Entries the device tier evicted to stay under its byte bound (to the host tier when it has room)."""
    host_evictions: int = 0
    """Entries dropped from the host tier to stay under its byte bound."""
    writes: int = 0
    """Entries written to the persistent tier."""

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.disk_hits + self.misses
        return (self.hits + self.disk_hits) / total if total else 0.0


class VideoEmbeddingCache:
    """Byte-bounded LRU of video embeddings with an optional on-disk tier (see module docstring)."""

    def __init__(self, *, max_bytes: int = 2 << 30, host_bytes: int = 0, persist_dir: Optional[str] = None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if host_bytes < 0:
            raise ValueError(f"host_bytes must be >= 0, got {host_bytes}")
        self.max_bytes = max_bytes
        self.host_bytes = host_bytes
        self.persist_dir = persist_dir
        if persist_dir:
            os.makedirs(persist_dir, exist_ok=True)
        self._entries: "collections.OrderedDict[str, torch.Tensor]" = collections.OrderedDict()
        self._bytes = 0
        self._host: "collections.OrderedDict[str, tuple[torch.Tensor, torch.device]]" = collections.OrderedDict()
        self._host_used = 0
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries) + len(self._host)

    @property
    def nbytes(self) -> int:
        """Bytes held by the device tier."""
        return self._bytes

    @property
    def host_nbytes(self) -> int:
        """Bytes held by the host tier."""
        return self._host_used

    def _path(self, key: str) -> str:
        return os.path.join(self.persist_dir, f"{key}.safetensors")

    def contains(self, key: str) -> bool:
        """Whether ``key`` would be served (memory or disk), without touching counters or LRU order."""
        return key in self._entries or key in self._host or bool(self.persist_dir and os.path.exists(self._path(key)))

    def get(self, key: str, device=None) -> Optional[torch.Tensor]:
        """The cached embedding for ``key`` (moved to ``device``), or None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry.to(device) if device is not None else entry
        if key in self._host:  # back to the device it was computed on (or the one asked for), re-admitted
            host, home = self._host.pop(key)
            self._host_used -= _size(host)
            self.stats.hits += 1
            self.stats.host_hits += 1
            entry = host.to(device if device is not None else home, non_blocking=True)
            self._insert(key, entry)
            return entry
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
        size = _size(embedding)
        if key in self._entries:
            self._bytes -= _size(self._entries.pop(key))
        if key in self._host:
            self._host_used -= _size(self._host.pop(key)[0])
        if size > self.max_bytes:
            self._to_host(key, embedding)  # larger than the device budget: host tier (or disk only)
            return
        self._entries[key] = embedding
        self._bytes += size
        while self._bytes > self.max_bytes:
            old_key, evicted = self._entries.popitem(last=False)
            self._bytes -= _size(evicted)
            self.stats.evictions += 1
            self._to_host(old_key, evicted)

    def _to_host(self, key: str, embedding: torch.Tensor) -> None:
        size = _size(embedding)
        if size > self.host_bytes:
            return
        home = embedding.device
        host = embedding
        if home.type != "cpu":
            host = torch.empty(embedding.shape, dtype=embedding.dtype, device="cpu",
                               pin_memory=torch.cuda.is_available())
            host.copy_(embedding)
        self._host[key] = (host, home)
        self._host_used += size
        while self._host_used > self.host_bytes:
            _, (dropped, _) = self._host.popitem(last=False)
            self._host_used -= _size(dropped)
            self.stats.host_evictions += 1

    def clear(self) -> None:
        """Drop the memory tiers, device and host (the disk tier stays)."""
        self._entries.clear()
        self._bytes = 0
        self._host.clear()
        self._host_used = 0


def _size(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
