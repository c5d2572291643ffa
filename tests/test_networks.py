"""Every network builds with TensorRT-RTX (on the CPU, ahead of time) in fp32/fp16, static/dynamic batch."""

from __future__ import annotations

import pytest

from tests.conftest import CHECKPOINTS, requires_tensorrt, shared
from trtnet.errors import TrtnetError
from trtnet.graph import ShapeRecorder
from trtnet.network import BatchProfile, define_network
from trtnet.networks import meta_for_arch

pytestmark = requires_tensorrt

PRECISIONS = ["fp32", "fp16"]
BATCHES = {"static": BatchProfile(2, 2, 2), "dynamic": BatchProfile(1, 4, 8)}


def build_plan(defined, precision, batch):
    from trtnet import compat

    builder = defined.builder
    config = compat.builder_config(builder, compat.BuildOptions(precision=precision, profiles=defined.profiles(batch)))
    return compat.build_serialized(builder, defined.network, config)


def define(tensors, meta, precision, batch, imgsz):
    from trtnet import compat

    builder = compat.trt().Builder(compat.Logger())
    defined = define_network(builder, tensors, meta, precision=precision, batch=batch, imgsz=imgsz)
    defined.builder = builder  # TensorRT needs the builder alive while the network is
    return defined


def imgsz_for(meta):
    return 224 if meta["family"] == "resnet" else (384 if len(meta["yaml"]["anchors"]) > 3 else 320)


@pytest.fixture(scope="module")
def checkpoints():
    from trtnet.checkpoint import read_checkpoint

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = read_checkpoint(shared("weights", *CHECKPOINTS[name]))
        return cache[name]

    return get


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_checkpoint_networks_build(checkpoints, name, precision, batch):
    ckpt = checkpoints(name)
    defined = define(ckpt.state_dict, ckpt.meta, precision, BATCHES[batch], imgsz_for(ckpt.meta))
    assert build_plan(defined, precision, BATCHES[batch]), f"TensorRT-RTX did not build {name} {precision} {batch}"
    shapes = [tuple(defined.network.get_output(i).shape) for i in range(defined.network.num_outputs)]
    b = -1 if batch == "dynamic" else 2
    if ckpt.meta["family"] == "yolov5":
        h = imgsz_for(ckpt.meta)
        strides = [8, 16, 32, 64][: len(shapes)]
        assert shapes == [(b, 255, h // s, h // s) for s in strides]
    else:
        assert shapes == [(b, 1000)]


@pytest.mark.slow
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("arch", ["yolov5m", "yolov5l", "yolov5x", "resnet34", "resnet101", "resnet152"])
def test_random_weight_networks_build(arch, precision, batch):
    """Sizes without a checkpoint here: the official v7.0 yaml multiples / torchvision tables, random weights."""
    meta = meta_for_arch(arch)
    store = ShapeRecorder()
    defined = define(store, meta, precision, BATCHES[batch], imgsz_for(meta))
    assert build_plan(defined, precision, BATCHES[batch]), f"TensorRT-RTX did not build {arch} {precision} {batch}"


@pytest.mark.parametrize(
    "arch, c3_repeats, stem_channels",
    [("yolov5n", [1, 2, 3, 1], 16), ("yolov5s", [1, 2, 3, 1], 32), ("yolov5m", [2, 4, 6, 2], 48),
     ("yolov5l", [3, 6, 9, 3], 64), ("yolov5x", [4, 8, 12, 4], 80)],
)
def test_depth_and_width_multiples_follow_parse_model(arch, c3_repeats, stem_channels):
    """Expected values: the official models' printed summaries (yolov5x: model.2 has 4 bottlenecks, the stem 80
    channels, ...), i.e. round(n * depth_multiple) and ceil(c * width_multiple / 8) * 8."""
    store = ShapeRecorder()
    define(store, meta_for_arch(arch), "fp32", BatchProfile(), 320)
    assert store.shapes["model.0.conv.weight"][0] == stem_channels
    for layer, n in zip((2, 4, 6, 8), c3_repeats):
        bottlenecks = {k.split(".")[3] for k in store.shapes if k.startswith(f"model.{layer}.m.")}
        assert len(bottlenecks) == n, f"model.{layer}"


def test_dynamic_input_size_builds_and_matches_static(checkpoints):
    """--min-imgsz/--max-imgsz: H and W dynamic (rectangular val batches). At 320x320 it is the same
    function as the static 320 network, and it also runs on rectangular inputs on either side of 320."""
    import numpy as np

    from trtnet import compat
    from trtnet.executor import run_network

    pytest.importorskip("torch", reason="the CPU reference executor needs torch")
    ckpt = checkpoints("yolov5n")
    static = define(ckpt.state_dict, ckpt.meta, "fp32", BatchProfile(1, 1, 2), 320)
    builder = compat.trt().Builder(compat.Logger())
    dyn = define_network(builder, ckpt.state_dict, ckpt.meta, batch=BatchProfile(1, 1, 2), imgsz=320, min_imgsz=128,
                         max_imgsz=352)
    assert tuple(dyn.network.get_input(0).shape) == (-1, 3, -1, -1)
    assert dyn.profiles(BatchProfile(1, 1, 2)) == [("images", (1, 3, 128, 128), (1, 3, 320, 320), (2, 3, 352, 352))]
    assert dyn.strides == [8, 16, 32]
    config = compat.builder_config(builder, compat.BuildOptions(profiles=dyn.profiles(BatchProfile(1, 1, 2))))
    assert compat.build_serialized(builder, dyn.network, config)
    x = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    static_out = run_network(static.network, {"images": x})
    dynamic_out = run_network(dyn.network, {"images": x})
    for k in ("raw_0", "raw_1", "raw_2"):
        np.testing.assert_array_equal(dynamic_out[k], static_out[k])
    rect = run_network(dyn.network, {"images": x[:, :, :256, :]})
    assert [rect[k].shape[2:] for k in ("raw_0", "raw_1", "raw_2")] == [(32, 40), (16, 20), (8, 10)]
    wide = run_network(dyn.network, {"images": np.pad(x, ((0, 0), (0, 0), (0, 0), (0, 32)))})
    assert [wide[k].shape[2:] for k in ("raw_0", "raw_1", "raw_2")] == [(40, 44), (20, 22), (10, 11)]


@pytest.mark.parametrize("lo, hi, message", [(16, None, "--min-imgsz 16 must lie between 32 and the input size 320"),
                                             (400, None, "--min-imgsz 400 must lie between"),
                                             (None, 288, "--max-imgsz 288 must be at least the input size 320")])
def test_dynamic_size_range_is_checked(checkpoints, lo, hi, message):
    ckpt = checkpoints("yolov5n")
    from trtnet import compat

    with pytest.raises(TrtnetError, match=message):
        define_network(compat.trt().Builder(compat.Logger()), ckpt.state_dict, ckpt.meta, imgsz=320,
                       min_imgsz=lo, max_imgsz=hi)
