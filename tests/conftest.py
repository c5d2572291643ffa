"""Shared test fixtures: paths to ../shared/data (skip with a reason when absent) and optional deps."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the repo; TRTNET_SHARED_DATA points elsewhere (e.g. on the GPU machine).
SHARED_DATA = Path(os.environ.get("TRTNET_SHARED_DATA") or (REPO / ".." / "shared" / "data")).resolve()
WEIGHTS = SHARED_DATA / "weights"
GOLDEN = SHARED_DATA / "golden"
IMAGES = SHARED_DATA / "images"


def shared(*parts: str) -> Path:
    """A path under ../shared/data; skips the calling test when it is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"test data not available: {path} (../shared/data sits beside the repo in CI)")
    return path


def free_ports(count: int) -> list[int]:
    """`count` TCP ports free on 127.0.0.1 just now (a server started on them is not mistaken for another)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


requires_torch = pytest.mark.skipif(not has_module("torch"), reason="torch not installed (extra: export)")
requires_tensorrt = pytest.mark.skipif(
    not (has_module("tensorrt") or has_module("tensorrt_rtx") or has_module("tensorrt_rtx_bindings")),
    reason="no TensorRT flavour installed (extra: rtx)",
)


@functools.cache
def gpu_unavailable_reason() -> str | None:
    """Why the GPU tests cannot run here (no NVIDIA GPU, or no TensorRT that runs engines); None when they can.
    Asked only by the modules that need a GPU, once."""
    from trtnet import compat
    from trtnet.cuda_rt import gpu_unavailable_reason as no_cuda_reason
    from trtnet.errors import TrtnetError

    reason = no_cuda_reason()
    if reason:
        return reason
    try:
        compat.trt()
    except TrtnetError as exc:
        return str(exc)
    return None


def requires_gpu() -> list[pytest.MarkDecorator]:
    """A GPU test module's `pytestmark`: marked `gpu`, skipped with the reason when no GPU can run engines."""
    reason = gpu_unavailable_reason()
    return [pytest.mark.gpu, pytest.mark.skipif(reason is not None, reason=f"needs an NVIDIA GPU: {reason}")]


# The checkpoints in ../shared/data/weights, by the names the tests use.
CHECKPOINTS = {
    "yolov5n": ("yolov5n.pt",),
    "yolov5s_syn": ("synthetic", "yolov5s_syn.pt"),
    "yolov5n6_syn": ("synthetic", "yolov5n6_syn.pt"),
    "yolov5s_v50_syn": ("synthetic", "yolov5s_v50_syn.pt"),
    "resnet18_syn": ("synthetic", "resnet18_syn.pth"),
    "resnet50_syn": ("synthetic", "resnet50_syn.pth"),
}


@pytest.fixture(scope="module")
def yolov5n_weights(tmp_path_factory) -> Path:
    """A folder with yolov5n.wts + yolov5n.json, converted once per test module (gen_wts of the shared yolov5n.pt)."""
    from trtnet import gen_wts

    out = tmp_path_factory.mktemp("weights")
    assert gen_wts.cli([str(shared("weights", "yolov5n.pt")), "-o", str(out)]) == 0
    return out


@pytest.fixture()
def weights_dir(tmp_path, yolov5n_weights) -> Path:
    """A fresh copy of yolov5n_weights in the test's own tmp_path, for tests that write beside the weights."""
    for f in yolov5n_weights.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path
