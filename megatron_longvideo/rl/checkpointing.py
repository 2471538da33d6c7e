"""Checkpoint save/resume of a GRPO run, on the shared megatron dist-checkpoint format.

Saves the policy, the optimizer, RNG states, the step, the prompt stream's position and the run's
flags (:func:`megatron_longvideo.checkpoint.dist_ckpt.save_checkpoint`); resume picks the latest
complete checkpoint, under ``--save`` first (a restarted run), else ``--load``; an SFT checkpoint or a
converted one (no GRPO step in it) starts GRPO from its weights. The loaded checkpoint's ``hf/`` files
(tokenizer, configs, unused tensors of a Hugging Face start) are written again with every save.
"""

from __future__ import annotations

from megatron_longvideo.checkpoint.dist_ckpt import load_checkpoint, save_checkpoint


class GRPOCheckpointing:
    """Save and resume a GRPO run: policy, optimizer, step and prompt position."""

    def __init__(self, args, ddp, optimizer, stream, groups, log):
        self.args, self.ddp, self.optimizer, self.stream, self.groups, self.log = args, ddp, optimizer, stream, groups, log
        self.assets = None

    def save(self, step: int) -> str:
        path = save_checkpoint(self.args.save, step, model=self.ddp, groups=self.groups, optimizer=self.optimizer,
                               loader=self.stream, run_config={"stage": "grpo", **vars(self.args)}, keep=self.args.keep_checkpoints,
                               assets=self.assets)
        self.log(f"saved {path}")
        return path

    def resume_path(self):
        """Where to start from: a checkpoint under ``--save`` (the run itself, restarted) wins over ``--load``."""
        from megatron_longvideo.checkpoint.dist_ckpt import find_checkpoint

        if self.args.save and find_checkpoint(self.args.save):
            return self.args.save
        return self.args.load

    def load(self) -> int:
        """Restore from :meth:`resume_path`; returns the GRPO step to continue from (0 for another stage's)."""
        from megatron.core import dist_checkpointing

        from megatron_longvideo.checkpoint.dist_ckpt import find_checkpoint

        path = self.resume_path()
        found = find_checkpoint(path)
        common = dist_checkpointing.load_common_state_dict(found) if found else {}
        stage = (common.get("run_config") or {}).get("stage")
        if stage != "grpo":  # another stage's checkpoint (or none: load_checkpoint names the problem)
            loaded = load_checkpoint(path, model=self.ddp, groups=self.groups, weights_only=True)
            self.assets = loaded.assets
            self.log(f"starting GRPO from the weights of {loaded.path} (stage {stage!r})")
            return 0
        loaded = load_checkpoint(path, model=self.ddp, groups=self.groups, optimizer=self.optimizer, loader=self.stream)
        self.assets = loaded.assets
        self.log(f"resumed from {loaded.path} at step {loaded.step}")
        return loaded.step
