"""`python -m trtnet.build --int8` end to end on the CPU (calibration with the reference executor, TensorRT-RTX
builds), its contradicting options, the calibration-file rebuild, ResNet INT8 with ImageNet preprocessing,
and the GPU calibration pass's host side."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.conftest import requires_tensorrt, requires_torch, shared
from trtnet import build as build_cmd
from trtnet import gen_wts

pytestmark = requires_tensorrt


def run_build(capsys, *args):
    code = build_cmd.cli([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out + out.err


def coco128():
    return shared("coco128", "images")


# -- contradictions: one clear error before anything is read or written --------------------------
@pytest.mark.parametrize("args, message", [
    (("--calib-method", "entropy"), "--calib-method applies to INT8: add --int8"),
    (("--fp16", "--calib", "x"), "--calib applies to INT8: add --int8"),
    (("--int8", "--int8-mode", "implicit", "--calib-method", "percentile"), "implicit calibrates with TensorRT"),
    (("--int8", "--int8-keep", "auto,model.2"), "auto and none stand alone"),
    (("--int8", "--calib-images", "0"), "--calib-images 0: must be at least 1"),
])
def test_contradicting_int8_options_fail_before_reading_anything(tmp_path, capsys, args, message):
    code, text = run_build(capsys, tmp_path / "absent.wts", "--weights-dir", tmp_path, *args)
    assert code == 2
    assert message in text
    assert "absent.wts" not in text  # refused before the weights were looked for
    assert list(tmp_path.iterdir()) == []


def test_int8_with_fp32_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        build_cmd.cli(["yolov5n", "--int8", "--fp32"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_implicit_int8_on_tensorrt_rtx_is_refused_before_reading(tmp_path, capsys):
    from trtnet import compat

    if not compat.flavour().is_rtx:
        pytest.skip("TensorRT with calibrators here")
    code, text = run_build(capsys, tmp_path / "absent.wts", "--int8", "--int8-mode", "implicit")
    assert code == 2
    assert "--int8-mode implicit" in text and "no INT8 calibrators" in text
    assert list(tmp_path.iterdir()) == []


def test_missing_calibration_folder_writes_nothing(weights_dir, capsys):
    before = sorted(p.name for p in weights_dir.iterdir())
    code, text = run_build(capsys, "yolov5n", "--weights-dir", weights_dir, "--int8",
                           "--calib", weights_dir / "nothing-here", "--imgsz", "64")
    assert code == 2 and "no such folder" in text
    assert sorted(p.name for p in weights_dir.iterdir()) == before


def test_api_refuses_int8_options_on_a_float_build(tmp_path):
    from trtnet.errors import TrtnetError
    from trtnet.quant.options import Int8Options

    with pytest.raises(TrtnetError, match="INT8 options given for a fp16 build"):
        build_cmd.build(build_cmd.BuildRequest(str(tmp_path / "absent.wts"), precision="fp16",
                                               int8=Int8Options(calib="x")))


def test_calib_device_defaults_to_cpu_without_a_gpu():
    from trtnet.quant.options import Int8Options

    try:
        from trtnet import cuda_rt

        gpu = cuda_rt.gpu_unavailable_reason() is None
    except Exception:
        gpu = False
    assert Int8Options().checked().calib_device == ("gpu" if gpu else "cpu")


# -- the acceptance line, and a rebuild from the calibration file -------------------------------
@pytest.mark.slow
@requires_torch
def test_int8_yolov5n_build_writes_engine_and_calibration_then_rebuilds_from_it(weights_dir, capsys, monkeypatch):
    from trtnet.engine_meta import EngineMeta
    from trtnet.quant.calibration_file import read_calibration

    code, text = run_build(capsys, weights_dir / "yolov5n.wts", "--int8", "--calib", coco128(),
                           "--calib-images", "8", "--imgsz", "320", "--calib-device", "cpu",
                           "--weights-dir", weights_dir)
    assert code == 0, text
    engine = weights_dir / "yolov5n.int8.320.engine"  # build's default name: NAME.PRECISION.SIZE
    calib_path = weights_dir / "yolov5n.int8.320.calib.json"
    meta = EngineMeta.from_dict(json.loads((weights_dir / "yolov5n.int8.320.engine.json").read_text()))
    assert engine.stat().st_size == meta.engine_bytes > 1_000_000
    assert meta.precision == "int8" and meta.int8.mode == "explicit" and meta.int8.images == 8
    assert meta.int8.calibration == calib_path.name and meta.int8.keep == ()
    calibration = read_calibration(calib_path)
    assert calibration.images.count == 8 and calibration.method == "percentile"  # the explicit default
    # 60 convolutions read 50 tensors: each of the 8 C3 feeds cv1 and cv2 the same input, and the heads
    # raw_0 / raw_1 share model.17 / model.20 with the downsampling convs model.18 / model.21
    assert len(calibration.amax) == 50 and all(v > 0 for v in calibration.amax.values())

    import trtnet.quant.options as options

    def no_calibration(*args, **kwargs):
        raise AssertionError("the rebuild calibrated again")

    monkeypatch.setattr(options, "calibrate", no_calibration)
    code, text = run_build(capsys, weights_dir / "yolov5n.wts", "--int8", "--calib-cache", calib_path,
                           "--imgsz", "320", "--int8-keep", "raw_0,model.0", "-o", weights_dir / "again.engine")
    assert code == 0, text
    again = json.loads((weights_dir / "again.engine.json").read_text())
    # raw_0 reads model.17's output, which model.18's convolution reads quantized: kept with it
    assert again["int8"]["keep"] == ["model.0", "model.18.conv", "raw_0"] and again["int8"]["images"] == 8
    assert "also kept in float, as they read a tensor a kept layer reads" in text


@requires_torch
def test_calibration_file_of_other_weights_is_refused_at_build(weights_dir, capsys, tmp_path):
    from trtnet.quant.calibration_file import CalibrationFile, ImagesUsed

    other = tmp_path / "other.calib.json"
    CalibrationFile("0" * 64, "entropy", {"images": 1.0}, ImagesUsed(1)).write(other)
    code, text = run_build(capsys, weights_dir / "yolov5n.wts", "--int8", "--calib-cache", other, "--imgsz", "64",
                           "--weights-dir", weights_dir)
    assert code == 2 and "made for another network" in text
    assert not list(weights_dir.glob("*.engine"))


# -- ResNet: ImageNet preprocessing, chosen by the family's task ----------------------------------
def test_resnet_calibrates_with_imagenet_preprocessing_and_yolo_with_letterbox(monkeypatch):
    from types import SimpleNamespace

    from trtnet import networks

    image = np.zeros((300, 400, 3), np.uint8)
    image[..., 2] = 255  # pure red in BGR
    x = networks.calibration_preprocess({"family": "resnet"}, 64)(image)
    assert x.shape == (1, 3, 64, 64) and x.dtype == np.float32
    # red after ImageNet normalisation: (1 - 0.485) / 0.229 in R, (0 - mean) / std in G and B
    np.testing.assert_allclose(x[0, :, 10, 10], [(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-5)
    y = networks.calibration_preprocess({"family": "yolov5"}, 64)(image)
    assert y.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(y[0, :, 0, 0], 114 / 255, rtol=1e-6)  # letterbox padding (400x300 → 64x48)
    np.testing.assert_allclose(y[0, :, 32, 32], [1, 0, 0])
    monkeypatch.setattr(networks, "for_meta", lambda meta: SimpleNamespace(FAMILY="new", TASK="classify"))
    np.testing.assert_allclose(networks.calibration_preprocess({"family": "new"}, 64)(image), x)  # no hook needed


def test_imagenet_preprocessing_crops_the_centre():
    from trtnet.quant.calibrate import imagenet_preprocess

    image = np.zeros((256, 512, 3), np.uint8)
    image[:, 192:320] = 255  # a white band in the middle: the 128-pixel centre crop of a 256-high image
    x = imagenet_preprocess(128)(image)
    white = (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x[0, :, 64, 0], white, rtol=1e-5)
    np.testing.assert_allclose(x[0, :, 64, 127], white, rtol=1e-5)


@pytest.mark.slow
@requires_torch
def test_resnet18_int8_build_on_the_cpu(tmp_path, capsys):
    from trtnet.quant.calibration_file import read_calibration

    source = shared("weights", "synthetic", "resnet18_syn.pth")
    assert gen_wts.cli([str(source), "-o", str(tmp_path / "resnet18.wts")]) == 0
    images = tmp_path / "images"
    images.mkdir()
    for name in sorted(p.name for p in coco128().rglob("*.jpg"))[:3]:
        shutil.copy(next(coco128().rglob(name)), images / name)
    code, text = run_build(capsys, tmp_path / "resnet18.wts", "--int8", "--calib", images, "--calib-images", "3",
                           "--imgsz", "64", "--calib-method", "percentile", "--calib-device", "cpu",
                           "--weights-dir", tmp_path)
    assert code == 0, text
    meta = json.loads((tmp_path / "resnet18.int8.64.engine.json").read_text())
    assert meta["family"] == "resnet" and meta["int8"]["method"] == "percentile"
    calibration = read_calibration(tmp_path / "resnet18.int8.64.calib.json")
    assert calibration.images.count == 3
    # ImageNet normalisation puts the network input's range well beyond [0, 1] (letterbox would not)
    assert calibration.amax["input"] > 1.5


# -- the GPU calibration pass's host side ---------------------------------------------------------
@requires_torch
def test_gpu_pass_marks_every_quantizable_tensor_but_the_input_and_feeds_the_same_histograms(tmp_path):
    from trtnet import compat
    from trtnet.checkpoint import read_checkpoint
    from trtnet.executor import run_network
    from trtnet.network import BatchProfile, define_network
    from trtnet.quant import calibrate as c
    from trtnet.quant.gpu_calibration import calibration_engine_meta, feeds_and_outputs, mark_calibration_outputs

    ckpt = read_checkpoint(shared("weights", "yolov5n.pt"))
    builder = compat.trt().Builder(compat.Logger())
    defined = define_network(builder, ckpt.state_dict, ckpt.meta, precision="fp32", imgsz=64,
                             batch=BatchProfile(2, 2, 2))
    names = list(dict.fromkeys(c.quantizable_tensors(defined.network).values()))
    marked = mark_calibration_outputs(defined.network, names)
    assert sorted(marked) == sorted(set(names) - {"images"})
    meta = calibration_engine_meta(defined, 2)
    assert meta["batch"] == {"min": 2, "opt": 2, "max": 2} and set(marked) <= set(meta["outputs"])

    def engine_like(x):  # what Engine.infer returns: the network's outputs only
        outputs = run_network(defined.network, {"images": x}, keep=marked)
        return feeds_and_outputs("images", x, {n: outputs[n] for n in meta["outputs"]})

    paths = sorted(coco128().rglob("*.jpg"))[:2]
    stats, _ = c.collect_histograms(engine_like, c.CalibrationImages(paths, 2, c.letterbox_preprocess(64)), names, 2)
    amax = stats.amax("max")
    assert set(amax) == set(names)
    assert 0.9 < amax["images"] <= 1.0  # letterboxed pixels in [0, 1]


@pytest.mark.slow
@requires_torch
def test_int8_keep_auto_uses_the_sensitivity_report_beside_the_weights(weights_dir, capsys):
    from trtnet.quant.calibration_file import network_hash
    from trtnet.quant.sensitivity import rank
    from trtnet.weights import load_weights

    weights = load_weights(weights_dir / "yolov5n.wts")
    errors = {"model.0": 0.5, "raw_2": 0.01, **{f"model.{i}": 0.01 for i in range(1, 10)}}
    rank(errors, {}, 4, network_hash(weights.tensors, weights.meta), full_error=1.0,
         heads=("raw_2",)).write(weights_dir / "yolov5n.sensitivity.json")
    code, text = run_build(capsys, weights_dir / "yolov5n.wts", "--int8", "--calib", coco128(), "--calib-images", "1",
                           "--imgsz", "64", "--int8-keep", "auto", "--calib-device", "cpu",
                           "--weights-dir", weights_dir)
    assert code == 0, text
    assert "keeping in fp16: model.0, raw_2" in text
    meta = json.loads((weights_dir / "yolov5n.int8.64.engine.json").read_text())
    assert meta["int8"]["keep"] == ["model.0", "raw_2"]


@requires_torch
def test_gpu_calibration_pass_through_the_simulated_cuda_runtime(monkeypatch):
    """engine_pass end to end without a GPU: TensorRT-RTX builds the fp32 calibration engine here, the
    runtime's Engine opens it on the CUDA-runtime simulator of test_runtime_cpu, whose 'engine' computes the
    marked tensors with the reference executor; the histograms must equal the executor pass's."""
    import trtnet.cuda_rt
    from tests.test_runtime_cpu import SIM, SimEngine, host_view
    from trtnet import compat
    from trtnet.checkpoint import read_checkpoint
    from trtnet.executor import run_network
    from trtnet.network import BatchProfile, define_network
    from trtnet.quant import calibrate as c
    from trtnet.quant import gpu_calibration

    ckpt = read_checkpoint(shared("weights", "yolov5n.pt"))
    builder = compat.trt().Builder(compat.Logger())
    reference = define_network(builder, ckpt.state_dict, ckpt.meta, precision="fp32", imgsz=64,
                               batch=BatchProfile(2, 2, 2))
    names = list(dict.fromkeys(c.quantizable_tensors(reference.network).values()))
    marked = gpu_calibration.mark_calibration_outputs(reference.network, names)
    outputs = {reference.network.get_output(i).name: reference.network.get_output(i)
               for i in range(reference.network.num_outputs)}
    shapes = {"images": (2, 3, 64, 64)}
    probe = run_network(reference.network, {"images": np.zeros((2, 3, 64, 64), np.float32)})
    shapes.update({name: probe[name].shape for name in outputs})

    def compute(batch, address):
        x = host_view(address["images"], (batch, 3, 64, 64), np.float32).copy()
        for name, value in run_network(reference.network, {"images": x}).items():
            host_view(address[name], value.shape, np.float32)[...] = value

    built = {}
    real_build = gpu_calibration.build_calibration_engine

    def build_and_remember(*args):
        engine, built_names = real_build(*args)
        built["bytes"] = engine.stat().st_size
        built["engine"] = engine
        return engine, built_names

    monkeypatch.setattr(trtnet.cuda_rt, "cudart", lambda: SIM.rt)
    monkeypatch.setattr(gpu_calibration, "build_calibration_engine", build_and_remember)
    monkeypatch.setattr(compat, "deserialize", lambda plan, logger=None: (None, SimEngine(SIM, shapes, compute)))
    paths = sorted(coco128().rglob("*.jpg"))[:3]
    loader = c.CalibrationImages(paths, 3, c.letterbox_preprocess(64))
    with gpu_calibration.engine_pass(ckpt.state_dict, ckpt.meta, 64, batch=2) as (gpu_names, infer):
        gpu, _ = c.collect_histograms(infer, loader, gpu_names, 2)  # 3 images: the last batch is padded
    assert built["bytes"] > 100_000 and not built["engine"].parent.exists()  # the temporary engine is gone
    assert set(marked) <= set(shapes)
    with c.executor_pass(ckpt.state_dict, ckpt.meta, 64) as (cpu_names, cpu_infer):
        cpu, _ = c.collect_histograms(cpu_infer, loader, cpu_names, 1)
    assert gpu_names == cpu_names
    for name in cpu_names:
        assert gpu.histograms[name].amax("max") == pytest.approx(cpu.histograms[name].amax("max"), rel=1e-5), name
        # every value of the 3 images counted once (the padding row of the last batch of 2 left out); the bins
        # differ (the first batch sets the bin width), so entropy amax is not compared
        assert gpu.histograms[name].counts.sum() == cpu.histograms[name].counts.sum(), name


