"""examples/adopt, after: train_gpt.py changed to train a video-language model with megatron_longvideo.

The pair: train_gpt.py is what Megatron-Core users have (megatron's GPTModel from its local layer spec,
DDP, optimizer, LR schedule and forward-backward schedule, their own data iterator: "count up" tokens, so
the loss falls); train_video_lm.py is the same script changed to train a video-language model with
megatron_longvideo: its groups (megatron's plus the encode group), its model (a GPTModel on its layer
spec, whose core attention runs CP on CPU, plus a frozen SigLIP tower and a trained projector), its SFT
loader (frames decoded lazily, bad inputs skipped), sequence packing (``pack_vlm_batch``: a micro-batch's
samples in one row) and ``packed_vlm_forward`` (frames encoded in parallel over the encode group, merged
into the text, sharded over CP). With the same flags it gives the losses of ``examples/sft.py
--pack-sequences``, which are those of padded rows (tests/examples/test_adopt.py). README.md here shows
the diff.

* CP: megatron-core runs CP in TransformerEngine's attention only (its local ``DotProductAttention``
  asserts CP == 1) and TE does not run on CPU, so train_gpt.py stays at CP=1 (2 ranks: 2 DP replicas).
* The embedding cache serves a video's tower + projector output while both are frozen
  (``--freeze-projector``: the LLM alone trains); by default the projector trains and training forwards
  bypass the cache (they need its gradient).
* Packing: each sample of a packed row attends to itself only, its positions restart at 0 and its last
  token predicts nothing, so the loss and gradients equal padded rows'; the row has no padding but the
  few tokens that round it to 2 x CP. (Shared-prefix packing, a prompt's G responses in one row, is GRPO's.)
* On CPU, ``enable_cpu_mode()`` patches megatron-core's CUDA assumptions (a no-op where CUDA exists):
  the one line a CPU run adds.

Prints ``step N | loss X | lr Y | grad norm Z`` per step on rank 0.

    torchrun --nproc-per-node 2 examples/adopt/train_video_lm.py --train-iters 20 --context-parallel-size 2 \\
        --data-path DATA/qa.jsonl --video-root DATA/videos --tokenizer DATA/tokenizer.model
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_longvideo.platform import enable_cpu_mode  # CPU only (see the docstring)
from megatron_longvideo.data import FrameSamplingConfig, load_tokenizer
from megatron_longvideo.models.encode import reduce_encode_replica_grads
from megatron_longvideo.models.llava_onevision.vision import VisionConfig
from megatron_longvideo.models.llm import LLMConfig, unwrap
from megatron_longvideo.models.video_cache import VideoEmbeddingCache, cache_key, weights_version
from megatron_longvideo.parallel import ParallelConfig, initialize_parallel
from megatron_longvideo.training.lm_step import cp_shard
from megatron_longvideo.training.packing import pack_vlm_batch, packed_vlm_forward
from megatron_longvideo.training.stage import build_data_loader, build_stage_model, vlm_config_for
from megatron_longvideo.training.vlm_step import sequence_multiple


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-iters", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x DP")
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-query-groups", type=int, default=2)
    p.add_argument("--data-path", required=True, help="SFT records (.jsonl)")
    p.add_argument("--video-root", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--freeze-projector", action="store_true", help="train the LLM alone (the cache then serves)")
    p.add_argument("--video-cache-mb", type=int, default=1024, help="embedding cache bound (0: off)")
    return p.parse_args(argv)


def batches(loader):
    """The library's loader, epoch after epoch (it keeps its own position)."""
    while True:
        yield from loader


