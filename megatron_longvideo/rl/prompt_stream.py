"""RL prompts from a LongVideo-Reason dataset, drawn in the data-parallel order, prefetched and resumable.

``PromptStream.draw(k)`` hands out this DP rank's next k prompts. With ``prefetch_workers`` the samples
(probe, frame decoding, tokenization, the file's content hash) are made ahead in DataLoader worker
processes while the current step trains: processes, not threads, because decoding needs the GIL between
FFmpeg calls and a training loop's Python would stall it (``benchmarks/decode_sharded.py``). At most
``prefetch_workers x prefetch_factor`` samples wait at a time, which bounds the memory. A worker's
``VideoDecodeError`` or ``RecordError`` reaches the caller as the original exception, naming the file.

Frame-sharded decoding (``VideoDatasetConfig(decode="lazy")`` with ``shard``): each rank of the encode
group decodes its own slice of each video (:class:`~megatron_longvideo.data.frames.FrameShard`), in the
worker when prefetching. A slice that fails concerns the whole replica, whose other ranks decoded other
frames: the ranks of ``group`` (the replica) agree on it at the draw, before any collective of the step,
and all skip the prompt (counted in ``skip_report``) or, with ``on_error="raise"``, all raise.
"""

from __future__ import annotations

import torch

from megatron_longvideo.data.errors import SkipReport
from megatron_longvideo.data.frames import FrameShard, agree_on_shard_errors, settle_shard_error
from megatron_longvideo.data.loader import CarryErrors, Failed
from megatron_longvideo.models.video_cache import content_id_of_file
from megatron_longvideo.rl.rewards import GroundTruth
from megatron_longvideo.rl.rollout import RLPrompt

__all__ = ["PromptStream", "to_rl_prompt"]


def to_rl_prompt(sample: dict, content_ids: dict) -> RLPrompt:
    """An ``rl``-mode dataset sample -> :class:`RLPrompt` (each file's content hashed once, unless the sample
    carries its ``content_ids`` already); a text-only sample gives a prompt without videos."""
    carried = sample.get("content_ids")
    ids = []
    for k, (path, indices) in enumerate(zip(sample["video_paths"], sample["frame_indices"])):
        if carried is not None:
            content_ids.setdefault(path, carried[k])
        if path not in content_ids:
            content_ids[path] = content_id_of_file(path)
        ids.append(f"{content_ids[path]}:{tuple(indices.tolist())}")
    return RLPrompt(
        videos=tuple(sample["videos"]),
        prompt_ids=sample["input_ids"],
        ground_truth=GroundTruth.from_record(sample["ground_truth"]),
        content_ids=tuple(ids),
        sample_id=str(sample["sample_id"]),
    )


class _PromptItems(CarryErrors):
    """The dataset as the prefetch workers run it: also hashes each file (once per worker)."""

    def __init__(self, dataset):
        super().__init__(dataset)
        self._content_ids: dict = {}

    def sample(self, index):
        sample = self.dataset[index]
        for path in sample["video_paths"]:
            if path not in self._content_ids:
                self._content_ids[path] = content_id_of_file(path)
        sample["content_ids"] = [self._content_ids[path] for path in sample["video_paths"]]
        return sample


class _StreamOrder(torch.utils.data.Sampler):
    """Dataset indices from ``(epoch, position)`` on, epoch after epoch (the stream's own order)."""

    def __init__(self, sampler, epoch: int, position: int):
        self.sampler, self.epoch, self.position = sampler, epoch, position

    def __iter__(self):
        epoch, position = self.epoch, self.position
        while True:
            order = self.sampler.rank_indices(epoch)
            yield from order[position:]
            epoch, position = epoch + 1, 0


def _as_is(sample):
    return sample


class PromptStream:
    """``draw(k)``: the next k prompts of this DP rank, epoch after epoch (reshuffled per epoch).

    ``state_dict()`` / ``load_state_dict()`` hold the epoch and position of the prompts handed out (not
    of those prefetched), so a resumed run continues with the prompts it would have drawn next.
    ``skip_report`` (the dataset's ``SkipReport``) counts the bad videos the drawn samples stepped over
    (their ``bad_inputs``) and the slices that failed to decode, besides the records dropped at load.

    ``prefetch_workers``: worker processes making samples ahead (0: made in ``draw``). ``shard``: this
    rank's slice of each video, decoded with the sample (a ``decode="lazy"`` dataset). ``group``: the
    process group of the ranks drawing the same prompts (the replica's TP x CP group), which agree on
    failed slices; None for one process.
    """

    def __init__(self, dataset, sampler, *, skip_report: SkipReport | None = None, prefetch_workers: int = 0,
                 prefetch_factor: int = 2, shard: FrameShard | None = None, group=None):
        if prefetch_workers < 0 or prefetch_factor < 1:
            raise ValueError(f"prefetch_workers must be >= 0 and prefetch_factor >= 1, got {prefetch_workers}, "
                             f"{prefetch_factor}")
        self.dataset, self.sampler = dataset, sampler
        if skip_report is None:
            skip_report = getattr(dataset, "skip_report", None)
        self.skip_report = skip_report if skip_report is not None else SkipReport()
        self.prefetch_workers, self.prefetch_factor = prefetch_workers, prefetch_factor
        if shard is not None:
            dataset.set_shard(shard)
        self.group = group
        self.epoch, self.position = 0, 0
        self._order = sampler.rank_indices(0)
        self._content_ids: dict = {}
        self._items = _PromptItems(dataset)
        self._iterator = None  # the prefetching DataLoader's iterator, made at the first draw

    def _next_sample(self) -> dict:
        if self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self.sampler.rank_indices(self.epoch)
        if self.prefetch_workers:
            if self._iterator is None:
                loader = torch.utils.data.DataLoader(
                    self._items, batch_size=None, sampler=_StreamOrder(self.sampler, self.epoch, self.position),
                    num_workers=self.prefetch_workers, prefetch_factor=self.prefetch_factor, collate_fn=_as_is)
                self._iterator = iter(loader)
            sample = next(self._iterator)
        else:
            sample = self._items[self._order[self.position]]
        self.position += 1
        if isinstance(sample, Failed):
            raise sample.error
        return sample

    def draw(self, k: int) -> list[RLPrompt]:
        out = []
        while len(out) < k:
            samples = [self._next_sample() for _ in range(k - len(out))]
            for sample in samples:
                self.skip_report.add_video_errors(sample.get("bad_inputs", ()))
            errors = agree_on_shard_errors([s.get("shard_error") for s in samples], self.group)
            for sample, error in zip(samples, errors):
                if error is None:
                    out.append(to_rl_prompt(sample, self._content_ids))
                else:
                    settle_shard_error(error, self.dataset.config.on_error, self.skip_report)
        return out

    def close(self) -> None:
        """Stop the prefetch workers (a later draw starts them again)."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.close()  # what the workers made ahead belongs to the old position
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self.sampler.rank_indices(self.epoch)