@requires_torch
def test_implicit_mode_defines_an_fp32_network_and_feeds_the_calibrator_letterboxed_batches(tmp_path, monkeypatch):
    """The implicit path's host side with TensorRT's calibrator and the device upload stood in for."""
    from trtnet import compat
    from trtnet.checkpoint import read_checkpoint
    from trtnet.engine_meta import Int8Record
    from trtnet.network import BatchProfile
    from trtnet.quant import implicit, int8_build
    from trtnet.quant.options import Int8Options

    made = {}

    def calibrator(method, batches, batch_size, cache_path, upload):
        made.update(batches=[b.copy() for b in implicit.fixed_batches(batches, batch_size)], cache=cache_path,
                    batch=batch_size, method=method)
        return "calibrator"

    monkeypatch.setattr(implicit, "tensorrt_calibrator", calibrator)
    monkeypatch.setattr(int8_build, "device_uploader", lambda: (None, None))
    monkeypatch.setattr(compat, "create_weakly_typed_network", lambda builder: builder.create_network(0))  # RTX
    ckpt = read_checkpoint(shared("weights", "yolov5n.pt"))
    builder = compat.trt().Builder(compat.Logger())
    options = Int8Options(calib=str(coco128()), calib_images=4, mode="implicit")
    network = int8_build.define_int8_network(builder, options, ckpt.state_dict, ckpt.meta,
                                             tmp_path / "yolov5n.int8.engine", print,
                                             batch=BatchProfile(1, 2, 4), imgsz=64)
    assert network.calibrator == "calibrator" and made["cache"] == tmp_path / "yolov5n.int8.calib.cache"
    assert made["method"] == "entropy" == network.record.method  # TensorRT's EntropyCalibrator2 by default
    assert made["batch"] == 2 and [b.shape for b in made["batches"]] == [(2, 3, 64, 64)] * 2  # opt batch
    assert network.defined.graph.dtype == np.float32  # TensorRT picks the precisions (INT8 + FP16 flags)
    layers = [network.defined.network.get_layer(i).type.name for i in range(network.defined.network.num_layers)]
    assert "QUANTIZE" not in layers
    assert network.record == Int8Record("implicit", "yolov5n.int8.calib.cache", "entropy", 4, ())


