"""trtnet.serve's request handling, settings and multi-device layout, without PyTriton or a GPU."""

from __future__ import annotations

import time
import types

import cv2
import numpy as np
import pytest

from trtnet import cuda_rt, serve, serve_triton
from trtnet.api import Detections
from trtnet.engine import Engine
from trtnet.errors import TrtnetError

NAMES = ["person", "bus", "car"]


def detections(boxes, scores, classes, shape=(100, 200)) -> Detections:
    return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32),
                      np.asarray(classes, np.int64), NAMES, shape)


def test_devices_are_cpu_or_distinct_gpu_indices():
    assert serve.parse_devices("cpu") == ("cpu",)
    assert serve.parse_devices("0, 1,3") == (0, 1, 3)
    for bad in ("", "gpu0", "0,0", "-1"):
        with pytest.raises(TrtnetError, match="--devices"):
            serve.parse_devices(bad)


def test_model_names_drop_the_file_suffix_and_odd_characters():
    assert serve.model_name("weights/yolov5n.fp16.engine") == "yolov5n.fp16"
    assert serve.model_name("/data/yolov5n.pt") == "yolov5n"
    assert serve.model_name("my model.wts") == "my_model"


def test_instances_are_made_per_device_for_any_number_of_devices():
    opened = []

    def opener(settings, device):
        opened.append(device)
        return f"runner{len(opened)}"

    settings = serve.ServeSettings("yolov5n.fp16.engine", devices=(0, 1, 2), instances=2)
    runners = serve.open_runners(settings, opener)
    assert opened == [0, 0, 1, 1, 2, 2]
    assert len(set(runners)) == 6


@pytest.mark.parametrize("graphs", [True, False])
def test_instances_run_the_engine_as_cuda_graphs_unless_told_not_to(monkeypatch, graphs):
    """Run P: TensorRT 8.5's eager enqueue took a fifth of a serving instance's time. The setting reaches the
    runner whether trtnet.serve opens it or Triton's Python backend does (through the repository's config)."""
    import json
    import re
    import sys
    import types

    import trtnet.api
    import trtnet.engine_files
    from trtnet.serve_triton import PYTHON_MODEL, config_pbtxt

    opened = []
    monkeypatch.setattr(trtnet.engine_files, "engine_task", lambda *a: "detect")
    monkeypatch.setattr(trtnet.api, "Detector", lambda *a, **kw: opened.append(kw["cuda_graphs"]) or "runner")
    args = ["x.engine"] + ([] if graphs else ["--no-cuda-graphs"])
    settings = serve.settings_from(serve.parser().parse_args(args))
    serve.open_runner(settings, 0)
    config_text = config_pbtxt("x", settings, 8, True, ["a"], "x.engine")
    params = {k: {"string_value": json.loads(v)}
              for k, v in re.findall(r'key: "(\w+)", value: \{ string_value: (".*?") \}', config_text)}
    model_config = {"parameters": params, "output": [{"name": "boxes"}], "max_batch_size": 8}
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    given = []
    monkeypatch.setattr(serve, "open_runner", lambda s, device: given.append(s.cuda_graphs) or "runner")
    monkeypatch.setattr(serve, "infer_function", lambda *a: None)
    warmed = []
    monkeypatch.setattr(serve, "warm_up", lambda runner, batch: warmed.append((runner, batch)))
    namespace: dict = {}
    exec(compile(PYTHON_MODEL, "model.py", "exec"), namespace)
    model = namespace["TritonPythonModel"]()
    model.initialize({"model_config": json.dumps(model_config), "model_repository": "/r", "model_version": "1",
                      "model_instance_device_id": "0"})
    assert opened == [graphs] and given == [graphs]
    assert warmed == [("runner", 8)]  # the config's max_batch_size, before the first request


class WarmedRunner:
    """A runner whose pipeline records the batch sizes it runs."""

    def __init__(self, cuda_graphs: bool, max_batch: int = 8, min_batch: int = 1):
        self.engine = types.SimpleNamespace(cuda_graphs=cuda_graphs, imgsz=(64, 48), max_batch=max_batch,
                                            run_as=lambda n: max(n, min_batch))  # as Engine.run_as pads
        self.batches: list = []
        self.pipeline = types.SimpleNamespace(run=lambda images: self.batches.append(
            (len(images), images[0].shape, images[0].dtype)))


