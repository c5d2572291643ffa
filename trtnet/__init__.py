"""trtnet: PyTorch checkpoints to TensorRT engines without ONNX."""

__version__ = "0.1.0"

from trtnet.errors import TrtnetError  # noqa: E402

__all__ = ["Classifier", "Detector", "TrtnetError", "__version__"]


def __getattr__(name):  # Detector/Classifier without importing cv2 and CUDA at `import trtnet`
    if name in ("Detector", "Classifier"):
        from trtnet import api

        return getattr(api, name)
    raise AttributeError(f"module 'trtnet' has no attribute {name!r}")
