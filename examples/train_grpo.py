"""GRPO of a video-language model on LongVideo-Reason style data, with Megatron-Core and MR-SP.

What it does: decodes the videos of RL records, encodes each video once per step over the encode
group (the cache serves every rollout and pass), samples G responses per prompt with the rollout
engine (by default the policy itself, every rank drawing its share; vLLM on GPU), scores them, and updates the policy with the GRPO loss over
context-parallel shards with shared-prefix packing. Logs go to TensorBoard; checkpoints are
megatron dist checkpoints. What it leaves out: pipeline parallelism in the trainer (PP must be 1),
multi-video records. ``--eval-data FILE --eval-interval N`` evaluates the policy in place every N steps
(greedy; the numbers of ``examples/evaluate.py``, logged as ``eval/*``).

CPU demo (2 ranks, CP=2, a few minutes; also what `bash examples/scripts/demo_cpu.sh` runs; add
``--model-family qwen2_5_vl`` for the Qwen2.5-VL family; the audio family, Qwen2-Audio, takes audio and
text records: ``--model-family qwen2_audio`` on the data of ``make_synthetic_dataset.py --tasks audio,text``
with its ``tokenizer_qwen2_audio.model``, or ``--synthetic-data DIR``, which writes them under ``DIR/audio``):

    python tools/make_synthetic_dataset.py --out demo_out/data
    torchrun --nproc-per-node 2 examples/train_grpo.py --context-parallel-size 2 \
        --data-path demo_out/data/qa.jsonl --video-root demo_out/data/videos \
        --tokenizer demo_out/data/tokenizer.model --sft-warmup-steps 100 --train-iters 300 \
        --prompts-per-step 8 --dynamic-sampling --tensorboard-dir demo_out/tb --save demo_out/ckpt

One GPU node (8 GPUs, vLLM rollouts):

    torchrun --nproc-per-node 8 examples/train_grpo.py --tensor-model-parallel-size 2 \
        --context-parallel-size 4 --engine vllm --num-frames 512 --group-size 8 ... (see --help)
"""

from __future__ import annotations

