"""Decoding cost of 1,024 frames sampled from a one-hour video: sequential PyAV, seeking PyAV, decord.

Writes (once, cached) a one-hour 30 fps H.264 video at small resolution for each keyframe interval
asked for, mostly static (a grey frame with a small square moving one pixel a second), then asks each
path for the same uniformly sampled frames through ``decode_video``: PyAV with ``seek=False`` (every
frame up to the last sampled one is decoded, as before), PyAV with ``seek=True`` (the default: jump to
the keyframe before each far-ahead frame) and decord (``get_batch``, which seeks itself). Each repeat
of each path runs in a fresh process, so its peak RSS (``ru_maxrss``, minus the RSS just before
decoding, after a 2-frame warm-up request) is its own. Reported: medians over the repeats of the
seconds (probe, frame table, decode, resize), the RSS growth and that growth beyond the output tensor;
the frames the decoder produced (counted, PyAV paths); the seconds of the seek path's frame table (one
demuxing pass) alone; and whether the frames equal the sequential path's bit for bit. Both PyAV paths
decode with frame threads; for reference, a plain decode of every frame is timed with frame and with
slice threads (on small frames frame threading costs more than it gives). Decoding runs with one torch
thread, as in DataLoader workers. The time ratio sits below the frames-decoded ratio by the fixed costs
(frame table, seeks, conversion); small static frames decode fast, so those weigh more here than with
camera footage, where the time ratio moves towards the frames-decoded one.

    python benchmarks/decode_seek.py                              # 108,000 frames, GOP 30 and 250 (~3 min, 2 cores)
    python benchmarks/decode_seek.py --quick --out /tmp/seek.md   # 2-minute video: a smoke run

A run and what it shows: docs/results/decode_seek_cpu.md.

Leaves out: other codecs (VP9, HEVC), GPU decoding, DALI.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import multiprocessing as mp
import os
import queue as queue_module
import resource
import statistics
import tempfile
import time
from fractions import Fraction

PATHS = ("pyav sequential", "pyav seek", "decord")


def write_static_video(path: str, *, num_frames: int, fps: int, size: int, gop: int) -> None:
    """A grey H.264 video with a keyframe every ``gop`` frames and a small square moving 1 px a second."""
    import av
    import numpy as np

    tmp = path + ".part"
    with av.open(tmp, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps), options={
            "preset": "ultrafast", "crf": "23", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"})
        stream.pix_fmt, stream.width, stream.height = "yuv420p", size, size
        side = max(4, size // 8)
        frame = np.full((size, size, 3), 128, dtype=np.uint8)  # [H, W, 3]
        for i in range(num_frames):
            x = (i // fps) % (size - side)
            frame[:] = 128
            frame[side : 2 * side, x : x + side] = (220, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def plain_decode_seconds(video: str, thread_type: str) -> float:
    """Seconds PyAV takes to decode every frame with ``thread_type`` threads, converting none."""
    import av

    with av.open(video) as container:
        stream = container.streams.video[0]
        stream.thread_type = thread_type
        start = time.perf_counter()
        for _ in container.decode(stream):
            pass
        return time.perf_counter() - start


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run_one(path_name: str, video: str, num_frames: int, image_size: int, queue) -> None:
    import torch

    from megatron_longvideo.data import backends
    from megatron_longvideo.data.sampling import FrameSamplingConfig
    from megatron_longvideo.data.video import decode_video, probe_video

    torch.set_num_threads(1)  # as in DataLoader workers, where decoding runs
    backend, seek = {"pyav sequential": ("pyav", False), "pyav seek": ("pyav", True), "decord": ("decord", True)}[path_name]
    decoded = [0]
    count_from = backends._decoded

    def counting(packets):  # frames the seeking path's decoder produced
        for frame in count_from(packets):
            decoded[0] += 1
            yield frame

    backends._decoded = counting
    if backend == "decord":
        importlib.import_module("decord")  # import cost outside the measurement
    info = probe_video(video)
    decode_video(video, FrameSamplingConfig(num_frames=2, image_size=image_size), backend=backend, seek=seek)  # warm-up
    decoded[0] = 0
    base = _rss_bytes()
    start = time.perf_counter()
    out = decode_video(video, FrameSamplingConfig(num_frames=num_frames, image_size=image_size), backend=backend, seek=seek)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if path_name == "pyav sequential":
        decoded[0] = out.indices[-1] + 1
    table_seconds = None
    if path_name == "pyav seek":
        start = time.perf_counter()
        backends.frame_table(video, info.num_frames)
        table_seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "num_sampled": len(out.indices), "peak_delta": max(peak - base, 0),
               "output_bytes": out.frames.numel() * out.frames.element_size(),
               "decoded": decoded[0] if backend == "pyav" else None, "table_seconds": table_seconds,
               "digest": hashlib.sha256(out.frames.numpy().tobytes()).hexdigest()})


def _measure(path_name: str, video: str, num_frames: int, image_size: int, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    runs = []
    for _ in range(repeats):
        queue = ctx.Queue()
        proc = ctx.Process(target=_run_one, args=(path_name, video, num_frames, image_size, queue))
        proc.start()
        while True:
            try:
                runs.append(queue.get(timeout=5))
                break
            except queue_module.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"{path_name} on {video}: the worker died (exit code {proc.exitcode})") from None
        proc.join()
    assert len({r["digest"] for r in runs}) == 1, f"{path_name}: frames differ between repeats"
    out = dict(runs[0])
    for key in ("seconds", "peak_delta"):
        out[key] = statistics.median(r[key] for r in runs)
    if out["table_seconds"] is not None:
        out["table_seconds"] = statistics.median(r["table_seconds"] for r in runs)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke size: a 2-minute video, 64 frames, one repeat")
    p.add_argument("--minutes", type=float, default=None, help="video length (default 60)")
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--size", type=int, default=64, help="video width and height")
    p.add_argument("--gops", default=None, help="keyframe intervals in frames, comma-separated (default 30,250)")
    p.add_argument("--num-frames", type=int, default=None, help="frames sampled (default 1024)")
    p.add_argument("--image-size", type=int, default=64, help="vision tower input size")
    p.add_argument("--repeats", type=int, default=None, help="fresh processes per path (default 3)")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "megatron_longvideo_bench"),
                   help="where the synthetic videos are kept between runs")
    p.add_argument("--out", help="also write the report here")
    args = p.parse_args(argv)
    minutes = args.minutes or (2 if args.quick else 60)
    gops = [int(g) for g in (args.gops or ("30" if args.quick else "30,250")).split(",")]
    num_frames = args.num_frames or (64 if args.quick else 1024)
    repeats = args.repeats or (1 if args.quick else 3)
    video_frames = int(minutes * 60 * args.fps)
    paths = [name for name in PATHS if name != "decord" or importlib.util.find_spec("decord") is not None]

    os.makedirs(args.cache_dir, exist_ok=True)
    lines = [f"{num_frames} frames sampled uniformly from a {video_frames:,}-frame ({minutes:g} min at {args.fps} fps) "
             f"{args.size}x{args.size} H.264 video (mostly static), resized to {args.image_size} px; medians of "
             f"{repeats} fresh processes per path.", ""]
    rows = []
    for gop in gops:
        video = os.path.join(args.cache_dir, f"static_{video_frames}f_{args.fps}fps_{args.size}px_gop{gop}.mp4")
        if not os.path.exists(video):
            start = time.perf_counter()
            write_static_video(video, num_frames=video_frames, fps=args.fps, size=args.size, gop=gop)
            print(f"wrote {video} in {time.perf_counter() - start:.0f} s")
        lines.append(f"- GOP {gop}: {os.path.getsize(video) / 2**20:.1f} MiB ({video})")
        results = {name: _measure(name, video, num_frames, args.image_size, repeats) for name in paths}
        rows.append((gop, results))
        plain = {t: plain_decode_seconds(video, t) for t in ("AUTO", "SLICE")}
        lines.append(f"  every frame decoded, none converted (PyAV, in the parent process): {plain['AUTO']:.2f} s with "
                     f"frame threads (what both paths use), {plain['SLICE']:.2f} s with slice threads")
    lines += ["", "| GOP | path | seconds | sampled frames/s | frames decoded | frame table (s) | peak RSS delta (MiB) "
              "| beyond output (MiB) | speed-up vs sequential | frames equal sequential |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for gop, results in rows:
        base = results["pyav sequential"]
        for name, r in results.items():
            decoded = f"{r['decoded']:,}" if r["decoded"] is not None else "n/a"
            table = f"{r['table_seconds']:.2f}" if r["table_seconds"] is not None else ""
            lines.append(
                f"| {gop} | {name} | {r['seconds']:.2f} | {r['num_sampled'] / r['seconds']:.0f} | {decoded} | {table} | "
                f"{r['peak_delta'] / 2**20:.1f} | {(r['peak_delta'] - r['output_bytes']) / 2**20:.1f} | "
                f"{base['seconds'] / r['seconds']:.1f}x | {'yes' if r['digest'] == base['digest'] else 'NO'} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
