"""Runtime, API and detect CLI without a GPU: everything around the engine, with fake engine outputs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import requires_tensorrt, requires_torch, shared
from trtnet import compat, detect
from trtnet.api import Classification, Detector, detections_from_rows, load_image, softmax, to_bgr, top_k
from trtnet.engine import split_batch
from trtnet.engine_files import check_device, check_tensorrt, load_metadata, resolve_engine
from trtnet.engine_meta import EngineMeta
from trtnet.errors import TrtnetError
from trtnet.plugins.preprocess import rows_to_image
from trtnet.sidecar import engine_sidecar_path

RTX = compat.Flavour("tensorrt-rtx", "1.7.1.116", 1)
TRT85 = compat.Flavour("tensorrt", "8.5.3.1", 8)
H200 = {"name": "NVIDIA H200", "compute_capability": "9.0", "free_bytes": 100 << 30}


def sidecar(**changes) -> dict:
    meta = {
        "family": "yolov5", "weights": "yolov5n.wts", "precision": "fp16", "imgsz": [640, 640],
        "batch": {"min": 1, "opt": 1, "max": 4}, "input": {"name": "images", "dtype": "float32"},
        "outputs": ["raw_0", "raw_1", "raw_2"], "tensorrt": {"flavour": "tensorrt", "version": "8.5.3.1"},
        "device": {"name": "NVIDIA H200", "compute_capability": "9.0"}, "engine_bytes": 5_000_000,
        "target_cc": [], "names": ["person", "bicycle", "car"], "nc": 3,
    }
    meta.update(changes)
    return meta


def engine_meta(**changes) -> EngineMeta:
    return EngineMeta.from_dict(sidecar(**changes), "e.json")


def fake_engine(folder: Path, name: str = "yolov5n.fp16", **changes) -> Path:
    engine = folder / f"{name}.engine"
    engine.write_bytes(b"not a real plan")
    changes.setdefault("engine_bytes", engine.stat().st_size)
    engine_sidecar_path(engine).write_text(json.dumps(sidecar(**changes)))
    return engine


# ------------------------------------------------------------------------------------------ batches


@pytest.mark.parametrize(("count", "smallest", "largest", "expected"), [
    (10, 1, 4, [(0, 4, 4), (4, 4, 4), (8, 2, 2)]),  # above the profile: split
    (3, 1, 8, [(0, 3, 3)]),
    (1, 2, 8, [(0, 1, 2)]),  # below the minimum: padded
    (9, 4, 4, [(0, 4, 4), (4, 4, 4), (8, 1, 4)]),  # static batch 4
    (0, 1, 8, []),
])
def test_split_batch(count, smallest, largest, expected):
    assert split_batch(count, smallest, largest) == expected


# ------------------------------------------------------------------------------------------ engines and metadata


def test_engine_name_finds_the_one_engine_of_a_model(tmp_path):
    (tmp_path / "yolov5n6.fp16.640.engine").write_bytes(b"x")  # another model whose name starts alike
    (tmp_path / "yolov5n.fp16.128-672.b1-32.engine").write_bytes(b"x")
    assert resolve_engine("yolov5n", tmp_path) == tmp_path / "yolov5n.fp16.128-672.b1-32.engine"


def test_engine_name_of_an_older_build_still_resolves(tmp_path):
    (tmp_path / "yolov5n.fp32.engine").write_bytes(b"x")
    assert resolve_engine("yolov5n", tmp_path) == tmp_path / "yolov5n.fp32.engine"


def test_engine_name_fitting_several_engines_lists_them(tmp_path):
    for name in ("yolov5n.fp16.320.engine", "yolov5n.fp16.640.engine", "yolov5n.fp32.640.engine"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(TrtnetError, match=r"names 3 engines .*yolov5n\.fp16\.320\.engine, yolov5n\.fp16\.640"
                                          r"\.engine, yolov5n\.fp32\.640\.engine"):
        resolve_engine("yolov5n", tmp_path)
    with pytest.raises(TrtnetError, match="names 2 engines"):
        resolve_engine("yolov5n.fp16", tmp_path)
    assert resolve_engine("yolov5n.fp16.640", tmp_path) == tmp_path / "yolov5n.fp16.640.engine"
    assert resolve_engine("yolov5n.fp32", tmp_path) == tmp_path / "yolov5n.fp32.640.engine"


def test_missing_engine_says_how_to_build(tmp_path):
    with pytest.raises(TrtnetError, match=r"python -m trtnet.build yolov5s --fp16"):
        resolve_engine("yolov5s", tmp_path)
    with pytest.raises(TrtnetError, match="no such engine"):
        resolve_engine(tmp_path / "nope.engine")


def test_metadata_missing_or_broken(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    with pytest.raises(TrtnetError, match="m.engine.json is missing"):
        load_metadata(engine)
    engine_sidecar_path(engine).write_text("{not json")
    with pytest.raises(TrtnetError, match="cannot read"):
        load_metadata(engine)
    engine_sidecar_path(engine).write_text(json.dumps({"family": "yolov5"}))
    with pytest.raises(TrtnetError, match="lacks imgsz"):
        load_metadata(engine)


def test_other_tensorrt_version_or_flavour_is_refused():
    check_tensorrt(engine_meta(), TRT85)
    expected = r"built with tensorrt 8\.5\.3\.1; this is tensorrt-rtx 1\.7.*Rebuild it here: python -m trtnet\.build"
    with pytest.raises(TrtnetError, match=expected):
        check_tensorrt(engine_meta(), RTX)
    with pytest.raises(TrtnetError, match="built with tensorrt 8.6.1"):
        check_tensorrt(engine_meta(tensorrt={"flavour": "tensorrt", "version": "8.6.1"}), TRT85)


def test_engine_for_another_gpu_is_refused():
    check_device(engine_meta(), TRT85, H200)
    h100 = {**H200, "name": "NVIDIA H100", "compute_capability": "9.0"}
    check_device(engine_meta(), TRT85, h100)  # same compute capability: TensorRT runs it
    a100 = {**H200, "name": "NVIDIA A100", "compute_capability": "8.0"}
    with pytest.raises(TrtnetError, match=r"built on NVIDIA H200 \(compute capability 9\.0\).*A100 \(8\.0\)"):
        check_device(engine_meta(), TRT85, a100)
    with pytest.raises(TrtnetError, match="--target-cc 8.0"):
        check_device(engine_meta(target_cc=["8.6", "8.9"]), RTX, a100)
    with pytest.raises(TrtnetError, match="MB free"):
        check_device(engine_meta(), TRT85, {**H200, "free_bytes": 1_000_000})


def test_engine_from_another_tensorrt_fails_before_touching_the_gpu(tmp_path):
    from trtnet.engine import Engine

    other = "8.5.3.1" if compat.flavour().name != "tensorrt" else "7.2.3"
    engine = fake_engine(tmp_path, tensorrt={"flavour": "tensorrt", "version": other})
    with pytest.raises(TrtnetError, match=f"built with tensorrt {other}.*Rebuild"):
        Engine(engine)


def test_truncated_engine_is_refused_before_tensorrt_reads_it(tmp_path, monkeypatch):
    import trtnet.cuda_rt
    from trtnet.engine import Engine

    monkeypatch.setattr(trtnet.cuda_rt, "cudart", lambda: SIM.rt)
    flavour = compat.flavour()
    engine = fake_engine(tmp_path, engine_bytes=999, tensorrt={"flavour": flavour.name, "version": flavour.version})
    with pytest.raises(TrtnetError, match=r"has 15 bytes, its metadata says 999: the file is truncated"):
        Engine(engine)


def test_detect_cli_reports_a_foreign_engine_and_exits_2(tmp_path, capsys):
    engine = fake_engine(tmp_path, tensorrt={"flavour": "tensorrt", "version": "7.2.3"})
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    assert detect.cli([str(engine), str(image), "--out", str(tmp_path / "out")]) == 2
    assert "error: the engine was built with tensorrt 7.2.3" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ images


def test_to_bgr_converts_gray_bgra_and_16_bit():
    gray = np.array([[0, 128], [255, 7]], np.uint8)
    assert to_bgr(gray).shape == (2, 2, 3) and (to_bgr(gray)[..., 1] == gray).all()
    assert to_bgr(gray[..., None]).shape == (2, 2, 3)
    bgra = np.zeros((3, 4, 4), np.uint8)
    bgra[..., 0], bgra[..., 2], bgra[..., 3] = 10, 200, 99
    out = to_bgr(bgra)
    assert out.shape == (3, 4, 3) and (out[..., 0] == 10).all() and (out[..., 2] == 200).all()
    assert to_bgr(np.full((2, 2, 3), 65535, np.uint16)).max() == 255


@pytest.mark.parametrize(("image", "message"), [
    (np.zeros((0, 5, 3), np.uint8), "empty"),
    (np.zeros((4, 4, 3), np.float32), "dtype float32"),
    (np.zeros((4, 4, 5), np.uint8), "HxWx4"),
])
def test_to_bgr_refuses_what_it_cannot_convert(image, message):
    with pytest.raises(TrtnetError, match=message):
        to_bgr(image)


def test_load_image_png_variants(tmp_path):
    gray, rgba, tiny = tmp_path / "gray.png", tmp_path / "rgba.png", tmp_path / "tiny.png"
    cv2.imwrite(str(gray), np.full((5, 7), 90, np.uint8))
    bgra = np.zeros((5, 7, 4), np.uint8)
    bgra[..., 1], bgra[..., 3] = 250, 128
    cv2.imwrite(str(rgba), bgra)
    cv2.imwrite(str(tiny), np.full((1, 1, 3), 3, np.uint8))
    assert load_image(gray)[0].shape == (5, 7, 3) and (load_image(gray)[0] == 90).all()
    image, path = load_image(rgba)
    assert image.shape == (5, 7, 3) and (image[..., 1] == 250).all() and (image[..., 0] == 0).all()
    assert path == str(rgba)
    assert load_image(tiny)[0].shape == (1, 1, 3)


def test_load_image_names_unreadable_files(tmp_path):
    empty, text = tmp_path / "empty.jpg", tmp_path / "notes.jpg"
    empty.write_bytes(b"")
    text.write_text("not an image")
    for path in (empty, text):
        with pytest.raises(TrtnetError, match=f"{path.name}: not an image"):
            load_image(path)
    with pytest.raises(TrtnetError, match="no such image"):
        load_image(tmp_path / "missing.jpg")


# ------------------------------------------------------------------------------------------ sources


def test_expand_sources(tmp_path, capsys):
    folder = tmp_path / "media"
    folder.mkdir()
    for name in ("b.jpg", "a.PNG", "clip.mp4", "readme.txt"):
        (folder / name).write_bytes(b"x")
    odd = tmp_path / "photo.unknown"
    odd.write_bytes(b"x")
    sources = detect.expand_sources([str(folder), str(tmp_path / "media" / "*.jpg"), "0", str(odd),
                                     str(tmp_path / "missing.jpg")])
    kinds = [(s.kind, Path(s.location).name) for s in sources]
    assert kinds == [("image", "a.PNG"), ("image", "b.jpg"), ("video", "clip.mp4"), ("image", "b.jpg"),
                     ("camera", "0"), ("image", "photo.unknown")]
    err = capsys.readouterr().err
    assert "skipping 1 file(s) that are neither images nor videos" in err
    assert "missing.jpg: no such file" in err


# ------------------------------------------------------------------------------------------ results


def official_scale_boxes(boxes, input_hw, image_hw):
    """ultralytics/yolov5 v7.0 utils.general.scale_boxes + clip_boxes, written out for the test."""
    gain = min(input_hw[0] / image_hw[0], input_hw[1] / image_hw[1])
    pad_x, pad_y = (input_hw[1] - image_hw[1] * gain) / 2, (input_hw[0] - image_hw[0] * gain) / 2
    out = np.array(boxes, dtype=np.float64)
    out[:, [0, 2]] = ((out[:, [0, 2]] - pad_x) / gain).clip(0, image_hw[1])
    out[:, [1, 3]] = ((out[:, [1, 3]] - pad_y) / gain).clip(0, image_hw[0])
    return out


def test_boxes_map_back_to_the_original_image():
    image = np.zeros((1080, 810, 3), np.uint8)  # bus.jpg's size; at 320 the letterbox pads 40 px left/right
    rows = np.array([[40, 0, 280, 320, 0.9, 5], [100, 50, 200, 150, 0.5, 0], [10, -5, 300, 330, 0.3, 2]],
                    np.float32)
    result = detections_from_rows(rows_to_image(rows, (320, 320), image.shape[:2]), image, ["person", "bicycle", "car"])
    np.testing.assert_allclose(result.boxes[0], [0, 0, 810, 1080], atol=1e-3)
    np.testing.assert_allclose(result.boxes[1], [202.5, 168.75, 540, 506.25], atol=1e-3)
    np.testing.assert_allclose(result.boxes[2], [0, 0, 810, 1080], atol=1e-3)  # clipped to the image
    assert result.labels == ["5", "person", "car"] and result.classes.tolist() == [5, 0, 2]
    np.testing.assert_allclose(result.scores, [0.9, 0.5, 0.3])


def test_official_nms_rows_on_bus_map_like_scale_boxes():
    golden = np.load(shared("golden", "golden_yolov5n_bus320.npz"))
    image = cv2.imread(str(shared("images", "bus.jpg")))
    rows = golden["det"]
    result = detections_from_rows(rows_to_image(rows, (320, 320), image.shape[:2]), image, [str(i) for i in range(80)])
    np.testing.assert_allclose(result.boxes, official_scale_boxes(rows[:, :4], (320, 320), image.shape[:2]),
                               rtol=1e-5, atol=1e-3)
    assert len(result) == len(rows)


def test_draw_and_json(tmp_path):
    image = np.full((60, 80, 3), 50, np.uint8)
    result = detections_from_rows(np.array([[10, 10, 40, 30, 0.87, 1]], np.float32), image, ["person", "bicycle"],
                                  path="x.jpg")
    drawn = result.draw()
    assert drawn.shape == image.shape and (image == 50).all()  # a copy: the original is untouched
    assert (drawn != 50).any(axis=2)[10, 10:40].all()  # the top edge of the box is drawn
    record = json.loads(result.to_json())
    assert record == {"path": "x.jpg", "shape": [60, 80], "detections": [
        {"xyxy": [10.0, 10.0, 40.0, 30.0], "conf": 0.87, "cls": 1, "name": "bicycle"}]}
    empty = detections_from_rows(np.zeros((0, 6), np.float32), image, ["person"])
    assert len(empty) == 0 and (empty.draw() == image).all()


def test_classification_top_k():
    probs = softmax(np.array([1.0, 3.0, 2.0, -1.0]))
    assert probs.sum() == pytest.approx(1.0)
    classes, scores = top_k(probs, 2)
    assert classes.tolist() == [1, 2] and scores[0] > scores[1]
    result = Classification(classes, scores, ["tench", "goldfish", "shark"])
    assert result.names == ["goldfish", "shark"]
    assert json.loads(result.to_json())["top"][0]["name"] == "goldfish"


# ------------------------------------------------------------------------------------------ detector with a fake engine


class FakeEngine:
    imgsz = (320, 320)
    max_batch = 2

    def close(self):
        pass


class FakePipeline:
    """Stands in for the GPU: one detection covering each image (in its pixels, as DetectPipeline returns
    them), class = call order."""

    def __init__(self):
        self.calls = []

    def run(self, images):
        self.calls.append(len(images))
        rows = []
        for image in images:
            h, w = image.shape[:2]
            rows.append(np.array([[0, 0, w, h, 0.75, len(rows)]], np.float32))
        return rows

    def stream(self, images, batch=1, depth=2):
        from trtnet.engine import batched

        for chunk in batched(images, batch):
            yield from self.run(chunk)


def fake_detector() -> Detector:
    detector = Detector.__new__(Detector)
    detector.engine, detector.pipeline, detector.names = FakeEngine(), FakePipeline(), ["person", "bicycle", "car"]
    return detector


def test_detector_accepts_paths_arrays_and_lists(tmp_path):
    path = tmp_path / "wide.png"
    cv2.imwrite(str(path), np.zeros((100, 300), np.uint8))  # grayscale file
    detector = fake_detector()
    results = detector.detect([path, np.zeros((50, 40, 4), np.uint8)])
    assert [r.shape for r in results] == [(100, 300), (50, 40)]
    np.testing.assert_allclose(results[0].boxes[0], [0, 0, 300, 100], atol=0.05)
    np.testing.assert_allclose(results[1].boxes[0], [0, 0, 40, 50], atol=0.05)
    assert results[0].path == str(path) and results[1].path is None
    assert len(detector.detect(np.zeros((8, 8, 3), np.uint8))) == 1


def test_detect_cli_images_skip_unreadable_and_write_outputs(tmp_path, capsys):
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    cv2.imwrite(str(good), np.full((40, 60, 3), 200, np.uint8))
    bad.write_text("garbage")
    outputs = detect.Outputs(tmp_path / "out", save=True, show=False)
    sources = detect.expand_sources([str(good), str(bad), str(good)])
    detect.run_images(fake_detector(), sources, outputs, batch=2)
    json_path = outputs.write_json()
    records = json.loads(json_path.read_text(encoding="utf-8"))
    assert [Path(r["path"]).name for r in records] == ["good.jpg", "good.jpg"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jpg")) == ["good.jpg", "good_1.jpg"]
    assert "skipping" in capsys.readouterr().err and outputs.skipped == 1
    assert "person  2" in outputs.summary(1.0) and "car" not in outputs.summary(1.0)


def test_detect_cli_video(tmp_path):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write mp4v video")
    for i in range(5):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    outputs = detect.Outputs(tmp_path / "out", save=True, show=False)
    detector = fake_detector()
    detect.run_stream(detector, detect.Source("video", str(video)), outputs, batch=2)
    assert detector.pipeline.calls == [2, 2, 1]
    assert [r["frame"] for r in outputs.records] == [0, 1, 2, 3, 4]
    assert outputs.frames == 5
    capture = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 5


def test_detect_cli_unopenable_video_is_skipped(tmp_path, capsys):
    video = tmp_path / "broken.mp4"
    video.write_bytes(b"\x00" * 100)
    outputs = detect.Outputs(tmp_path / "out", save=True, show=False)
    detect.run_stream(fake_detector(), detect.Source("video", str(video)), outputs, batch=2)
    assert outputs.skipped == 1 and not outputs.records
    assert "broken.mp4" in capsys.readouterr().err


def test_detect_cli_nothing_to_do(tmp_path, capsys):
    assert detect.cli(["yolov5n", str(tmp_path / "nothing.jpg")]) == 2
    assert "error: nothing to detect on" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ --help


@pytest.mark.parametrize("script", ["detect.py", "classify.py"])
def test_demo_scripts_have_help(script):
    import subprocess
    import sys

    demo = Path(__file__).resolve().parents[1] / "demos" / script
    done = subprocess.run([sys.executable, str(demo), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "usage:" in done.stdout


@pytest.mark.parametrize("command", ["detect", "demo", "bench"])
def test_every_command_has_help(command, capsys):
    import importlib

    module = importlib.import_module(f"trtnet.{command}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: trtnet {command} ")


# ------------------------------------------------------------------------------------------ ImageNet preprocessing


@pytest.mark.parametrize(("hw", "expected"), [
    # torchvision Resize(256): short side 256, long side int(256 * long / short); CenterCrop(224): offsets
    # int(round((size - 224) / 2)) — worked out by hand from torchvision's code.
    ((1080, 810), (341, 256, 58, 16)),
    ((720, 1280), (256, 455, 16, 116)),
    ((224, 224), (256, 256, 16, 16)),
    ((1, 1), (256, 256, 16, 16)),
])
def test_imagenet_geometry(hw, expected):
    from trtnet.plugins.preprocess import imagenet_geometry

    assert imagenet_geometry(*hw) == expected


def test_classify_kernel_is_one_of_the_shared_kernel_modules():
    from trtnet.plugins import cuda

    assert "imagenet(ClsBatch batch)" in cuda.module_source("classify_preprocess")


def test_classify_kernel_compiles_and_its_parameters_match_the_python_layout():
    import ctypes

    from trtnet.plugins import cuda
    from trtnet.plugins.preprocess import ClsBatch, ClsImage

    source = (Path(cuda.__file__).parent / "classify_preprocess.cu").read_text(encoding="utf-8")
    checks = "".join(
        f"static_assert(__builtin_offsetof({struct}, {field}) == {getattr(cls, field).offset}, \"{field}\");\n"
        for struct, cls in (("ClsImage", ClsImage), ("ClsBatch", ClsBatch)) for field, _ in cls._fields_
    )
    checks += f"static_assert(sizeof(ClsBatch) == {ctypes.sizeof(ClsBatch)}, \"size\");\n"
    try:
        cubin = cuda.compile_cubin(source + checks, "sm_75", "classify_preprocess_layout", use_cache=False)
    except TrtnetError as exc:
        if "NVRTC (the CUDA runtime compiler) is not available" in str(exc):
            pytest.skip(str(exc))
        raise
    assert len(cubin) > 0


# ------------------------------------------------------------------------------------------ simulated GPU
#
# The runtime's GPU path run against a stand-in: "device memory" is host memory, CUDA calls act at once
# (or are recorded while a stream captures a graph), the "engine" returns the official head maps of
# bus.jpg (golden_yolov5n_bus320.npz) when its input is the official letterbox of bus.jpg (zeros otherwise),
# and the kernels are their NumPy references. What this checks is trtnet's own plumbing: staging,
# pointers, shapes, batch splitting and padding, graphs, threads, mapping boxes back.


def host_view(ptr: int, shape, dtype) -> np.ndarray:
    import ctypes

    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    return np.frombuffer((ctypes.c_ubyte * (count * dtype.itemsize)).from_address(ptr), dtype, count).reshape(shape)


class SimGpu:
    """The CUDA runtime calls trtnet makes, on host memory. Work queued on a stream runs only when something
    waits for it (a stream or event synchronize, or the stream an event is waited on), in stream order, so
    a missing wait or a buffer reused too early gives wrong results instead of passing by luck."""

    def __init__(self):
        import collections
        import threading
        import types

        self.memory: dict[int, object] = {}
        self.pinned: dict[int, int] = {}  # start address → size of the page-locked allocations
        self.capturing: dict[int, list] = {}
        self.queues: dict[int, list] = collections.defaultdict(list)  # stream → work not yet run
        self.ran: dict[int, int] = collections.defaultdict(int)  # stream → how many items have run
        self.events: dict[int, tuple[int, int]] = {}  # event → (stream, items that precede it)
        self.destroyed_streams: set[int] = set()
        self.next_id = 100
        self.launches = 0
        self.device_count_calls = 0
        self.current = threading.local()  # the calling thread's device, as cudaSetDevice left it
        self.lock = threading.RLock()
        ok = 0
        self.rt = types.SimpleNamespace(
            cudaGetDeviceCount=self.device_count, cudaGetDevice=lambda: (ok, getattr(self.current, "device", 0)),
            cudaSetDevice=self.set_device,
            cudaGetDeviceProperties=lambda d: (ok, types.SimpleNamespace(name=b"Sim GPU", major=9, minor=0)),
            cudaMemGetInfo=lambda: (ok, 80 << 30, 80 << 30),
            cudaMalloc=self.alloc, cudaFree=self.free, cudaMallocHost=self.alloc_pinned, cudaFreeHost=self.free,
            cudaPointerGetAttributes=self.pointer_attributes,
            cudaMemoryType=types.SimpleNamespace(cudaMemoryTypeHost=1),
            cudaStreamNonBlocking=1, cudaStreamCreateWithFlags=lambda flags: (ok, self.new_id()),
            cudaStreamSynchronize=self.stream_synchronize, cudaStreamDestroy=self.stream_destroy,
            cudaStreamWaitEvent=self.stream_wait_event,
            cudaEventCreate=lambda: (ok, self.new_id()), cudaEventDisableTiming=2,
            cudaEventCreateWithFlags=lambda flags: (ok, self.new_id()), cudaEventRecord=self.event_record,
            cudaEventSynchronize=self.event_synchronize, cudaEventElapsedTime=lambda a, b: (ok, 1.0),
            cudaEventDestroy=lambda e: (ok,),
            cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2,
                                                 cudaMemcpyDeviceToDevice=3),
            cudaMemcpyAsync=self.memcpy, cudaMemsetAsync=self.memset,
            cudaStreamCaptureMode=types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1),
            cudaStreamBeginCapture=self.begin_capture, cudaStreamEndCapture=self.end_capture,
            cudaGetLastError=lambda: (ok,), cudaGraphInstantiate=lambda g, flags: (ok, g),
            cudaGraphDestroy=lambda g: (ok,), cudaGraphExecDestroy=lambda g: (ok,),
            cudaGraphLaunch=self.graph_launch,
        )

    def device_count(self):
        self.device_count_calls += 1
        return 0, 2

    def set_device(self, device):
        self.current.device = int(device)
        return (0,)

    def new_id(self) -> int:
        with self.lock:
            self.next_id += 1
            return self.next_id

    def alloc(self, nbytes):
        import ctypes

        buffer = ctypes.create_string_buffer(max(int(nbytes), 1))
        self.memory[ctypes.addressof(buffer)] = buffer
        return 0, ctypes.addressof(buffer)

    def alloc_pinned(self, nbytes):
        err, ptr = self.alloc(nbytes)
        self.pinned[ptr] = max(int(nbytes), 1)
        return err, ptr

    def free(self, ptr):
        self.memory.pop(int(ptr), None)
        self.pinned.pop(int(ptr), None)
        return (0,)

    def pointer_attributes(self, ptr):
        import types

        host = any(start <= int(ptr) < start + size for start, size in list(self.pinned.items()))
        return 0, types.SimpleNamespace(type=1 if host else 0)

    # -- streams: queued work runs when waited for

    def stream_destroy(self, stream):
        self.destroyed_streams.add(int(stream))
        return (0,)

    def submit(self, stream, work) -> None:
        with self.lock:
            recording = self.capturing.get(int(stream))
            (recording if recording is not None else self.queues[int(stream)]).append(work)

    def run_until(self, stream: int, position: int) -> None:
        """Run `stream`'s queued work until `position` items have run."""
        with self.lock:
            queue = self.queues[stream]
            while self.ran[stream] < position and queue:
                work = queue.pop(0)
                self.ran[stream] += 1
                work()

    def queued_end(self, stream: int) -> int:
        return self.ran[stream] + len(self.queues[stream])

    def stream_synchronize(self, stream):
        self.run_until(int(stream), self.queued_end(int(stream)))
        return (0,)

    def event_record(self, event, stream):
        with self.lock:
            self.events[int(event)] = (int(stream), self.queued_end(int(stream)))
        return (0,)

    def event_synchronize(self, event):
        stream, position = self.events.get(int(event), (0, 0))
        self.run_until(stream, position)
        return (0,)

    def stream_wait_event(self, stream, event, flags):
        other, position = self.events.get(int(event), (0, 0))
        self.submit(stream, lambda: self.run_until(other, position))
        return (0,)

    def memcpy(self, dst, src, nbytes, kind, stream):
        import ctypes

        self.submit(stream, lambda: ctypes.memmove(int(dst), int(src), int(nbytes)))
        return (0,)

    def memset(self, ptr, value, nbytes, stream):
        import ctypes

        self.submit(stream, lambda: ctypes.memset(int(ptr), int(value), int(nbytes)))
        return (0,)

    def begin_capture(self, stream, mode):
        self.capturing[int(stream)] = []
        return (0,)

    def end_capture(self, stream):
        return 0, self.capturing.pop(int(stream))

    def graph_launch(self, graph, stream):
        self.launches += 1
        for work in graph:
            self.submit(stream, work)
        return (0,)