def test_warm_up_captures_every_batch_size_largest_first():
    """Buffers grow to the largest batch once (a larger batch after smaller ones would move them and drop every
    graph captured so far), then each smaller size is captured; the engine's profile bounds --max-batch."""
    runner = WarmedRunner(cuda_graphs=True)
    serve.warm_up(runner, 32)
    assert [n for n, _, _ in runner.batches] == [8, 7, 6, 5, 4, 3, 2, 1]
    assert {(shape, dtype) for _, shape, dtype in runner.batches} == {((64, 48, 3), np.dtype(np.uint8))}
    runner = WarmedRunner(cuda_graphs=True)
    serve.warm_up(runner, 3)
    assert [n for n, _, _ in runner.batches] == [3, 2, 1]


def test_warm_up_runs_each_padded_batch_once():
    """Below the profile's smallest batch requests run padded to it: one graph, captured once (a static batch-8
    engine is warmed by one batch of 8, not eight)."""
    runner = WarmedRunner(cuda_graphs=True, max_batch=8, min_batch=4)
    serve.warm_up(runner, 32)
    assert [n for n, _, _ in runner.batches] == [8, 7, 6, 5, 4]
    runner = WarmedRunner(cuda_graphs=True, max_batch=8, min_batch=8)
    serve.warm_up(runner, 2)  # --max-batch below the static batch: still the one graph requests will use
    assert [n for n, _, _ in runner.batches] == [8]


def test_warm_up_does_nothing_without_graphs_or_an_engine():
    runner = WarmedRunner(cuda_graphs=False)
    serve.warm_up(runner, 8)
    assert runner.batches == []
    serve.warm_up(object(), 8)  # the CPU path's runner: no engine, nothing to capture


def test_an_engine_takes_its_device_on_every_thread_that_uses_it(monkeypatch):
    chosen = []
    monkeypatch.setattr(cuda_rt, "set_device", chosen.append)
    engine = object.__new__(Engine)  # the device logic only: no engine file, no GPU
    engine.device_index = 1
    engine.use_device()
    engine.device_index = None
    engine.use_device()
    assert chosen == [1]


def test_use_device_refuses_an_index_the_machine_lacks(monkeypatch):
    calls = []

    class FakeRuntime:
        def cudaGetDeviceCount(self):
            return 0, 2

        def cudaSetDevice(self, device):
            calls.append(device)
            return (0,)

    monkeypatch.setattr(cuda_rt, "cudart", FakeRuntime)
    monkeypatch.setattr(cuda_rt, "check", lambda result, what="": result)
    cuda_rt.use_device(1)
    assert calls == [1]
    with pytest.raises(TrtnetError, match="device 2: this machine has 2 GPU"):
        cuda_rt.use_device(2)


def test_encoded_images_decode_and_undecodable_ones_become_errors():
    from trtnet.image_decoding import FileDecoder

    ok, png = cv2.imencode(".png", np.full((8, 6, 3), 7, np.uint8))
    assert ok
    request = {"image": np.array([[png.tobytes()], [b"not an image"], [b""]], dtype=object)}
    inputs = serve.request_inputs(request)
    assert [type(x) for x in inputs] == [serve.Encoded] * 3
    decoded, ready = serve.decode_inputs(FileDecoder("cpu"), inputs)
    assert ready is None  # nothing decoded on a GPU
    assert decoded[0].shape == (8, 6, 3) and int(decoded[0][0, 0, 0]) == 7
    assert isinstance(decoded[1], TrtnetError) and "image of 12 bytes: not an image OpenCV can read" in str(decoded[1])
    assert isinstance(decoded[2], TrtnetError)


def test_raw_pixels_must_be_uint8_hxwx3():
    good = serve.request_inputs({"pixels": np.zeros((2, 5, 4, 3), np.uint8)})
    assert [x.shape for x in good] == [(5, 4, 3), (5, 4, 3)]
    for bad in (np.zeros((1, 5, 4, 3), np.float32), np.zeros((1, 5, 4, 4), np.uint8)):
        errors = serve.request_inputs({"pixels": bad})
        assert len(errors) == 1 and isinstance(errors[0], TrtnetError)
    assert isinstance(serve.request_inputs({"conf": np.ones((1, 1))})[0], TrtnetError)


def test_outputs_are_padded_to_max_det_with_a_count_and_errors_per_image():
    found = detections([[1, 2, 3, 4], [5, 6, 7, 8]], [0.9, 0.5], [1, 0])
    out = serve.detection_outputs([found, TrtnetError("broken")], max_det=3)
    assert out["boxes"].shape == (2, 3, 4) and out["count"][:, 0].tolist() == [2, 0]
    assert out["boxes"][0, 1].tolist() == [5, 6, 7, 8] and out["classes"][0].tolist() == [1, 0, -1]
    assert out["shape"][0].tolist() == [100, 200]
    assert out["error"][:, 0].tolist() == [b"", b"broken"]
    assert [r["count"].shape for r in serve.split_rows(out, [1, 1])] == [(1, 1), (1, 1)]


