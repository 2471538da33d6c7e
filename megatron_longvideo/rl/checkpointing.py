"""Checkpoint save/resume of a GRPO run, on the shared megatron dist-checkpoint format.

Saves the policy, the optimizer, the learning-rate schedule, RNG states, the step, the prompt stream's
position and the run's flags (:func:`megatron_longvideo.checkpoint.dist_ckpt.save_checkpoint`); resume
picks the latest complete checkpoint, under ``--save`` first (a restarted run), else ``--load``; an SFT
checkpoint or a converted one (no GRPO step in it) starts GRPO from its weights. The loaded
checkpoint's ``hf/`` files (tokenizer, configs, unused tensors of a Hugging Face start) are written
again with every save.

The KL reference is the run's starting weights on every start, never the resumed policy: ``--ref-load``
if given, else what the run's checkpoints recorded at its first start, else the run's ``--load``. A run
that starts from no checkpoint (random or warmed-up weights) saves its reference once under
``--save/reference`` and records that. The source is saved in every checkpoint's run config as
``ref_load``.
"""

from __future__ import annotations

import os

from megatron_longvideo.checkpoint.dist_ckpt import find_checkpoint, load_checkpoint, save_checkpoint

REFERENCE_DIR = "reference"
"""Folder under ``--save`` holding the reference of a run that started from no checkpoint."""


class GRPOCheckpointing:
    """Save and resume a GRPO run: policy, optimizer, schedule, step, prompt position and reference source."""

    def __init__(self, args, ddp, optimizer, stream, groups, log, scheduler=None):
        self.args, self.ddp, self.optimizer, self.stream, self.groups, self.log = args, ddp, optimizer, stream, groups, log
        self.scheduler = scheduler
        self.assets = None
        self.recorded = {}  # the run config of the GRPO checkpoint resumed from (empty on a first start)
        self.ref_load = None  # resolved by reference_source()

    @property
    def verify_checksums(self) -> bool:
        return not getattr(self.args, "no_verify_checksums", False)

    def save(self, step: int) -> str:
        run_config = {"stage": "grpo", **vars(self.args), "ref_load": self.ref_load}
        path = save_checkpoint(self.args.save, step, model=self.ddp, groups=self.groups, optimizer=self.optimizer,
                               scheduler=self.scheduler, loader=self.stream, run_config=run_config,
                               keep=self.args.keep_checkpoints, assets=self.assets)
        self.log(f"saved {path}")
        return path

    def resume_path(self):
        """Where to start from: a checkpoint under ``--save`` (the run itself, restarted) wins over ``--load``."""
        if self.args.save and find_checkpoint(self.args.save):
            return self.args.save
        return self.args.load

    def load(self) -> int:
        """Restore from :meth:`resume_path`; returns the GRPO step to continue from (0 for another stage's)."""
        from megatron.core import dist_checkpointing

        path = self.resume_path()
        found = find_checkpoint(path)
        common = dist_checkpointing.load_common_state_dict(found) if found else {}
        stage = (common.get("run_config") or {}).get("stage")
        if stage != "grpo":  # another stage's checkpoint (or none: load_checkpoint names the problem)
            loaded = load_checkpoint(path, model=self.ddp, groups=self.groups, weights_only=True,
                                     verify_checksums=self.verify_checksums)
            self.assets = loaded.assets
            self.log(f"starting GRPO from the weights of {loaded.path} (stage {stage!r})")
            return 0
        loaded = load_checkpoint(path, model=self.ddp, groups=self.groups, optimizer=self.optimizer,
                                 scheduler=self.scheduler, loader=self.stream, verify_checksums=self.verify_checksums)
        self.assets = loaded.assets
        self.recorded = dict(loaded.run_config)
        self.log(f"resumed from {loaded.path} at step {loaded.step}")
        return loaded.step

    def reference_source(self) -> str | None:
        """The checkpoint the reference loads (None: the policy's weights at this first start)."""
        explicit = getattr(self.args, "ref_load", None)
        recorded = self.recorded.get("ref_load") if self.recorded else None
        if explicit and recorded and os.path.abspath(explicit) != os.path.abspath(recorded):
            self.log(f"warning: --ref-load {explicit} replaces the reference this run started with ({recorded})")
        if explicit:
            self.ref_load = explicit
        elif self.recorded:  # a resumed GRPO run: the reference it started with
            self.ref_load = recorded or self.recorded.get("load")
            if self.ref_load is None:
                self.log("warning: the resumed checkpoint records no reference source (saved by an older version); "
                         "the reference is the resumed policy. Pass --ref-load to choose it")
        else:
            self.ref_load = self.args.load
        return self.ref_load

    def build_reference(self, make_model):
        """The reference model: ``make_model()`` filled with :meth:`reference_source`'s weights, or (a first
        start from no checkpoint) with the policy's, then saved under ``--save/reference`` so a resumed run
        finds the same ones. Collective over all ranks."""
        from megatron_longvideo.checkpoint.full_state import gather_full_state, load_full_state

        reference = make_model()
        source = self.reference_source()
        if source is not None:
            loaded = load_checkpoint(source, model=reference, groups=self.groups, weights_only=True,
                                     verify_checksums=self.verify_checksums)
            self.log(f"reference: the weights of {loaded.path}")
        else:
            load_full_state(reference, gather_full_state(self.ddp, self.groups), self.groups)
            if self.args.save:
                root = os.path.join(self.args.save, REFERENCE_DIR)
                saved = save_checkpoint(root, 0, model=reference, groups=self.groups,
                                        run_config={"stage": "reference", "source": "starting weights"})
                self.ref_load = root
                self.log(f"reference: the starting weights, saved as {saved}")
            else:
                self.log("reference: the starting weights (not saved: no --save, so a restart cannot resume)")
        reference.requires_grad_(False)
        return reference