def test_gpu_calibration_without_a_gpu_is_refused_before_reading(tmp_path, capsys):
    from trtnet.cuda_rt import gpu_unavailable_reason

    if gpu_unavailable_reason() is None:
        pytest.skip("a GPU is usable here")
    code, text = run_build(capsys, tmp_path / "absent.wts", "--int8", "--calib", tmp_path, "--calib-device", "gpu")
    assert code == 2 and "--calib-device gpu:" in text and "use --calib-device cpu" in text
    assert list(tmp_path.iterdir()) == []


def test_engine_meta_types_the_int8_record_and_names_a_broken_one():
    from trtnet.engine_meta import EngineMeta, Int8Record
    from trtnet.errors import TrtnetError

    base = {"family": "yolov5", "imgsz": [320, 320], "batch": {"min": 1, "opt": 1, "max": 1},
            "input": {"name": "images"}, "outputs": ["raw_0"], "tensorrt": {"flavour": "tensorrt", "version": "8.5"},
            "precision": "int8"}
    record = {"mode": "explicit", "calibration": "y.calib.json", "method": "entropy", "images": 8, "keep": ["raw_0"]}
    meta = EngineMeta.from_dict({**base, "int8": record})
    assert meta.int8 == Int8Record("explicit", "y.calib.json", "entropy", 8, ("raw_0",))
    assert meta.to_dict()["int8"] == record
    assert "int8" not in EngineMeta.from_dict(base).to_dict()
    with pytest.raises(TrtnetError, match="field 'int8'.*images"):
        EngineMeta.from_dict({**base, "int8": {**record, "images": "eight"}}, "x.engine.json")


