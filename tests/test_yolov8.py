"""YOLOv8 / YOLO11 detection (networks/yolov8.py): checkpoints read without ultralytics, the network run by
the CPU reference executor against the official goldens, the anchor-free NMS, and TensorRT-RTX builds.

Goldens (../shared/data/golden, made by the official ultralytics 8.3.253): `raw` = Detect's inference
output [1, 4+nc, 2100] at 320, `head_i` = per level cat(cv2, cv3) maps, `det` = official
non_max_suppression(raw, 0.25, 0.45, max_det=300), `layer_XX` = each top-level layer (yolo11n_nc3).
Tolerance: 1e-3 of each output's range (the issue's bar); measured errors are ~3e-5 of the range (BN folding
and summation order: the MANIFEST measures fused vs unfused at up to 0.03 px on boxes spanning ~800 px).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import requires_tensorrt, requires_torch, shared
from trtnet.errors import TrtnetError
from trtnet.plugins.official import non_max_suppression_anchor_free

MODELS = ["yolov8s_syn", "yolo11s_syn", "yolo11n_nc3_syn"]
RANGE_TOL = 1e-3
NOT_WEIGHTS = (".num_batches_tracked",)


def golden(model):
    return np.load(shared("golden", f"golden_{model}_bus320.npz"))


def read(model):
    from trtnet.checkpoint import load_pickle
    from trtnet.networks import yolov8

    path = shared("weights", "synthetic", f"{model}.pt")
    return yolov8.read_checkpoint(path, load_pickle(path))


def define(ckpt, batch=1, hw=(320, 320), precision="fp32"):
    """The network on a fresh INetworkDefinition (as the registry's define_network will do it)."""
    from trtnet import compat
    from trtnet.graph import Graph, WeightStore
    from trtnet.networks import yolov8

    builder = compat.trt().Builder(compat.Logger())
    network = compat.create_network(builder)
    store = WeightStore(ckpt.state_dict, "test")
    g = Graph(network, store, compat.compute_dtype(precision), bn_eps=ckpt.meta["bn_eps"])
    yolov8.define(g, ckpt.meta, batch, hw)
    store.ensure_all_used(ignore=NOT_WEIGHTS)
    return builder, network


def assert_close(name, actual, expected, tol=RANGE_TOL):
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} vs golden {expected.shape}"
    span = float(np.ptp(expected)) or 1.0
    err = float(np.abs(actual.astype(np.float32) - expected.astype(np.float32)).max())
    assert err <= tol * span, f"{name}: max error {err:.3g} of range {span:.3g}"


# -- checkpoints ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_checkpoint_metadata_and_state_dict_match_ultralytics(model):
    tensors = json.loads(shared("golden", f"golden_{model}_tensors.json").read_text())
    ckpt = read(model)
    assert ckpt.family == "yolov8"
    assert ckpt.meta["nc"] == tensors["nc"] == len(ckpt.meta["names"])
    assert ckpt.meta["names"] == [tensors["names"][str(i)] for i in range(tensors["nc"])]
    assert ckpt.meta["strides"] == [int(s) for s in tensors["stride"]]
    assert ckpt.meta["reg_max"] == tensors["reg_max"]
    assert ckpt.meta["bn_eps"] == tensors["batchnorm_eps"][0]
    assert ckpt.meta["yaml"] == tensors["model_yaml"]
    assert [(k, list(v.shape)) for k, v in ckpt.state_dict.items()] == [(k, s) for k, s, _ in tensors["state_dict"]]
    assert all(v.dtype == np.float32 for v in ckpt.state_dict.values())


def test_other_families_are_not_recognised():
    from trtnet.checkpoint import load_pickle
    from trtnet.networks import yolov8

    path = shared("weights", "synthetic", "yolov5s_syn.pt")
    assert yolov8.read_checkpoint(path, load_pickle(path)) is None
    assert yolov8.read_checkpoint(path, {"model": None}) is None


