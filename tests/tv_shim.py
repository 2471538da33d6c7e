"""torchvision for the subprocess checks that run transformers' or qwen-vl-utils' own code.

The only torchvision wheels for Linux are CUDA builds; next to a CPU-only torch their C extension does not
load, and torchvision's import then fails registering fake kernels for two detection operators (``nms``,
``qnms``). ``import_torchvision`` defines those two operator *schemas* first when that happens, so the
import succeeds; they are never called (the code under test uses torchvision's pure-Python transforms,
which run as they are). ``unpack(wheel, folder)`` puts a wheel's packages on a path without installing it:
installed, the CUDA build would break transformers' imports in every other test.
"""

import sys
import zipfile


def import_torchvision() -> str:
    import torch

    try:
        import torchvision  # noqa: F401
        return "native"
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    for name in [m for m in sys.modules if m.startswith("torchvision")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import_torchvision.lib = lib  # kept alive for the process
    import torchvision  # noqa: F401
    return "schemas defined (CUDA wheel next to a CPU torch)"


def unpack(wheel: str, folder: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(folder)
    return folder