def test_request_options_narrow_the_detections():
    found = detections([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]], [0.9, 0.6, 0.4], [0, 0, 2])
    assert serve.narrowed(found, serve.Overrides(conf=0.5)).scores.tolist() == pytest.approx([0.9, 0.6])
    assert serve.narrowed(found, serve.Overrides(classes=(2,))).classes.tolist() == [2]
    # boxes 0 and 1 overlap with IoU 0.81: an iou of 0.5 keeps the better one; 0.9 keeps both
    assert len(serve.narrowed(found, serve.Overrides(iou=0.5))) == 2
    assert len(serve.narrowed(found, serve.Overrides(iou=0.9))) == 3


def test_requests_give_one_option_row_per_image():
    request = {"image": np.zeros((2, 1), object), "conf": np.array([[0.3], [0.7]], np.float32),
               "classes": np.array([[0, 2], [1, 1]], np.int32)}
    options = serve.request_overrides(request, 2)
    assert [o.conf for o in options] == pytest.approx([0.3, 0.7])
    assert [o.classes for o in options] == [(0, 2), (1, 1)] and options[0].iou is None


def test_one_bad_image_does_not_fail_the_others_in_a_batch():
    class Runner:
        names = NAMES

        def detect_loaded(self, images):
            return [detections([[0, 0, 1, 1]], [0.8], [1], image.shape[:2]) for image in images]

    infer = serve.infer_function(Runner(), serve.ServeSettings("x", max_det=4))
    ok, jpg = cv2.imencode(".jpg", np.zeros((20, 30, 3), np.uint8))
    requests = [{"image": np.array([[b"junk"]], object)}, {"image": np.array([[jpg.tobytes()]], object)},
                {"pixels": np.zeros((1, 9, 7, 3), np.uint8), "conf": np.array([[0.9]], np.float32)}]
    bad, good, filtered = infer(requests)
    assert bad["error"][0, 0] and bad["count"][0, 0] == 0
    assert good["error"][0, 0] == b"" and good["count"][0, 0] == 1 and good["shape"][0].tolist() == [20, 30]
    assert filtered["count"][0, 0] == 0 and filtered["shape"][0].tolist() == [9, 7]


def test_an_instance_reports_its_own_time_at_close(capsys):
    """Triton's compute_infer also holds PyTriton's transfers: the instance's own share is printed at shutdown."""
    class Runner:
        names = NAMES

        def detect_loaded(self, images):
            time.sleep(0.01)
            return [detections([], [], [], image.shape[:2]) for image in images]

    infer = serve.infer_function(Runner(), serve.ServeSettings("x", max_det=2), instance=3)
    pixels = {"pixels": np.zeros((2, 9, 7, 3), np.uint8)}
    infer([pixels, {"pixels": np.zeros((1, 5, 5, 3), np.uint8)}])
    infer([pixels])
    infer.close()
    line = capsys.readouterr().out.strip()
    assert line.startswith("instance 3: 2 executions, 5 images, own time ")
    assert 10.0 <= float(line.split("own time ")[1].split()[0]) < 1000.0
    by_batch = line.split("by images per execution: ")[1]  # to set against Triton's batch_stats
    assert by_batch.startswith("2: ") and ", 3: " in by_batch and by_batch.endswith("(1)")


def test_an_instance_closes_its_decoder_when_asked(monkeypatch):
    closed = []

    class Decoder:
        def close(self):
            closed.append(self)

    monkeypatch.setattr(serve, "instance_decoder", lambda runner, settings: Decoder())
    infer = serve.infer_function(object(), serve.ServeSettings("x"))
    assert not closed
    infer.close()  # serve() calls it before the runner's close: GPU-decoded images go while their GPU is there
    assert len(closed) == 1


def test_bench_shares_split_evenly():
    assert serve.shares(32, 4) == [8, 8, 8, 8]
    assert serve.shares(10, 4) == [3, 3, 2, 2]
    assert sum(serve.shares(4600, 3)) == 4600


def test_bench_in_processes_reports_a_client_that_cannot_start_instead_of_waiting():
    import time

    start = time.monotonic()
    with pytest.raises(TrtnetError, match="--bench: "):
        serve.bench("http://127.0.0.1:9", ["x.jpg"], concurrency=2, requests=4, processes=2)  # nothing listens
    assert time.monotonic() - start < 100