class SimEngine:
    """An 'engine' whose outputs `compute(batch, addresses)` writes; the first of `shapes` is the input."""

    def __init__(self, gpu: SimGpu, shapes: dict, compute):
        self.gpu, self.shapes, self.compute = gpu, shapes, compute
        self.names = list(self.shapes)
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_dtype(self, name):
        return compat.trt().float32

    def get_tensor_shape(self, name):
        return self.shapes[name]

    def get_tensor_mode(self, name):
        t = compat.trt()
        return t.TensorIOMode.INPUT if name == self.names[0] else t.TensorIOMode.OUTPUT

    def create_execution_context(self):
        return SimContext(self)


class SimContext:
    def __init__(self, engine: SimEngine):
        self.engine, self.batch, self.address = engine, 0, {}

    def set_input_shape(self, name, shape):
        self.batch = shape[0]
        return True

    def get_tensor_shape(self, name):
        return (self.batch, *self.engine.shapes[name][1:])

    def set_tensor_address(self, name, ptr):
        self.address[name] = ptr

    def execute_async_v3(self, stream):
        batch, address = self.batch, dict(self.address)  # what a captured graph would have baked in
        self.engine.gpu.submit(stream, lambda: self.engine.compute(batch, address))
        return True


YOLO_SHAPES = {"images": (-1, 3, 320, 320), "raw_0": (-1, 255, 40, 40), "raw_1": (-1, 255, 20, 20),
               "raw_2": (-1, 255, 10, 10)}


