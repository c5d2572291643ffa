"""The blocks YOLOv5 and YOLOv8/YOLO11 share (networks/blocks.py), and what their define takes from the yaml:
Conv's Ultralytics argument order and its refused dilation, the yaml's `activation`, and Detect at reg_max 1
(Ultralytics' nn.Identity in place of DFL)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import requires_tensorrt, shared
from trtnet.errors import TrtnetError


def new_graph(tensors=None):
    from trtnet import compat
    from trtnet.graph import Graph, WeightStore

    builder = compat.trt().Builder(compat.Logger())
    network = compat.create_network(builder)
    return builder, network, Graph(network, WeightStore(tensors or {}, "test"), np.dtype(np.float32))


def conv_weights(p, c1, c2, k, seed=0):
    rng = np.random.default_rng(seed)
    return {f"{p}.conv.weight": rng.normal(size=(c2, c1, k, k)).astype(np.float32),
            f"{p}.bn.weight": np.ones(c2, np.float32), f"{p}.bn.bias": np.zeros(c2, np.float32),
            f"{p}.bn.running_mean": np.zeros(c2, np.float32), f"{p}.bn.running_var": np.ones(c2, np.float32)}


def test_blocks_module_is_not_a_family():
    from trtnet import networks
    from trtnet.networks import blocks

    assert not hasattr(blocks, "FAMILY")
    assert "blocks" not in networks.families() and {"yolov5", "yolov8"} <= set(networks.families())


@requires_tensorrt
def test_conv_arguments_in_ultralytics_order():
    """Conv(c1, c2, k, s, p, g, d, act) and DWConv(c1, c2, k, s, d, act): act=False in 8th / 6th place."""
    from trtnet.networks.blocks import conv, dwconv

    _, network, g = new_graph({**conv_weights("a", 3, 4, 3), **conv_weights("b", 1, 4, 3, seed=1)})
    a = conv(g, g.input("x", (1, 3, 8, 8)), "a", 4, 3, 2, None, 1, 1, False)  # stride 2, no activation
    b = dwconv(g, a, "b", 4, 3, 1, 1, False)  # groups = gcd(4, 4): depthwise weights [4, 1, 3, 3]
    g.weights.ensure_all_used()
    assert tuple(a.shape) == tuple(b.shape) == (1, 4, 4, 4)
    names = {network.get_layer(i).name for i in range(network.num_layers)}
    assert {"a", "b"} <= names and not {"a.sigmoid", "b.sigmoid", "a.conv", "b.conv"} & names


@requires_tensorrt
def test_conv_without_activation_is_the_bare_convolution():
    from trtnet.executor import run_network
    from trtnet.networks.blocks import conv

    weights = conv_weights("a", 2, 3, 1)
    _, network, g = new_graph(weights)
    g.output(conv(g, g.input("x", (1, 2, 2, 2)), "a", 3, 1, 1, None, 1, 1, False), "y")
    x = np.random.default_rng(2).normal(size=(1, 2, 2, 2)).astype(np.float32)
    expected = np.einsum("oi,bihw->bohw", weights["a.conv.weight"][:, :, 0, 0], x)  # BN is the identity here
    np.testing.assert_allclose(run_network(network, {"x": x})["y"], expected, rtol=1e-3, atol=1e-3)  # BN eps


@requires_tensorrt
def test_yolov5_bottleneck_is_kernels_1_3_and_v8s_is_3_3():
    """common.Bottleneck(c1, c2, shortcut, g, e): cv1 1x1, cv2 3x3; block.Bottleneck(..., k=(3, 3), e) 3x3 both.
    The weight store refuses a kernel of the wrong size, so the build itself is the check."""
    from trtnet.networks import blocks, yolov5

    _, _, g = new_graph({**conv_weights("v5.cv1", 8, 2, 1), **conv_weights("v5.cv2", 2, 8, 3),
                         **conv_weights("v8.cv1", 8, 4, 3), **conv_weights("v8.cv2", 4, 8, 3)})
    x = g.input("x", (1, 8, 4, 4))
    yolov5.bottleneck(g, x, "v5", 8, True, 1, 0.25)  # e in 4th place: c_ = 2
    blocks.bottleneck(g, x, "v8", 8)
    g.weights.ensure_all_used()


@requires_tensorrt
@pytest.mark.parametrize("call", ["conv", "dwconv"])
def test_dilation_other_than_one_is_refused(call):
    from trtnet.networks import blocks

    _, _, g = new_graph(conv_weights("a", 4, 4, 3))
    x = g.input("x", (1, 4, 8, 8))
    with pytest.raises(TrtnetError, match=r"^a: Conv with dilation d=2 is not supported \(only d=1\)$"):
        if call == "conv":
            blocks.conv(g, x, "a", 4, 3, 1, None, 1, 2)
        else:
            blocks.dwconv(g, x, "a", 4, 3, 1, 2)


def yolo11n():
    from trtnet.checkpoint import load_pickle
    from trtnet.networks import yolov8

    path = shared("weights", "synthetic", "yolo11n_nc3_syn.pt")
    return yolov8.read_checkpoint(path, load_pickle(path))


def define_yolov8(ckpt, meta):
    from trtnet import compat
    from trtnet.graph import Graph, WeightStore
    from trtnet.networks import yolov8

    builder = compat.trt().Builder(compat.Logger())
    network = compat.create_network(builder)
    g = Graph(network, WeightStore(ckpt.state_dict, "test"), np.dtype(np.float32), bn_eps=meta["bn_eps"])
    yolov8.define(g, meta, 1, (64, 64))
    return builder, network


@requires_tensorrt
def test_yolov8_takes_the_yaml_activation():
    """parse_model sets Conv.default_act from the yaml's `activation`: here LeakyReLU(0.1) in every Conv."""
    from trtnet.executor import run_network

    ckpt = yolo11n()
    meta = {**ckpt.meta, "yaml": {**ckpt.meta["yaml"], "activation": "nn.LeakyReLU(0.1)"}}
    _, network = define_yolov8(ckpt, meta)
    names = {network.get_layer(i).name for i in range(network.num_layers)}
    assert "model.0.sigmoid" not in names  # SiLU's sigmoid is gone
    x = np.random.default_rng(0).random((1, 3, 64, 64), np.float32)
    out = run_network(network, {"images": x}, keep=["model.0.conv", "model.0"])
    pre = out["model.0.conv"]
    assert (pre < 0).any()
    np.testing.assert_allclose(out["model.0"], np.where(pre > 0, pre, 0.1 * pre), rtol=1e-5, atol=1e-6)
    bad = {**ckpt.meta, "yaml": {**ckpt.meta["yaml"], "activation": "nn.GELU()"}}
    with pytest.raises(TrtnetError, match=r"unsupported activation 'nn.GELU\(\)' in the model yaml"):
        define_yolov8(ckpt, bad)


