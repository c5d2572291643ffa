"""On a GPU: TrtnetYoloNMS's enqueue, driven directly on device memory, gives what the kernels give run
directly, what a torchvision reference gives, and what the official YOLOv5 pipeline gave (goldens).

    python -m pytest -m gpu tests/gpu/test_plugins_gpu.py      # or: python tests/gpu/test_plugins_gpu.py

Needs torch with CUDA, torchvision, a TensorRT binding with IPluginV3 classes (TensorRT-RTX's will do:
../shared/gpu/rtx) and trtnet installed (`pip install --no-deps --no-build-isolation -e .`).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

# The official yaml anchors (models/yolov5n.yaml, models/hub/yolov5n6.yaml), in input pixels.
P5_ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
P6_ANCHORS = [[19, 27, 44, 40, 38, 94], [96, 68, 86, 152, 180, 137], [140, 301, 303, 264, 238, 542],
              [436, 615, 739, 380, 925, 792]]
GOLDENS = {"yolov5n": ("golden_yolov5n_bus320.npz", P5_ANCHORS),
           "yolov5n6_syn": ("golden_yolov5n6_syn_bus320.npz", P6_ANCHORS)}
DTYPES = {"float32": torch.float32, "float16": torch.float16}
VARIANTS = {"default": {}, "multi_label": {"multi_label": True}, "agnostic": {"agnostic": True},
            "max_det_5": {"max_det": 5}}


@pytest.fixture(scope="module")
def tp():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from trtnet.plugins import trt_plugins

    if not trt_plugins.python_plugins_supported():
        pytest.skip("no TensorRT binding with IPluginV3 classes (TensorRT-RTX's: see ../shared/gpu/rtx)")
    pytest.importorskip("trtnet.plugins.postprocess", reason="the decode + NMS kernels are not there yet")
    return trt_plugins


def golden(model: str):
    """(raw head maps [1, C, h, w] float32, official det [n, 6], strides, anchors, nc) of bus.jpg at 320."""
    from tests.conftest import shared  # here, not at the top: this file also runs as a script

    file, anchors = GOLDENS[model]
    data = np.load(shared("golden", file))
    heads = [data[f"raw_{i}"] for i in range(len(anchors))]
    size = data["image"].shape[-1]
    strides = [size // h.shape[-1] for h in heads]
    nc = heads[0].shape[1] // (len(anchors[0]) // 2) - 5
    return heads, data["det"], strides, anchors, nc


def perturbed_batch(heads, dtype):
    """Batch 2 on the GPU: the golden maps and a noisy copy, so images differ and detections are many."""
    gen = torch.Generator().manual_seed(0)
    batch = []
    for h in heads:
        h = torch.from_numpy(h)
        batch.append(torch.cat((h, h + 0.3 * torch.randn(h.shape, generator=gen))).to("cuda", DTYPES[dtype]))
    return batch


def dynamic_desc(trt, shape, dtype, max_batch):
    desc = trt.PluginTensorDesc()
    desc.dims, desc.type, desc.format = trt.Dims(shape), dtype, trt.TensorFormat.LINEAR
    dynamic = trt.DynamicPluginTensorDesc()
    dynamic.desc, dynamic.min, dynamic.opt = desc, trt.Dims(shape), trt.Dims(shape)
    dynamic.max = trt.Dims((max_batch, *shape[1:]))
    return dynamic


def run_plugin(tp, settings, heads):
    """What TensorRT does with the plugin: rebuild it from its fields, attach, size the workspace for the
    profile's largest batch (here twice the batch run), then enqueue on the current stream."""
    trt = tp._trt
    built = tp.YoloNMSPlugin(settings, trt.TensorRTPhase.BUILD)
    runtime = tp.register().create_plugin("yolo_nms", built.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    plugin = runtime.attach_to_context(None)

    batch = heads[0].shape[0]
    head_type = trt.DataType.HALF if heads[0].dtype == torch.float16 else trt.DataType.FLOAT
    ins = [dynamic_desc(trt, tuple(h.shape), head_type, 2 * batch) for h in heads]
    dets, counts = output_buffers(batch, settings.max_det)
    outs = [dynamic_desc(trt, tuple(dets.shape), trt.DataType.FLOAT, 2 * batch),
            dynamic_desc(trt, tuple(counts.shape), trt.DataType.INT32, 2 * batch)]
    assert all(plugin.supports_format_combination(pos, ins + outs, len(ins)) for pos in range(len(ins) + 2))
    plugin.configure_plugin(ins, outs)
    workspace = torch.empty(max(plugin.get_workspace_size(ins, outs), 1), dtype=torch.uint8, device="cuda")
    plugin.on_shape_change([d.desc for d in ins], [d.desc for d in outs])
    plugin.enqueue([d.desc for d in ins], [d.desc for d in outs], [h.data_ptr() for h in heads],
                   [dets.data_ptr(), counts.data_ptr()], workspace.data_ptr(), torch.cuda.current_stream().cuda_stream)
    return detections(dets, counts)


def run_kernels(settings, heads, head_dtype):
    from trtnet.plugins.postprocess import YoloPostprocess

    post = YoloPostprocess(**settings.postprocess_kwargs())
    batch, shapes = heads[0].shape[0], [tuple(h.shape[2:]) for h in heads]
    workspace = torch.empty(max(post.workspace_bytes(batch, shapes), 1), dtype=torch.uint8, device="cuda")
    dets, counts = output_buffers(batch, settings.max_det)
    post.enqueue(torch.cuda.current_stream().cuda_stream, [h.data_ptr() for h in heads], head_dtype, batch, shapes,
                 workspace.data_ptr(), dets.data_ptr(), counts.data_ptr())
    return detections(dets, counts)


def output_buffers(batch, max_det):
    dets = torch.full((batch, max_det, 6), float("nan"), device="cuda")
    counts = torch.full((batch,), -1, dtype=torch.int32, device="cuda")
    return dets, counts


def detections(dets, counts):
    torch.cuda.synchronize()
    dets, counts = dets.cpu().numpy(), counts.cpu().numpy()
    assert ((counts >= 0) & (counts <= dets.shape[1])).all(), f"counts {counts} outside [0, {dets.shape[1]}]"
    return [dets[i, : counts[i]] for i in range(len(counts))]


def reference(heads, settings):
    """Official YOLOv5 (v7.0) Detect decode + non_max_suppression: torchvision's nms on boxes offset by
    class * 7680 (the official max_wh), so classes never overlap unless agnostic."""
    from torchvision.ops import nms

    results = []
    for x in decode(heads, settings):
        x = x[x[:, 4] > settings.conf]
        scores = x[:, 5:] * x[:, 4:5]
        box = torch.cat((x[:, :2] - x[:, 2:4] / 2, x[:, :2] + x[:, 2:4] / 2), 1)
        if settings.multi_label:
            i, j = (scores > settings.conf).nonzero(as_tuple=True)
            rows = torch.cat((box[i], scores[i, j, None], j[:, None].float()), 1)
        else:
            best, j = scores.max(1, keepdim=True)
            rows = torch.cat((box, best, j.float()), 1)[best.view(-1) > settings.conf]
        rows = rows[rows[:, 4].argsort(descending=True)[: settings.capacity]]
        offsets = rows[:, 5:6] * (0 if settings.agnostic else 7680)
        keep = nms(rows[:, :4] + offsets, rows[:, 4], settings.iou)[: settings.max_det]
        results.append(rows[keep].cpu().numpy())
    return results


def decode(heads, settings):
    """[B, N, nc+5] rows (cx, cy, w, h in input pixels, obj, class probabilities), as Detect outputs them."""
    levels = []
    for x, stride, anchors in zip(heads, settings.strides, settings.anchors):
        b, _, h, w = x.shape
        na = len(anchors) // 2
        y = x.float().view(b, na, settings.nc + 5, h, w).permute(0, 1, 3, 4, 2).sigmoid()
        gy, gx = torch.meshgrid(torch.arange(h, device=y.device), torch.arange(w, device=y.device), indexing="ij")
        grid = torch.stack((gx, gy), -1).float() - 0.5
        anchor = torch.tensor(anchors, dtype=torch.float32, device=y.device).view(1, na, 1, 1, 2)
        xy = (y[..., :2] * 2 + grid) * stride
        wh = (y[..., 2:4] * 2) ** 2 * anchor
        levels.append(torch.cat((xy, wh, y[..., 4:]), -1).reshape(b, -1, settings.nc + 5))
    return torch.cat(levels, 1)


def canonical(rows):
    return rows[np.lexsort((rows[:, 4], rows[:, 5]))]  # by class, then score


def assert_same_detections(actual, expected, box_atol, conf_atol):
    assert len(actual) == len(expected), f"{len(actual)} detections, expected {len(expected)}"
    a, e = canonical(actual), canonical(expected)
    np.testing.assert_array_equal(a[:, 5], e[:, 5])
    np.testing.assert_allclose(a[:, :4], e[:, :4], rtol=1e-5, atol=box_atol)
    np.testing.assert_allclose(a[:, 4], e[:, 4], rtol=0, atol=conf_atol)


def make_settings(tp, model, **changes):
    _, _, strides, anchors, nc = golden(model)
    return tp.YoloNMSSettings(strides=strides, anchors=anchors, nc=nc, **changes)


@pytest.mark.parametrize("model", list(GOLDENS))
def test_plugin_gives_the_official_detections(tp, model):
    heads, det, *_ = golden(model)
    settings = make_settings(tp, model, conf=0.25, iou=0.45, max_det=1000)
    batch = [torch.from_numpy(np.concatenate((h, h))).cuda() for h in heads]  # every image must stand alone
    for image in run_plugin(tp, settings, batch):
        assert_same_detections(image, det, box_atol=2e-3, conf_atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_plugin_equals_the_kernels_run_directly(tp, dtype, variant):
    settings = make_settings(tp, "yolov5n", conf=0.02, **VARIANTS[variant])
    heads = perturbed_batch(golden("yolov5n")[0], dtype)
    for ours, kernels in zip(run_plugin(tp, settings, heads), run_kernels(settings, heads, dtype)):
        np.testing.assert_array_equal(canonical(ours), canonical(kernels))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_plugin_matches_torchvision_reference(tp, dtype, variant):
    pytest.importorskip("torchvision")
    settings = make_settings(tp, "yolov5n", conf=0.02, **VARIANTS[variant])
    heads = perturbed_batch(golden("yolov5n")[0], dtype)
    for ours, expected in zip(run_plugin(tp, settings, heads), reference(heads, settings)):
        assert_same_detections(ours, expected, box_atol=2e-3, conf_atol=1e-5)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-rs", "-p", "no:cacheprovider"]))