def yolo_heads_of_bus(golden):
    """The official head maps of bus.jpg for inputs that are its official letterbox, zeros otherwise."""
    expected = golden["image"][0].astype(np.float32) / 255

    def compute(batch, address):
        x = host_view(address["images"], (batch, 3, 320, 320), np.float32)
        for name in ("raw_0", "raw_1", "raw_2"):
            out = host_view(address[name], (batch, *golden[name].shape[1:]), np.float32)
            for i in range(batch):
                out[i] = golden[name][0] if np.allclose(x[i], expected, atol=1.5 / 255) else 0.0

    return compute


class SimLetterbox:
    """plugins.preprocess.Letterbox with the official NumPy letterbox in place of the kernel."""

    def __init__(self, out_h, out_w, dtype="float32"):
        self.out_h, self.out_w, self.dtype = out_h, out_w, dtype

    def output_bytes(self, batch, out_hw=None):
        out_h, out_w = out_hw or (self.out_h, self.out_w)
        return batch * 3 * out_h * out_w * np.dtype(self.dtype).itemsize

    def enqueue(self, stream, images, heights, widths, out_ptr, pitches=None, out_hw=None):
        """Image i's rows are pitches[i] bytes apart (default 3 * width), as letterbox.cu reads them."""
        from trtnet.plugins.official import letterbox, to_network_input

        pitches = pitches or [3 * w for w in widths]

        def work():
            out = host_view(out_ptr, (len(images), 3, *(out_hw or (self.out_h, self.out_w))), self.dtype)
            for i, (ptr, h, w, pitch) in enumerate(zip(images, heights, widths, pitches)):
                image = np.ascontiguousarray(host_view(ptr, (h, pitch), np.uint8)[:, : 3 * w]).reshape(h, w, 3)
                out[i] = to_network_input(letterbox(image, (self.out_h, self.out_w), canvas=out_hw)[0])[0]

        SIM.submit(stream, work)


