"""Checkpoint save/resume of a GRPO run, on the shared megatron dist-checkpoint format.

Saves the policy, the optimizer, RNG states, the step, the prompt stream's position and the run's
flags (:func:`megatron_longvideo.checkpoint.dist_ckpt.save_checkpoint`); resume picks the latest
complete checkpoint. ``--load`` of an SFT checkpoint (no GRPO step in it) starts GRPO from its weights.
"""

from __future__ import annotations

from megatron_longvideo.checkpoint.dist_ckpt import load_checkpoint, save_checkpoint


class GRPOCheckpointing:
    """Save and resume a GRPO run: policy, optimizer, step and prompt position."""

    def __init__(self, args, ddp, optimizer, stream, groups, log, *, keep: int = 3):
        self.args, self.ddp, self.optimizer, self.stream, self.groups, self.log = args, ddp, optimizer, stream, groups, log
        self.keep = keep

    def save(self, step: int) -> str:
        path = save_checkpoint(self.args.save, step, model=self.ddp, groups=self.groups, optimizer=self.optimizer,
                               loader=self.stream, run_config={"stage": "grpo", **vars(self.args)}, keep=self.keep)
        self.log(f"saved {path}")
        return path

    def load(self) -> int:
        """Restore from ``--load``; returns the GRPO step to continue from (0 for another stage's checkpoint)."""
        from megatron.core import dist_checkpointing

        from megatron_longvideo.checkpoint.dist_ckpt import find_checkpoint

        found = find_checkpoint(self.args.load)
        common = dist_checkpointing.load_common_state_dict(found) if found else {}
        stage = (common.get("run_config") or {}).get("stage")
        if stage != "grpo":  # another stage's checkpoint (or none: load_checkpoint names the problem)
            loaded = load_checkpoint(self.args.load, model=self.ddp, groups=self.groups, weights_only=True)
            self.log(f"starting GRPO from the weights of {loaded.path} (stage {stage!r})")
            return 0
        loaded = load_checkpoint(self.args.load, model=self.ddp, groups=self.groups, optimizer=self.optimizer, loader=self.stream)
        self.log(f"resumed from {loaded.path} at step {loaded.step}")
        return loaded.step
