"""`python -m trtnet.demo`: the checked download (against a local HTTP server), local checkpoints, and the
run on a machine without a GPU (the CPU path, checked against the official boxes)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import socket
import threading

import pytest

from tests.conftest import SHARED_DATA, requires_tensorrt, shared
from trtnet import demo

with contextlib.suppress(ImportError):  # binds BuildProgress's default stream (sys.stderr) before capsys swaps it
    import trtnet.build  # noqa: F401
from trtnet.errors import TrtnetError
from trtnet.fileio import sha256_of


@pytest.fixture(scope="module")
def server():
    """http://127.0.0.1:PORT/ serving ../shared/data (read-only)."""
    shared("weights", "yolov5n.pt")
    handler = functools.partial(QuietHandler, directory=str(SHARED_DATA))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_the_pinned_checksum_is_the_official_files():
    assert sha256_of(shared("weights", "yolov5n.pt")) == demo.DEFAULT_SHA256


def test_download_with_good_checksum_writes_the_file(server, tmp_path):
    target = tmp_path / "weights" / "yolov5n.pt"
    demo.download(f"{server}/weights/yolov5n.pt", target, demo.DEFAULT_SHA256)
    assert sha256_of(target) == demo.DEFAULT_SHA256
    assert leftovers(target.parent) == ["yolov5n.pt"]


def test_download_with_bad_checksum_leaves_nothing(server, tmp_path):
    target = tmp_path / "yolov5n.pt"
    with pytest.raises(TrtnetError, match=r"sha256 .* expected 0{64}.*nothing was written"):
        demo.download(f"{server}/weights/yolov5n.pt", target, "0" * 64)
    assert leftovers(tmp_path) == []


def test_offline_says_which_file_to_place_where(tmp_path):
    target = tmp_path / "weights" / "yolov5n.pt"
    with pytest.raises(TrtnetError, match=rf"Offline\? Place the official yolov5n.pt .* at {target}"):
        demo.download(f"http://127.0.0.1:{closed_port()}/yolov5n.pt", target, demo.DEFAULT_SHA256)
    assert not target.exists()


def test_missing_file_on_the_server_is_an_error(server, tmp_path):
    with pytest.raises(TrtnetError, match="could not download"):
        demo.download(f"{server}/weights/nope.pt", tmp_path / "nope.pt", None)
    assert leftovers(tmp_path) == []


def test_a_present_checkpoint_with_another_checksum_is_refused(tmp_path):
    fake = tmp_path / "yolov5n.pt"
    fake.write_bytes(b"not the official file")
    with pytest.raises(TrtnetError, match="not the official file"):
        demo.ensure_checkpoint(fake, "http://unused.invalid/", demo.DEFAULT_SHA256)


def test_a_plain_path_is_fetched_like_a_url(tmp_path):
    target = tmp_path / "weights" / "yolov5n.pt"
    demo.download(str(shared("weights", "yolov5n.pt")), target, demo.DEFAULT_SHA256)
    assert sha256_of(target) == demo.DEFAULT_SHA256
    assert demo.as_url("https://example.com/a.pt") == "https://example.com/a.pt"
    assert demo.as_url("weights/a.pt").startswith("file:///")


@pytest.mark.parametrize("digest", ["", "   ", "abc", "g" * 64])
def test_an_empty_or_malformed_checksum_is_an_error_not_a_skip(digest, tmp_path, capsys):
    argv = ["--sha256", digest, "--weights-dir", str(tmp_path / "weights"), "--out", str(tmp_path / "out")]
    assert demo.cli(argv) == 2
    err = capsys.readouterr().err
    assert f"error: --sha256 {digest!r}: expected 64 hex digits" in err and "--weights PATH" in err
    assert not (tmp_path / "weights").exists()


def test_a_local_official_checkpoint_is_used_in_place(tmp_path, capsys):
    copy = tmp_path / "elsewhere" / "yolov5n.pt"
    copy.parent.mkdir()
    copy.write_bytes(shared("weights", "yolov5n.pt").read_bytes())
    unreachable = f"http://127.0.0.1:{closed_port()}/yolov5n.pt"
    assert demo.ensure_checkpoint(tmp_path / "w" / "yolov5n.pt", unreachable, demo.DEFAULT_SHA256, [copy]) == copy
    assert "found locally" in capsys.readouterr().out
    copy.write_bytes(b"tampered")  # a local file with another digest is passed over (then the fetch fails)
    with pytest.raises(TrtnetError, match="could not download"):
        demo.ensure_checkpoint(tmp_path / "w" / "yolov5n.pt", unreachable, demo.DEFAULT_SHA256, [copy])