class SimPostprocess:
    """plugins.postprocess.YoloPostprocess with the official NumPy decode + NMS in place of the kernels."""

    def __init__(self, *, nc, head="anchors", strides=(), anchors=(), conf=0.25, iou=0.45, max_det=1000,
                 multi_label=False, agnostic=False, capacity=30000):
        assert head in ("anchors", "anchor_free") and (head == "anchors") == bool(strides) == bool(anchors)
        self.head, self.strides, self.anchors, self.nc = head, strides, anchors, nc
        self.conf, self.iou, self.max_det, self.multi_label, self.agnostic = conf, iou, max_det, multi_label, agnostic
        self.calls = []

    def workspace_bytes(self, batch, level_shapes):
        return 64 * batch

    def enqueue(self, stream, head_ptrs, head_dtype, batch, level_shapes, workspace_ptr, dets_ptr, counts_ptr):
        from trtnet.plugins import official

        self.calls.append((len(head_ptrs), head_dtype, batch, [tuple(s) for s in level_shapes]))

        def work():
            dets = host_view(dets_ptr, (batch, self.max_det, 6), np.float32)
            counts = host_view(counts_ptr, (batch,), np.int32)
            dets[...] = 0
            for i, rows in enumerate(self.official_rows(official, head_ptrs, head_dtype, batch, level_shapes)):
                dets[i, : len(rows)] = rows
                counts[i] = len(rows)

        SIM.submit(stream, work)

    def official_rows(self, official, head_ptrs, head_dtype, batch, level_shapes):
        if self.head == "anchor_free":  # one output [B, 4 + nc, N]; level_shapes [(N,)]
            (ptr,), ((n,),) = head_ptrs, level_shapes
            prediction = host_view(ptr, (batch, 4 + self.nc, n), head_dtype).astype(np.float32)
            return official.non_max_suppression_anchor_free(prediction, self.conf, self.iou, self.max_det,
                                                            self.multi_label, self.agnostic)
        channels = len(self.anchors[0]) // 2 * (self.nc + 5)
        heads = [host_view(p, (batch, channels, h, w), head_dtype) for p, (h, w) in zip(head_ptrs, level_shapes)]
        return [official.nms(cands, self.iou, self.max_det, self.agnostic)
                for cands in official.decode(heads, self.strides, self.anchors, self.conf, self.multi_label)]