def test_the_batcher_never_exceeds_the_engines_batch_profile():
    class WithEngine:
        class engine:
            max_batch = 8

    settings = serve.ServeSettings("x", max_batch=32)
    assert serve.batch_bound(settings, WithEngine()) == 8
    assert serve.batch_bound(settings, object()) == 32


def test_cli_refusals_name_the_option(capsys):
    assert serve.cli(["--devices", "cpu"]) == 2
    assert "give an engine" in capsys.readouterr().err
    assert serve.cli(["x.engine", "--instances", "0"]) == 2
    assert "--instances 0" in capsys.readouterr().err
    assert serve.cli(["yolov5n", "--devices", "cpu", "--export-repo", "repo"]) == 2
    assert "--export-repo" in capsys.readouterr().err
    assert serve.cli(["yolov5n", "--devices", "cpu", "--decode", "gpu"]) == 2
    assert "--decode gpu decodes on a GPU; --devices cpu has none" in capsys.readouterr().err


def test_the_exit_timeout_reaches_triton_s_config(monkeypatch):
    """Ctrl-C/SIGTERM: Triton lets requests in flight finish for --exit-timeout seconds (its own default, 30, made
    PyTriton's stop take up to a minute)."""
    import sys
    import types

    configs = types.ModuleType("pytriton.triton")
    configs.TritonConfig = lambda **kwargs: kwargs  # the keywords trtnet gives PyTriton
    monkeypatch.setitem(sys.modules, "pytriton", types.ModuleType("pytriton"))
    monkeypatch.setitem(sys.modules, "pytriton.triton", configs)
    default = serve.settings_from(serve.parser().parse_args(["x.engine"]))
    chosen = serve.settings_from(serve.parser().parse_args(["x.engine", "--exit-timeout", "3"]))
    assert serve.triton_config(default)["exit_timeout_secs"] == 10
    assert serve.triton_config(chosen)["exit_timeout_secs"] == 3
    with pytest.raises(TrtnetError, match="--exit-timeout -1: must be 0 or more seconds"):
        serve.settings_from(serve.parser().parse_args(["x.engine", "--exit-timeout", "-1"]))


def test_bench_counts_every_failed_request_and_keeps_each_client_in_its_own_thread(monkeypatch):
    """tritonclient's HTTP client belongs to the thread that made it (used from another, every request failed
    with a greenlet error the benchmark did not count): each client thread makes its own, and a request that
    fails in any way is an error, not a silent gap in the latencies."""
    import threading

    from trtnet import client as client_module

    calls = iter(range(1000))
    lock = threading.Lock()

    class FakeClient:
        def __init__(self, url, model=None):
            self.thread = threading.get_ident()

        def detect(self, image):
            assert threading.get_ident() == self.thread, "a client used outside the thread that made it"
            with lock:
                n = next(calls)
            if n % 2:
                raise RuntimeError("connection reset")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(client_module, "Client", FakeClient)
    result = serve.bench("http://127.0.0.1:9", ["x.jpg"], concurrency=3, requests=10)
    assert (result.errors, len(result.latencies_ms)) == (5, 5)


def test_bench_reads_each_image_file_once_and_sends_its_bytes(monkeypatch, tmp_path):
    from trtnet import client as client_module

    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8 jpeg")
    sent = []

    class FakeClient:
        def __init__(self, url, model=None):
            pass

        def detect(self, image):
            sent.append(image)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(client_module, "Client", FakeClient)
    result = serve.bench("http://127.0.0.1:9", [str(tmp_path / "a.jpg"), "missing.jpg"], concurrency=2, requests=6)
    assert result.errors == 0
    assert sorted(map(repr, sent)) == sorted([repr(b"\xff\xd8 jpeg")] * 3 + ["'missing.jpg'"] * 3)


def test_python_backend_repository_for_an_engine_on_listed_gpus(tmp_path):
    """`--backend python` serves a repository whose engine and sidecar link to the originals, its instances on
    the GPUs given; the exported one (no `link`) copies them and lets Triton use every GPU."""
    engine = tmp_path / "yolov5n.fp16.engine"
    engine.write_bytes(b"plan")
    engine.with_name(engine.name + ".json").write_text("{}")
    settings = serve.ServeSettings(str(engine), devices=(0, 1), instances=2)
    model = serve_triton.write_repo(settings, tmp_path / "linked", detect=True, names=NAMES, max_batch=4, link=True,
                                    gpus=[0, 1])
    assert model.name == "yolov5n.fp16" and (model / "1" / engine.name).resolve() == engine.resolve()
    assert (model / "1" / "yolov5n.fp16.engine.json").is_symlink() and (model / "1" / "model.py").is_file()
    config = (model / "config.pbtxt").read_text()
    assert "instance_group [ { count: 2, kind: KIND_GPU, gpus: [0, 1] } ]" in config
    assert 'key: "engine", value: { string_value: "yolov5n.fp16.engine" }' in config and "max_batch_size: 4" in config
    copied = serve_triton.write_repo(settings, tmp_path / "copied", detect=True, names=NAMES, max_batch=4)
    assert not (copied / "1" / engine.name).is_symlink()
    assert "{ count: 2, kind: KIND_GPU }" in (copied / "config.pbtxt").read_text()


