"""CPU mode: with every patch megatron-core trains on CPU-only torch; without any one of them it fails.

The scenario covers what the patches are for: model-parallel seeding, weight init and dropout under
the model-parallel RNG tracker, a tiny GPTModel forward and
backward through the 1F1B pipeline schedule (PP=2), megatron DDP with the distributed optimizer,
gradient clipping, an optimizer step, an optimizer state round trip, and megatron's
``broadcast_data`` of a batch to the TP ranks.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.dist import run_ranks

PATCH_NAMES = ("torch_proxy", "rng_tracker", "tensor_cuda", "tensor_type_name")


def _scenario(rank, world_size, skip):
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    from megatron_longvideo.platform import enable_cpu_mode

    enable_cpu_mode(skip=skip)
    dist.init_process_group("gloo")
    try:
        from megatron_longvideo.models.llm import LLMConfig, build_llm
        from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
        from megatron_longvideo.training.engine import OptimConfig, build_optimizer, forward_backward, wrap_ddp
        from megatron_longvideo.training.lm_step import lm_loss_step

        groups = initialize_parallel(ParallelConfig(pipeline_parallel_size=2), seed=5)
        # dropout (megatron's own attention: the tile engine has none) and init on the "device" go through
        # megatron's model-parallel RNG tracker
        llm = build_llm(LLMConfig.tiny(vocab_size=128), groups, attention_dropout=0.1, core_attention="megatron",
                        use_cpu_initialization=False)
        model = wrap_ddp(llm, groups, use_distributed_optimizer=True)
        optimizer = build_optimizer([model], OptimConfig(lr=1e-3, clip_grad=1e-3, use_distributed_optimizer=True))
        tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
        # megatron's way of handing a batch to the TP ranks (moves it with .cuda())
        from megatron.core import tensor_parallel

        tokens = tensor_parallel.broadcast_data(["tokens"], {"tokens": tokens}, torch.int64)["tokens"]
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 16)}
        model.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(model, lm_loss_step(groups), [batch, batch], seq_length=16, micro_batch_size=2)
        ok, grad_norm, _ = optimizer.step()
        assert ok and grad_norm > 1e-3, grad_norm  # clipping ran
        optimizer.load_state_dict(optimizer.state_dict())
        destroy_parallel()
        return "ok"
    except Exception as e:  # noqa: BLE001 - the test reports what failed without the patch
        return f"{type(e).__name__}: {e}"


def test_all_patches_are_sufficient():
    assert run_ranks(_scenario, 2, ()) == ["ok", "ok"]


@pytest.mark.parametrize("patch", PATCH_NAMES)
def test_each_patch_is_needed(patch):
    results = run_ranks(_scenario, 2, (patch,))
    assert any(r != "ok" for r in results), f"the scenario passed without the {patch!r} patch"
    assert any("cuda" in r.lower() or "CUDA" in r for r in results if r != "ok"), results


def test_patches_are_documented_and_skip_names_checked():
    from megatron_longvideo.platform.cpu import PATCHES, enable_cpu_mode

    assert tuple(p.name for p in PATCHES) == PATCH_NAMES
    for p in PATCHES:
        assert "Needed by" in p.needed_by, p.name
    with pytest.raises(ValueError, match="unknown CPU-mode patch"):
        enable_cpu_mode(skip=("no_such_patch",))


def test_import_pulls_no_optional_heavy_dependency():
    code = (
        "import sys, megatron_longvideo, megatron_longvideo.platform, megatron_longvideo.parallel, "
        "megatron_longvideo.models, megatron_longvideo.rl, megatron_longvideo.data, megatron_longvideo.kernels\n"
        "heavy = [m for m in ('transformer_engine', 'vllm', 'nvidia.dali', 'apex', 'decord') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout
