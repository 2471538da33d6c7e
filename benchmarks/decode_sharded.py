"""Frame-sharded decoding across an encode group, and prompt prefetching behind a training step (CPU).

Two measurements, each a ratio inside one run, medians over repeats:

1. **Frame-sharded decoding.** One long synthetic H.264 video (default 10 minutes at 30 fps, 128 px,
   a keyframe every 30 frames, mostly static; written once into ``--cache-dir``), 512 frames sampled
   uniformly and resized to 64 px. For each encode-group size E in 1, 2, 4, 8 and each rank r of E, a
   fresh ``probe_lazy`` object (as a rank's own process would hold) decodes ``FrameShard(rank=r,
   size=E)`` with ``decode_shard``; probe and decode are timed together. The ranks run one after the
   other here, but on a real group they run in parallel, so the critical path is the slowest rank;
   the sum over ranks is the CPU work the group does. E=1 is what every rank does today with
   ``decode='full'`` (the whole sample on every rank); ``decode_video`` is timed too for reference.
   Reported per E: slowest rank and sum (medians over ``--repeats`` rounds, the E values taking
   turns), the sampled frames and resized uint8 bytes a rank keeps (most over ranks), the slowest
   rank's time and the sum as fractions of E=1 (the median of each round's ratio), the ideal 1/E,
   and whether the shards' frames (``LazyFrames.frames(start, stop)`` of each rank, concatenated)
   equal ``decode_video``'s bit for bit, served from what each rank's ``decode_shard`` decoded.
   The fixed costs every rank pays whatever E is, the probe and the frame table (one demuxing pass
   over the whole file, built by the first request that seeks), are timed alone as well.

   **Shared probe** (``data/probe_cache.py``): the same shards, in the same rounds, with the group's
   probe shared through a fresh folder per round and E. First epoch: rank 0's ``probe_shared`` probes,
   builds the frame table and publishes (timed: ``t_pub``), then decodes its shard; each other rank
   reads the entry and decodes its shard. In a real group those ranks start with rank 0 and wait for
   the entry, so the critical path is ``max(rank 0, t_pub + slowest other rank)``. Later epochs: the
   entry is there and every rank, rank 0 included, reads it. Reported per E: both critical paths
   (medians), the later epochs' sum over ranks, each against today's E=1 of the same round, the probes
   and frame tables made by the ranks that read the entry (0 when it works), and whether the shards
   equal ``decode_video`` bit for bit. Reading an entry is timed alone as well.

2. **Prefetch.** A ``PromptStream`` over a small synthetic RL dataset (``make_synthetic_dataset``,
   videos of one to two minutes, ``decode='full'``) hands out k prompts per step; each step forces the
   frames to exist (``as_tensor``) and then runs a simulated training step: tanh(matmul) of float32
   matrices in the main process with one torch thread, calibrated at start to take about what decoding
   one step's prompts takes. Compared: ``prefetch_workers`` 0, 1 and 2 (``prefetch_factor`` =
   ceil(k / workers), at least 2, so the workers may hold a whole step's prompts ahead; with the
   default of 2, one worker would hold only 2 of 4). Every configuration starts a fresh stream at
   epoch 0, so all draw the same prompts. Decode alone (``draw`` with no training), train alone and
   the three worker counts take turns for ``--rounds`` rounds, in an order rotated each round.
   Reported: per configuration the median over rounds of its median step (the steps after one warm-up
   step, which also starts the workers), of the wait inside ``draw`` and of the rest of the step (the
   training, slowed where workers take its cores); the step over 0 workers' (the median of each
   round's ratio); decode alone (also in CPU-seconds of this process, FFmpeg's threads included) and
   train alone, so the ideal ``max(train, decode)`` and the serial ``train + decode`` can be read off;
   and whether every configuration drew the same prompts with the same frames as 0 workers. Each
   stream is closed after its configuration. On a 2-core machine 2 workers plus the main thread
   oversubscribe the cores.

    python benchmarks/decode_sharded.py                                 # ~5 min on 2 CPU cores
    python benchmarks/decode_sharded.py --quick --out /tmp/sharded.md   # smoke size, well under a minute

A run and what it shows: docs/results/decode_sharded_cpu.md.

Leaves out: ranks as real parallel processes (they would share the 2 cores here), decord/DALI,
``decode='lazy'`` with ``shard`` inside the prompt stream, the GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402
from decode_seek import write_static_video  # noqa: E402

GROUP_SIZES = (1, 2, 4, 8)
WORKERS = (0, 1, 2)


# ---------------------------------------------------------------------------------------------- part 1


def _decode_rank(video: str, cfg, rank: int, size: int):
    """One rank's work: a fresh probe, then its shard. Returns ``(seconds, lazy frames)``."""
    from megatron_longvideo.data.frames import FrameShard
    from megatron_longvideo.data.video import probe_lazy

    start = time.perf_counter()
    lazy = probe_lazy(video, cfg)
    lazy.decode_shard(FrameShard(rank=rank, size=size))
    return time.perf_counter() - start, lazy