SIM = SimGpu()


@pytest.fixture
def sim_detector(tmp_path, monkeypatch):
    import trtnet.cuda_rt
    import trtnet.plugins.postprocess
    import trtnet.plugins.preprocess

    golden = np.load(shared("golden", "golden_yolov5n_bus320.npz"))
    monkeypatch.setattr(trtnet.cuda_rt, "cudart", lambda: SIM.rt)
    sim = SimEngine(SIM, YOLO_SHAPES, yolo_heads_of_bus(golden))
    monkeypatch.setattr(compat, "deserialize", lambda plan, logger=None: (None, sim))
    monkeypatch.setattr(trtnet.plugins.preprocess, "Letterbox", SimLetterbox)
    monkeypatch.setattr(trtnet.plugins.postprocess, "YoloPostprocess", SimPostprocess)
    flavour = compat.flavour()
    names = [str(i) for i in range(80)]
    names[0], names[5] = "person", "bus"
    engine = fake_engine(tmp_path, "yolov5n.fp32", imgsz=[320, 320], batch={"min": 1, "opt": 2, "max": 2},
                         tensorrt={"flavour": flavour.name, "version": flavour.version}, nc=80, names=names,
                         strides=[8, 16, 32], anchors=[[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119],
                                                       [116, 90, 156, 198, 373, 326]],
                         postprocess={"mode": "kernels", "conf": 0.25, "iou": 0.45, "max_det": 1000,
                                      "multi_label": False, "agnostic": False})

    def make(**kwargs):
        return Detector(engine, **kwargs)

    make.path = engine
    return make


def expected_bus(image):
    rows = np.load(shared("golden", "golden_yolov5n_bus320.npz"))["det"]
    return rows, official_scale_boxes(rows[:, :4], (320, 320), image.shape[:2])


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_simulated_detector_reproduces_the_official_result(sim_detector, cuda_graphs):
    bus = cv2.imread(str(shared("images", "bus.jpg")))
    rows, boxes = expected_bus(bus)
    other = np.full((300, 500, 3), 77, np.uint8)
    launches = SIM.launches
    with sim_detector(cuda_graphs=cuda_graphs) as detector:
        for _ in range(3):  # with graphs: capture once per batch size, then replay
            results = detector.detect([bus, other, bus, shared("images", "bus.jpg"), other])  # batches 2, 2, 1
            assert [len(r) for r in results] == [4, 0, 4, 4, 0]
            for r in (results[0], results[2], results[3]):
                np.testing.assert_allclose(r.boxes, boxes, rtol=1e-5, atol=1e-3)
                np.testing.assert_allclose(r.scores, rows[:, 4], rtol=1e-6)
                assert r.labels == ["person", "bus", "person", "person"]
    assert (SIM.launches > launches) == cuda_graphs


def test_simulated_detector_serves_threads(sim_detector):
    import threading

    bus = cv2.imread(str(shared("images", "bus.jpg")))
    other = np.full((64, 64, 3), 9, np.uint8)
    _, boxes = expected_bus(bus)
    failures = []
    with sim_detector() as detector:

        def work(seed):
            rng = np.random.default_rng(seed)
            for _ in range(3):
                picks = rng.integers(0, 2, rng.integers(1, 4))
                for pick, r in zip(picks, detector.detect([bus if p else other for p in picks])):
                    if len(r) != (4 if pick else 0) or (pick and not np.allclose(r.boxes, boxes, atol=1e-3)):
                        failures.append((seed, pick, r))

        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # dynamic batch: TensorRT allows one context per optimization profile, so threads take turns on one
        assert detector.engine.one_context and len(detector.engine._workers) == 1
    assert not failures


@pytest.mark.parametrize(("batch", "depth", "pinned"), [(1, 2, True), (2, 2, True), (1, 3, False), (2, 1, False)])
def test_simulated_stream_gives_what_detect_gives_while_frames_are_reused(sim_detector, batch, depth, pinned):
    from trtnet import cuda_rt

    bus = cv2.imread(str(shared("images", "bus.jpg")))
    other = np.full(bus.shape, 77, np.uint8)
    _, boxes = expected_bus(bus)
    picks = [1, 0, 1, 1, 0, 0, 1]
    with sim_detector() as detector:
        # a video reader's ring of `batch` frames, each rewritten `batch` frames later: what stream allows
        ring = [cuda_rt.pinned_array(bus.shape) if pinned else np.empty_like(bus) for _ in range(batch)]

        def frames():
            for i, pick in enumerate(picks):
                frame = ring[i % batch]
                frame[...] = bus if pick else other
                yield frame

        results = list(detector.stream(frames(), batch=batch, depth=depth))
    assert [len(r) for r in results] == [4 if pick else 0 for pick in picks]
    for r in (r for r, pick in zip(results, picks) if pick):
        np.testing.assert_allclose(r.boxes, boxes, rtol=1e-5, atol=1e-3)


def test_simulated_stream_left_early_frees_the_engine(sim_detector):
    import threading

    bus = cv2.imread(str(shared("images", "bus.jpg")))
    with sim_detector() as detector:
        stream = detector.stream([bus] * 5)
        assert len(next(stream)) == 4
        stream.close()  # what leaving a for loop early does (detect's camera loop closes it)
        found = []
        helper = threading.Thread(target=lambda: found.append(len(detector.detect(bus)[0])))
        helper.start()
        helper.join(timeout=10)
        assert found == [4]


V8_GOLDEN = "golden_yolo11n_nc3_syn_bus320.npz"


def anchor_free_output_of_bus(golden):
    """The official Detect output of bus.jpg for inputs that are its official letterbox, zeros otherwise."""
    expected = golden["image"][0].astype(np.float32) / 255

    def compute(batch, address):
        x = host_view(address["images"], (batch, 3, 320, 320), np.float32)
        out = host_view(address["output0"], (batch, *golden["raw"].shape[1:]), np.float32)
        for i in range(batch):
            out[i] = golden["raw"][0] if np.allclose(x[i], expected, atol=1.5 / 255) else 0.0

    return compute


