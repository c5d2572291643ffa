"""`python -m trtnet.demo`: the checked download (against a local HTTP server) and the CPU-only run."""

from __future__ import annotations

import functools
import http.server
import socket
import threading

import pytest

from tests.conftest import SHARED_DATA, requires_tensorrt, shared
from trtnet import demo
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


@requires_tensorrt
def test_demo_without_a_gpu_stops_after_the_build(server, tmp_path, monkeypatch, capsys):
    import trtnet.cuda_rt

    monkeypatch.setattr(trtnet.cuda_rt, "gpu_unavailable_reason", lambda: "no NVIDIA driver (test)")
    weights = tmp_path / "weights"
    argv = ["--url", f"{server}/weights/yolov5n.pt", "--weights-dir", str(weights), "--out", str(tmp_path / "out")]
    assert demo.cli(argv) == 0
    out = capsys.readouterr().out
    assert {"yolov5n.pt", "yolov5n.wts", "yolov5n.json", "yolov5n.fp16.engine", "yolov5n.fp16.engine.json"} <= set(
        leftovers(weights))
    assert "No detection here: no NVIDIA driver (test)" in out
    assert f"python -m trtnet.detect {weights / 'yolov5n.fp16.engine'} IMAGE" in out
    assert not (tmp_path / "out").exists()
    # A second run reuses every step.
    assert demo.cli(argv) == 0
    assert "building" not in capsys.readouterr().out
