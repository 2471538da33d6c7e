"""Run by ``test_qwen_vl_sampling.py`` in a subprocess with torchvision and qwen-vl-utils on its path:
qwen-vl-utils' own frame count, resize and ``fetch_video`` (decord reader). Prints one JSON line.

    python qwen_vl_utils_check.py VIDEO CASES_JSON
"""

import json
import os
import sys


def main(video, cases_path):
    from tests.tv_shim import import_torchvision

    import_torchvision()
    os.environ["FORCE_QWENVL_VIDEO_READER"] = "decord"
    import importlib.metadata

    from qwen_vl_utils.vision_process import fetch_video, smart_nframes, smart_resize

    with open(cases_path) as f:
        cases = json.load(f)
    nframes = [smart_nframes(dict(ele), total_frames=total, video_fps=fps) for ele, total, fps in cases["nframes"]]
    sizes = [list(smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)) for h, w, lo, hi in cases["resize"]]
    frames, sample_fps = fetch_video({"video": video, "fps": 2.0, "max_pixels": cases["max_pixels"]},
                                     return_video_sample_fps=True)
    import numpy as np

    np.save(cases["out"], frames.round().clamp(0, 255).to(dtype=__import__("torch").uint8).numpy())
    print(json.dumps({"version": importlib.metadata.version("qwen-vl-utils"),
                      "nframes": nframes, "sizes": sizes, "shape": list(frames.shape), "sample_fps": sample_fps}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