def _shared_rank(video: str, cfg, rank: int, size: int, folder: str):
    """One rank with the group's probe shared through ``folder``: ``(seconds to the probe, seconds in
    all, lazy frames)``. ``wait_s=0``: here rank 0 has published before the others run; a rank that
    missed the entry would probe itself and show in the file-pass count."""
    from megatron_longvideo.data.frames import FrameShard
    from megatron_longvideo.data.probe_cache import probe_shared

    start = time.perf_counter()
    lazy = probe_shared(video, cfg, probe_dir=folder, shard=FrameShard(rank=rank, size=size), wait_s=0)
    probed = time.perf_counter() - start
    lazy.decode_shard(FrameShard(rank=rank, size=size))
    return probed, time.perf_counter() - start, lazy


def _shards_exact(lazies, size: int, reference) -> bool:
    """The ranks' shards, concatenated, equal ``reference`` and were served from what each decoded."""
    from megatron_longvideo.data.frames import FrameShard

    before = [lz.num_decoded for lz in lazies]
    parts = [lz.frames(*FrameShard(rank=r, size=size).frames_of(len(lz))) for r, lz in enumerate(lazies)]
    return torch.equal(torch.cat(parts), reference.frames) and [lz.num_decoded for lz in lazies] == before


def measure_sharing(video: str, cfg, e: int, folder: str, reference, check: bool) -> dict:
    """One round of E ranks sharing the probe: the first epoch's and a later epoch's critical paths."""
    published, first_total, rank0 = _shared_rank(video, cfg, 0, e, folder)
    first = [_shared_rank(video, cfg, r, e, folder) for r in range(1, e)]
    later = [_shared_rank(video, cfg, r, e, folder) for r in range(e)]
    readers = [lz for _, _, lz in first + later]
    out = {"first": max([first_total] + [published + t for _, t, _ in first]),
           "later": max(t for _, t, _ in later), "later_total": sum(t for _, t, _ in later),
           "passes": sum(lz.num_probes + lz.num_tables_built for lz in readers)}
    if check:
        out["exact"] = (_shards_exact([rank0] + [lz for _, _, lz in first], e, reference)
                        and _shards_exact([lz for _, _, lz in later], e, reference))
    return out