def test_python_backend_repository_for_weights_on_the_cpu(tmp_path):
    weights = tmp_path / "yolov5n.wts"
    weights.write_text("0\n")
    settings = serve.ServeSettings(str(weights), devices=("cpu",), imgsz=320, weights_dir=str(tmp_path))
    model = serve_triton.write_repo(settings, tmp_path / "models", detect=True, names=NAMES, max_batch=8, link=True)
    config = (model / "config.pbtxt").read_text()
    assert "kind: KIND_CPU" in config and "gpus" not in config and not (model / "1" / "yolov5n.wts").exists()
    for key, value in (("device", "cpu"), ("weights", str(weights.resolve())), ("imgsz", "320")):
        assert f'key: "{key}", value: {{ string_value: "{value}" }}' in config
    assert 'key: "engine"' not in config


def test_triton_runs_on_the_addresses_and_ports_asked_for(tmp_path):
    settings = serve.ServeSettings("x", devices=("cpu",), host="127.0.0.1", http_port=9000, grpc_port=9001,
                                   metrics_port=9002, exit_timeout_s=7)
    command = serve_triton.triton_command(tmp_path / "server", tmp_path / "models", settings)
    assert command[0] == str(tmp_path / "server" / "bin" / "tritonserver")
    pairs = dict(zip(command[1::2], command[2::2]))
    assert pairs["--model-repository"] == str(tmp_path / "models") and pairs["--http-port"] == "9000"
    assert pairs["--grpc-port"] == "9001" and pairs["--metrics-port"] == "9002"
    assert "--allow-gpu-metrics=false" in command and "7" in command
    assert serve_triton.local_url(serve.ServeSettings("x", http_port=8000)) == "http://127.0.0.1:8000"


def test_triton_and_its_stubs_keep_image_sized_blocks(monkeypatch):
    """Triton and its Python-backend stubs start with trtnet.allocator's thresholds (unless the user opted out),
    and the exported model.py sets them itself, for a Triton that someone else starts."""
    pytest.importorskip("pytriton", reason="the Triton environment comes from PyTriton (make serve-env)")
    from trtnet import allocator

    for key in (*allocator.ENV, allocator.OPT_OUT):
        monkeypatch.delenv(key, raising=False)
    assert allocator.ENV.items() <= serve_triton.triton_environment().items()
    monkeypatch.setenv(allocator.OPT_OUT, "0")
    assert not allocator.ENV.keys() & serve_triton.triton_environment().keys()
    assert "keep_freed_memory()" in serve_triton.PYTHON_MODEL.split("def initialize")[1].split("def execute")[0]


def test_bench_reports_what_triton_counted_between_two_readings():
    def reading(requests, executions, queue_ns, batches):
        return {"model_stats": [{"name": "m", "inference_count": str(requests), "execution_count": executions,
                                 "inference_stats": {"queue": {"count": requests, "ns": queue_ns}},
                                 "batch_stats": [{"batch_size": size, **{k: {"count": c, "ns": ns * c} for k, ns in
                                                                         zip(serve.COMPUTE, per)}}
                                                 for size, c, per in batches]}]}

    before = reading(4, 4, 4_000_000, [(1, 4, (100_000, 2_000_000, 50_000))])
    after = reading(4 + 12, 4 + 3, 4_000_000 + 12 * 3_000_000,
                    [(1, 4, (100_000, 2_000_000, 50_000)), (4, 3, (400_000, 5_000_000, 200_000))])
    counted = serve.server_stats(before, after)
    assert counted.executions == 3 and counted.mean_batch == 4.0 and counted.queue_ms == pytest.approx(3.0)
    assert counted.per_execution_ms == pytest.approx((0.4, 5.0, 0.2))
    assert "mean batch 4.00" in counted.row() and "infer 5.00" in counted.row()
    assert serve.server_stats(after, after) is None  # nothing ran between them