def official_decode_reg_max_1(levels, strides, nc):
    """ultralytics Detect._inference with dfl = nn.Identity (reg_max 1), written from its source in numpy."""
    b = levels[0].shape[0]
    x_cat = np.concatenate([t.reshape(b, 4 + nc, -1) for t in levels], 2)
    box, cls = x_cat[:, :4], x_cat[:, 4:]
    points, rows = [], []
    for t, s in zip(levels, strides):
        h, w = t.shape[2:]
        sy, sx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
        points.append(np.stack((sx, sy), -1).reshape(-1, 2))
        rows.append(np.full((h * w, 1), s))
    anchors, stride_rows = np.concatenate(points).T[None], np.concatenate(rows).T[None]
    lt, rb = box[:, :2], box[:, 2:]
    x1y1, x2y2 = anchors - lt, anchors + rb
    dbox = np.concatenate([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1) * stride_rows
    return np.concatenate([dbox, 1 / (1 + np.exp(-cls))], 1)


@requires_tensorrt
def test_detect_at_reg_max_1_has_no_dfl():
    from trtnet.executor import run_network
    from trtnet.networks.yolov8 import detect_decode

    nc, strides = 2, [8, 16]
    _, network, g = new_graph()
    levels = [g.input(f"l{i}", (1, 4 + nc, 32 // s, 32 // s)) for i, s in enumerate(strides)]
    g.output(detect_decode(g, levels, "model.9", nc, 1, strides), "output0")
    rng = np.random.default_rng(3)
    feeds = {f"l{i}": rng.random((1, 4 + nc, 32 // s, 32 // s), np.float32) * 3 for i, s in enumerate(strides)}
    out = run_network(network, feeds)["output0"]
    expected = official_decode_reg_max_1(list(feeds.values()), strides, nc)
    assert out.shape == (1, 4 + nc, 16 + 4)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# -- checkpoint look-ups both families share ----------------------------------------------------------------


@pytest.mark.parametrize("family, model", [("yolov5", "yolov5s_syn"), ("yolov8", "yolo11n_nc3_syn")])
def test_class_names_refused_when_they_do_not_fit_nc(family, model):
    """Both families read `model.names` alike: a dict keyed 0..nc-1 or nc names; none at all → numbers."""
    import importlib

    from trtnet.checkpoint import load_pickle

    module = importlib.import_module(f"trtnet.networks.{family}")
    path = shared("weights", "synthetic", f"{model}.pt")
    obj = load_pickle(path)
    nc = module.read_checkpoint(path, obj).meta["nc"]
    obj["model"].state["names"] = None
    assert module.read_checkpoint(path, obj).meta["names"] == [str(i) for i in range(nc)]
    obj["model"].state["names"] = {i + 1: f"c{i}" for i in range(nc)}
    with pytest.raises(TrtnetError, match=rf"{model}.pt: the model has {nc} classes but its names are \{{1: 'c0'"):
        module.read_checkpoint(path, obj)
    obj["model"].state["names"] = ["a"] * (nc + 1)
    with pytest.raises(TrtnetError, match=f"the model has {nc} classes but its names are"):
        module.read_checkpoint(path, obj)


@pytest.mark.parametrize("family, model", [("yolov5", "yolov5s_syn"), ("yolov8", "yolo11n_nc3_syn")])
def test_a_model_not_ending_in_detect_is_refused(family, model):
    import importlib

    from trtnet.checkpoint import load_pickle

    module = importlib.import_module(f"trtnet.networks.{family}")
    path = shared("weights", "synthetic", f"{model}.pt")
    obj = load_pickle(path)
    head = list(obj["model"].children()["model"].children().values())[-1]
    head.qualname = head.qualname.replace("Detect", "Segment")
    with pytest.raises(TrtnetError, match=r"model ends in .*, not Detect; trtnet builds detection models only"):
        module.read_checkpoint(path, obj)


def test_checkpoint_beside_looks_in_weights_dir_then_beside_the_engine(tmp_path):
    from trtnet.networks.blocks import checkpoint_beside

    weights_dir, engines = tmp_path / "weights", tmp_path / "engines"
    weights_dir.mkdir(), engines.mkdir()
    meta, engine = {"weights": "/elsewhere/best.wts"}, engines / "best.engine"
    assert checkpoint_beside(meta, engine, str(weights_dir)) is None
    (engines / "best.pt").write_bytes(b"")
    assert checkpoint_beside(meta, engine, str(weights_dir)) == engines / "best.pt"
    (weights_dir / "best.pt").write_bytes(b"")
    assert checkpoint_beside(meta, engine, str(weights_dir)) == weights_dir / "best.pt"