@pytest.mark.parametrize("attr, value, message", [
    ("nc", 0, r"Detect.nc = 0 is not a count from 1 to 100000"),
    ("nc", 2e8, r"Detect.nc = 200000000(\.0)? is not a count from 1 to 100000"),
    ("reg_max", 65, "reg_max 65 is outside"),
])
def test_implausible_detect_metadata_is_refused(attr, value, message):
    from trtnet.checkpoint import load_pickle
    from trtnet.networks import yolov8

    path = shared("weights", "synthetic", "yolo11n_nc3_syn.pt")
    obj = load_pickle(path)
    head = list(obj["model"].children()["model"].children().values())[-1]
    head.state[attr] = value
    with pytest.raises(TrtnetError, match=message):
        yolov8.read_checkpoint(path, obj)


def test_other_ultralytics_tasks_and_end2end_heads_are_refused():
    from trtnet.checkpoint import load_pickle
    from trtnet.networks import yolov8

    path = shared("weights", "synthetic", "yolo11n_nc3_syn.pt")
    obj = load_pickle(path)
    head = list(obj["model"].children()["model"].children().values())[-1]
    head.state["end2end"] = True
    with pytest.raises(TrtnetError, match="end-to-end"):
        yolov8.read_checkpoint(path, obj)
    obj["model"].qualname = "ultralytics.nn.tasks.SegmentationModel"
    with pytest.raises(TrtnetError, match="holds an Ultralytics SegmentationModel: trtnet builds detection"):
        yolov8.read_checkpoint(path, obj)


def test_strides_must_be_powers_of_two():
    from trtnet.checkpoint import load_pickle
    from trtnet.networks import yolov8

    path = shared("weights", "synthetic", "yolo11n_nc3_syn.pt")
    obj = load_pickle(path)
    obj["model"].state["stride"] = np.array([8.0, 12.0, 32.0], np.float32)
    with pytest.raises(TrtnetError, match=r"strides \[8, 12, 32\] are not powers of two"):
        yolov8.read_checkpoint(path, obj)


# -- anchor-free NMS (plugins/reference.py) ---------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_anchor_free_nms_equals_official_det(model):
    g = golden(model)
    (det,) = non_max_suppression_anchor_free(g["raw"], conf=0.25, iou=0.45, max_det=300)
    assert det.shape == g["det"].shape
    np.testing.assert_array_equal(det[:, 5], g["det"][:, 5])
    np.testing.assert_allclose(det[:, :5], g["det"][:, :5], rtol=1e-4, atol=1e-4)


def test_anchor_free_nms_multi_label_and_agnostic():
    """Hand-made rows: two overlapping boxes (IoU 0.82) whose best classes differ; box 0 is above conf in both."""
    rows = np.array([  # cx, cy, w, h, score class 0, score class 1
        [50, 50, 20, 20, 0.9, 0.6],
        [52, 50, 20, 20, 0.1, 0.8],
        [200, 200, 10, 10, 0.3, 0.2],
    ], np.float32)
    pred = rows.T[None]
    (best,) = non_max_suppression_anchor_free(pred, conf=0.25, iou=0.45)
    assert best[:, 5].tolist() == [0, 1, 0] and best[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.3])
    (agnostic,) = non_max_suppression_anchor_free(pred, conf=0.25, iou=0.45, agnostic=True)
    assert agnostic[:, 4].tolist() == pytest.approx([0.9, 0.3])
    (multi,) = non_max_suppression_anchor_free(pred, conf=0.25, iou=0.45, multi_label=True)
    # (box 0, class 1, 0.6) is a candidate too, but box 1's 0.8 of the same class suppresses it (IoU 0.82)
    assert multi[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.3]) and multi[:, 5].tolist() == [0, 1, 0]
    np.testing.assert_allclose(best[0, :4], [40, 40, 60, 60])


# -- the network on the CPU reference executor ------------------------------------------------------------


