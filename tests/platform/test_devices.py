"""The device rule: no tensor of ours on the training hot path is made without an explicit device.

One GRPO step (CP=2 with shared-prefix packing, and CP=2 unpacked with groups split into micro-batches)
and SFT steps through the shared training loop run under
:class:`~megatron_longvideo.platform.device.DeviceAudit`, which records every tensor factory called from
this package's code without ``device=``. On a CUDA machine each of those would be a CPU tensor meeting
a CUDA activation or an NCCL collective. (Why not ``torch.set_default_device("meta")``: megatron-core
and transformers rightly rely on the default device inside, so it would flag their code, not ours.)
"""

from __future__ import annotations

import torch

from tests.dist import init_cpu_dist, run_ranks
from tests.rl.test_grpo_e2e import VOCAB_TEXTS, _setup


def _grpo_worker(rank, world_size, tok_path, pack, split):
    init_cpu_dist()
    from megatron_longvideo.parallel.groups import destroy_parallel
    from megatron_longvideo.platform.device import DeviceAudit, compute_device, device_of

    trainer, prompts, ddp, groups = _setup(tok_path, world_size, pack, split)
    queue = list(prompts)
    with DeviceAudit() as audit:
        metrics = trainer.step(lambda k: [queue.pop(0) for _ in range(k)])
    placed = device_of(ddp) == compute_device()
    destroy_parallel()
    return audit.strays, metrics["train/loss"], placed


def test_grpo_step_makes_no_tensor_without_a_device(tmp_path):
    from megatron_longvideo.data.tokenizer import train_sentencepiece

    tok_path = train_sentencepiece(VOCAB_TEXTS, str(tmp_path / "tok"), vocab_size=300)
    for pack, split in ((True, None), (False, 3)):
        strays, loss, placed = run_ranks(_grpo_worker, 2, tok_path, pack, split)[0]
        assert placed, "the model is not on the rank's compute device"
        assert loss == loss, "the step did not run"
        assert strays == [], f"tensors created without an explicit device (pack={pack}): {strays}"


def _sft_worker(rank, world_size, data):
    init_cpu_dist()
    from megatron_longvideo.platform.device import DeviceAudit
    from megatron_longvideo.training.engine import OptimConfig
    from tests.training.helpers import Run

    run = Run({"cp": 2}, data)
    with DeviceAudit() as audit:
        result = run.train(OptimConfig(lr=1e-3), train_iters=2, micro_batch_size=1, log_interval=1)
    run.close()
    return audit.strays, result.losses


def test_training_loop_makes_no_tensor_without_a_device(tmp_path):
    from tests.training.helpers import make_data

    data = make_data(str(tmp_path / "data"), num_videos=4)
    strays, losses = run_ranks(_sft_worker, 2, data)[0]
    assert len(losses) == 2
    assert strays == [], f"tensors created without an explicit device: {strays}"


def test_the_audit_catches_a_stray():
    from megatron_longvideo.platform import device

    with device.DeviceAudit() as audit:
        device._probe_for_tests()
    assert len(audit.strays) == 1 and "platform/device.py" in audit.strays[0] and "zeros" in audit.strays[0]
    with device.DeviceAudit() as audit:
        torch.zeros(3)  # outside the package: not ours to police
    assert audit.strays == []
