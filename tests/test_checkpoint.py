"""trtnet.checkpoint: reading torch checkpoints without torch, refusing pickles that would run code.

Expected metadata comes from the published model definitions (ultralytics/yolov5 yamls, torchvision),
never from trtnet itself; tensor-by-tensor equality with torch is checked in test_gen_wts.py.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest

from tests.conftest import requires_torch, shared
from trtnet.checkpoint import load_pickle, read_checkpoint
from trtnet.errors import TrtnetError

P5_ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]  # yolov5s.yaml
P6_ANCHORS = [[19, 27, 44, 40, 38, 94], [96, 68, 86, 152, 180, 137], [140, 301, 303, 264, 238, 542],
              [436, 615, 739, 380, 925, 792]]  # models/hub/yolov5n6.yaml
YOLOV5 = {  # file: (generation, strides, anchors, imgsz)
    ("yolov5n.pt",): ("v6+", [8, 16, 32], P5_ANCHORS, 640),
    ("synthetic", "yolov5s_syn.pt"): ("v6+", [8, 16, 32], P5_ANCHORS, 640),
    ("synthetic", "yolov5n6_syn.pt"): ("v6+", [8, 16, 32, 64], P6_ANCHORS, 1280),
    ("synthetic", "yolov5s_v50_syn.pt"): ("v5.0-focus", [8, 16, 32], P5_ANCHORS, 640),
}


@pytest.mark.parametrize("parts", list(YOLOV5), ids=lambda p: p[-1])
def test_yolov5_meta(parts):
    generation, strides, anchors, imgsz = YOLOV5[parts]
    ckpt = read_checkpoint(shared("weights", *parts))
    meta = ckpt.meta
    assert ckpt.family == meta["family"] == "yolov5"
    assert meta["generation"] == generation
    assert meta["nc"] == 80 and len(meta["names"]) == 80
    assert meta["names"][0] == "person" and meta["names"][79] == "toothbrush"  # COCO
    assert meta["strides"] == strides
    assert meta["anchors"] == anchors
    assert meta["bn_eps"] == 0.001  # YOLOv5's Conv: BatchNorm2d(eps=1e-3) after initialize_weights
    assert meta["imgsz"] == imgsz
    assert meta["yaml"]["nc"] == 80 and meta["yaml"]["anchors"] == anchors
    assert all(v.dtype == np.float32 for v in ckpt.state_dict.values())
    if generation == "v5.0-focus":  # Focus: space-to-depth (3 → 12 channels), then its Conv `conv`
        assert ckpt.state_dict["model.0.conv.conv.weight"].shape[1:] == (12, 3, 3)
    else:  # v6+: a plain 6x6 stride-2 Conv stem
        assert ckpt.state_dict["model.0.conv.weight"].shape[1:] == (3, 6, 6)


@pytest.mark.parametrize("name, arch, layers", [("resnet18_syn.pth", "resnet18", 122),
                                                 ("resnet50_syn.pth", "resnet50", 320)])
def test_resnet_meta(name, arch, layers):
    ckpt = read_checkpoint(shared("weights", "synthetic", name))
    assert ckpt.family == "resnet"
    assert ckpt.meta == {"family": "resnet", "arch": arch, "num_classes": 1000, "bn_eps": 1e-5, "imgsz": 224}
    assert len(ckpt.state_dict) == layers  # torchvision resnet18 / resnet50 state_dict() lengths
    assert ckpt.state_dict["fc.weight"].shape == (1000, 512 if arch == "resnet18" else 2048)


# -- pickles that try to run code ------------------------------------------------------------------


class Calls:
    """Pickles as `func(*args)`: what a malicious checkpoint does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def torch_zip(path, obj) -> None:
    """The zip layout torch.save writes, made by hand so that these tests need no torch."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        archive.writestr("archive/version", "3\n")


@pytest.mark.parametrize("func, qualname", [(os.system, f"{os.system.__module__}.system"), (eval, "builtins.eval")])
def test_refuses_pickles_that_call_functions(tmp_path, func, qualname):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = f"touch {marker}" if func is os.system else f"__import__('pathlib').Path({str(marker)!r}).touch()"
    torch_zip(path, {"epoch": 1, "model": Calls(func, payload)})
    with pytest.raises(TrtnetError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert f"refusing to load {path}" in message and f"calls {qualname}," in message
    assert not marker.exists()


def test_refuses_legacy_format_pickles(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(Calls(os.system, f"touch {marker}")))
    with pytest.raises(TrtnetError, match="refusing to load .*system"):
        read_checkpoint(path)
    assert not marker.exists()


def test_refuses_dotted_names_that_reach_past_the_allow_list(tmp_path):
    # STACK_GLOBAL with a dotted name resolves attribute chains in a plain Unpickler.
    def short_unicode(text: bytes) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text

    data = b"\x80\x04" + short_unicode(b"torch._utils") + short_unicode(b"_rebuild_tensor_v2.__globals__") + b"\x93."
    path = tmp_path / "chain.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data)
    with pytest.raises(TrtnetError, match=r"calls torch\._utils\._rebuild_tensor_v2\.__globals__, which is not"):
        read_checkpoint(path)


@requires_torch
def test_tensor_reaching_past_its_storage_is_rejected(tmp_path):
    import torch

    buffer = io.BytesIO()
    torch.save({"w": torch.arange(100, dtype=torch.float32)}, buffer)
    path = tmp_path / "short.pth"
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[:8] if item.filename.endswith("/data/0") else data)
    with pytest.raises(TrtnetError, match="overruns its storage"):
        load_pickle(path)


# -- formats and families --------------------------------------------------------------------------


@requires_torch
def test_legacy_format_reads_like_the_zip_format(tmp_path):
    import torch

    state = {"a": torch.tensor([1.0, -2.5]), "b": torch.arange(12, dtype=torch.float16).reshape(3, 4)[:, 1:3],
             "n": torch.tensor(7), "bf": torch.tensor([1.5, -3.0], dtype=torch.bfloat16)}
    # enough tensors that the object pickle outgrows the reader's buffer while storages are read
    state.update({f"layer.{i}.weight": torch.full((i + 1,), float(i)) for i in range(300)})
    for zip_format in (True, False):
        path = tmp_path / f"sd_{zip_format}.pth"
        torch.save(state, path, _use_new_zipfile_serialization=zip_format)
        got = load_pickle(path)
        for name, tensor in state.items():
            assert np.array_equal(np.asarray(got[name], np.float32), tensor.float().numpy()), (zip_format, name)


@requires_torch
def test_unknown_families_are_named(tmp_path):
    import torch

    torch.save(torch.nn.Linear(2, 3), tmp_path / "linear.pt")
    with pytest.raises(TrtnetError, match=r"unknown model family: it holds a torch\.nn\.modules\.linear\.Linear"):
        read_checkpoint(tmp_path / "linear.pt")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(TrtnetError, match="unknown model family: a state dict with keys encoder.weight"):
        read_checkpoint(tmp_path / "other.pth")


@requires_torch
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated, its files still exist
def test_torchscript_is_named(tmp_path):
    import torch

    torch.jit.script(torch.nn.ReLU()).save(str(tmp_path / "scripted.pt"))
    with pytest.raises(TrtnetError, match="TorchScript"):
        read_checkpoint(tmp_path / "scripted.pt")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(TrtnetError, match="cannot read .*text.pt: not a valid PyTorch checkpoint"):
        read_checkpoint(tmp_path / "text.pt")
    with pytest.raises(TrtnetError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pt")


@requires_torch
def test_resnet_variants_are_refused(tmp_path):
    import torch

    state = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 2048)}
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for j in range(blocks):
            state[f"layer{stage}.{j}.conv2.weight"] = torch.zeros(128, 4, 3, 3)  # ResNeXt-50 32x4d: grouped
            state[f"layer{stage}.{j}.conv3.weight"] = torch.zeros(256, 128, 1, 1)
    torch.save(state, tmp_path / "resnext.pth")
    with pytest.raises(TrtnetError, match=r"bottleneck blocks \[3, 4, 6, 3\], layer1.0.conv2 \(128, 4, 3, 3\)"):
        read_checkpoint(tmp_path / "resnext.pth")


# -- a YOLOv5 checkpoint with custom anchors, classes and an EMA, written by torch -------------------


@pytest.fixture
def yolov5_modules(monkeypatch):
    """Minimal stand-ins for ultralytics' models.common / models.yolo, importable while the test runs."""
    import torch
    from torch import nn

    class Conv(nn.Module):
        def __init__(self, c1, c2, eps=1e-3):
            super().__init__()
            self.conv = nn.Conv2d(c1, c2, 3, bias=False)
            self.bn = nn.BatchNorm2d(c2, eps=eps)
            self.act = nn.SiLU()

    class Detect(nn.Module):
        def __init__(self, nc, anchors, ch):
            super().__init__()
            self.nc, self.nl, self.na = nc, len(anchors), len(anchors[0]) // 2
            self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
            self.register_buffer("scratch", torch.zeros(3), persistent=False)
            self.m = nn.ModuleList(nn.Conv2d(c, self.na * (nc + 5), 1) for c in ch)

    class DetectionModel(nn.Module):
        def __init__(self, nc, names, anchors, strides, eps=1e-3):
            super().__init__()
            self.yaml = {"nc": nc, "anchors": 3, "backbone": [], "head": []}  # anchors: 3 → autoanchor'd
            self.model = nn.Sequential(Conv(3, 8), Conv(8, 8, eps), Detect(nc, anchors, [8, 8, 8]))
            self.stride = torch.tensor(strides, dtype=torch.float32)
            self.model[-1].anchors /= self.stride.view(-1, 1, 1)  # as ultralytics' Model.__init__ does
            self.names = names

    package, common, yolo = (types.ModuleType(n) for n in ("models", "models.common", "models.yolo"))
    for cls, module in ((Conv, common), (Detect, yolo), (DetectionModel, yolo)):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    for module in (package, common, yolo):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return DetectionModel


