"""dist_checkpointing save / load: resharding, an interrupted save, and errors that name what is wrong.

Resharding: 2 SFT steps at TP=2 are saved; the same model then evaluates a fixed batch and takes one more
optimizer step on it. Loading the checkpoint at TP=1 (DP=2) and at CP=2 must give the same loss on that
batch and, after the same step, the same weights (so the Adam state resharded too). The same holds for the
distributed optimizer's checkpoint (``fully_reshardable``) saved at DP=2 and loaded at CP=2 (DP=1).
"""

from __future__ import annotations

import os
import shutil

import pytest

from megatron_longvideo.training.engine import OptimConfig
from tests.dist import init_cpu_dist, run_ranks
from tests.training.helpers import Run, eval_loss, full_weights, make_data, max_diff, train_step

OPTIM = OptimConfig(lr=1e-2)
DIST_OPTIM = OptimConfig(lr=1e-2, use_distributed_optimizer=True)


def _loaded(layout, data, root, optim=OPTIM):
    """Load ``root`` into a fresh model at ``layout``; loss on the fixed batch, then weights after one step."""
    from megatron_longvideo.checkpoint.dist_ckpt import load_checkpoint
    from megatron_longvideo.training.engine import build_optimizer, wrap_ddp
    from megatron_longvideo.training.loop import TrainConfig, build_scheduler

    run = Run(layout, data)
    model = wrap_ddp(run.model(), run.groups, use_distributed_optimizer=optim.use_distributed_optimizer)
    optimizer = build_optimizer([model], optim)
    scheduler = build_scheduler(optimizer, TrainConfig(train_iters=10), optim)
    info = load_checkpoint(root, model=model, groups=run.groups, optimizer=optimizer, scheduler=scheduler,
                           loader=run.loader)
    batch = run.fixed_batch()
    out = {"loss": eval_loss(model, run, batch), "step": info.step, "restored": info.restored}
    train_step(model, optimizer, run, batch)
    out["weights"] = full_weights(model, run)
    run.close()
    return out


def _reshard_worker(rank, world_size, data, root):
    from megatron_longvideo.checkpoint.dist_ckpt import close_checkpoint_writer

    init_cpu_dist()
    try:
        out = {}
        for saved, optim, loads in (({"tp": 2}, OPTIM, {"tp1": {}, "cp2": {"cp": 2}}),
                                    ({}, DIST_OPTIM, {"distopt_dp2_to_cp2": {"cp": 2}})):
            run = Run(saved, data)
            path = f"{root}/{len(out)}"
            result = run.train(optim, train_iters=2, save=path)
            batch = run.fixed_batch()
            ref = {"loss": eval_loss(result.model, run, batch)}
            train_step(result.model, result.optimizer, run, batch)
            ref["weights"] = full_weights(result.model, run)
            run.close()
            for name, layout in loads.items():
                got = _loaded(layout, data, path, optim)
                out[name] = {"loss": abs(got["loss"] - ref["loss"]),
                             "weights": max_diff(got["weights"], ref["weights"]),
                             "step": got["step"], "restored": got["restored"]}
        return out
    finally:
        close_checkpoint_writer()


def test_checkpoint_loads_into_other_layouts(tmp_path):
    data = make_data(str(tmp_path / "data"))
    out = run_ranks(_reshard_worker, 2, data, str(tmp_path / "ckpt"))[0]
    assert sorted(out) == ["cp2", "distopt_dp2_to_cp2", "tp1"]
    for name, r in out.items():
        assert r["step"] == 2
        # another layout: everything but the RNG states
        assert r["restored"] == ("model", "optimizer", "scheduler", "data"), (name, r["restored"])
        assert r["loss"] <= 1e-5, f"{name}: loss differs by {r['loss']}"
        assert r["weights"] <= 1e-5, f"{name}: weights after one more step differ by {r['weights']}"


