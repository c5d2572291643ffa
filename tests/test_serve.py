"""`trtnet.serve` end to end on the CPU: a real Triton server on 127.0.0.1 with yolov5n at 320, through PyTriton
and through Triton's own Python backend (`--backend python`).

Runs in the serve environment (`make test-serve`: PyTriton needs numpy < 2); elsewhere it skips. The model is
yolov5n at --imgsz 320 so that the NumPy network (~0.1 s/image on a quiet core) keeps the load test short.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, free_ports, shared

pytest.importorskip("pytriton", reason="PyTriton runs in its own environment: `make test-serve` runs these tests")
psutil = pytest.importorskip("psutil", reason="psutil checks for orphan processes (installed by make serve-env)")

from trtnet.client import Client  # noqa: E402
from trtnet.errors import TrtnetError  # noqa: E402
from trtnet.serve import BACKENDS  # noqa: E402

IMGSZ = 320
STARTUP_S = 180


class Server:
    """`python -m trtnet.serve` in a subprocess; `stop()` interrupts it and reports what was left running."""

    def __init__(self, weights: Path, log: Path, backend: str = "pytriton"):
        self.http, self.grpc, self.metrics = free_ports(3)
        command = [sys.executable, "-m", "trtnet.serve", str(weights), "--devices", "cpu", "--imgsz", str(IMGSZ),
                   "--host", "127.0.0.1", "--http-port", str(self.http), "--grpc-port", str(self.grpc),
                   "--metrics-port", str(self.metrics), "--max-queue-delay-us", "50000", "--max-batch", "8",
                   "--backend", backend]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.log = log
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.family: list = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with Client(self.url):
                    self.family = psutil.Process(self.process.pid).children(recursive=True)
                    return
            except TrtnetError:
                time.sleep(1)
        self.stop()
        pytest.fail(f"the server was not ready after {STARTUP_S} s:\n{self.log.read_text()[-3000:]}")

    def stop(self, signum: int = signal.SIGINT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:  # PyTriton: Triton's --exit-timeout (10 s), then up to 30 s before it kills tritonserver
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from trtnet.gen_wts import main as gen_wts

    out = tmp_path_factory.mktemp("serve_weights")
    gen_wts([str(shared("weights", "yolov5n.pt")), "-o", str(out)])
    return out / "yolov5n.wts"


@pytest.fixture(scope="module", params=BACKENDS)
def server(weights, tmp_path_factory, request):
    """The server on each backend: PyTriton's proxy, and Triton's own Python backend (--backend python)."""
    running = Server(weights, tmp_path_factory.mktemp("serve_log") / "server.log", request.param)
    running.wait_ready()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def direct(weights):
    from trtnet.cpu import CpuDetector

    return CpuDetector(weights, max_det=300, imgsz=IMGSZ)


def images() -> list[str]:
    return [str(shared("images", "bus.jpg")), str(shared("images", "zidane.jpg"))]


def assert_same(served, expected) -> None:
    assert len(served) == len(expected)
    for s, e in zip(served, expected):
        assert len(e) > 0, "the reference found nothing: the comparison would prove little"
        assert s.shape == e.shape
        np.testing.assert_array_equal(s.classes, e.classes)
        np.testing.assert_allclose(s.boxes, e.boxes, atol=1e-3)
        np.testing.assert_allclose(s.scores, e.scores, atol=1e-6)
        assert s.names == e.names


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_detections_equal_the_cpu_detector(server, direct, protocol):
    url = server.url if protocol == "http" else f"grpc://127.0.0.1:{server.grpc}"
    with Client(url) as client:
        assert client.model == "yolov5n"
        assert client.names[:2] == ["person", "bicycle"] and len(client.names) == 80
        assert_same(client.detect(images()), direct.detect(images()))


def test_raw_pixels_encoded_bytes_and_request_options(server, direct):
    import cv2

    image = cv2.imread(images()[0])
    with Client(server.url) as client:
        assert_same(client.detect(image), direct.detect(image))
        from_bytes = client.detect(Path(images()[1]).read_bytes())
        assert from_bytes[0].path is None
        np.testing.assert_allclose(from_bytes[0].boxes, direct.detect(images()[1])[0].boxes, atol=1e-3)
        people = client.detect(images()[0], conf=0.5, classes=[0])[0]
    reference = direct.detect(images()[0])[0]
    keep = (reference.scores >= 0.5) & (reference.classes == 0)
    assert 0 < len(people) < len(reference)
    np.testing.assert_allclose(people.boxes, reference.boxes[keep], atol=1e-3)


def test_bad_requests_get_errors_and_good_ones_keep_succeeding(server, tmp_path):
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a JPEG")
    with Client(server.url) as client:
        with pytest.raises(TrtnetError, match="not an image OpenCV can read"):
            client.detect(str(broken))
        raw = http.InferenceServerClient(f"127.0.0.1:{server.http}")
        for dtype, array in (("FP32", np.zeros((1, 8, 8, 3), np.float32)), ("UINT8", np.zeros((1, 8, 8, 4), np.uint8))):
            tensor = http.InferInput("pixels", list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            with pytest.raises(InferenceServerException):
                raw.infer("yolov5n", [tensor])
        assert len(client.detect(images()[1])[0]) > 0


def test_dynamic_batching_batches_concurrent_requests(server):
    errors: list = []

    def one_request() -> None:
        try:
            with Client(server.url) as client:
                client.detect(images()[0])
        except TrtnetError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one_request) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    with Client(server.url) as client:
        batches = client.statistics("yolov5n")["model_stats"][0]["batch_stats"]
    assert max(int(b["batch_size"]) for b in batches if int(b["compute_infer"]["count"]) > 0) > 1, batches


def test_load_8_clients_by_50_requests_without_errors(server):
    from trtnet.serve import bench

    result = bench(server.url, images(), concurrency=8, requests=400)
    print(f"CPU server, yolov5n at {IMGSZ}: {result.throughput:.1f} images/s, p50 {result.percentile(50):.0f} ms, "
          f"p99 {result.percentile(99):.0f} ms")
    assert result.errors == 0 and len(result.latencies_ms) == 400


def test_bench_prints_triton_s_batches_and_times_after_each_concurrency(server, capsys):
    from trtnet.serve import main

    assert main(["--bench", server.url, "--concurrency", "1,4", "--requests", "8", "--bench-processes", "1",
                 "--images", *images()]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [i for i, line in enumerate(lines) if line.split() and line.split()[0] in ("1", "4")]
    assert len(rows) == 2 and all("server:" in lines[i + 1] and "mean batch" in lines[i + 1] for i in rows), lines


def test_bench_spreads_its_clients_over_processes(server):
    from trtnet.serve import bench

    result = bench(server.url, images(), concurrency=4, requests=40, processes=2)
    assert result.errors == 0 and len(result.latencies_ms) == 40 and result.seconds > 0


def assert_stops_cleanly(server: Server, signum: int) -> None:
    assert server.family, "the server started no Triton process: nothing to check"
    assert server.stop(signum) == 0, server.log.read_text()[-3000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                              for p in server.family):
        time.sleep(0.5)
    left = [p.pid for p in server.family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left running after shutdown: {left}"


def test_shutdown_is_clean(server):
    assert_stops_cleanly(server, signal.SIGINT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_shuts_down_as_cleanly(weights, tmp_path, backend):
    """Kubernetes stops a pod with SIGTERM: the same clean exit (status 0, nothing left) as Ctrl-C."""
    server = Server(weights, tmp_path / "server.log", backend)
    server.wait_ready()
    assert_stops_cleanly(server, signal.SIGTERM)


def test_startup_refuses_what_cannot_run(tmp_path, capsys):
    from trtnet import serve

    assert serve.cli([str(tmp_path / "missing.pt"), "--devices", "cpu"]) == 2
    assert "missing.pt: no such checkpoint" in capsys.readouterr().err
    assert serve.cli([str(tmp_path / "missing.engine"), "--devices", "0"]) == 2
    assert "missing.engine: no such engine file" in capsys.readouterr().err


def test_exported_config_is_a_valid_triton_model_config():
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from trtnet.serve import ServeSettings
    from trtnet.serve_triton import config_pbtxt

    text = config_pbtxt("yolov5n.fp16", ServeSettings("x", instances=2), 16, True, ["a", "b"], "yolov5n.fp16.engine")
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.backend == "python" and config.max_batch_size == 16
    assert [i.name for i in config.input] == ["image", "pixels", "conf", "iou", "classes"]
    assert config.instance_group[0].count == 2
    assert config.parameters["class_names"].string_value == '["a", "b"]'
    compile(serve_python_model(), "model.py", "exec")


def serve_python_model() -> str:
    from trtnet.serve_triton import PYTHON_MODEL

    return PYTHON_MODEL


def test_the_serving_overhead_tool_measures_both_allocator_settings():
    """tests/serve_overhead.py (the CPU numbers behind trtnet.allocator) still runs: one short round."""
    shared("images", "bus.jpg")
    done = subprocess.run([sys.executable, str(REPO / "tests" / "serve_overhead.py"), "--requests", "40",
                           "--concurrency", "2", "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["kept"], ["glibc"])]
    assert [r[0] for r in rows] == ["kept", "glibc"] and all(float(r[1]) > 0 for r in rows), done.stdout
