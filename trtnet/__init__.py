"""trtnet: PyTorch checkpoints to TensorRT engines without ONNX."""

__version__ = "0.1.0"

import os as _os  # noqa: E402

# In a source checkout that is not installed (a Jetson, the GPU harness), `trtnet.networks` and
# `trtnet.plugins` are the top-level networks/ and plugins/ folders, as the installed package maps them.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "networks", "yolov5.py")) and _checkout not in __path__:
    __path__.append(_checkout)

from trtnet.errors import TrtnetError  # noqa: E402

__all__ = ["Classifier", "CpuDetector", "Detector", "TrtnetError", "__version__"]


def __getattr__(name):  # Detector/Classifier without importing cv2 and CUDA at `import trtnet`
    if name in ("Detector", "Classifier"):
        from trtnet import api

        return getattr(api, name)
    if name == "CpuDetector":
        from trtnet import cpu

        return cpu.CpuDetector
    raise AttributeError(f"module 'trtnet' has no attribute {name!r}")