@pytest.fixture
def sim_v8_detector(tmp_path, monkeypatch):
    """A yolov8-family engine (YOLO11n, 3 classes) as trtnet.build writes its sidecar, on the simulated GPU."""
    import trtnet.cuda_rt
    import trtnet.plugins.postprocess
    import trtnet.plugins.preprocess

    golden = np.load(shared("golden", V8_GOLDEN))
    made = []

    def postprocess(**kwargs):
        made.append(SimPostprocess(**kwargs))
        return made[-1]

    monkeypatch.setattr(trtnet.cuda_rt, "cudart", lambda: SIM.rt)
    sim = SimEngine(SIM, {"images": (-1, 3, 320, 320), "output0": (-1, 7, 2100)}, anchor_free_output_of_bus(golden))
    monkeypatch.setattr(compat, "deserialize", lambda plan, logger=None: (None, sim))
    monkeypatch.setattr(trtnet.plugins.preprocess, "Letterbox", SimLetterbox)
    monkeypatch.setattr(trtnet.plugins.postprocess, "YoloPostprocess", postprocess)
    flavour = compat.flavour()
    engine = fake_engine(tmp_path, "yolo11n_nc3_syn.fp32", family="yolov8", weights="yolo11n_nc3_syn.wts",
                         imgsz=[320, 320], batch={"min": 1, "opt": 2, "max": 2}, outputs=["output0"],
                         tensorrt={"flavour": flavour.name, "version": flavour.version}, nc=3, names=["a", "b", "c"],
                         strides=[8, 16, 32], head="anchor_free",
                         postprocess={"mode": "kernels", "conf": 0.25, "iou": 0.45, "max_det": 1000,
                                      "multi_label": False, "agnostic": False})

    def make(**kwargs):
        return Detector(engine, **kwargs)

    make.path, make.postprocesses = engine, made
    return make


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_simulated_detector_on_a_yolov8_engine_reproduces_the_official_nms(sim_v8_detector, cuda_graphs):
    bus = cv2.imread(str(shared("images", "bus.jpg")))
    rows = np.load(shared("golden", V8_GOLDEN))["det"]
    assert 0 < len(rows) < 300
    boxes = official_scale_boxes(rows[:, :4], (320, 320), bus.shape[:2])
    other = np.full((300, 500, 3), 77, np.uint8)
    with sim_v8_detector(cuda_graphs=cuda_graphs) as detector:
        results = detector.detect([bus, other, bus])  # batches 2, 1
    (post,) = sim_v8_detector.postprocesses
    assert post.head == "anchor_free" and post.nc == 3 and not post.strides
    assert {call[3][0] for call in post.calls} == {(2100,)}
    assert [len(r) for r in results] == [len(rows), 0, len(rows)]
    for r in (results[0], results[2]):
        np.testing.assert_allclose(r.boxes, boxes, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(r.scores, rows[:, 4], rtol=1e-6)
        assert r.labels == [["a", "b", "c"][int(c)] for c in rows[:, 5]]


def test_rect_on_a_static_engine_names_the_rebuild_flags(sim_v8_detector):
    with pytest.raises(TrtnetError, match=r"takes 320x320 inputs only: rect needs .*--min-imgsz/--max-imgsz"):
        sim_v8_detector(rect=True)


class SimDynamicEngine(SimEngine):
    """A dynamic-size anchor-free 'engine' (input [-1, 3, -1, -1]): `compute(x)` gives output0 for the input x
    of the shape the context was set to; the input shapes it ran at are kept in `ran_at`."""

    def __init__(self, gpu: SimGpu, nc: int, compute):
        super().__init__(gpu, {"images": (-1, 3, -1, -1), "output0": (-1, 4 + nc, -1)}, compute)
        self.ran_at: list[tuple] = []

    def create_execution_context(self):
        return SimDynamicContext(self)


class SimDynamicContext(SimContext):
    def set_input_shape(self, name, shape):
        self.shape = tuple(shape)
        return super().set_input_shape(name, shape)

    def get_tensor_shape(self, name):
        b, _, h, w = self.shape
        return self.shape if name == "images" else (b, self.engine.shapes[name][1], anchor_points(h, w))

    def execute_async_v3(self, stream):
        shape, address, engine = self.shape, dict(self.address), self.engine
        out_shape = self.get_tensor_shape("output0")

        def run():
            engine.ran_at.append(shape)
            host_view(address["output0"], out_shape, np.float32)[...] = engine.compute(
                host_view(address["images"], shape, np.float32).copy())

        engine.gpu.submit(stream, run)
        return True


@pytest.fixture
def sim_dynamic_v8(tmp_path, monkeypatch):
    """make(compute, **Detector kwargs): a dynamic-size (32..640) YOLO11n (3 classes) engine on the simulated GPU."""
    import trtnet.cuda_rt
    import trtnet.plugins.postprocess
    import trtnet.plugins.preprocess

    monkeypatch.setattr(trtnet.cuda_rt, "cudart", lambda: SIM.rt)
    monkeypatch.setattr(trtnet.plugins.preprocess, "Letterbox", SimLetterbox)
    monkeypatch.setattr(trtnet.plugins.postprocess, "YoloPostprocess", SimPostprocess)
    flavour = compat.flavour()
    engine = fake_engine(tmp_path, "yolo11n_nc3_syn.fp32", family="yolov8", weights="yolo11n_nc3_syn.wts",
                         imgsz=[640, 640], min_imgsz=32, max_imgsz=640, batch={"min": 1, "opt": 2, "max": 2},
                         outputs=["output0"], tensorrt={"flavour": flavour.name, "version": flavour.version}, nc=3,
                         names=["a", "b", "c"], strides=[8, 16, 32], head="anchor_free",
                         postprocess={"mode": "kernels", "conf": 0.25, "iou": 0.45, "max_det": 300,
                                      "multi_label": False, "agnostic": False})

    def make(compute, static_hw=None, **kwargs):
        """`static_hw`: a static engine of that (h, w) instead (`--imgsz H,W`)."""
        sim = SimDynamicEngine(SIM, 3, compute)
        monkeypatch.setattr(compat, "deserialize", lambda plan, logger=None: (None, sim))
        path = engine
        if static_hw:
            meta = json.loads(engine_sidecar_path(engine).read_text(encoding="utf-8"))
            meta.update(imgsz=list(static_hw), min_imgsz=None, max_imgsz=None)
            path = fake_engine(tmp_path, "yolo11n_nc3_syn.fp32.{}x{}".format(*static_hw), **meta)
        detector = Detector(path, max_det=300, **kwargs)
        detector.sim = sim
        return detector

    return make


def anchor_points(h: int, w: int) -> int:
    """Anchor-free output columns at strides 8, 16, 32: h·w/64 · (1 + 1/4 + 1/16)."""
    return h * w // 64 * 21 // 16


def no_detections(x):
    return np.zeros((x.shape[0], 7, anchor_points(*x.shape[2:])), np.float32)


def test_simulated_rect_runs_each_batch_at_its_smallest_shape(sim_dynamic_v8):
    bus = cv2.imread(str(shared("images", "bus.jpg")))  # 810x1080 → 480x640 at 640
    zidane = cv2.imread(str(shared("images", "zidane.jpg")))  # 1280x720 → 640x384
    with sim_dynamic_v8(no_detections, rect=True) as detector:
        detector.detect([bus, bus])
        detector.detect([bus, zidane])  # one shape per batch: the largest of theirs
        results = list(detector.stream([bus, zidane, zidane, bus], batch=1, depth=2))
        ran_at = detector.sim.ran_at
    assert ran_at == [(2, 3, 640, 480), (2, 3, 640, 640), (1, 3, 640, 480), (1, 3, 384, 640), (1, 3, 384, 640),
                      (1, 3, 640, 480)]
    assert [r.shape for r in results] == [(1080, 810), (720, 1280), (720, 1280), (1080, 810)]
    with sim_dynamic_v8(no_detections) as detector:  # rect is opt-in: the square engine size by default
        detector.detect([bus, zidane])
        assert detector.sim.ran_at == [(2, 3, 640, 640)]


@requires_tensorrt
@requires_torch  # YOLO11's chunk/attention layers run on the torch executor
def test_simulated_rect_detector_reproduces_the_ultralytics_640_predict(sim_dynamic_v8):
    """Detector(rect=True).detect(bus.jpg) end to end (GPU plumbing simulated, the network run by the CPU
    executor at the size the pipeline chose) against the official `predict(imgsz=640)` of YOLO11n."""
    from tests.test_cpu import matched_golden_detect640
    from trtnet.cpu import define_cpu_network

    network = define_cpu_network(shared("weights", "synthetic", "yolo11n_nc3_syn.pt"), 640, dynamic=True)
    with sim_dynamic_v8(lambda x: network.run(x)[0], rect=True) as detector:
        result = detector.detect(shared("images", "bus.jpg"))[0]
        assert detector.sim.ran_at == [(1, 3, 640, 480)]
    assert len(result) == 70 and result.shape == (1080, 810)
    assert matched_golden_detect640(result, "yolo11n_nc3_syn") == 1.0


@requires_tensorrt
@requires_torch
def test_simulated_detector_on_a_static_non_square_engine_reproduces_the_ultralytics_640_predict(sim_dynamic_v8):
    """A static 640x480 engine (`--imgsz 640,480`, for TensorRTs that cannot build a dynamic size): Detector's
    own letterbox to the engine's shape is the official rect input of bus.jpg, so the detections are the golden's."""
    from tests.test_cpu import matched_golden_detect640
    from trtnet.cpu import define_cpu_network

    network = define_cpu_network(shared("weights", "synthetic", "yolo11n_nc3_syn.pt"), 640, dynamic=True)
    with sim_dynamic_v8(lambda x: network.run(x)[0], static_hw=(640, 480)) as detector:
        assert detector.imgsz == (640, 480)
        result = detector.detect(shared("images", "bus.jpg"))[0]
        assert detector.sim.ran_at == [(1, 3, 640, 480)]
    assert len(result) == 70 and result.shape == (1080, 810)
    assert matched_golden_detect640(result, "yolo11n_nc3_syn") == 1.0
    static = sim_dynamic_v8(lambda x: network.run(x)[0], static_hw=(640, 480))
    with static, pytest.raises(TrtnetError, match="takes 640x480 inputs only: rect needs an engine built with a dyn"):
        Detector(static.engine.path, rect=True)


def test_simulated_bench_on_a_yolov8_engine(sim_v8_detector, tmp_path):
    from trtnet import bench

    report = tmp_path / "bench.json"
    argv = [str(sim_v8_detector.path), "--batch", "1,2", "--iters", "2", "--warmup", "1", "--json", str(report)]
    assert bench.cli(argv) == 0
    rows = json.loads(report.read_text(encoding="utf-8"))
    assert {(r["mode"], r["batch"]) for r in rows} >= {("engine", 1), ("end-to-end", 2)}


def imagenet_kernel(qualified, grid, block, args, stream=0, shared=0):
    """classify_preprocess.imagenet in NumPy, reading the same parameter struct the kernel gets."""
    assert qualified == "classify_preprocess.imagenet"
    (params,) = args

    def work():
        out = host_view(params.out, (params.first + grid[2], 3, params.out_h, params.out_w), np.float32)
        for z in range(grid[2]):
            im = params.image[z]
            src = host_view(im.src, (im.h, im.pitch), np.uint8)[:, : 3 * im.w].reshape(im.h, im.w, 3)
            sx = np.clip((np.arange(params.out_w) + im.left + 0.5) * im.scale_x - 0.5, 0, im.w - 1)
            sy = np.clip((np.arange(params.out_h) + im.top + 0.5) * im.scale_y - 0.5, 0, im.h - 1)
            x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
            x1, y1 = np.minimum(x0 + 1, im.w - 1), np.minimum(y0 + 1, im.h - 1)
            fx, fy = (sx - x0)[None, :, None], (sy - y0)[:, None, None]
            s = src.astype(np.float32)
            top = s[y0][:, x0] * (1 - fx) + s[y0][:, x1] * fx
            bottom = s[y1][:, x0] * (1 - fx) + s[y1][:, x1] * fx
            rgb = (top * (1 - fy) + bottom * fy)[..., ::-1] / 255
            out[params.first + z] = ((rgb - list(params.mean)) / list(params.std)).transpose(2, 0, 1)

    SIM.submit(stream, work)


def channel_means(batch, address):
    x = host_view(address["input"], (batch, 3, 224, 224), np.float32)
    host_view(address["logits"], (batch, 3), np.float32)[...] = x.mean(axis=(2, 3))


def test_simulated_classifier_preprocesses_like_torchvision(tmp_path, monkeypatch):
    import trtnet.cuda_rt
    import trtnet.plugins.cuda
    from trtnet.api import Classifier

    sim = SimEngine(SIM, {"input": (-1, 3, 224, 224), "logits": (-1, 3)}, channel_means)
    monkeypatch.setattr(trtnet.cuda_rt, "cudart", lambda: SIM.rt)
    monkeypatch.setattr(compat, "deserialize", lambda plan, logger=None: (None, sim))
    monkeypatch.setattr(trtnet.plugins.cuda, "launch", imagenet_kernel)
    flavour = compat.flavour()
    engine = fake_engine(tmp_path, "resnet18.fp32", family="resnet", imgsz=[224, 224], input={"name": "input"},
                         outputs=["logits"], batch={"min": 1, "opt": 1, "max": 1}, num_classes=3,
                         names=["red", "green", "blue"], tensorrt={"flavour": flavour.name, "version": flavour.version})
    bus = cv2.imread(str(shared("images", "bus.jpg")))
    # torchvision's recipe with OpenCV: Resize(256) → 256 x int(256 * long / short), CenterCrop(224)
    resized = cv2.resize(bus, (256, int(256 * 1080 / 810)), interpolation=cv2.INTER_LINEAR)
    top = int(round((resized.shape[0] - 224) / 2))
    crop = resized[top:top + 224, 16:240, ::-1].astype(np.float64) / 255
    want = (crop.mean(axis=(0, 1)) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    with Classifier(engine) as classifier:
        logits = classifier.pipeline.run([bus, np.full((10, 20, 3), 255, np.uint8)])  # profile max 1: split
        top2 = classifier.classify(bus, topk=2)[0]
    # cv2 rounds to uint8 through fixed-point weights (its means run ~0.1 grey level low): allow 1/4 level
    np.testing.assert_allclose(logits[0], want, atol=0.25 / 255 / 0.224)
    np.testing.assert_allclose(logits[1], (1 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225], atol=1e-5)
    assert top2.names == [["red", "green", "blue"][i] for i in np.argsort(-want)[:2]]
    from trtnet.engine import Engine

    x = np.random.default_rng(0).random((3, 3, 224, 224), dtype=np.float32)
    with Engine(engine) as raw:
        np.testing.assert_allclose(raw.infer(x)["logits"], x.mean(axis=(2, 3)), rtol=1e-5)


def test_simulated_bench(sim_detector, tmp_path, capsys):
    from trtnet import bench

    report = tmp_path / "bench.json"
    argv = [str(sim_detector.path), "--batch", "1,2,4", "--iters", "3", "--warmup", "1", "--json", str(report)]
    assert bench.cli(argv) == 0
    rows = json.loads(report.read_text(encoding="utf-8"))
    modes = ["engine", "end-to-end", "e2e pinned", "streamed"]
    assert [(r["mode"], r["batch"]) for r in rows] == [(m, b) for b in (1, 2) for m in modes]
    captured = capsys.readouterr()
    assert "batch 4 skipped: the engine's profile is 1..2" in captured.err
    assert "end-to-end" in captured.out and "img/s" in captured.out


@requires_torch
def test_bench_says_why_there_is_no_torch_comparison(tmp_path):
    import torch

    from trtnet.bench import torch_model

    model, why = torch_model({"family": "yolov5", "weights": "yolov5n.wts"}, tmp_path / "x.engine", "weights", None)
    assert model is None
    if torch.cuda.is_available():
        assert "--yolov5-src" in why
    else:
        assert "no CUDA" in why


@requires_torch
def test_bench_torch_only_says_why_it_cannot_time_torch(sim_detector, capsys):
    import torch

    from trtnet import bench

    if torch.cuda.is_available():
        pytest.skip("this checks the message of a machine without CUDA torch")
    assert bench.cli([str(sim_detector.path), "--torch-only", "--batch", "1"]) != 0
    assert "--torch-only: torch has no CUDA here" in capsys.readouterr().err


@pytest.mark.parametrize("meta, hw, message", [
    ({"imgsz": [640, 640]}, (480, 640), "takes 640x640 inputs only, not 480x640"),
    ({"imgsz": [640, 640], "min_imgsz": 128}, (672, 512), r"672x512 lies outside e.engine's range 128..640"),
    ({"imgsz": [640, 640], "min_imgsz": 128, "max_imgsz": 672}, (64, 640), r"range 128..672: rebuild"),
])
def test_input_sizes_outside_the_engine_are_refused_with_the_flags_to_rebuild(meta, hw, message):
    from trtnet.engine import Engine

    engine = Engine.__new__(Engine)  # only the metadata matters here: no TensorRT, no GPU
    engine.path, engine.meta = Path("e.engine"), engine_meta(**meta)
    with pytest.raises(TrtnetError, match=message):
        engine.check_size(hw)
    engine.check_size(engine.imgsz)


def test_dynamic_size_range_accepts_sizes_within_it():
    from trtnet.engine import Engine

    engine = Engine.__new__(Engine)
    engine.path, engine.meta = Path("e.engine"), engine_meta(imgsz=[640, 640], min_imgsz=128, max_imgsz=672)
    assert engine.size_range == (128, 672)
    for hw in [(128, 128), (448, 672), (672, 672), (640, 480)]:
        engine.check_size(hw)


IMPOSSIBLE_NMS = [{"conf": 1.5}, {"iou": -0.1}, {"max_det": 0}]


@pytest.mark.parametrize("settings", IMPOSSIBLE_NMS)
def test_impossible_nms_settings_are_refused_by_the_kernels_and_the_build(settings):
    from trtnet.build import PostprocessSettings
    from trtnet.plugins.postprocess import YoloPostprocess

    with pytest.raises(TrtnetError, match="NMS settings"):
        PostprocessSettings(mode="kernels", **settings)
    with pytest.raises(TrtnetError, match="NMS settings"):
        YoloPostprocess(strides=[8], anchors=[[10, 13]], nc=1, **settings)


@pytest.mark.parametrize("settings", IMPOSSIBLE_NMS)
def test_impossible_nms_settings_are_refused_by_the_detector(sim_detector, settings):
    with pytest.raises(TrtnetError, match="NMS settings"):
        sim_detector(**settings)


def test_val_nms_iou_defaults_to_the_family_validator(tmp_path):
    from trtnet.val import val_iou

    v5 = fake_engine(tmp_path, "yolov5n.fp16")
    v8 = fake_engine(tmp_path, "yolo11n.fp16", family="yolov8", weights="yolo11n.wts", outputs=["output0"],
                     head="anchor_free", strides=[8, 16, 32])
    assert val_iou(str(v5)) == 0.6  # YOLOv5's val.py
    assert val_iou(str(v8)) == 0.7  # Ultralytics' DetectionValidator


def test_simulated_cuda_graphs_replay_only_at_the_size_they_were_captured_at(sim_dynamic_v8):
    with sim_dynamic_v8(no_detections, cuda_graphs=True) as detector:
        engine = detector.engine
        for side in (96, 96, 96, 64, 64):  # the larger size first: the buffers stay where they are
            out = engine.infer(np.zeros((1, 3, side, side), np.float32))["output0"]
            assert out.shape == (1, 7, anchor_points(side, side))
        assert detector.sim.ran_at[-2:] == [(1, 3, 64, 64), (1, 3, 64, 64)]


def test_a_worker_keeps_only_its_most_recently_replayed_cuda_graphs(sim_dynamic_v8, monkeypatch):
    import trtnet.engine

    monkeypatch.setattr(trtnet.engine, "MAX_GRAPHS", 2)
    with sim_dynamic_v8(no_detections, cuda_graphs=True) as detector:
        engine = detector.engine
        for side in (96, 64, 96, 32):  # 96 replayed before 32 is captured: 64 is the oldest then
            engine.infer(np.zeros((1, 3, side, side), np.float32))
        with engine.checkout() as worker:
            assert [key[0][1] for key in worker._graphs] == [(96, 96), (32, 32)]
        out = engine.infer(np.zeros((1, 3, 64, 64), np.float32))["output0"]  # captured again, still right
        assert out.shape == (1, 7, anchor_points(64, 64))


def test_an_engine_checks_its_device_once_and_sets_it_on_each_checkout(sim_detector):
    SIM.current.device = 0
    with sim_detector(device=1) as detector:
        counted = SIM.device_count_calls
        SIM.current.device = 0  # another call on this thread moved to another GPU
        detector.detect([np.zeros((32, 32, 3), np.uint8)] * 3)
        assert SIM.current.device == 1
        assert SIM.device_count_calls == counted


def test_cudart_imports_the_bindings_once(monkeypatch):
    import sys
    import types

    import trtnet.cuda_rt

    cudart = trtnet.cuda_rt.cudart
    first, second = types.ModuleType("cuda.bindings"), types.ModuleType("cuda.bindings")
    first.runtime, second.runtime = "first runtime", "second runtime"
    cudart.cache_clear()
    monkeypatch.setitem(sys.modules, "cuda.bindings", first)
    try:
        assert cudart() == "first runtime"
        monkeypatch.setitem(sys.modules, "cuda.bindings", second)
        assert cudart() == "first runtime"
    finally:
        cudart.cache_clear()


def test_closing_an_engine_from_another_thread_frees_its_memory_on_its_gpu(sim_detector, monkeypatch):
    import threading

    freed_on = []
    free = SIM.rt.cudaFree
    monkeypatch.setattr(SIM.rt, "cudaFree", lambda ptr: (freed_on.append(SIM.current.device), free(ptr))[1])
    detector = sim_detector(device=1)
    detector.detect([np.zeros((32, 32, 3), np.uint8)])
    closer = threading.Thread(target=detector.close)  # serve closes its runners from the main thread
    closer.start()
    closer.join()
    assert freed_on and set(freed_on) == {1}


@pytest.mark.parametrize("make", ["rect on a static engine", "a Classifier of a detect engine"])
def test_a_constructor_that_fails_closes_the_engine_it_loaded(sim_v8_detector, monkeypatch, make):
    from trtnet import Classifier
    from trtnet.engine import Engine

    closed = []
    close = Engine.close
    monkeypatch.setattr(Engine, "close", lambda self: (closed.append(self.path), close(self))[1])
    with pytest.raises(TrtnetError):
        sim_v8_detector(rect=True) if make.startswith("rect") else Classifier(sim_v8_detector.path)
    assert len(closed) == 1


@pytest.mark.parametrize("source", ["frames", "files"])
def test_simulated_rect_stream_drains_the_runs_in_flight_before_another_size(sim_dynamic_v8, tmp_path, monkeypatch,
                                                                             source):
    import shutil

    import trtnet.plugins.preprocess
    from trtnet.engine import Worker
    from trtnet.pipelines import DetectPipeline

    events = []
    prepare, collect = Worker.prepare, DetectPipeline._collect
    monkeypatch.setattr(Worker, "prepare", lambda self, n, hw=None: (events.append(hw), prepare(self, n, hw))[1])
    monkeypatch.setattr(DetectPipeline, "_collect", lambda self, run: (events.append("collect"), collect(self, run))[1])
    sized = []
    rect_input_hw = trtnet.plugins.preprocess.rect_input_hw
    monkeypatch.setattr(trtnet.plugins.preprocess, "rect_input_hw", lambda *a: (sized.append(a), rect_input_hw(*a))[1])
    names = ["bus.jpg", "zidane.jpg", "zidane.jpg"]  # 810x1080 → 640x480 at 640, 1280x720 → 384x640
    with sim_dynamic_v8(no_detections, rect=True) as detector:
        if source == "frames":
            frames = [cv2.imread(str(shared("images", name))) for name in names]
            shapes = [r.shape for r in detector.stream(frames, batch=1, depth=2)]
        else:
            paths = [shutil.copy(shared("images", name), tmp_path / f"{i}_{name}") for i, name in enumerate(names)]
            shapes = [r.shape for _, r, _ in detector.detect_files(paths, batch=1, decode="cpu")]
    assert shapes == [(1080, 810), (720, 1280), (720, 1280)]
    assert events == [(640, 480), "collect", (384, 640), (384, 640), "collect", "collect"]
    assert len(sized) == 3  # once per batch


def test_rows_of_an_engine_with_nms_inside_are_filtered_by_conf_and_max_det_then_mapped_to_each_image():
    """`--postprocess plugin` engines output their own dets/counts: the pipeline keeps rows at or above its conf,
    at most max_det of them, in the image's pixels (mapped as rows_to_image maps them)."""
    import types

    from trtnet.pipelines import DetectPipeline, _InFlight
    from trtnet.plugins.postprocess import NmsSettings

    rng = np.random.default_rng(5)
    dets = rng.uniform(0, 640, (2, 4, 6)).astype(np.float32)
    dets[..., 4] = [[0.9, 0.2, 0.8, 0.7], [0.6, 0.1, 0.3, 0.95]]
    counts = np.array([4, 3], np.int32)
    memory = np.concatenate([dets.ravel().view(np.uint8), counts.view(np.uint8)])

    class Host:
        def view(self, shape, dtype, offset=0):
            return memory[offset:].view(dtype)[: int(np.prod(shape))].reshape(shape)

    run = _InFlight(Host(), types.SimpleNamespace(synchronize=lambda: None), 2, 4, (640, 640),
                    ((480, 640), (1080, 810)))
    pipeline = types.SimpleNamespace(in_engine=True, settings=NmsSettings(conf=0.5, max_det=2))
    rows = DetectPipeline._collect(pipeline, run)
    for i, hw in enumerate(((480, 640), (1080, 810))):
        kept = dets[i, : counts[i]][dets[i, : counts[i], 4] >= 0.5][:2]
        np.testing.assert_array_equal(rows[i], rows_to_image(kept, (640, 640), hw))
    assert [len(r) for r in rows] == [2, 1]