def main(argv=None):
    args = parse_args(argv)
    enable_cpu_mode()  # CPU only: megatron-core on a CPU-only torch (a no-op where CUDA exists)
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "RANK" not in os.environ:  # one process without torchrun
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    dist.init_process_group("nccl" if cuda else "gloo")
    groups = initialize_parallel(ParallelConfig(context_parallel_size=args.context_parallel_size), seed=args.seed)

    # the model
    tokenizer = load_tokenizer(args.tokenizer)
    llm = LLMConfig(num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
                    num_query_groups=args.num_query_groups, ffn_hidden_size=4 * args.hidden_size)
    config = vlm_config_for(tokenizer, llm=llm, vision=VisionConfig(), tensor_parallel_size=1)
    model = build_stage_model(config, groups, trained=("llm",) if args.freeze_projector else ("llm", "projector"),
                              seed=args.seed)  # seeds torch and moves the model to the rank's device itself

    # megatron's DDP, optimizer and LR schedule
    def finalize(chunks, num_tokens=None, **kwargs):  # megatron's, then the tower's TP replicas (TP > 1 only)
        finalize_model_grads(chunks, num_tokens, **kwargs)
        reduce_encode_replica_grads(chunks[0], groups)
    model.config.finalize_model_grads_func = finalize
    model = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False, bucket_size=None))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=0.0, weight_decay=0.0,
                                                       adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0),
                                       [model], use_gloo_process_groups=False)
    model.config.grad_scale_func = optimizer.scale_loss
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr, max_lr=args.lr, min_lr=0.0, lr_warmup_steps=0, lr_decay_steps=args.train_iters,
        lr_decay_style="cosine", start_wd=0.0, end_wd=0.0, wd_incr_steps=args.train_iters, wd_incr_style="constant")

    # the data and the loss
    loader = build_data_loader(mode="sft", data_path=args.data_path, video_root=args.video_root, tokenizer=tokenizer,
                               sampling=FrameSamplingConfig(num_frames=args.num_frames, image_size=config.vision.image_size),
                               vision=config.vision, groups=groups, micro_batch_size=args.micro_batch_size,
                               seed=args.seed, on_error="skip", decode="sharded")
    data_iterator = batches(loader)
    cache = VideoEmbeddingCache(max_bytes=args.video_cache_mb << 20)

    def forward_step(data_iterator, model):
        sample = next(data_iterator)
        batch = pack_vlm_batch(sample, pad_id=tokenizer.pad_id, multiple=sequence_multiple(groups))  # one row
        version = weights_version(unwrap(model).vision)  # a key per video: file, frames, tower + projector weights
        keys = [[cache_key(path, {"frames": f.tolist()}, version) for path, f in zip(*sample_videos)]
                for sample_videos in zip(sample["video_paths"], sample["frame_indices"])]
        output = packed_vlm_forward(model, groups, batch, cache=cache, cache_keys=keys)
        loss_mask = cp_shard(batch["loss_mask"], groups).to(device)  # this CP rank's tokens

        def loss_func(losses):  # megatron's per-token convention: (sum, token count, report)
            loss_sum = (losses.float() * loss_mask).sum()
            num_tokens = loss_mask.sum().to(torch.int)
            return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}

        return output, loss_func

    # the training loop
    dp_size = parallel_state.get_data_parallel_world_size()
    num_microbatches = (args.global_batch_size or args.micro_batch_size * dp_size) // (args.micro_batch_size * dp_size)
    forward_backward = get_forward_backward_func()
    losses = {}
    for step in range(1, args.train_iters + 1):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(forward_step_func=forward_step, data_iterator=data_iterator, model=[model],
                                   num_microbatches=num_microbatches, seq_length=0,  # unused without PP
                                   micro_batch_size=args.micro_batch_size)
        total = torch.zeros(2, device=device)  # (loss sum, tokens) over micro-batches, then DP x CP ranks
        for report in reports:
            total += report["lm loss"].detach().float()
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        lr = optimizer.param_groups[0]["lr"]
        ok, grad_norm, _ = optimizer.step()
        if ok:
            scheduler.step(increment=1)
        losses[step] = total[0].item() / total[1].item()
        if dist.get_rank() == 0:
            print(f"step {step} | loss {losses[step]:.6f} | lr {lr:.3e} | grad norm {grad_norm:.3f}", flush=True)
    if dist.get_rank() == 0:
        print(f"video cache: {cache.stats.hits} hits, {cache.stats.misses} misses", flush=True)
    parallel_state.destroy_model_parallel()
    return losses


if __name__ == "__main__":
    main()