def test_engine_metadata_validates_the_int8_record_with_the_rest(tmp_path):
    from types import SimpleNamespace

    from trtnet.build import BuildRequest, engine_metadata
    from trtnet.engine_meta import Int8Record
    from trtnet.errors import TrtnetError

    weights = tmp_path / "resnet18.wts"
    weights.write_bytes(b"1\n")
    defined = SimpleNamespace(family="resnet", imgsz=(64, 64), min_imgsz=None, max_imgsz=None, input_name="input",
                              output_names=["output"], network=SimpleNamespace(num_layers=3), strides=[])
    meta = {"family": "resnet", "arch": "resnet18", "num_classes": 10}
    req = BuildRequest(str(weights), precision="int8")
    record = Int8Record("explicit", "r.calib.json", "entropy", 8, ("fc",))
    written = engine_metadata(req, defined, meta, weights, 1.0, 10, record)
    assert written["int8"] == {"mode": "explicit", "calibration": "r.calib.json", "method": "entropy", "images": 8,
                               "keep": ["fc"]}
    assert "int8" not in engine_metadata(BuildRequest(str(weights)), defined, meta, weights, 1.0, 10)
    with pytest.raises(TrtnetError, match="field 'int8'.*images"):
        engine_metadata(req, defined, meta, weights, 1.0, 10, Int8Record("explicit", "r.calib.json", "entropy", -1))
