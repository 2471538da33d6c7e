"""A disk cache of decoded, resized frames, and a pre-decode pass that fills it with progress.

Long videos cost seconds to decode; a run over many epochs decodes each once with ``predecode`` (in
DataLoader worker processes) and then reads ``[T, 3, S, S]`` uint8 tensors. A file that failed is
remembered with its message, so later passes skip it at once. The key covers the file (absolute path,
size, mtime) and every setting that changes the frames, so a changed file or config misses the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import torch

from megatron_longvideo.data.errors import SkipReport, VideoDecodeError
from megatron_longvideo.data.sampling import FrameSamplingConfig


def cache_key(path: str, config: FrameSamplingConfig, backend: str) -> str:
    """Hex digest naming one (file version, sampling config, backend) triple."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
        stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = (None, None)
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("mean", "std")}
    blob = json.dumps([path, stamp, fields, backend], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def load_cached(cache_dir: str, key: str) -> dict | None:
    """The cached entry, None on a miss; raises the remembered ``VideoDecodeError`` for a bad file."""
    bad = os.path.join(cache_dir, key + ".bad.json")
    if os.path.exists(bad):
        with open(bad) as f:
            entry = json.load(f)
        raise VideoDecodeError(entry["path"], entry["reason"], context=entry.get("context"))
    try:
        return torch.load(os.path.join(cache_dir, key + ".pt"), weights_only=True)
    except FileNotFoundError:
        return None


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def save_cached(cache_dir: str, key: str, entry: dict) -> None:
    """Store ``entry`` (``frames`` uint8 [T, 3, S, S], ``indices``, ``timestamps``) atomically."""
    os.makedirs(cache_dir, exist_ok=True)
    _atomic_write(os.path.join(cache_dir, key + ".pt"), lambda p: torch.save(entry, p))


def save_bad(cache_dir: str, key: str, error: VideoDecodeError) -> None:
    """Remember that a file failed, with its message."""
    os.makedirs(cache_dir, exist_ok=True)
    entry = {"path": error.path, "reason": error.reason or str(error), "context": error.context}

    def write(p):
        with open(p, "w") as f:
            json.dump(entry, f)

    _atomic_write(os.path.join(cache_dir, key + ".bad.json"), write)


class _VideoItems(torch.utils.data.Dataset):
    def __init__(self, dataset, videos: list[str]):
        self.dataset, self.videos = dataset, videos

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):
        try:
            self.dataset.load_frames(self.videos[i], decode="full")
            return None
        except VideoDecodeError as e:
            return (e.path, str(e))


def predecode(dataset, *, num_workers: int = 0, log=print, every_seconds: float = 5.0) -> SkipReport:
    """Decode every distinct video of ``dataset`` once into its cache, printing progress.

    ``dataset`` is a ``LongVideoDataset`` with a ``cache_dir``. Prints a line at most every
    ``every_seconds`` (videos done, rate, bad count, ETA) and a final summary; returns the bad files.
    """
    if dataset.config.cache_dir is None:
        raise ValueError("predecode needs a dataset with config.cache_dir set")
    videos = sorted({r.video for r in dataset.records})
    loader = torch.utils.data.DataLoader(_VideoItems(dataset, videos), batch_size=None, shuffle=False,
                                         num_workers=num_workers)
    report = SkipReport()
    start = last = time.monotonic()
    for done, bad in enumerate(loader, start=1):
        if bad is not None:
            report.add_video_errors([tuple(bad)])
        now = time.monotonic()
        if now - last >= every_seconds or done == len(videos):
            rate = done / max(now - start, 1e-9)
            eta = (len(videos) - done) / rate
            log(f"predecode: {done}/{len(videos)} videos ({100 * done / len(videos):.1f}%), "
                f"{rate:.1f} videos/s, {report.num_bad_videos} bad, ETA {eta:.0f} s")
            last = now
    log(f"predecode: done in {time.monotonic() - start:.1f} s; {report.num_bad_videos} bad videos"
        + "".join(f"\n  {m}" for m in report.messages))
    return report