@requires_tensorrt
@requires_torch
@pytest.mark.parametrize("model", MODELS)
def test_network_matches_golden_raw_heads_and_layers(model):
    from trtnet.executor import run_network

    g = golden(model)
    _, network = define(read(model))
    layers = sorted(k for k in g.files if k.startswith("layer_"))
    detect = "model.23" if "yolo11" in model else "model.22"
    keep = [f"model.{int(k[6:])}" for k in layers] + [f"{detect}.level{i}" for i in range(3)]
    out = run_network(network, {"images": g["image"].astype(np.float32) / 255}, keep=keep)
    assert_close(f"{model} raw", out["output0"], g["raw"])
    assert_close(f"{model} boxes", out["output0"][:, :4], g["raw"][:, :4])
    assert_close(f"{model} scores", out["output0"][:, 4:], g["raw"][:, 4:])
    for i in range(3):
        assert_close(f"{model} head_{i}", out[f"{detect}.level{i}"], g[f"head_{i}"])
    for k in layers:
        assert_close(f"{model} {k}", out[f"model.{int(k[6:])}"], g[k])
    if model == "yolo11n_nc3_syn":
        assert layers == [f"layer_{i:02d}" for i in range(23)]
    (det,) = non_max_suppression_anchor_free(out["output0"], 0.25, 0.45, 300)
    assert det.shape == g["det"].shape and (det[:, 5] == g["det"][:, 5]).all()


@requires_tensorrt
@requires_torch
def test_fp16_graph_and_batch_of_two():
    """Half precision computes the same function (the error of a miswired layer is whole units everywhere);
    batch 2 (dynamic batch) gives each image its own result.

    These random-weight models amplify fp16 rounding layer by layer (layer 22 is off by 7% of its range),
    and DFL turns a logit error into a bin shift of a whole stride on a few boxes (max 75 px), so the
    bound is on the typical error: median box error 0.35 px (4e-4 of the range), score 99th percentile 6e-3."""
    from trtnet.executor import run_network

    g = golden("yolo11n_nc3_syn")
    ckpt = read("yolo11n_nc3_syn")
    x = g["image"].astype(np.float32) / 255
    _, half = define(ckpt, precision="fp16")
    err = np.abs(run_network(half, {"images": x})["output0"] - g["raw"])
    assert np.median(err[:, :4]) <= 1e-3 * np.ptp(g["raw"][:, :4])
    assert np.percentile(err[:, 4:], 99) <= 1e-2
    _, dyn = define(ckpt, batch=-1)
    assert tuple(dyn.get_output(0).shape) == (-1, 7, 2100)
    out = run_network(dyn, {"images": np.concatenate([x, x[:, :, ::-1]])})["output0"]
    assert_close("batch image 0", out[:1], g["raw"])
    assert np.abs(out[1] - out[0]).max() > 1.0


def official_anchors(hw, strides=(8, 16, 32)):
    """ultralytics.utils.tal.make_anchors(feats, strides, 0.5), transposed: [2, N] points and [1, N] strides."""
    points, rows = [], []
    for s in strides:
        h, w = hw[0] // s, hw[1] // s
        sy, sx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
        points.append(np.stack((sx, sy), -1).reshape(-1, 2))
        rows.append(np.full((h * w, 1), s))
    return np.concatenate(points).T, np.concatenate(rows).T


@requires_tensorrt
@requires_torch
def test_anchor_points_follow_the_run_time_size():
    """Dynamic height and width: the anchor points come from the level shapes at run time (as Detect makes
    them), so one network serves 320x320 (the golden) and rectangular inputs."""
    from trtnet.executor import run_network

    g = golden("yolo11n_nc3_syn")
    np.testing.assert_array_equal(official_anchors((320, 320))[0], g["anchors"].T)  # the helper is the official
    _, network = define(read("yolo11n_nc3_syn"), batch=-1, hw=(-1, -1))
    assert tuple(network.get_input(0).shape) == (-1, 3, -1, -1)
    x = g["image"].astype(np.float32) / 255
    keep = ["model.23.anchors", "model.23.anchors.strides"]
    out = run_network(network, {"images": x}, keep=keep)
    assert_close("dynamic-size raw", out["output0"], g["raw"])
    rect = run_network(network, {"images": x[:, :, 32:288, :]}, keep=keep)
    points, strides = official_anchors((256, 320))
    assert rect["output0"].shape == (1, 7, 32 * 40 + 16 * 20 + 8 * 10)
    np.testing.assert_array_equal(rect["model.23.anchors"][0], points)
    np.testing.assert_array_equal(rect["model.23.anchors.strides"][0], strides)


