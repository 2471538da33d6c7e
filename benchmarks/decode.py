"""Decoding throughput and peak memory per backend for a long-video request.

Writes a long synthetic video (H.264 for pyav / decord, VP9 for DALI's CPU decoder), then asks each
available backend for 1,024 uniformly sampled frames, each backend in a fresh process so that peak
RSS (``ru_maxrss``, minus the process's RSS just before decoding, after a 2-frame warm-up request)
belongs to that backend alone.
Prints a markdown table: sampled frames per second, video frames per second (every frame up to the
last sampled one is decoded), peak RSS delta, and that delta beyond the output tensor itself (the
decoder's working memory); for scale, the size of all full-resolution RGB frames of the video, which
a decoder that kept them all would need on top of the output. Decoding runs with one torch thread,
as in DataLoader workers. The synthetic video is mostly static, so it decodes faster than camera
footage of the same size: compare backends within one run, not with other videos.

    python benchmarks/decode.py            # 8,192-frame 256x256 video, 1,024 frames at 384 px
    python benchmarks/decode.py --quick    # 512-frame 64x64 video, 128 frames: a smoke run

Leaves out: GPU (NVDEC) decoding, which needs CUDA; the DALI row is its CPU decoder.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import resource
import tempfile
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run_one(backend: str, path: str, num_frames: int, image_size: int, queue) -> None:
    from megatron_longvideo.data.sampling import FrameSamplingConfig
    from megatron_longvideo.data.video import decode_video, probe_video

    import torch

    torch.set_num_threads(1)  # as in DataLoader workers, where decoding runs
    cfg = FrameSamplingConfig(num_frames=num_frames, image_size=image_size)
    if backend == "decord":
        import decord  # noqa: F401  (import cost outside the measurement)
    if backend == "dali":
        import nvidia.dali  # noqa: F401
    probe_video(path)
    decode_video(path, FrameSamplingConfig(num_frames=2, image_size=image_size), backend=backend)  # warm-up
    base = _rss_bytes()
    start = time.perf_counter()
    out = decode_video(path, cfg, backend=backend)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put({"backend": backend, "seconds": seconds, "num_sampled": len(out.indices),
               "last_index": out.indices[-1], "peak_delta": max(peak - base, 0),
               "output_bytes": out.frames.numel() * out.frames.element_size()})


def _available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke size")
    p.add_argument("--video-frames", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="video width and height")
    p.add_argument("--num-frames", type=int, default=None, help="frames requested")
    p.add_argument("--image-size", type=int, default=None, help="vision tower input size")
    args = p.parse_args(argv)
    video_frames = args.video_frames or (512 if args.quick else 8192)
    size = args.size or (64 if args.quick else 256)
    num_frames = args.num_frames or (128 if args.quick else 1024)
    image_size = args.image_size or (64 if args.quick else 384)

    from megatron_longvideo.data.synthetic import write_synthetic_video

    backends = [("pyav", "h264"), ("decord", "h264"), ("dali", "vp9")]
    backends = [(b, c) for b, c in backends if b == "pyav" or _available("decord" if b == "decord" else "nvidia.dali")]
    ctx = mp.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for codec in sorted({c for _, c in backends}):
            paths[codec] = os.path.join(tmp, f"long.{ {'h264': 'mp4', 'vp9': 'webm'}[codec] }")
            t = time.perf_counter()
            write_synthetic_video(paths[codec], num_frames=video_frames, fps=30, size=size, codec=codec)
            print(f"wrote {video_frames}-frame {size}x{size} {codec} video "
                  f"({os.path.getsize(paths[codec]) / 2**20:.1f} MiB) in {time.perf_counter() - t:.1f} s")
        for backend, codec in backends:
            queue = ctx.Queue()
            proc = ctx.Process(target=_run_one, args=(backend, paths[codec], num_frames, image_size, queue))
            proc.start()
            result = queue.get()
            proc.join()
            rows.append((codec, result))
    all_frames = video_frames * size * size * 3
    print(f"\n{num_frames} of {video_frames} frames ({size}x{size}) -> [{num_frames}, 3, {image_size}, {image_size}] "
          f"float32 ({rows[0][1]['output_bytes'] / 2**20:.0f} MiB output); all full-resolution RGB frames "
          f"of the video would be {all_frames / 2**20:.0f} MiB\n")
    print("| backend | codec | sampled frames/s | video frames/s | seconds | peak RSS delta (MiB) | beyond output (MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for codec, r in rows:
        print(f"| {r['backend']} | {codec} | {r['num_sampled'] / r['seconds']:.0f} | "
              f"{(r['last_index'] + 1) / r['seconds']:.0f} | {r['seconds']:.2f} | {r['peak_delta'] / 2**20:.0f} | "
              f"{(r['peak_delta'] - r['output_bytes']) / 2**20:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