CUSTOM_ANCHORS = [[12, 16, 19, 36, 40, 28], [36, 75, 76, 55, 72, 146], [142, 110, 192, 243, 459, 401]]


@requires_torch
def test_custom_yolov5_takes_ema_anchors_from_the_model_and_names_from_a_dict(tmp_path, yolov5_modules):
    import torch

    ema = yolov5_modules(2, {0: "cat", 1: "dog"}, CUSTOM_ANCHORS, [8, 16, 32]).half()
    stale = yolov5_modules(5, ["a", "b", "c", "d", "e"], CUSTOM_ANCHORS, [8, 16, 32]).half()
    extras = {"best_fitness": np.array([0.42]), "fi": np.float64(0.3), "opt": argparse.Namespace(weights="a.pt"),
              "save_dir": pathlib.Path("runs/train/exp")}  # what train.py's last.pt / best.pt also hold
    torch.save({"epoch": 3, "model": stale, "ema": ema, "optimizer": None, **extras}, tmp_path / "custom.pt")
    ckpt = read_checkpoint(tmp_path / "custom.pt")
    assert ckpt.meta["nc"] == 2 and ckpt.meta["names"] == ["cat", "dog"]
    assert ckpt.meta["anchors"] == CUSTOM_ANCHORS
    assert ckpt.meta["epoch"] == 3
    expected = ema.state_dict()
    assert list(ckpt.state_dict) == list(expected)  # non-persistent Detect.scratch left out, as torch does
    for name, tensor in expected.items():
        assert np.array_equal(ckpt.state_dict[name], tensor.float().numpy()), name


@requires_torch
def test_yolov5_without_ema_uses_model_and_checks_bn_eps(tmp_path, yolov5_modules):
    import torch

    model = yolov5_modules(1, ["only"], CUSTOM_ANCHORS, [8, 16, 32])
    torch.save({"model": model, "ema": None}, tmp_path / "plain.pt")
    assert read_checkpoint(tmp_path / "plain.pt").meta["names"] == ["only"]
    torch.save({"model": yolov5_modules(1, ["x"], CUSTOM_ANCHORS, [8, 16, 32], eps=1e-5)}, tmp_path / "mixed.pt")
    with pytest.raises(TrtnetError, match=r"different eps values \[1e-05, 0.001\]"):
        read_checkpoint(tmp_path / "mixed.pt")