@requires_tensorrt
def test_input_size_must_be_a_stride_multiple():
    with pytest.raises(TrtnetError, match="multiple of the model's stride 32"):
        define(read("yolo11n_nc3_syn"), hw=(320, 300))


# -- TensorRT-RTX builds ---------------------------------------------------------------------------------


@requires_tensorrt
@pytest.mark.parametrize("dynamic_size", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("model", ["yolo11n_nc3_syn", pytest.param("yolov8s_syn", marks=pytest.mark.slow)])
def test_engine_builds(model, precision, dynamic_size):
    """Dynamic batch 1..2 at 160 (TensorRT-RTX builds on the CPU), or also dynamic size 128..192.
    About 3-6 s each here; the larger yolov8s counts as slow."""
    from trtnet import compat

    hw = (-1, -1) if dynamic_size else (160, 160)
    builder, network = define(read(model), batch=-1, hw=hw, precision=precision)
    lo, hi = (128, 192) if dynamic_size else (160, 160)
    profiles = [("images", (1, 3, lo, lo), (1, 3, 160, 160), (2, 3, hi, hi))]
    config = compat.builder_config(builder, compat.BuildOptions(precision=precision, profiles=profiles))
    assert compat.build_serialized(builder, network, config), f"TensorRT-RTX did not build {model} {precision}"
    n = -1 if dynamic_size else 525
    assert tuple(network.get_output(0).shape) == (-1, 4 + read(model).meta["nc"], n)


# -- the anchor-free decode kernel (plugins/decode.cu) and its host side ---------------------------------


@pytest.fixture
def nvrtc(tmp_path, monkeypatch):
    from trtnet.plugins import cuda

    monkeypatch.setenv("TRTNET_CACHE", str(tmp_path))
    try:
        cuda.nvrtc_version()
    except TrtnetError as exc:
        pytest.skip(str(exc))
    return cuda


@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90"])
def test_anchor_free_kernels_compile(nvrtc, arch):
    from trtnet.plugins import postprocess

    source = nvrtc.module_source("decode")
    for kernel in postprocess.DECODE_KERNELS["anchor_free"]:
        assert f'extern "C" __global__ void {kernel.split(".")[1]}(Predictions p' in source
    assert nvrtc.compile_cubin(source, arch, "decode_v8", use_cache=False)[:4] == b"\x7fELF"


def test_predictions_struct_matches_the_kernel(nvrtc):
    from tests.test_kernels_compile import layout_asserts
    from trtnet.plugins import postprocess

    checks = layout_asserts(postprocess.Predictions, "Predictions")
    nvrtc.compile_cubin(nvrtc.module_source("decode") + "\n" + "\n".join(checks) + "\n", "sm_80", "v8_layout",
                        use_cache=False)


def test_anchor_free_postprocess_parameters():
    from trtnet.networks import yolov8
    from trtnet.plugins.postprocess import YoloPostprocess

    post = YoloPostprocess(**yolov8.postprocess_kwargs({"nc": 3}), conf=0.3, multi_label=True)
    params = post._params([1234], "float16", [(2100,)])
    assert (params.ptr, params.n, params.nc, params.half, params.multi_label) == (1234, 2100, 3, 1, 1)
    assert params.conf == pytest.approx(0.3)
    assert post.workspace_bytes(2, [(2100,)]) == post.layout(2).total + 256
    with pytest.raises(TrtnetError, match="one output"):
        post.workspace_bytes(1, [(40, 40), (20, 20), (10, 10)])
    with pytest.raises(TrtnetError, match="takes no strides or anchors"):
        YoloPostprocess(head="anchor_free", nc=3, strides=[8, 16, 32])
    with pytest.raises(TrtnetError, match="head must be one of anchors, anchor_free"):
        YoloPostprocess(head="anchorless", nc=3)