def golden_bus_detections():
    official = json.loads(shared("golden", "golden_yolov5n_detect640.json").read_text(encoding="utf-8"))
    return official["images"]["bus.jpg"]["detections"]


@requires_tensorrt
def test_demo_without_a_gpu_detects_on_the_cpu(tmp_path, monkeypatch, capsys):
    """`make demo` on a CPU machine: the shared yolov5n.pt, build, then the CPU path writes the annotated
    bus.jpg and detections.json, whose boxes are the official ones."""
    import cv2

    import trtnet.cuda_rt

    monkeypatch.setattr(trtnet.cuda_rt, "gpu_unavailable_reason", lambda: "no NVIDIA driver (test)")
    monkeypatch.setattr(demo, "LOCAL_CHECKPOINTS", (shared("weights", "yolov5n.pt"),))
    weights, out = tmp_path / "weights", tmp_path / "out"
    argv = ["--url", f"http://127.0.0.1:{closed_port()}/offline.pt", "--weights-dir", str(weights), "--out", str(out),
            "--source", str(shared("images", "bus.jpg"))]
    assert demo.cli(argv) == 0
    printed = capsys.readouterr().out
    assert {"yolov5n.wts", "yolov5n.json", "yolov5n.fp16.640.engine", "yolov5n.fp16.640.engine.json"} <= \
        set(leftovers(weights))
    assert "running the same network on the CPU" in printed and "this ran on the CPU" in printed
    assert 'pip install -e ".[trt-cu12]"' in printed and "a few minutes" not in printed
    assert leftovers(out) == ["bus.jpg", "detections.json"]
    assert cv2.imread(str(out / "bus.jpg")).shape == (1080, 810, 3)
    records = json.loads((out / "detections.json").read_text(encoding="utf-8"))
    got = records[0]["detections"]
    expected = golden_bus_detections()
    assert [d["cls"] for d in got] == [d["cls"] for d in expected] == [0, 0, 0, 5]
    for g, e in zip(got, expected):
        assert box_iou(g["xyxy"], e["xyxy_unrounded"]) > 0.9
        assert abs(g["conf"] - e["conf"]) < 0.01
    # A second run reuses every step.
    assert demo.cli(argv) == 0
    assert "building" not in capsys.readouterr().out


@requires_tensorrt
def test_demo_falls_back_to_the_cpu_when_the_gpu_cannot_run_the_engine(tmp_path, monkeypatch, capsys):
    import trtnet.cuda_rt

    def refuse(engine, image):
        raise TrtnetError(f"{engine} was built for sm_120 (test)")

    monkeypatch.setattr(trtnet.cuda_rt, "gpu_unavailable_reason", lambda: None)
    monkeypatch.setattr(demo, "detect_on", refuse)
    mine = tmp_path / "mine.pt"
    mine.write_bytes(shared("weights", "yolov5n.pt").read_bytes())
    argv = ["--weights", str(mine), "--weights-dir", str(tmp_path / "weights"), "--out", str(tmp_path / "out"),
            "--source", str(shared("images", "bus.jpg"))]
    assert demo.cli(argv) == 0
    printed = capsys.readouterr().out
    assert "the GPU could not run it: " in printed and "built for sm_120 (test)" in printed
    records = json.loads((tmp_path / "out" / "detections.json").read_text(encoding="utf-8"))
    assert [d["cls"] for d in records[0]["detections"]] == [0, 0, 0, 5]


@requires_tensorrt
def test_demo_takes_a_checkpoint_of_your_own(tmp_path, monkeypatch, capsys):
    import trtnet.cuda_rt

    monkeypatch.setattr(trtnet.cuda_rt, "gpu_unavailable_reason", lambda: "no NVIDIA driver (test)")
    mine = tmp_path / "mine.pt"
    mine.write_bytes(shared("weights", "synthetic", "yolov5s_syn.pt").read_bytes())
    argv = ["--weights", str(mine), "--weights-dir", str(tmp_path / "weights"), "--out", str(tmp_path / "out"),
            "--source", str(shared("images", "zidane.jpg"))]
    assert demo.cli(argv) == 0
    assert "your checkpoint; not checked" in capsys.readouterr().out
    assert {"mine.wts", "mine.fp16.640.engine"} <= set(leftovers(tmp_path / "weights"))
    assert leftovers(tmp_path / "out") == ["detections.json", "zidane.jpg"]
    assert demo.cli(["--weights", str(tmp_path / "nope.pt")]) == 2


def box_iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