def measure_sharding(video: str, cfg, repeats: int, scratch: str) -> tuple[dict, dict, dict]:
    """Per group size: medians of the slowest rank and of the sum, what a rank keeps, exactness; the
    same with the probe shared (``scratch``: a folder for the shared probes)."""
    from megatron_longvideo.data import backends
    from megatron_longvideo.data.frames import FrameShard
    from megatron_longvideo.data.probe_cache import probe_shared
    from megatron_longvideo.data.video import decode_video, probe_lazy, probe_video

    reference = decode_video(video, cfg)  # warm-up (page cache, codec) and the frames to match
    slowest = {e: [] for e in GROUP_SIZES}
    total = {e: [] for e in GROUP_SIZES}
    shared = {e: [] for e in GROUP_SIZES}
    kept = {}
    exact = {}
    for round_ in range(repeats):
        for e in GROUP_SIZES:
            shared[e].append(measure_sharing(video, cfg, e, os.path.join(scratch, f"r{round_}_e{e}"), reference,
                                             check=round_ == 0))
            seconds, lazies = [], []
            for r in range(e):
                s, lazy = _decode_rank(video, cfg, r, e)
                seconds.append(s)
                lazies.append(lazy)
            slowest[e].append(max(seconds))
            total[e].append(sum(seconds))
            if round_ == 0:
                h, w = lazies[0].size
                counts = [len(lz.decoded_positions()) for lz in lazies]
                kept[e] = (max(counts), max(counts) * 3 * h * w)
                before = [lz.num_decoded for lz in lazies]
                parts = [lz.frames(*FrameShard(rank=r, size=e).frames_of(len(lz))) for r, lz in enumerate(lazies)]
                # equal to the full decode, and served from what each shard decoded (nothing decoded late)
                exact[e] = (torch.equal(torch.cat(parts), reference.frames)
                            and [lz.num_decoded for lz in lazies] == before == counts)
    rows = {e: {"slowest": statistics.median(slowest[e]), "total": statistics.median(total[e]),
                # ratios within each round, then their median (slow phases of a shared machine cancel)
                "ratio": statistics.median(a / b for a, b in zip(slowest[e], slowest[1])),
                "total_ratio": statistics.median(a / b for a, b in zip(total[e], total[1])),
                "frames": kept[e][0], "bytes": kept[e][1], "exact": exact[e]} for e in GROUP_SIZES}
    sharing = {}
    for e in GROUP_SIZES:
        rounds = shared[e]
        sharing[e] = {key: statistics.median(r[key] for r in rounds) for key in ("first", "later", "later_total")}
        for key in ("first", "later"):
            sharing[e][key + "_ratio"] = statistics.median(r[key] / b for r, b in zip(rounds, slowest[1]))
        sharing[e]["vs_today"] = statistics.median(r["later"] / b for r, b in zip(rounds, slowest[e]))
        sharing[e]["passes"] = max(r["passes"] for r in rounds)
        sharing[e]["exact"] = rounds[0]["exact"]

    def timed(fn, n=max(repeats, 3)):
        out = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
        return statistics.median(out)

    info = probe_video(video)
    fixed = {
        "decode_video": timed(lambda: decode_video(video, cfg)),
        "probe": timed(lambda: probe_lazy(video, cfg)),
        "table": timed(lambda: backends.frame_table(video, info.num_frames)),
        "read": timed(lambda: probe_shared(video, cfg, probe_dir=os.path.join(scratch, "r0_e2"),
                                           shard=FrameShard(rank=1, size=2), wait_s=0)),
        "num_frames": info.num_frames,
        "sampled": len(reference.indices),
    }
    return rows, sharing, fixed


# ---------------------------------------------------------------------------------------------- part 2


def _matmul_step(a: torch.Tensor, b: torch.Tensor, iters: int) -> None:
    c = a
    for _ in range(iters):
        c = torch.tanh(c @ b)  # bounded, so the values stay finite
    float(c[0, 0])


def _dataset(root: str, num_frames: int, image_size: int):
    from megatron_longvideo.data.dataset import LongVideoDataset, VideoDatasetConfig
    from megatron_longvideo.data.sampling import FrameSamplingConfig
    from megatron_longvideo.data.tokenizer import load_tokenizer

    config = VideoDatasetConfig(mode="rl", video_root=os.path.join(root, "videos"),
                                sampling=FrameSamplingConfig(num_frames=num_frames, image_size=image_size),
                                decode="full")
    return LongVideoDataset.from_file(os.path.join(root, "qa.jsonl"), tokenizer=load_tokenizer("bytes"),
                                      num_video_tokens=lambda t: 2 * t, config=config)


def _stream(ds, workers: int, k: int):
    from megatron_longvideo.data.sampler import DistributedVideoSampler
    from megatron_longvideo.rl.prompt_stream import PromptStream

    factor = max(2, math.ceil(k / workers)) if workers else 2
    sampler = DistributedVideoSampler(len(ds), dp_rank=0, dp_size=1, seed=0)
    return PromptStream(ds, sampler, prefetch_workers=workers, prefetch_factor=factor), factor