import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_grpo_args(parser):
    """The GRPO flags, on top of the shared Megatron-style ones (megatron_longvideo.training.args)."""
    g = parser.add_argument_group("GRPO")
    g.add_argument("--group-size", type=int, default=8, help="responses per prompt (G)")
    g.add_argument("--prompts-per-step", type=int, default=4, help="prompts per step on each data-parallel replica")
    g.add_argument("--max-new-tokens", type=int, default=16, help="longest response a rollout generates")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling of the rollouts (1: off)")
    g.add_argument("--kl-beta", type=float, default=0.0, help="KL-to-reference weight; 0 skips the reference pass")
    g.add_argument("--ref-load", default=None, metavar="CKPT",
                   help="checkpoint the KL reference takes its weights from (default: the run's first --load; with "
                        "neither, the starting weights, saved once under --save/reference); kept across restarts")
    g.add_argument("--kl-estimator", default="k3", choices=["k1", "k2", "k3"], help="estimator of the KL to the reference: k1, k2 or k3 (Schulman's)")
    g.add_argument("--clip-low", type=float, default=0.2, help="PPO clip range below 1 (ratio clipped at 1 - this)")
    g.add_argument("--clip-high", type=float, default=0.28, help="DAPO clip-higher")
    g.add_argument("--loss-aggregation", default="token_mean", choices=["token_mean", "seq_mean", "seq_sum_token_mean"], help="token_mean (DAPO), seq_mean (GRPO paper) or seq_sum_token_mean (Dr.GRPO, L = --max-new-tokens)")
    g.add_argument("--advantage-scale", default="std", choices=["std", "none"], help="std: GRPO; none: Dr.GRPO")
    g.add_argument("--advantage-estimator", default=None, choices=["grpo", "dr_grpo", "rloo", "reinforce_pp"],
                   help="grpo, dr_grpo, rloo (leave-one-out baseline) or reinforce_pp (REINFORCE++: group baseline, "
                        "then normalised over the whole batch of every replica); default: from --advantage-scale")
    g.add_argument("--policy-loss", default="ppo", choices=["ppo", "gspo", "cispo"],
                   help="ppo: token ratios clipped (GRPO, DAPO); gspo: one length-normalised ratio per sequence, "
                        "clipped per sequence (use small clip ranges, e.g. --clip-low 3e-4 --clip-high 4e-4); cispo: "
                        "the clipped ratio as a detached weight of every token's gradient (MiniMax-M1)")
    g.add_argument("--kl-importance-weight", action="store_true",
                   help="weight the KL estimate by the policy / old-policy ratio, unbiased when minibatches are off-policy")
    g.add_argument("--overlong-buffer", type=int, default=0,
                   help="DAPO's soft overlong punishment: responses longer than --max-new-tokens minus this lose up to "
                        "--overlong-penalty reward, linearly to the limit (0: off)")
    g.add_argument("--overlong-penalty", type=float, default=1.0, help="reward lost at the length limit")
    g.add_argument("--tis-cap", type=float, default=None,
                   help="truncated importance sampling: weight the policy loss by min(trainer-old / engine probability, "
                        "cap) per token (e.g. 2; needs the engine's log-probs, which it turns on)")
    g.add_argument("--engine-logprobs", action="store_true",
                   help="log rollout/logprob_diff_mean and _max: engine vs trainer log-probs of the sampled tokens")
    g.add_argument("--reward", action="append", default=None, metavar="NAME=WEIGHT",
                   help="reward (registered name or module:function) and weight, repeatable (default accuracy=1.0, format=0.2)")
    g.add_argument("--reward-time-limit", type=float, default=30.0,
                   help="seconds a user reward (module:function) may take per response; past it the call is abandoned "
                        "and its group left out of the update, counted as 'reward: timeout' (0: no limit)")
    g.add_argument("--dynamic-sampling", action="store_true", help="drop groups with equal rewards and refill (DAPO)")
    g.add_argument("--no-pack", action="store_true", help="disable shared-prefix packing")
    g.add_argument("--update-epochs", type=int, default=1, help="passes over each step's rollouts")
    g.add_argument("--num-minibatches", type=int, default=1, help="optimizer steps per GRPO step")
    g.add_argument("--responses-per-microbatch", type=int, default=None,
                   help="split each group into micro-batches of this many responses (default: whole groups)")
    g.add_argument("--engine", default="megatron", choices=["megatron", "hf", "vllm"],
                   help="rollout engine: megatron (the policy itself, its TP shards, no weight copy; the default, "
                        "faster than hf on CPU: docs/results/rollout_engines_cpu.md), hf (transformers), vllm (GPU)")
    g.add_argument("--rollout-ranks", default="all", choices=["all", "first"],
                   help="all: every rank holds an engine and draws its share of each step's responses (the tokens "
                        "do not depend on the split); first: the first rank of each TP x CP replica draws them all")
    g.add_argument("--sync-bucket-mb", type=float, default=256.0,
                   help="weight sync to the rollout engines in buckets of this many MB (training dtype, gathered from "
                        "the TP shards one bucket at a time)")
    g.add_argument("--rollout-max-frames", type=int, default=None,
                   help="rollouts see each video at most this many frames (uniformly taken); training sees all, "
                        "corrected by truncated importance sampling (needs --tis-cap)")
    g.add_argument("--vllm-gpu-memory-utilization", type=float, default=None,
                   help="the share of each GPU the vLLM engine may take (default: what is free beside Megatron "
                        "when it starts, less the optimizer state still to be allocated)")
    g.add_argument("--offload-reference", action="store_true", help="keep the reference model in CPU memory between its passes")
    g.add_argument("--train-projector", action="store_true", help="train the projector too (default: frozen)")
    g.add_argument("--log-samples-every", type=int, default=10, help="log one rollout's text every N steps (0: never)")
    g.add_argument("--sft-warmup-steps", type=int, default=0,
                   help="steps of format-only SFT before GRPO: targets '<think> </think><answer>X</answer>' with a random X")
    g.add_argument("--eval-data", default=None, metavar="FILE",
                   help="a test file (videos under --video-root) to evaluate the policy on every --eval-interval steps "
                        "(greedy, the megatron engine; as examples/evaluate.py: eval/accuracy, eval/format_rate, "
                        "eval/<category>/accuracy)")
    g.add_argument("--eval-interval", type=int, default=0, help="steps between evaluations (0: after the last step only)")
    g.add_argument("--eval-max-records", type=int, default=None, help="evaluate the first N records of --eval-data")


