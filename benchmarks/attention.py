"""One attention layer, forward + backward, per CP mode and size: the tile engine against the dense path
and against the floor (one plain causal flash call on the whole sequence).

For each sequence length S, the layer is megatron's core-attention slot filled by the library's
``TileCoreAttention`` (real CP groups, real collectives; one torch thread per rank):

  cp1            CP=1 (the three modes coincide)
  all_gather     K/V all-gathered over CP; a2a: Ulysses (heads split); p2p: ring (K/V and dK/dV travel)
  plain / packed a plain causal row, or a shared-prefix packed group: prefix 3/4 of S, 8 responses, padding

and, on one rank, two references: the **floor**, one causal call of the kernel the engine picks
(``cpu_flash`` on CPU) on the whole sequence (forward + its backward: the least any exact causal
attention can cost), and the **dense** path (the
test oracle: masked scores materialised; the library's attention before the engine), which is skipped
(not run) once its predicted score tensors pass ``--dense-cap-gb``.

Per configuration it reports, as medians of ``--repeats``: per-rank wall time, CPU seconds summed over
the ranks (the total work, which on a machine with fewer cores than ranks is the fair comparison with
the floor), the tiling overhead = that CPU time / the floor's (packed layouts compute fewer pairs than
a plain causal row, so their ratio can fall below 1), kernel calls per layer, and the peak working
memory per rank: bytes of live tensors counted exactly (``megatron_longvideo.memory_meter``; on CUDA
the allocator's peak), q/k/v excluded, their gradients included. ``--device cuda`` runs CP=1 on one GPU
(``--dtype bfloat16`` for the flash kernels).

    python benchmarks/attention.py --out docs/results/attention_cpu.md            # 4k, 16k, 64k (~15 min, 2 cores)
    python benchmarks/attention.py --quick --out /tmp/attention_smoke.md          # smoke size (CI)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from megatron_longvideo.parallel.spawn import init_cpu_dist, run_ranks

MODES = ("all_gather", "a2a", "p2p")


def packed_layout(seq_len: int, responses: int = 8):
    from megatron_longvideo.attention.layout import SequenceLayout

    prefix = seq_len * 3 // 4
    n = (seq_len - prefix) // (responses + 1)
    seg = torch.full((1, seq_len), -1, dtype=torch.long)
    seg[0, :prefix] = 0
    for g in range(responses):
        seg[0, prefix + g * n : prefix + (g + 1) * n] = g + 1
    return SequenceLayout.from_segments(seg)


def _module(cp_comm_type, heads, kv_heads, head_dim, groups, context):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_longvideo.attention.core import TileCoreAttention

    config = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                               num_query_groups=kv_heads, kv_channels=head_dim, attention_dropout=0.0,
                               context_parallel_size=groups.cp_size, cp_comm_type=cp_comm_type)
    return TileCoreAttention(config, 1, AttnMaskType.causal, pg_collection=groups.pg_collection,
                             sequence_context=context)


def _timed(fn, repeats, device="cpu"):
    import torch.distributed as dist

    from megatron_longvideo.memory_meter import LiveTensorMeter

    fn()  # warm-up
    walls, cpus, peak = [], [], 0
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        if device == "cuda":  # device time (the CPU only launches) and the allocator's peak
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
            cpus.append(walls[-1])
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
            continue
        with LiveTensorMeter() as meter:
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        peak = max(peak, meter.peak)
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "cpu_min": min(cpus), "cpu_max": max(cpus),
            "peak_mb": peak / 2**20}


def _worker(rank, world_size, opts):
    init_cpu_dist()
    import torch.distributed as dist

    from megatron_longvideo.attention.backends import get_backend
    from megatron_longvideo.attention.dense import chunk_index, dense_attention, visible_mask
    from megatron_longvideo.attention.layout import SequenceLayout, rank_chunks
    from megatron_longvideo.parallel.context import SequenceContext
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    cp = world_size
    groups = initialize_parallel(ParallelConfig(context_parallel_size=cp), seed=0)
    h, hk, d = opts["heads"], opts["kv_heads"], opts["head_dim"]
    device, dtype = opts["device"], getattr(torch, opts["dtype"])
    results = {}
    for s in opts["seq"]:
        s_local = s // cp
        gen = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(s_local, 1, n, d, generator=gen).to(device, dtype).requires_grad_(True)
                   for n in (h, hk, hk))
        grad = torch.randn(s_local, 1, h * d, generator=gen).to(device, dtype)
        for packed in (False, True):
            for mode in MODES if cp > 1 else ("all_gather",):
                layout = packed_layout(s) if packed else SequenceLayout.plain(s)  # its own plan cache
                context = SequenceContext()
                attn = _module(mode, h, hk, d, groups, context)

                def step():
                    with context.use(layout=layout):
                        out = attn(q, k, v, None)
                    out.backward(grad)
                    q.grad = k.grad = v.grad = None

                row = _timed(step, opts["repeats"] if s < 65536 else 1, device)
                key = ("cp1" if cp == 1 else mode, "packed" if packed else "plain")
                (plan,) = layout._plans.values()  # p2p: one plan per ring step
                calls = sum(x.num_calls for x in plan) if isinstance(plan, tuple) else plan.num_calls
                totals = torch.tensor([row["cpu"], row["wall"], row["peak_mb"], calls], dtype=torch.float64)
                gathered = [torch.zeros_like(totals) for _ in range(cp)]
                dist.all_gather(gathered, totals)
                row["cpu_sum"] = sum(t[0].item() for t in gathered)
                row["wall"] = max(t[1].item() for t in gathered)
                row["peak_mb"] = max(t[2].item() for t in gathered)
                row["calls"] = int(max(t[3].item() for t in gathered))  # the busiest rank's kernel calls
                results[(s, cp) + key] = row
        if cp == 1:  # the floor and the dense path, on this one rank
            qb, kb, vb = (x.detach().permute(1, 2, 0, 3).requires_grad_(True) for x in (q, k, v))
            g4 = grad.view(s, 1, h, d).permute(1, 2, 0, 3)
            flash = get_backend("auto", qb)  # the kernel the engine picks here (GQA natively on CPU / flash)
            if not flash.native_gqa:
                kb, vb = (x.detach().repeat_interleave(h // hk, 1).requires_grad_(True) for x in (kb, vb))

            def floor():
                out, lse, _ = flash.forward(qb, kb, vb, True, d**-0.5)
                flash.backward(g4, qb, kb, vb, out, lse, None, True, d**-0.5)

            results[(s, 1, "floor", "plain")] = _timed(floor, opts["repeats"] if s < 65536 else 1, device)
            for packed in (False, True):
                layout = packed_layout(s) if packed else SequenceLayout.plain(s)
                need = 4 * h * s * s * 4 + s * s  # scores, masked scores, probabilities, their gradient; the mask
                if need > opts["dense_cap_gb"] * 2**30:
                    results[(s, 1, "dense", "packed" if packed else "plain")] = {"skipped": True, "need_gb": need / 2**30}
                    continue
                idx = chunk_index(rank_chunks(s, 1, 0))

                def dense():
                    out, _ = dense_attention(qb, kb, vb, visible_mask(layout, 1, idx, idx).to(device), d**-0.5)
                    out.backward(g4)
                    qb.grad = kb.grad = vb.grad = None

                row = _timed(dense, opts["repeats"], device)
                row["cpu_sum"] = row["cpu"]
                results[(s, 1, "dense", "packed" if packed else "plain")] = row
    destroy_parallel()
    return results


def report(results: dict, opts: dict) -> str:
    lines = [f"## One attention layer, forward + backward ({opts['machine']})", "",
             f"{opts['heads']} query heads, {opts['kv_heads']} KV heads, head dim {opts['head_dim']}, {opts['dtype']}, "
             f"batch 1, on {opts['device']}; one torch thread per rank; packed: prefix 3/4 of S + 8 responses + padding; median of {opts['repeats']} "
             f"(1 at 65,536). Memory: peak live-tensor bytes per rank (max over ranks; CUDA: allocator peak), "
             f"q/k/v excluded.", ""]
    for s in opts["seq"]:
        floor = results[(s, 1, "floor", "plain")]
        spread = (floor["cpu_max"] / floor["cpu_min"] - 1) * 100
        lines += [f"### S = {s:,}", "",
                  f"Floor (one causal flash call, forward + backward, whole sequence): {floor['cpu']:.3f} CPU s "
                  f"(its repeats spread {spread:.0f}%), {floor['peak_mb']:.1f} MB.", "",
                  "| layout | CP | mode | kernel calls (busiest rank) | wall per rank (s) | CPU s, all ranks | vs floor | MB per rank |",
                  "|---|---:|---|---:|---:|---:|---:|---:|"]
        for packed in ("plain", "packed"):
            dense = results[(s, 1, "dense", packed)]
            if dense.get("skipped"):
                lines.append(f"| {packed} | 1 | dense (oracle) | - | skipped | skipped | - | "
                             f"needs {dense['need_gb']:.0f} GB (> --dense-cap-gb {opts['dense_cap_gb']:g}) |")
            else:
                lines.append(f"| {packed} | 1 | dense (oracle) | - | {dense['wall']:.3f} | {dense['cpu_sum']:.3f} | "
                             f"{dense['cpu_sum'] / floor['cpu']:.2f}x | {dense['peak_mb']:.1f} |")
            for cp in opts["cp"]:
                for mode in MODES if cp > 1 else ("cp1",):
                    r = results.get((s, cp, mode, packed))
                    if r is None:
                        continue
                    lines.append(f"| {packed} | {cp} | {'engine' if cp == 1 else mode} | {r['calls']} | {r['wall']:.3f} | "
                                 f"{r['cpu_sum']:.3f} | {r['cpu_sum'] / floor['cpu']:.2f}x | {r['peak_mb']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dense-cap-gb", type=float, default=8.0, help="mark the dense path OOM above this")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: CP=1 only (one GPU)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--machine", default="CPU, 2 cores, torch " + torch.__version__.split("+")[0])
    p.add_argument("--quick", action="store_true", help="smoke size: S 512 and 1024, CP 1 and 2, 1 repeat")
    p.add_argument("--out", help="write the report here")
    args = p.parse_args(argv)
    if args.quick:
        args.seq, args.cp, args.repeats = [512, 1024], [1, 2], 1
    if args.device == "cuda":
        args.cp = [1]
    for s in args.seq:
        if any(s % (2 * cp) for cp in args.cp):
            p.error(f"--seq {s} must be divisible by 2 x every --cp")
    opts = dict(seq=args.seq, cp=args.cp, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                repeats=args.repeats, dense_cap_gb=args.dense_cap_gb, machine=args.machine, device=args.device,
                dtype=args.dtype)
    results = {}
    for cp in sorted(set(args.cp) | {1}):
        t0 = time.perf_counter()
        results.update(run_ranks(_worker, cp, opts, timeout=7200)[0])
        print(f"[cp={cp}] done in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    text = report(results, opts)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