def _run_steps(ds, workers: int, k: int, steps: int, train) -> dict:
    """``steps + 1`` steps (the first a warm-up): per step the seconds, the wait in ``draw``, a digest."""
    from megatron_longvideo.data.frames import as_tensor

    stream, factor = _stream(ds, workers, k)
    step_s, wait_s, cpu_s, digest = [], [], [], hashlib.sha256()
    try:
        for _ in range(steps + 1):
            cpu = time.process_time()  # this process's threads (FFmpeg's included), not the workers'
            start = time.perf_counter()
            prompts = stream.draw(k)
            frames = [as_tensor(p.videos[0]) for p in prompts]
            waited = time.perf_counter() - start
            if train is not None:
                train()
            step_s.append(time.perf_counter() - start)
            cpu_s.append(time.process_time() - cpu)
            wait_s.append(waited)
            for p, f in zip(prompts, frames):
                digest.update(p.sample_id.encode())
                digest.update(f.contiguous().numpy().tobytes())
    finally:
        stream.close()
    return {"step": statistics.median(step_s[1:]), "wait": statistics.median(wait_s[1:]),
            "train_in_step": statistics.median(a - b for a, b in zip(step_s[1:], wait_s[1:])),
            "cpu": statistics.median(cpu_s[1:]), "factor": factor, "digest": digest.hexdigest()}


def measure_prefetch(root: str, num_frames: int, image_size: int, k: int, steps: int, rounds: int,
                     matmul: int) -> tuple[dict, dict]:
    """Decode alone, train alone and each worker count, taking turns for ``rounds`` rounds; per
    configuration the median over rounds of its median step (and of its step over 0 workers' in the
    same round, so slow phases of a shared machine cancel out)."""
    ds = _dataset(root, num_frames, image_size)
    calibration = _run_steps(ds, 0, k, steps, None)["step"]  # decode alone (also warms the page cache)

    a, b = torch.randn(matmul, matmul), torch.randn(matmul, matmul) / math.sqrt(matmul)
    _matmul_step(a, b, 5)
    probe_iters = 50
    start = time.perf_counter()
    _matmul_step(a, b, probe_iters)
    per_iter = (time.perf_counter() - start) / probe_iters
    iters = max(1, round(calibration / per_iter))

    def train():
        _matmul_step(a, b, iters)

    def train_alone():
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            train()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    per_round = {key: [] for key in ("decode", "decode_cpu", "train", *WORKERS)}
    ratios = {w: [] for w in WORKERS}
    digests = {}
    order = ["decode", "train", *WORKERS]
    for i in range(rounds):
        runs = {}
        for what in order[i % len(order):] + order[: i % len(order)]:  # rotated: no configuration always first
            if what == "decode":
                decode = _run_steps(ds, 0, k, steps, None)
                per_round["decode"].append(decode["step"])
                per_round["decode_cpu"].append(decode["cpu"])
            elif what == "train":
                per_round["train"].append(train_alone())
            else:
                runs[what] = _run_steps(ds, what, k, steps, train)
        for w, r in runs.items():
            per_round[w].append(r)
            ratios[w].append(r["step"] / runs[0]["step"])
            digests.setdefault(w, set()).add(r["digest"])
    rows = {}
    for w in WORKERS:
        rows[w] = {"step": statistics.median(r["step"] for r in per_round[w]),
                   "wait": statistics.median(r["wait"] for r in per_round[w]),
                   "train_in_step": statistics.median(r["train_in_step"] for r in per_round[w]),
                   "factor": per_round[w][0]["factor"], "ratio": statistics.median(ratios[w]),
                   "same": digests[w] == digests[0] and len(digests[0]) == 1}
    alone = {"decode": statistics.median(per_round["decode"]), "train": statistics.median(per_round["train"]),
             "decode_cpu": statistics.median(per_round["decode_cpu"]),
             "calibration": calibration, "iters": iters, "matmul": matmul}
    return rows, alone