def parse_args(argv=None):
    from megatron_longvideo.training.args import parse, resolve_family, resolve_tokenizer, validate_inputs

    args = parse(argv, description="GRPO for long-video VLMs on Megatron-Core",
                 defaults={"train_iters": 20, "lr": 1e-3, "keep_checkpoints": 3, "lr_decay_style": "constant"},
                 extend=add_grpo_args)
    if args.synthetic_data:
        from megatron_longvideo.training.stage import ensure_synthetic_data

        paths = ensure_synthetic_data(args.synthetic_data, seed=args.seed, family=resolve_family(args))
        args.data_path = args.data_path or paths["qa"]
        args.video_root = args.video_root or paths["video_root"]
        args.tokenizer = args.tokenizer or paths["tokenizer"]
    resolve_tokenizer(args)
    for flag in ("data_path", "video_root", "tokenizer"):
        if not getattr(args, flag):
            raise SystemExit(f"train_grpo.py: --{flag.replace('_', '-')} is required (or --synthetic-data DIR)")
    validate_inputs(args, data_flags=("data_path", "eval_data"), checkpoint_flags=("load", "ref_load"))
    return args


def build(args):
    from megatron_longvideo.data.dataset import LongVideoDataset, VideoDatasetConfig
    from megatron_longvideo.data.sampler import DistributedVideoSampler
    from megatron_longvideo.models import build_model, family_of, replace_tower, tower_config
    from megatron_longvideo.parallel.groups import initialize_parallel
    from megatron_longvideo.platform import enable_cpu_mode
    from megatron_longvideo.rl.prompt_stream import PromptStream
    from megatron_longvideo.models.llm import check_layout_supported
    from megatron_longvideo.training.args import (dataset_media, frame_sampling, load_tokenizer_for, model_config,
                                                  model_options, parallel_config)

    if not args.no_pack:  # refuse at start-up what the first packed forward would refuse
        check_layout_supported(args.core_attention, packed=True)
    enable_cpu_mode()
    groups = initialize_parallel(parallel_config(args), seed=args.seed)
    random.seed(args.seed)
    tok = load_tokenizer_for(args)
    cfg = model_config(args, tok)
    if family_of(cfg) == "qwen2_5_vl":
        if args.train_projector:
            raise ValueError("--train-projector: Qwen2.5-VL's merger is part of its tower; use --train-vision-tower")
        cfg = replace_tower(cfg, freeze=not args.train_vision_tower)
    else:  # the audio family's encoder and projector freeze as SigLIP's and its projector do
        cfg = replace_tower(cfg, freeze=not args.train_vision_tower,
                            freeze_projector=not (args.train_projector or args.train_vision_tower))
    torch.manual_seed(args.seed)
    policy = build_model(cfg, groups, seed=args.seed, recompute_activations=args.recompute_activations,
                         **model_options(args))
    media = dataset_media(args, cfg)
    data_cfg = VideoDatasetConfig(mode="rl", video_root=args.video_root, on_error=args.on_bad_input, sampling=frame_sampling(args),
                                  decode="lazy" if args.decode == "sharded" else "full", audio=media["audio"],
                                  probe_dir=media["probe_dir"])
    import torch.distributed as dist

    from megatron_longvideo.data.errors import SkipReport

    # every rank reads the whole file: rank 0 alone logs the skipped records (the counts are the same everywhere)
    skips = SkipReport() if dist.get_rank() == 0 else SkipReport(log=None)
    dataset = LongVideoDataset.from_file(args.data_path, tokenizer=tok, num_video_tokens=media["num_video_tokens"],
                                         num_audio_tokens=media["num_audio_tokens"], config=data_cfg, skip_report=skips)
    sampler = DistributedVideoSampler(len(dataset), dp_rank=groups.dp_rank, dp_size=groups.dp_size, seed=args.seed)
    from megatron_longvideo.models.encode import encode_shard

    # enough samples waiting for a whole step's prompts (a worker makes --prefetch-factor of them ahead)
    factor = max(args.prefetch_factor, -(-args.prompts_per_step // max(args.num_workers, 1)))
    stream = PromptStream(dataset, sampler, prefetch_workers=args.num_workers, prefetch_factor=factor,
                          shard=encode_shard(groups, tower_config(cfg)) if args.decode == "sharded" else None,
                          group=groups.tp_cp)
    return groups, tok, cfg, policy, stream


def sft_warmup(args, groups, tok, policy_ddp, optimizer, stream, log):
    """Format-only SFT: the response format with random answer letters (learns the format, not the task)."""
    from megatron_longvideo.data.prompts import format_response
    from megatron_longvideo.models.vlm import vlm_forward
    from megatron_longvideo.training.engine import forward_backward
    from megatron_longvideo.training.lm_step import cp_shard

    rng = random.Random(args.seed + groups.dp_rank)
    unit = 2 * groups.cp_size * (groups.tp_size if groups.config.sequence_parallel else 1)
    for step in range(args.sft_warmup_steps):
        items = []
        for prompt in stream.draw(args.prompts_per_step):
            letters = "ABCD"[: max(2, len(prompt.ground_truth.options) or 4)]
            target = tok.encode(format_response(" ", rng.choice(letters), tok.special)) + [tok.eos_id]
            ids = torch.cat([prompt.prompt_ids, torch.tensor(target)])
            labels = torch.cat([ids[1:], torch.tensor([tok.pad_id])])
            mask = torch.zeros_like(ids, dtype=torch.float)
            mask[len(prompt.prompt_ids) - 1 : -1] = 1.0  # predict the response tokens only
            pad = (-len(ids)) % unit
            ids = torch.cat([ids, torch.full((pad,), tok.pad_id)])
            labels = torch.cat([labels, torch.full((pad,), tok.pad_id)])
            mask = torch.cat([mask, torch.zeros(pad)])
            items.append((ids[None], labels[None], mask[None], [list(prompt.videos)]))

        def step_fn(item, model):
            ids, labels, mask, videos = item
            out = vlm_forward(model, groups, input_ids=ids, videos=videos, labels=labels)
            local = cp_shard(mask, groups)

            def loss_func(losses):
                total = (losses.float() * local).sum()
                return total, local.sum().to(torch.int), {"lm loss": torch.stack([total.detach(), local.sum()])}

            return out, loss_func

        policy_ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(policy_ddp, step_fn, items, seq_length=max(i[0].shape[1] for i in items), micro_batch_size=1)
        optimizer.step()
        if reports and (step % 10 == 0 or step == args.sft_warmup_steps - 1):
            total = sum(r["lm loss"] for r in reports)
            log(f"[format warm-up {step + 1}/{args.sft_warmup_steps}] response loss {total[0].item() / max(total[1].item(), 1):.3f}")


def main(argv=None):
    args = parse_args(argv)
    import torch.distributed as dist

    from megatron_longvideo.data.errors import report_run_skips
    from megatron_longvideo.models import build_model
    from megatron_longvideo.rl.engines.base import SamplingConfig
    from megatron_longvideo.rl.losses import GRPOLossConfig
    from megatron_longvideo.rl.rollout import is_replica_leader
    from megatron_longvideo.rl.trainer import GRPOConfig, GRPOTrainer
    from megatron_longvideo.training.args import model_options, optim_config
    from megatron_longvideo.training.engine import build_optimizer, mixed_precision, wrap_ddp

    groups, tok, cfg, policy, stream = build(args)
    if args.save:  # a second run on the same --save refuses at once, naming the first
        from megatron_longvideo.checkpoint.lock import lock_save_folder_on_rank0

        lock_save_folder_on_rank0(args.save)
    rank0 = dist.get_rank() == 0
    log = print if rank0 else (lambda *a, **k: None)
    ddp = wrap_ddp(policy, groups, use_distributed_optimizer=args.use_distributed_optimizer)
    optimizer = build_optimizer([ddp], optim_config(args))
    scheduler = build_grpo_scheduler(args, optimizer)
    checkpointing = _checkpointing(args, ddp, optimizer, stream, groups, log, scheduler)
    start = checkpointing.load() if checkpointing.resume_path() else 0
    if args.sft_warmup_steps and start == 0:
        for group in optimizer.param_groups:  # the warm-up trains at --lr, before the schedule's first step
            group["lr"] = args.lr
        sft_warmup(args, groups, tok, ddp, optimizer, stream, log)
        scheduler.step(increment=0)  # back to the schedule's rate
    reference = None
    if args.kl_beta > 0:
        def make_reference():
            torch.manual_seed(args.seed)
            return mixed_precision(build_model(cfg, groups, seed=args.seed, **model_options(args)))

        reference = checkpointing.build_reference(make_reference)
    rewards = tuple((k, float(v)) for k, v in (r.split("=") for r in (args.reward or ["accuracy=1.0", "format=0.2"])))
    grpo = GRPOConfig(
        group_size=args.group_size, prompts_per_step=args.prompts_per_step, pack=not args.no_pack,
        sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                stop_token_ids=(tok.eos_id,), seed=args.seed),
        loss=GRPOLossConfig(clip_eps_low=args.clip_low, clip_eps_high=args.clip_high, kl_beta=args.kl_beta,
                            kl_estimator=args.kl_estimator, aggregation=args.loss_aggregation,
                            policy_loss=args.policy_loss, kl_importance_weight=args.kl_importance_weight,
                            norm_len=args.max_new_tokens if args.loss_aggregation == "seq_sum_token_mean" else None,
                            tis_cap=args.tis_cap),
        engine_logprobs=args.engine_logprobs,
        advantage_scale=args.advantage_scale, advantage_estimator=args.advantage_estimator,
        overlong_buffer=args.overlong_buffer, overlong_penalty=args.overlong_penalty, rewards=rewards,
        reward_time_limit_s=args.reward_time_limit or None, dynamic_sampling=args.dynamic_sampling,
        num_minibatches=args.num_minibatches, update_epochs=args.update_epochs, log_samples_every=args.log_samples_every,
        rollout_max_frames=args.rollout_max_frames, sync_bucket_mb=args.sync_bucket_mb,
        offload_reference=args.offload_reference, responses_per_microbatch=args.responses_per_microbatch,
    )
    engine = None
    if args.engine == "vllm" and args.rollout_ranks == "first" and dist.get_world_size() > 1:
        raise SystemExit("--rollout-ranks first: vLLM engines inside a multi-rank job start on every rank together "
                         "(vLLM's external_launcher builds its groups over the whole job); use --rollout-ranks all")
    if args.rollout_ranks == "all" or is_replica_leader(groups):
        engine = _build_engine(args, cfg, tok, ddp, groups)
    writer = None
    if rank0 and args.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.tensorboard_dir)
    trainer = GRPOTrainer(grpo, policy=ddp, optimizer=optimizer, groups=groups, tokenizer=tok, engine=engine,
                          reference=reference, writer=writer, log=log, scheduler=scheduler)
    trainer.step_count = start
    run_eval = _evaluator(args, groups, tok, cfg, ddp, writer, log) if args.eval_data else None
    history = []
    progress = _progress(rank0, start, args.train_iters)
    for it in range(start, args.train_iters):
        metrics = trainer.step(stream.draw)
        history.append(metrics["reward/mean"])
        progress(metrics)
        if writer is not None:  # what was skipped so far, by reason (this rank's videos; every rank's records)
            for key, value in stream.skip_report.as_scalars().items():
                writer.add_scalar(key, value, trainer.step_count)
        if run_eval is not None and ((args.eval_interval and (it + 1) % args.eval_interval == 0)
                                     or (not args.eval_interval and it + 1 == args.train_iters)):
            run_eval(trainer.step_count)
        stop = bool(args.exit_interval) and (it + 1) % args.exit_interval == 0 and it + 1 < args.train_iters
        if args.save and ((args.save_interval and (it + 1) % args.save_interval == 0) or stop):
            checkpointing.save(it + 1)
        if stop:
            log(f"--exit-interval {args.exit_interval}: stopping after step {it + 1}; run again to resume")
            break
    else:
        if args.save and not (args.save_interval and args.train_iters % args.save_interval == 0) and args.train_iters > start:
            checkpointing.save(args.train_iters)
    stream.close()
    report_run_skips(stream.skip_report, log)
    if trainer.reward_report.total:  # this replica's responses that no reward could score (rank 0)
        log(f"rewards: {trainer.reward_report.total} responses could not be scored; their groups were left out\n"
            + trainer.reward_report.top_reasons())
    if rank0 and history:
        k = max(1, len(history) // 5)
        first, last = sum(history[:k]) / k, sum(history[-k:]) / k
        log(f"mean reward: first {k} steps {first:.3f}, last {k} steps {last:.3f}")
    if writer is not None:
        writer.close()
    from megatron_longvideo.parallel.groups import destroy_parallel

    destroy_parallel()  # megatron's groups torn down before the interpreter's exit (as the SFT stages do)
    return history


def _evaluator(args, groups, tok, cfg, policy, writer, log):
    """``run(step)``: the policy evaluated in place on ``--eval-data`` (:mod:`megatron_longvideo.rl.evaluation`,
    greedy, no checkpoint reload), logged to TensorBoard and the log; a collective (every rank calls it)."""
    import torch.distributed as dist

    from megatron_longvideo.data.errors import SkipReport
    from megatron_longvideo.models import tower_config
    from megatron_longvideo.rl.engines import build_engine
    from megatron_longvideo.models.encode import encode_shard
    from megatron_longvideo.rl.evaluation import build_eval_set, eval_scalars, evaluate
    from megatron_longvideo.training.args import dataset_media, frame_sampling

    eval_set = build_eval_set(args.eval_data, tokenizer=tok, video_root=args.video_root, sampling=frame_sampling(args),
                              on_error=args.on_bad_input,
                              skip_report=SkipReport() if dist.get_rank() == 0 else SkipReport(log=None),
                              decode=args.decode, shard=encode_shard(groups, tower_config(cfg)), **dataset_media(args, cfg))
    engine = build_engine("megatron", cfg, policy=policy, groups=groups, tokenizer=tok, pad_token_id=tok.pad_id)

    def run(step):
        result = evaluate(policy, groups, tok, eval_set, engine=engine, max_new_tokens=args.max_new_tokens,
                          max_records=args.eval_max_records)
        scalars = eval_scalars(result.metrics)
        if writer is not None:
            for key, value in scalars.items():
                writer.add_scalar(key, value, step)
        cats = ", ".join(f"{name} {c['accuracy']:.3f}" for name, c in result.metrics["categories"].items())
        log(f"[eval step {step}] accuracy {scalars['eval/accuracy']:.3f} format {scalars['eval/format_rate']:.3f} "
            f"({int(scalars['eval/num_records'])} records; {cats})", flush=True)
        return result

    return run


def _build_engine(args, cfg, tok, policy, groups):
    """This rank's rollout engine, in the policy's precision (vLLM: bf16 unless the policy is 16-bit)."""
    from megatron_longvideo.models import family_of, video_token_counter
    from megatron_longvideo.rl.engines import build_engine
    from megatron_longvideo.training.args import params_dtype
    from megatron_longvideo.training.engine import pending_optimizer_bytes

    dtype = params_dtype(args)
    if args.engine == "megatron":  # generates with the policy's own weights: nothing to copy or sync
        return build_engine("megatron", cfg, policy=policy, groups=groups, tokenizer=tok, pad_token_id=tok.pad_id)
    if args.engine != "vllm":
        return build_engine(args.engine, cfg, tokenizer=tok, pad_token_id=tok.pad_id, dtype=dtype)
    from megatron_longvideo.rl.engines.vllm_engine import tokenizer_folder

    # vLLM loads a tokenizer folder by path (none: token ids only) and pads itself; one engine per GPU, in
    # what is free beside Megatron less the optimizer state it has yet to allocate
    kwargs = dict(tokenizer=tokenizer_folder(tok), dtype=torch.bfloat16 if dtype == torch.float32 else dtype,
                  gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                  memory_reserve_bytes=pending_optimizer_bytes(policy, groups, distributed=args.use_distributed_optimizer))
    if family_of(cfg) == "qwen2_5_vl":  # vLLM's encoder cache must hold the longest video the flags allow
        frames = args.num_frames if not args.fps else args.max_frames
        if args.rollout_max_frames:
            frames = min(frames, args.rollout_max_frames)
        kwargs["max_video_tokens"] = video_token_counter(cfg, args.image_size)(frames)
    return build_engine("vllm", cfg, **kwargs)


def _progress(enabled: bool, start: int, total: int):
    """A rank-0 progress line per step with the key numbers."""
    t0 = time.perf_counter()

    def show(m):
        if not enabled:
            return
        done = show.count = getattr(show, "count", start) + 1
        eta = (time.perf_counter() - t0) / (done - start) * (total - done)
        print(f"[grpo {done}/{total}] reward {m['reward/mean']:.3f} (acc {m.get('reward/accuracy', float('nan')):.2f}) "
              f"loss {m['train/loss']:+.4f} kl {m.get('train/kl_ref', 0.0):.4f} clip {m['train/clip_frac_high'] + m['train/clip_frac_low']:.2f} "
              f"ent {m['train/entropy']:.2f} len {m['response/length']:.1f} cache {m['cache/hit_rate']:.2f} "
              f"{m['time/step']:.1f}s/step eta {eta:.0f}s", flush=True)

    return show


def _checkpointing(args, ddp, optimizer, stream, groups, log, scheduler=None):
    from megatron_longvideo.rl.checkpointing import GRPOCheckpointing

    return GRPOCheckpointing(args, ddp, optimizer, stream, groups, log, scheduler=scheduler)


def build_grpo_scheduler(args, optimizer):
    """megatron's ``OptimizerParamScheduler`` over GRPO steps: ``--lr-warmup-iters``, ``--lr-decay-iters`` and
    ``--train-iters`` count GRPO steps, each ``--num-minibatches x --update-epochs`` optimizer steps."""
    import types

    from megatron_longvideo.training.args import optim_config
    from megatron_longvideo.training.loop import build_scheduler

    per = args.num_minibatches * args.update_epochs
    steps = types.SimpleNamespace(train_iters=args.train_iters * per, lr_warmup_iters=args.lr_warmup_iters * per,
                                  lr_decay_iters=(args.lr_decay_iters or args.train_iters) * per,
                                  lr_decay_style=args.lr_decay_style)
    return build_scheduler(optimizer, steps, optim_config(args))


if __name__ == "__main__":
    from megatron_longvideo.training.launch import run_script  # one error line per run; tracebacks in logs/

    sys.exit(run_script(main, name="train_grpo"))
