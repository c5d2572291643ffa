"""trtnet: PyTorch checkpoints to TensorRT engines without ONNX."""

__version__ = "0.1.0"

from trtnet.errors import TrtnetError  # noqa: E402

__all__ = ["TrtnetError", "__version__"]