def _synthetic(cache_dir: str, num_videos: int, min_frames: int, max_frames: int, fps: int, size: int) -> str:
    """A cached synthetic RL dataset (written into a temporary folder, then renamed)."""
    from megatron_longvideo.data.synthetic import SyntheticDatasetConfig, make_synthetic_dataset

    root = os.path.join(cache_dir, f"rl_{num_videos}v_{min_frames}-{max_frames}f_{fps}fps_{size}px")
    if os.path.exists(os.path.join(root, "qa.jsonl")):
        return root
    tmp = root + f".part{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    make_synthetic_dataset(tmp, SyntheticDatasetConfig(num_videos=num_videos, min_frames=min_frames,
                                                       max_frames=max_frames, fps=fps, size=size))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    print(f"wrote {root} in {time.perf_counter() - start:.0f} s")
    return root


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke size: a 1-minute video, 64 frames, 3 steps")
    p.add_argument("--minutes", type=float, default=None, help="length of the sharded video (default 10)")
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--size", type=int, default=128, help="video width and height")
    p.add_argument("--gop", type=int, default=30, help="keyframe interval in frames")
    p.add_argument("--num-frames", type=int, default=None, help="frames sampled from the long video (default 512)")
    p.add_argument("--image-size", type=int, default=64, help="vision tower input size")
    p.add_argument("--repeats", type=int, default=None, help="rounds over the group sizes (default 9)")
    p.add_argument("--videos", type=int, default=None, help="videos of the RL dataset (default 16)")
    p.add_argument("--prompt-frames", type=int, default=None, help="frames sampled per prompt (default 64)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (k)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per configuration and round (default 6)")
    p.add_argument("--rounds", type=int, default=None, help="rounds over the prefetch configurations (default 5)")
    p.add_argument("--matmul", type=int, default=256, help="side of the simulated training step's matrices")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "megatron_longvideo_bench"),
                   help="where the synthetic videos are kept between runs")
    p.add_argument("--out", help="also write the report here")
    args = p.parse_args(argv)
    minutes = args.minutes or (1 if args.quick else 10)
    num_frames = args.num_frames or (64 if args.quick else 512)
    repeats = args.repeats or (3 if args.quick else 9)
    videos = args.videos or (4 if args.quick else 16)
    prompt_frames = args.prompt_frames or (16 if args.quick else 64)
    steps = args.steps or (3 if args.quick else 6)
    rounds = args.rounds or (1 if args.quick else 5)
    k = 2 if args.quick and args.prompts == 4 else args.prompts
    clip = (240, 360) if args.quick else (1800, 3600)  # frames of the RL videos (8-12 s or 1-2 min at 30 fps)

    from megatron_longvideo.data.sampling import FrameSamplingConfig

    torch.set_num_threads(1)  # decoding as in DataLoader workers; the simulated step on one core
    os.makedirs(args.cache_dir, exist_ok=True)
    video_frames = int(minutes * 60 * args.fps)
    video = os.path.join(args.cache_dir, f"static_{video_frames}f_{args.fps}fps_{args.size}px_gop{args.gop}.mp4")
    if not os.path.exists(video):
        start = time.perf_counter()
        write_static_video(video, num_frames=video_frames, fps=args.fps, size=args.size, gop=args.gop)
        print(f"wrote {video} in {time.perf_counter() - start:.0f} s")
    cfg = FrameSamplingConfig(num_frames=num_frames, image_size=args.image_size)
    scratch = tempfile.mkdtemp(prefix="probe_shared_")
    try:
        shard_rows, sharing, fixed = measure_sharding(video, cfg, repeats, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    root = _synthetic(args.cache_dir, videos, clip[0], clip[1], args.fps, args.size)
    prefetch_rows, alone = measure_prefetch(root, prompt_frames, args.image_size, k, steps, rounds, args.matmul)

    lines = [
        "## Frame-sharded decoding", "",
        f"{fixed['sampled']} frames sampled uniformly from a {fixed['num_frames']:,}-frame ({minutes:g} min at "
        f"{args.fps} fps) {args.size}x{args.size} H.264 video (keyframe every {args.gop} frames, mostly static, "
        f"{os.path.getsize(video) / 2**20:.1f} MiB), resized to {args.image_size} px; per rank a fresh "
        f"`probe_lazy` + `decode_shard`, timed together; medians of {repeats} rounds (ratios: the median of "
        f"each round's ratio). Fixed costs each rank pays whatever E is: probe {fixed['probe'] * 1e3:.1f} ms, "
        f"frame table (one demuxing pass over the whole file) {fixed['table']:.3f} s. `decode_video` of the whole "
        f"sample (what every rank does with decode='full'): {fixed['decode_video']:.3f} s.", "",
        "| E | frames per rank (max) | kept per rank (MiB, max) | slowest rank (s) | sum over ranks (s) "
        "| slowest vs E=1 | ideal 1/E | speed-up vs E=1 | sum vs E=1 | shards equal decode_video |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e, r in shard_rows.items():
        lines.append(
            f"| {e} | {r['frames']} | {r['bytes'] / 2**20:.2f} | {r['slowest']:.3f} | {r['total']:.3f} | "
            f"{r['ratio']:.2f} | {1 / e:.3f} | {1 / r['ratio']:.2f}x | {r['total_ratio']:.2f} | "
            f"{'yes' if r['exact'] else 'NO'} |")
    lines += [
        "", "## Shared probe", "",
        f"The same shards with the group's probe shared (`probe_shared`): rank 0 probes, builds the frame table "
        f"and publishes; the others read the entry ({fixed['read'] * 1e3:.1f} ms) instead of probing and demuxing. "
        f"First epoch: max(rank 0, rank 0's publish + the slowest other rank), the others waiting for the entry; "
        f"later epochs: every rank reads it. Against today's per-rank probe at E=1 of the same round "
        f"(medians of {repeats} rounds).", "",
        "| group size | per-rank probe: slowest (s) | shared, first epoch: slowest (s) | shared, later epochs: "
        "slowest (s) | shared, later epochs: sum (s) | speed-up vs E=1: per-rank probe | speed-up vs E=1: "
        "shared, first epoch | speed-up vs E=1: shared, later epochs | ideal | later epochs vs per-rank probe "
        "| probes + tables by readers | shards equal decode_video |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e, r in sharing.items():
        today = shard_rows[e]
        lines.append(
            f"| {e} | {today['slowest']:.3f} | {r['first']:.3f} | {r['later']:.3f} | {r['later_total']:.3f} | "
            f"{1 / today['ratio']:.2f}x | {1 / r['first_ratio']:.2f}x | {1 / r['later_ratio']:.2f}x | {e}x | "
            f"{r['vs_today']:.2f} | {r['passes']} | {'yes' if r['exact'] else 'NO'} |")
    ideal, serial = max(alone["train"], alone["decode"]), alone["train"] + alone["decode"]
    cores = os.cpu_count() or 1
    crowded = (f"{cores} CPU cores: {max(WORKERS)} workers plus the main thread oversubscribe them"
               if cores < max(WORKERS) + 1 else f"{cores} CPU cores")
    lines += [
        "", "## Prefetch behind a training step", "",
        f"{videos} synthetic videos of {clip[0]}-{clip[1]} frames ({args.size} px, {args.fps} fps), {prompt_frames} "
        f"frames per prompt at {args.image_size} px, {k} prompts per step, decode='full'. Simulated step: "
        f"{alone['iters']} tanh(matmul) of {alone['matmul']}x{alone['matmul']} float32 in the main process (one "
        f"torch thread), calibrated to a first decode-alone pass ({alone['calibration']:.3f} s). {steps} steps after "
        f"a warm-up step per configuration, {rounds} rounds taking turns; medians over rounds of each "
        f"configuration's median step. Decode alone (draw, no training) {alone['decode']:.3f} s per step "
        f"({alone['decode_cpu']:.3f} CPU-seconds of this process, FFmpeg's threads included), train alone "
        f"{alone['train']:.3f} s: ideal max(train, decode) {ideal:.3f} s, serial train + decode {serial:.3f} s. "
        f"{crowded}.", "",
        "| prefetch workers | prefetch factor | step (s) | wait in draw (s) | rest of step (s) | train alone (s) "
        "| decode alone (s) | ideal max (s) | vs 0 workers | speed-up vs 0 workers | step vs ideal "
        "| same prompts and frames as 0 workers |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for w, r in prefetch_rows.items():
        factor = r["factor"] if w else "-"
        lines.append(
            f"| {w} | {factor} | {r['step']:.3f} | {r['wait']:.3f} | {r['train_in_step']:.3f} | "
            f"{alone['train']:.3f} | {alone['decode']:.3f} | {ideal:.3f} | {r['ratio']:.2f} | {1 / r['ratio']:.2f}x | "
            f"{r['step'] / ideal:.2f} | {'yes' if r['same'] else 'NO'} |")
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
