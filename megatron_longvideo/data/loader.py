"""Batches for the trainer: collation and a DataLoader wrapper that keeps the resume position.

``ResumableDataLoader`` runs ``LongVideoDataset.__getitem__`` in DataLoader worker processes, advances
the ``DistributedVideoSampler`` only by batches actually handed to the caller (workers prefetch ahead,
so the sampler's own iteration position would over-count), and adds each batch's ``bad_inputs`` to
the run's ``SkipReport``. A batch counts as consumed the moment it is handed over, so a checkpoint
saved after training on it resumes with the next one.

Prefetch: ``num_workers`` processes make batches while the current step trains, at most
``num_workers x prefetch_factor`` batches ahead (the memory bound). A worker's ``VideoDecodeError`` or
``RecordError`` reaches the caller as the original exception, naming the file and the record.

Frame-sharded decoding (``decode="lazy"`` dataset and ``shard``): the workers decode only this rank's
slice of each video. A slice that fails is agreed on by the ranks of ``group`` (those holding the same
batches) when the batch is handed over, before any collective of the step: all of them skip that batch,
counted in the skip report (``on_error="raise"``: all raise).
"""

from __future__ import annotations

import torch

from megatron_longvideo.data.errors import RecordError, SkipReport, VideoDecodeError
from megatron_longvideo.data.frames import FrameShard, agree_on_shard_errors, settle_shard_error
from megatron_longvideo.data.prompts import IGNORE_INDEX
from megatron_longvideo.data.sampler import DistributedVideoSampler


class VideoBatchCollator:
    """Pads token sequences on the right; keeps the visual inputs as lists (they differ in frame count).

    Batch: ``videos`` per sample a list of [T_ij, 3, S, S] (images: one frame; empty for a text-only
    sample), ``video_paths``, ``frame_indices`` and ``timestamps`` likewise; ``input_ids`` [B, S_max] (pad id); ``attention_mask``
    [B, S_max] bool; ``labels`` [B, S_max] (``IGNORE_INDEX`` on padding) or None; ``video_start``,
    ``num_video_tokens``, ``num_prompt_tokens`` [B]; per-sample lists for the rest.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: list[dict]) -> dict:
        lengths = [s["input_ids"].numel() for s in samples]
        batch_size, max_len = len(samples), max(lengths)
        input_ids = torch.full((batch_size, max_len), self.pad_id, dtype=torch.long, device="cpu")  # [B, S_max]
        attention_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device="cpu")  # [B, S_max]
        has_labels = samples[0]["labels"] is not None
        labels = torch.full((batch_size, max_len), IGNORE_INDEX, dtype=torch.long, device="cpu") if has_labels else None
        for b, (s, n) in enumerate(zip(samples, lengths)):
            input_ids[b, :n] = s["input_ids"]
            attention_mask[b, :n] = True
            if has_labels:
                labels[b, :n] = s["labels"]
        return {
            "videos": [list(s["videos"]) for s in samples],
            "video_paths": [list(s["video_paths"]) for s in samples],
            "frame_indices": [s["frame_indices"] for s in samples],
            "timestamps": [s["timestamps"] for s in samples],
            "visual_spans": [tuple(s.get("visual_spans", ())) for s in samples],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "video_start": torch.tensor([s["video_start"] for s in samples], dtype=torch.long, device="cpu"),  # [B]
            "num_video_tokens": torch.tensor([s["num_video_tokens"] for s in samples], dtype=torch.long, device="cpu"),
            "num_prompt_tokens": torch.tensor([s["num_prompt_tokens"] for s in samples], dtype=torch.long, device="cpu"),
            "ground_truth": [s["ground_truth"] for s in samples],
            "sample_id": [s["sample_id"] for s in samples],
            "index": [s["index"] for s in samples],
            "bad_inputs": [b for s in samples for b in s["bad_inputs"]],
            "shard_error": next((s["shard_error"] for s in samples if s.get("shard_error")), None),
        }


class Failed:
    """A worker's exception carried back as a value, so the caller re-raises the original exception
    (DataLoader itself re-raises a copy made from the traceback's text)."""

    def __init__(self, error: Exception):
        self.error = error


class CarryErrors(torch.utils.data.Dataset):
    """``dataset`` as DataLoader workers run it: a bad input's exception comes back as a :class:`Failed`
    value; ``sample`` (a subclass's hook) finishes each sample in the worker."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def sample(self, index):
        return self.dataset[index]

    def __getitem__(self, index):
        try:
            return self.sample(index)
        except (VideoDecodeError, RecordError) as e:
            return Failed(e)


class _CollateOrFail:
    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, samples):
        failed = next((s for s in samples if isinstance(s, Failed)), None)
        return failed if failed is not None else self.collate_fn(samples)


class ResumableDataLoader:
    """Iterate micro-batches of one DP rank; ``state_dict`` is the position of delivered batches."""

    def __init__(self, dataset, sampler: DistributedVideoSampler, *, micro_batch_size: int = 1,
                 num_workers: int = 0, collate_fn=None, skip_report: SkipReport | None = None,
                 prefetch_factor: int | None = None, shard: FrameShard | None = None, group=None):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.sampler = sampler
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.collate_fn = collate_fn or VideoBatchCollator(dataset.tokenizer.pad_id)
        self.skip_report = skip_report if skip_report is not None else getattr(dataset, "skip_report", SkipReport())
        self.prefetch_factor = prefetch_factor
        if shard is not None:
            dataset.set_shard(shard)
        self.group = group

    def __len__(self) -> int:
        """Micro-batches left in the current epoch."""
        return len(self.sampler) // self.micro_batch_size

    def __iter__(self):
        epoch = self.sampler.epoch
        loader = torch.utils.data.DataLoader(
            CarryErrors(self.dataset), batch_size=self.micro_batch_size, sampler=self.sampler, drop_last=True,
            num_workers=self.num_workers, collate_fn=_CollateOrFail(self.collate_fn),
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
        )
        for batch in loader:
            if isinstance(batch, Failed):
                raise batch.error
            self.skip_report.add_video_errors(batch["bad_inputs"])
            self.sampler.advance(self.micro_batch_size * self.sampler.dp_size)
            (error,) = agree_on_shard_errors([batch.get("shard_error")], self.group)
            if error is not None:
                settle_shard_error(error, self.dataset.config.on_error, self.skip_report)
                continue
            yield batch
        if self.sampler.epoch == epoch:  # a tail smaller than a micro-batch was dropped
            self.sampler.set_epoch(epoch + 1)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