def _errors_worker(rank, world_size, data, root):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_longvideo.checkpoint import dist_ckpt
    from megatron_longvideo.checkpoint.ckpt_files import latest_step

    init_cpu_dist()
    out = {}

    def error_of(fn):
        try:
            fn()
        except dist_ckpt.CheckpointError as e:
            return str(e)
        return None

    try:
        run = Run({}, data)
        result = run.train(OPTIM, train_iters=2, save=root, save_interval=1, keep_checkpoints=0)
        model, opt = result.model, result.optimizer
        # an interrupted save: the files of step 3 are written, then the save dies before it completes
        real_save = dist_checkpointing.save

        def dying_save(*args, **kwargs):
            real_save(*args, **kwargs)
            raise OSError("simulated crash in the middle of a save")

        dist_checkpointing.save = dying_save
        try:
            dist_ckpt.save_checkpoint(root, 3, model=model, groups=run.groups, optimizer=opt)
            out["save_raised"] = False
        except OSError:
            out["save_raised"] = True
        finally:
            dist_checkpointing.save = real_save
        dist.barrier()
        out["tmp_left"] = sorted(n for n in os.listdir(root) if n.endswith(".tmp"))
        out["latest_after_crash"] = latest_step(root)
        if rank == 0:
            os.remove(os.path.join(root, "latest_checkpointed_iteration.txt"))
        dist.barrier()
        out["latest_without_marker"] = latest_step(root)
        out["loaded_step"] = dist_ckpt.load_checkpoint(root, model=model, groups=run.groups, optimizer=opt).step
        run.close()

        good = os.path.join(root, "iter_0000002")

        def broken(name, damage):
            path = os.path.join(os.path.dirname(root), name)
            if rank == 0:
                shutil.copytree(good, path)
                damage(path)
            dist.barrier()
            return path

        def flip(path):
            with open(path, "r+b") as f:
                f.seek(os.path.getsize(path) // 2)
                byte = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([byte[0] ^ 0xFF]))

        missing = broken("missing", lambda p: os.remove(os.path.join(p, "__1_0.distcp")))
        corrupt = broken("corrupt", lambda p: flip(os.path.join(p, "__0_0.distcp")))
        truncated = broken("truncated", lambda p: open(os.path.join(p, "common.pt"), "r+b").truncate(10))
        run = Run({}, data)
        model = run.model()
        from megatron_longvideo.training.engine import wrap_ddp

        model = wrap_ddp(model, run.groups)
        for name, path in (("missing", missing), ("corrupt", corrupt), ("truncated", truncated)):
            out[name] = error_of(lambda: dist_ckpt.load_checkpoint(path, model=model, groups=run.groups))
        out["nothing"] = error_of(lambda: dist_ckpt.load_checkpoint(os.path.join(root, "nowhere"), model=model,
                                                                     groups=run.groups))
        run.close()
        run = Run({}, data, hidden_size=48)
        out["shape"] = error_of(lambda: dist_ckpt.load_checkpoint(root, model=run.model(), groups=run.groups))
        run.close()
        return out
    finally:
        dist_ckpt.close_checkpoint_writer()


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    data = make_data(str(tmp_path_factory.mktemp("errors_data")))
    root = str(tmp_path_factory.mktemp("errors_ckpt") / "run")
    return run_ranks(_errors_worker, 2, data, root)[0]


def test_interrupted_save_keeps_the_previous_checkpoint(errors):
    assert errors["save_raised"]
    assert errors["tmp_left"] == ["iter_0000003.tmp"], "the dying save should leave its .tmp folder behind"
    assert errors["latest_after_crash"] == 2
    assert errors["latest_without_marker"] == 2, "a .tmp folder was taken for a checkpoint"
    assert errors["loaded_step"] == 2


def test_errors_name_the_file_or_tensor(errors):
    assert "missing file" in errors["missing"] and "__1_0.distcp" in errors["missing"], errors["missing"]
    assert "corrupt file" in errors["corrupt"] and "__0_0.distcp" in errors["corrupt"], errors["corrupt"]
    assert "sha256" in errors["corrupt"]
    assert "corrupt file" in errors["truncated"] and "common.pt" in errors["truncated"], errors["truncated"]
    assert "nowhere" in errors["nothing"] and "no complete checkpoint" in errors["nothing"], errors["nothing"]
    shape = errors["shape"]
    assert shape is not None and "another model shape" in shape, shape
    assert "(" in shape and "48" in shape and "32" in shape, f"both shapes should be named: {shape}"
    assert "tensor 'llm." in shape or "tensor 'vision." in shape, shape
