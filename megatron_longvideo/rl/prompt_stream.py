"""RL prompts from a LongVideo-Reason dataset, drawn in the data-parallel order and resumable."""

from __future__ import annotations

from megatron_longvideo.data.errors import SkipReport
from megatron_longvideo.models.video_cache import content_id_of_file
from megatron_longvideo.rl.rewards import GroundTruth
from megatron_longvideo.rl.rollout import RLPrompt

__all__ = ["PromptStream", "to_rl_prompt"]


def to_rl_prompt(sample: dict, content_ids: dict) -> RLPrompt:
    """An ``rl``-mode dataset sample -> :class:`RLPrompt` (video content hashed once per file)."""
    path = sample["video_path"]
    if path not in content_ids:
        content_ids[path] = content_id_of_file(path)
    return RLPrompt(
        frames=sample["frames"],
        prompt_ids=sample["input_ids"],
        ground_truth=GroundTruth.from_record(sample["ground_truth"]),
        content_id=f"{content_ids[path]}:{tuple(sample['frame_indices'].tolist())}",
        sample_id=str(sample["sample_id"]),
    )


class PromptStream:
    """``draw(k)``: the next k prompts of this DP rank, epoch after epoch (reshuffled per epoch).

    ``state_dict()`` / ``load_state_dict()`` hold the epoch and position, so a resumed run continues
    with the prompts it would have drawn next. ``skip_report`` (the dataset's ``SkipReport``) counts the
    bad videos the drawn samples stepped over (their ``bad_inputs``), besides the records dropped at load.
    """

    def __init__(self, dataset, sampler, *, skip_report: SkipReport | None = None):
        self.dataset, self.sampler = dataset, sampler
        if skip_report is None:
            skip_report = getattr(dataset, "skip_report", None)
        self.skip_report = skip_report if skip_report is not None else SkipReport()
        self.epoch, self.position = 0, 0
        self._order = sampler.rank_indices(0)
        self._content_ids: dict = {}

    def draw(self, k: int) -> list[RLPrompt]:
        out = []
        while len(out) < k:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self.sampler.rank_indices(self.epoch)
            sample = self.dataset[self._order[self.position]]
            self.skip_report.add_video_errors(sample.get("bad_inputs", ()))
            out.append(to_rl_prompt(sample, self._content_ids))
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self.sampler.rank_indices(self.epoch)
