"""Image files → pixels: the per-file decoder choice, the OpenCV path, and the GPU path on the CPU simulator of
test_runtime_cpu with a stand-in for nvImageCodec (decodes with OpenCV into simulated device memory, on the
stream it is given, rows padded to a pitch); the bench's files mode and `detect --decode` on top of it."""

from __future__ import annotations

import json
import threading
import time
import types

import cv2
import numpy as np
import pytest

from tests.conftest import shared
from tests.test_runtime_cpu import SIM, SimLetterbox, expected_bus, host_view, sim_detector  # noqa: F401
from trtnet import image_decoding
from trtnet.errors import TrtnetError
from trtnet.image_decoding import DecoderChoice, FileDecoder, StreamHeader, decoder_for

RGB_JPEG = StreamHeader("jpeg", 64, 48, 3, 8)


def jpeg_bytes(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    return data.tobytes()


def coloured(h: int = 48, w: int = 64) -> np.ndarray:
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = (255, 0, 0)  # blue left half (BGR): a swapped channel order shows
    image[h // 2:, :, 2] = 200
    return image


# ------------------------------------------------------------------------------------------ the choice


@pytest.mark.parametrize(("header", "data_change", "expected"), [
    (RGB_JPEG, None, ("gpu", "8-bit 3-channel JPEG")),
    (RGB_JPEG, "png", ("cpu", "not a JPEG")),
    (RGB_JPEG, "truncate", ("cpu", "truncated JPEG (no end marker)")),
    (RGB_JPEG, "pad", ("gpu", "8-bit 3-channel JPEG")),  # zero bytes after the end marker are common
    (None, None, ("cpu", "nvImageCodec cannot parse its header")),
    (StreamHeader("jpeg", 64, 48, 1, 8), None, ("cpu", "grayscale JPEG")),
    (StreamHeader("jpeg", 64, 48, 4, 8), None, ("cpu", "CMYK/YCCK JPEG")),
    (StreamHeader("jpeg", 64, 48, 3, 12), None, ("cpu", "12-bit JPEG")),
    (StreamHeader("jpeg", 0, 48, 3, 8), None, ("cpu", "JPEG header gives 0x48 pixels")),
    (StreamHeader("jpeg2k", 64, 48, 3, 8), None, ("cpu", "nvImageCodec reads it as jpeg2k, not JPEG")),
])
def test_decoder_for(header, data_change, expected):
    data = jpeg_bytes(coloured())
    if data_change == "png":
        data = cv2.imencode(".png", coloured())[1].tobytes()
    elif data_change == "truncate":
        data = data[: len(data) // 2]
    elif data_change == "pad":
        data += b"\x00" * 7
    assert decoder_for(data, header) == DecoderChoice(*expected)


def test_decoder_for_reads_files_read_into_an_arena_as_it_reads_bytes(tmp_path):
    data = jpeg_bytes(coloured())
    for name, content in (("ok.jpg", data), ("cut.jpg", data[: len(data) // 2]), ("pad.jpg", data + b"\x00" * 7),
                          ("p.png", cv2.imencode(".png", coloured())[1].tobytes())):
        (tmp_path / name).write_bytes(content)
        read = image_decoding.read_now([tmp_path / name]).datas[0]
        assert isinstance(read, np.ndarray) and read.tobytes() == content
        assert decoder_for(read, RGB_JPEG) == decoder_for(content, RGB_JPEG)


def test_read_arena_reads_each_file_and_says_why_one_cannot_be_read(tmp_path):
    contents = [b"a" * 100, b"", b"b" * 5000, bytes(range(256)) * 3]
    paths = []
    for k, content in enumerate(contents):
        paths.append(str(tmp_path / f"{k}.bin"))
        (tmp_path / f"{k}.bin").write_bytes(content)
    paths.insert(2, str(tmp_path / "missing.bin"))
    arena = image_decoding.ReadArena()
    read = arena.read(paths)
    assert read[1] == "empty file" and read[2].startswith("cannot read it (")
    assert [r.tobytes() for r in (read[0], read[3], read[4])] == [contents[0], contents[2], contents[3]]
    assert all(r.base is arena.memory or r.base is arena.memory.base for r in (read[0], read[3], read[4]))
    memory = arena.memory
    again = arena.read(paths[:1])  # a smaller batch: the same memory, no new allocation
    assert arena.memory is memory and again[0].tobytes() == contents[0]


def test_read_now_hands_its_arena_to_the_next_batch_once_released(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    first = image_decoding.read_now([tmp_path / "a.bin"])
    held = image_decoding.read_now([tmp_path / "a.bin"])  # first not released: another arena
    assert held.arena is not first.arena
    arena = first.arena
    first.release()
    assert image_decoding.read_now([tmp_path / "a.bin"]).arena is arena and first.arena is None


def test_decoder_for_says_why_the_gpu_is_not_used():
    why = "nvImageCodec is not installed: pip install ..."
    assert decoder_for(jpeg_bytes(coloured()), RGB_JPEG, why) == DecoderChoice("cpu", why)


def test_gpu_decode_unavailable_names_the_missing_package(monkeypatch):
    monkeypatch.setattr(image_decoding, "nvimgcodec_module", lambda: None)
    reason = image_decoding.gpu_decode_unavailable()
    assert "nvImageCodec is not installed" in reason and "gpu-decode-cu12" in reason
    with pytest.raises(TrtnetError, match=r"--decode gpu: nvImageCodec is not installed"):
        FileDecoder("gpu")
    with pytest.raises(TrtnetError, match="--decode fast: choose one of auto, gpu, cpu"):
        FileDecoder("fast")
    old = types.SimpleNamespace(__version__="0.4.0", SampleFormat=types.SimpleNamespace(I_RGB=1))
    monkeypatch.setattr(image_decoding, "nvimgcodec_module", lambda: old)
    assert "nvImageCodec 0.4.0 cannot decode to BGR" in image_decoding.gpu_decode_unavailable()


def test_real_nvimgcodec_headers_lead_to_the_expected_choice(tmp_path):
    codec = image_decoding.nvimgcodec_module()
    if codec is None:
        pytest.skip("nvidia-nvimgcodec is not installed (the gpu-decode extras)")
    gray = jpeg_bytes(coloured()[..., 0])
    assert decoder_for(gray, image_decoding.read_header(codec, gray)).reason == "grayscale JPEG"
    colour = jpeg_bytes(coloured())
    assert image_decoding.read_header(codec, colour) == StreamHeader("jpeg", 64, 48, 3, 8)
    assert image_decoding.read_header(codec, b"garbage") is None


# ------------------------------------------------------------------------------------------ OpenCV


def mixed_folder(tmp_path):
    """A JPEG, a PNG, a grayscale JPEG, an empty file, a corrupt one, and a truncated JPEG."""
    files = {}
    for name, data in {
        "a.jpg": jpeg_bytes(coloured()), "b.png": cv2.imencode(".png", coloured(30, 20))[1].tobytes(),
        "c.jpg": jpeg_bytes(coloured()[..., 1]), "d.jpg": b"", "e.jpg": b"not an image",
        "f.jpg": jpeg_bytes(coloured(40, 40))[:300],
    }.items():
        (tmp_path / name).write_bytes(data)
        files[name] = str(tmp_path / name)
    return files


def test_cpu_decoder_gives_what_imread_gives_and_names_bad_files(tmp_path):
    files = mixed_folder(tmp_path)
    with FileDecoder("cpu") as decoder:
        batch = decoder.decode(list(files.values()))
    by_name = {f.path.rsplit("/", 1)[-1]: f for f in batch.files}
    for name in ("a.jpg", "b.png", "c.jpg"):
        np.testing.assert_array_equal(by_name[name].image, cv2.imread(files[name], cv2.IMREAD_COLOR))
        assert by_name[name].choice == DecoderChoice("cpu", "--decode cpu") and not by_name[name].on_gpu
    assert by_name["d.jpg"].image is None and by_name["d.jpg"].error == "empty file"
    assert by_name["e.jpg"].image is None and "not an image OpenCV can read" in by_name["e.jpg"].error
    assert [f.path for f in batch.failed] == [files["d.jpg"], files["e.jpg"]] or \
        cv2.imread(files["f.jpg"]) is None  # OpenCV decodes what a truncated JPEG holds, as imread does
    assert batch.ready is None


# ------------------------------------------------------------------------------------------ GPU, simulated

PITCH_PAD = 64  # the stand-in pads each row, as a decoder may: the letterbox must use the pitch


class FakeCodeStream:
    made = 0  # code streams made: nvImageCodec parses a file once per stream

    def __init__(self, data):
        data = bytes(data)  # nvImageCodec takes bytes or a uint8 array (a file read into a ReadArena)
        FakeCodeStream.made += 1
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise RuntimeError("cannot parse")
        self.data = data
        self.codec_name = "jpeg" if data.startswith(b"\xff\xd8") else "png"
        self.height, self.width = image.shape[:2]
        self.num_channels = 1 if image.ndim == 2 else image.shape[2]
        self.precision = 8


class FakeImage:
    freed: list[tuple[bool, bool]] = []  # per image freed: (its stream already destroyed, its decoder gone)

    def __init__(self, h, w, stream=0, decoder_state=None):
        self.pitch = 3 * w + PITCH_PAD
        self.ptr = SIM.alloc(h * self.pitch)[1]
        self.h, self.w = h, w
        self.stream, self.decoder_state = int(stream), decoder_state or types.SimpleNamespace(gone=False)

    def __del__(self):  # nvImageCodec frees an image stream-ordered, on its decoder's allocator
        FakeImage.freed.append((self.stream in SIM.destroyed_streams, self.decoder_state.gone))

    @property
    def __cuda_array_interface__(self):
        return {"shape": (self.h, self.w, 3), "typestr": "|u1", "data": (self.ptr, False),
                "strides": (self.pitch, 3, 1), "version": 3}


class FakeDecoder:
    """Decodes with OpenCV on `cuda_stream` (the work runs when the simulator reaches it); a file whose
    bytes hold b"FAILME" it cannot decode (None, as nvImageCodec reports a failure), nor one with b"NOTHW"
    when it is made of the hardware engines alone (`hardware_present` False: such a decoder cannot be made)."""

    decoded = 0
    device_ids: list = []
    hardware_present = True
    decoded_by: dict = {}  # "hardware" / "every" → images
    # as nvImageCodec: into the `images` given (their memory reused) and done when `decode` returns, so a slot's
    # images decoded again while the letterbox of their last batch has not run yet show as wrong pixels
    in_place = False

    def __init__(self, **kwargs):
        kinds = [b.kind for b in kwargs["backends"]]
        assert kinds[0] == "HW_GPU_ONLY"  # the hardware JPEG engines first
        self.kind = "hardware" if kinds == ["HW_GPU_ONLY"] else "every"
        self.state = types.SimpleNamespace(gone=False)  # shared with its images, which do not keep it alive
        if self.kind == "hardware" and not FakeDecoder.hardware_present:
            raise RuntimeError("Internal error - Could not create decoder. Code: 7")
        FakeDecoder.device_ids.append(kwargs["device_id"])

    def __del__(self):
        self.state.gone = True

    def decode(self, streams, params=None, cuda_stream=0, images=None):
        assert params.sample_format == "I_BGR" and cuda_stream
        out = []
        reuse = list(images or []) if FakeDecoder.in_place else []
        for k, s in enumerate(streams):
            if b"FAILME" in s.data or (self.kind == "hardware" and b"NOTHW" in s.data):
                out.append(None)
                continue
            FakeDecoder.decoded_by[self.kind] = FakeDecoder.decoded_by.get(self.kind, 0) + 1
            if k < len(reuse) and (reuse[k].h, reuse[k].w) == (s.height, s.width):
                image = reuse[k]
            else:
                image = FakeImage(s.height, s.width, cuda_stream, self.state)

            def work(image=image, data=s.data):
                pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
                rows = host_view(image.ptr, (image.h, image.pitch), np.uint8)
                rows[:, : 3 * image.w] = pixels.reshape(image.h, -1)

            work() if FakeDecoder.in_place else SIM.submit(cuda_stream, work)
            FakeDecoder.decoded += 1
            out.append(image)
        return out


FAKE_NVIMGCODEC = types.SimpleNamespace(
    __version__="0.9.0", CodeStream=FakeCodeStream, Decoder=FakeDecoder,
    SampleFormat=types.SimpleNamespace(I_BGR="I_BGR"), ColorSpec=types.SimpleNamespace(SRGB="SRGB"),
    BackendKind=types.SimpleNamespace(HW_GPU_ONLY="HW_GPU_ONLY", GPU_ONLY="GPU_ONLY", HYBRID_CPU_GPU="HYBRID"),
    Backend=lambda kind: types.SimpleNamespace(kind=kind), DecodeParams=lambda **kw: types.SimpleNamespace(**kw),
)


@pytest.fixture
def gpu_files(sim_detector, tmp_path, monkeypatch):  # noqa: F811
    """The simulated detector with the nvImageCodec stand-in, and a folder: bus.jpg twice, a flat grey
    JPEG, bus as PNG (OpenCV's), a JPEG the stand-in fails on (OpenCV decodes it), an unreadable file."""
    import trtnet.plugins.preprocess

    monkeypatch.setattr(image_decoding, "nvimgcodec_module", lambda: FAKE_NVIMGCODEC)
    monkeypatch.setattr(trtnet.plugins.preprocess, "Letterbox", SimLetterbox)
    bus = cv2.imread(str(shared("images", "bus.jpg")))
    folder = tmp_path / "images"
    folder.mkdir()
    data = shared("images", "bus.jpg").read_bytes()
    grey = jpeg_bytes(np.full((300, 500, 3), 77, np.uint8))
    fails = grey[:2] + b"\xff\xfe\x00\x08FAILME" + grey[2:]  # a JPEG comment segment the stand-in refuses
    for name, content in (("1.jpg", data), ("2.jpg", grey), ("3.png", cv2.imencode(".png", bus)[1].tobytes()),
                          ("4.jpg", fails), ("5.jpg", b"junk"), ("6.jpg", data)):
        (folder / name).write_bytes(content)
    return sim_detector, folder, bus


def test_simulated_gpu_decode_feeds_the_letterbox_without_host_pixels(gpu_files):
    make, folder, bus = gpu_files
    _, boxes = expected_bus(bus)
    paths = sorted(str(p) for p in folder.iterdir())
    with make() as detector:
        results = list(detector.detect_files(paths, batch=2, decode="gpu", keep_images=False))
    assert [r[0] for r in results] == paths
    counts = [len(r[1]) if r[1] is not None else None for r in results]
    assert counts == [4, 0, 4, 0, None, 4]
    for _, result, _ in (results[0], results[2], results[5]):
        np.testing.assert_allclose(result.boxes, boxes, rtol=1e-5, atol=1e-3)
        assert result.shape == bus.shape[:2]
    assert results[0][1].image is None and results[5][1].image is None  # decoded on the GPU: no host pixels
    np.testing.assert_array_equal(results[2][1].image, bus)  # the PNG: OpenCV's pixels
    assert "not an image OpenCV can read" in results[4][2]


@pytest.mark.parametrize("hardware_present", [True, False])
def test_simulated_gpu_decode_tries_the_hardware_engines_alone_first(gpu_files, monkeypatch, hardware_present):
    make, folder, bus = gpu_files
    monkeypatch.setattr(FakeDecoder, "decoded_by", {})
    monkeypatch.setattr(FakeDecoder, "hardware_present", hardware_present)
    grey = jpeg_bytes(np.full((300, 500, 3), 77, np.uint8))
    (folder / "7.jpg").write_bytes(grey[:2] + b"\xff\xfe\x00\x07NOTHW" + grey[2:])  # not for the hardware engines
    paths = [str(folder / name) for name in ("1.jpg", "7.jpg", "4.jpg", "6.jpg")]
    with make() as detector, FileDecoder("gpu", device=detector.engine.device_index) as decoder:
        batch = decoder.decode(paths)
        assert [f.on_gpu for f in batch.files] == [True, True, False, True]  # 4.jpg: no decoder takes it
        assert batch.files[2].choice == DecoderChoice("cpu", "nvImageCodec could not decode it")
        pixels = [f.image.download(decoder.stream) if f.on_gpu else f.image for f in batch.files]
    for image, expected in zip(pixels, (bus, cv2.imdecode(np.frombuffer(grey, np.uint8), cv2.IMREAD_COLOR),
                                        cv2.imread(paths[2]), bus)):
        np.testing.assert_array_equal(image, expected)
    assert FakeDecoder.decoded_by == ({"hardware": 2, "every": 1} if hardware_present else {"every": 3})


def test_simulated_decode_ahead_never_overwrites_images_a_batch_in_flight_still_reads(gpu_files, monkeypatch):
    """detect_files decodes ahead on its own thread into reused images (as nvImageCodec, done on return); the
    letterbox of a batch runs only when the GPU gets to it. Bus frames give 4 detections, the grey ones of the
    same size none: a slot reused too early would hand a batch another file's pixels."""
    from trtnet.pipelines import DetectPipeline

    make, folder, bus = gpu_files
    monkeypatch.setattr(FakeDecoder, "in_place", True)
    submit = DetectPipeline._submit_queued

    def late_submit(self, *args, **kwargs):  # the decode thread gets well ahead of the GPU's letterbox
        time.sleep(0.05)
        return submit(self, *args, **kwargs)

    monkeypatch.setattr(DetectPipeline, "_submit_queued", late_submit)
    grey = folder / "grey_bus_size.jpg"
    grey.write_bytes(jpeg_bytes(np.full_like(bus, 77)))
    pattern = "BGGBBGBGGGBBGBGBBBGG"
    paths = [str(folder / "1.jpg") if c == "B" else str(grey) for c in pattern]
    with make() as detector:
        for batch in (1, 2):
            results = list(detector.detect_files(paths, batch=batch, decode="gpu", keep_images=False))
            assert [len(r[1]) for r in results] == [4 if c == "B" else 0 for c in pattern], batch


def test_simulated_gpu_decode_runs_on_the_detector_s_device(gpu_files, monkeypatch):
    make, folder, bus = gpu_files
    monkeypatch.setattr(FakeDecoder, "device_ids", [])
    SIM.current.device = 0
    with make(device=1) as detector:
        SIM.current.device = 0  # another call on this thread moved to GPU 0
        results = list(detector.detect_files([str(folder / "1.jpg")], decode="gpu", keep_images=False))
    assert FakeDecoder.device_ids == [1, 1]  # the hardware engines' decoder, then every backend's
    assert len(results[0][1]) == 4


def test_simulated_gpu_decode_says_which_decoder_took_each_file(gpu_files):
    make, folder, _ = gpu_files
    paths = sorted(str(p) for p in folder.iterdir())
    with FileDecoder("auto") as decoder:
        assert decoder.uses_gpu
        batch = decoder.decode(paths)
        reasons = [(f.choice.decoder, f.choice.reason) for f in batch.files]
        assert reasons == [("gpu", "8-bit 3-channel JPEG"), ("gpu", "8-bit 3-channel JPEG"), ("cpu", "not a JPEG"),
                           ("cpu", "nvImageCodec could not decode it"), ("cpu", "not a JPEG"),
                           ("gpu", "8-bit 3-channel JPEG")]
        assert [f.on_gpu for f in batch.files] == [True, True, False, False, False, True]
        assert batch.ready is not None
        downloaded = image_decoding.host_images(decoder, [paths[0], paths[1]])
    np.testing.assert_array_equal(downloaded[0], cv2.imread(paths[0]))
    assert downloaded[1].shape == (300, 500, 3)


def test_simulated_gpu_decode_parses_each_file_once(gpu_files):
    """The header check's code stream is the one decoded (parsing twice cost ~0.3 ms per 32 files, run N)."""
    make, folder, _ = gpu_files
    paths = sorted(str(p) for p in folder.iterdir())
    with FileDecoder("auto") as decoder:
        decoder.decode(paths)  # the decoders made
        before = FakeCodeStream.made
        batch = decoder.decode(paths)
    assert sum(f.on_gpu for f in batch.files) == 3
    assert FakeCodeStream.made - before == len(paths)  # once each (the four sent to the GPU were parsed twice)


def test_simulated_opencv_files_decode_while_the_gpu_decodes(gpu_files, monkeypatch):
    """A PNG in a batch of JPEGs starts on the I/O threads before nvImageCodec's call returns (run N: one
    grayscale JPEG decoded after the GPU's call doubled a 32-file batch), and still gets OpenCV's pixels."""
    make, folder, bus = gpu_files
    host_started = threading.Event()
    decode_on_host = image_decoding.cpu_decode
    monkeypatch.setattr(image_decoding, "cpu_decode", lambda data: host_started.set() or decode_on_host(data))
    overlapped = []
    decode_on_gpu = FakeDecoder.decode

    def gpu_waits_for_the_host(self, streams, **kwargs):
        overlapped.append(host_started.wait(timeout=2.0))
        return decode_on_gpu(self, streams, **kwargs)

    monkeypatch.setattr(FakeDecoder, "decode", gpu_waits_for_the_host)
    with FileDecoder("gpu") as decoder:
        batch = decoder.decode([str(folder / "1.jpg"), str(folder / "3.png")])
    assert overlapped == [True]
    assert batch.files[0].on_gpu and not batch.files[1].on_gpu
    np.testing.assert_array_equal(batch.files[1].image, bus)


def test_simulated_detect_files_keeps_pixels_for_drawing(gpu_files):
    make, folder, bus = gpu_files
    with make() as detector:
        path, result, _ = next(detector.detect_files([str(folder / "1.jpg")], decode="gpu"))
    np.testing.assert_array_equal(result.image, bus)
    assert result.draw().shape == bus.shape


def test_simulated_detect_cli_decodes_on_the_gpu(gpu_files, tmp_path, monkeypatch, capsys):
    from trtnet import detect

    make, folder, _ = gpu_files
    before = FakeDecoder.decoded
    out = tmp_path / "out"
    assert detect.cli([str(make.path), str(folder), "--decode", "gpu", "--out", str(out), "--batch", "2"]) == 0
    records = json.loads((out / "detections.json").read_text(encoding="utf-8"))
    assert [len(r["detections"]) for r in records] == [4, 0, 4, 0, 4]
    assert FakeDecoder.decoded - before == 3  # 1.jpg, 2.jpg, 6.jpg (4.jpg failed there, went to OpenCV)
    assert (out / "1.jpg").exists() and "skipping" in capsys.readouterr().err


def test_simulated_bench_files_mode(gpu_files, tmp_path, capsys):
    from trtnet import bench

    make, folder, _ = gpu_files
    report = tmp_path / "bench.json"
    argv = [str(make.path), "--files", str(folder), "--batch", "2", "--iters", "4", "--warmup", "1",
            "--json", str(report)]
    assert bench.cli(argv) == 0
    rows = json.loads(report.read_text(encoding="utf-8"))
    assert [(r["mode"], r["batch"]) for r in rows] == [("engine", 2), ("files cpu", 2), ("files gpu", 2)]
    cpu, gpu = rows[1], rows[2]
    assert "0/" in cpu["note"] and "decoded on the GPU" in gpu["note"] and "0/" not in gpu["note"]
    assert set(cpu["stages"]["mean_ms"]) == {"read (host)", "decode (host)", "upload", "letterbox", "engine", "nms",
                                             "download"}
    assert "decode" in gpu["stages"]["mean_ms"] and "decode (host)" not in gpu["stages"]["mean_ms"]
    assert abs(sum(gpu["stages"]["share"].values()) - 1) < 1e-6 and gpu["stages"]["batches"] == 3
    assert all(r["images_per_s"] > 0 for r in rows)
    assert "files gpu" in capsys.readouterr().out


def test_bench_files_mode_refuses_a_folder_without_images(sim_detector, tmp_path, capsys):  # noqa: F811
    from trtnet import bench

    (tmp_path / "empty").mkdir()
    assert bench.cli([str(sim_detector.path), "--files", str(tmp_path / "empty"), "--batch", "1"]) == 2
    assert f"--files {tmp_path / 'empty'}: no image files in it" in capsys.readouterr().err


def test_simulated_gpu_images_kept_past_close_free_before_their_decoder_and_stream(gpu_files):
    """An image nvImageCodec decoded is freed on its stream by its decoder's allocator: freed after either was
    destroyed, it crashed the process on an H200 (run J: `detect --decode gpu` at exit, a FileDecoder closed
    while its last images were still referenced). Images kept past `close` keep both until they go."""
    import gc

    from trtnet import cuda_rt

    _, folder, bus = gpu_files
    FakeImage.freed.clear()
    with FileDecoder("gpu") as decoder:
        batch = decoder.decode([folder / "1.jpg", folder / "2.jpg"])
        stream = decoder.stream.handle
    kept = batch.files[0].image
    np.testing.assert_array_equal(kept.download(cuda_rt.Stream()), bus)  # its pixels are still there
    del batch
    gc.collect()
    assert FakeImage.freed == [(False, False)]  # 2.jpg: freed with its batch, stream and decoder alive
    assert stream not in SIM.destroyed_streams
    del kept
    gc.collect()
    assert FakeImage.freed == [(False, False)] * 2
    assert stream in SIM.destroyed_streams  # with the last image decoded on it


def test_device_image_from_a_cuda_array_interface():
    image = types.SimpleNamespace(__cuda_array_interface__={"shape": (4, 5, 3), "typestr": "|u1",
                                                            "data": (1234, False), "strides": None})
    assert image_decoding.DeviceImage.of(image) == image_decoding.DeviceImage(1234, 4, 5, 15)
    image.__cuda_array_interface__ = {"shape": (4, 5, 4), "typestr": "|u1", "data": (1, False)}
    with pytest.raises(TrtnetError, match="takes HxWx3 uint8"):
        image_decoding.DeviceImage.of(image)


# ------------------------------------------------------------------------------------------ GPU scripts


def test_stream_profiler_runs_on_the_simulator_and_restores_what_it_wraps(sim_detector):  # noqa: F811
    import importlib.util
    from pathlib import Path

    from trtnet import cuda_rt, engine, pipelines

    spec = importlib.util.spec_from_file_location("profile_stream", Path(__file__).parent / "gpu" / "profile_stream.py")
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    originals = (engine.Worker.enqueue, pipelines.stage_images, cuda_rt.Event.synchronize)
    with sim_detector() as detector:
        row = profile.profile_stream(detector, frames=6, batch=1, depth=2, pinned=False)
        assert "_submit" not in vars(detector.pipeline)  # the timeline's wrapper is gone
    assert (engine.Worker.enqueue, pipelines.stage_images, cuda_rt.Event.synchronize) == originals
    assert row["gpu"]["runs"] == 6 and row["worker"].startswith("shared")
    calls = row["host_calls"]
    assert calls["Worker.enqueue"]["count"] == 6 and calls["Letterbox.enqueue"]["count"] == 6
    assert calls["Event.synchronize(uploaded: frame reusable)"]["count"] == 6
    assert calls["Event.synchronize(done: results landed)"]["count"] == 6
    assert calls["Event.record"]["count"] == 12  # uploaded and done per run: the profiler's own are not counted


def test_val_reader_gives_the_dataset_pixels_through_the_file_decoder(monkeypatch):
    from trtnet.datasets import load_detection_dataset
    from trtnet.val import dataset_reader

    monkeypatch.setattr(image_decoding, "nvimgcodec_module", lambda: None)  # OpenCV, whatever is installed
    dataset = load_detection_dataset(shared("coco128"))
    assert dataset_reader(dataset, "cpu") is None  # val's default: dataset.read, as before
    read = dataset_reader(dataset, "auto")
    indices = [5, 0, 17]
    for image, i in zip(read(indices), indices):
        np.testing.assert_array_equal(image, dataset.read(i))


def test_a_decoder_that_cannot_start_leaves_auto_on_opencv_and_fails_gpu(gpu_files, monkeypatch):
    def refuse(**kwargs):
        raise RuntimeError("Internal error - Could not create decoder. Code: 8")

    monkeypatch.setattr(FAKE_NVIMGCODEC, "Decoder", refuse)
    make, folder, bus = gpu_files
    with FileDecoder("auto") as decoder:
        assert not decoder.uses_gpu
        file = decoder.decode([str(folder / "1.jpg")]).files[0]
    assert file.choice == DecoderChoice("cpu", "nvImageCodec could not start (RuntimeError: Internal error - Could "
                                               "not create decoder. Code: 8)")
    np.testing.assert_array_equal(file.image, bus)
    with pytest.raises(TrtnetError, match=r"--decode gpu: nvImageCodec could not start"):
        FileDecoder("gpu")


def test_simulated_opencv_batches_do_not_overwrite_a_staged_upload_in_flight(gpu_files):
    make, folder, _ = gpu_files
    bus, grey = str(folder / "3.png"), str(folder / "2.jpg")  # two OpenCV-decoded images per batch: staged
    paths = [bus, grey, grey, bus, bus, bus, grey, grey]
    with make() as detector:
        counts = [len(r) for _, r, _ in detector.detect_files(paths, batch=2, decode="cpu", keep_images=False)]
    assert counts == [4, 0, 0, 4, 4, 4, 0, 0]


def test_iter_decoded_reads_the_batch_after_the_next_while_this_one_is_used(tmp_path, monkeypatch):
    import time

    files = []
    for k in range(7):
        files.append(str(tmp_path / f"{k}.jpg"))
        (tmp_path / f"{k}.jpg").write_bytes(jpeg_bytes(coloured() // (k + 1)))
    reads, read = [], image_decoding.ReadArena._read_one
    monkeypatch.setattr(image_decoding.ReadArena, "_read_one",
                        lambda self, path, *where: reads.append(path) or read(self, path, *where))
    with FileDecoder("cpu") as decoder:
        batches = image_decoding.iter_decoded(decoder, files, 2)
        first = next(batches)
        deadline = time.monotonic() + 10
        while len(reads) < 6 and time.monotonic() < deadline:  # the next two batches, before anyone asked for them
            time.sleep(0.01)
        assert sorted(reads) == files[:6]
        rest = list(batches)
    decoded = [f for batch in (first, *rest) for f in batch.files]
    assert [f.path for f in decoded] == files and sorted(reads) == files
    for k, f in enumerate(decoded):
        np.testing.assert_array_equal(f.image, cv2.imdecode(np.frombuffer(jpeg_bytes(coloured() // (k + 1)), np.uint8),
                                                            cv2.IMREAD_COLOR))


class _RecordingDecoder:
    """FileDecoder.decode's signature; records which slot and thread each batch was decoded in."""

    def __init__(self, fail_on: int = -1):
        self.calls, self.fail_on, self.lock = [], fail_on, threading.Lock()

    def decode(self, chunk, slot=0, contents=None):
        import threading

        with self.lock:
            self.calls.append((list(chunk), slot, threading.current_thread().name))
        if chunk[0] == self.fail_on:
            raise RuntimeError(f"batch at {chunk[0]}")
        return list(chunk), slot


def test_iter_decoded_decodes_the_next_batch_on_its_own_thread_while_this_one_is_used():
    import threading
    import time

    decoder = _RecordingDecoder()
    batches = image_decoding.iter_decoded(decoder, range(10), 2, depth=2)
    first = next(batches)
    deadline = time.monotonic() + 10
    while len(decoder.calls) < 2 and time.monotonic() < deadline:  # the second batch, before anyone asked for it
        time.sleep(0.01)
    assert [c[0] for c in decoder.calls] == [[0, 1], [2, 3]]
    assert {c[2] for c in decoder.calls}.isdisjoint({threading.current_thread().name})
    rest = list(batches)
    assert [b[0] for b in (first, *rest)] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    # depth - 1 in flight + one handed out + one being decoded hold images at once: three slots in turn
    assert [b[1] for b in (first, *rest)] == [0, 1, 2, 0, 1]


def test_iter_decoded_raises_a_decode_error_in_order_and_starts_nothing_after_an_early_stop():
    decoder = _RecordingDecoder(fail_on=4)
    batches = image_decoding.iter_decoded(decoder, range(10), 2)
    assert next(batches)[0] == [0, 1] and next(batches)[0] == [2, 3]
    with pytest.raises(RuntimeError, match="batch at 4"):
        next(batches)
    stopped = _RecordingDecoder()
    early = image_decoding.iter_decoded(stopped, range(100), 2)
    next(early)
    early.close()
    assert len(stopped.calls) <= 3  # the one handed out, the next, perhaps the one queued behind it


def test_simulated_server_decodes_jpegs_on_the_gpu_with_the_results_of_opencv(gpu_files):
    """trtnet.serve's request path on a GPU Detector: the JPEGs of a dynamic batch are decoded by nvImageCodec
    straight into the letterbox, the rest by OpenCV, and every request gets what `--decode cpu` gives it."""
    from trtnet import serve

    make, folder, bus = gpu_files
    _, boxes = expected_bus(bus)
    requests = [{"image": np.array([[(folder / name).read_bytes()]], object)}
                for name in ("1.jpg", "3.png", "5.jpg", "2.jpg", "4.jpg")]
    requests.append({"pixels": bus[None]})
    answers = {}
    with make() as detector:
        for mode in ("cpu", "gpu"):
            before = FakeDecoder.decoded
            answers[mode] = serve.infer_function(detector, serve.ServeSettings("x", decode=mode))(requests)
            answers[mode + " decoded on the gpu"] = FakeDecoder.decoded - before
    assert answers["cpu decoded on the gpu"] == 0
    assert answers["gpu decoded on the gpu"] == 2  # 1.jpg, 2.jpg (4.jpg it fails on: OpenCV decodes that one)
    for cpu, gpu in zip(answers["cpu"], answers["gpu"]):
        assert cpu.keys() == gpu.keys()
        for key in cpu:
            np.testing.assert_array_equal(cpu[key], gpu[key], err_msg=key)
    counts = [int(a["count"][0, 0]) for a in answers["gpu"]]
    assert counts == [4, 4, 0, 0, 0, 4]
    for i in (0, 1, 5):
        np.testing.assert_allclose(answers["gpu"][i]["boxes"][0, :4], boxes, rtol=1e-5, atol=1e-3)
        assert answers["gpu"][i]["shape"][0].tolist() == list(bus.shape[:2])
    assert b"not an image OpenCV can read" in answers["gpu"][2]["error"][0, 0]


def test_decode_gpu_is_refused_at_startup_where_nvimgcodec_is_missing(sim_detector, monkeypatch):  # noqa: F811
    from trtnet import serve

    monkeypatch.setattr(image_decoding, "gpu_decode_unavailable", lambda: "nvImageCodec is not installed")
    with sim_detector() as detector:
        with pytest.raises(TrtnetError, match="--decode gpu: nvImageCodec is not installed"):
            serve.infer_function(detector, serve.ServeSettings("x", decode="gpu"))
        assert not serve.instance_decoder(detector, serve.ServeSettings("x")).uses_gpu  # auto: OpenCV


def test_a_decode_from_another_thread_queues_on_the_decoder_s_gpu(gpu_files, monkeypatch):
    """A serving instance on GPU 1 decodes on whichever thread Triton calls it from (current device 0 there): the
    event after the decode must be made on GPU 1, where its stream is."""
    import threading

    from trtnet import cuda_rt

    make, folder, bus = gpu_files
    made_on = []
    event = cuda_rt.Event

    def recording_event(*args, **kwargs):
        made_on.append(getattr(SIM.current, "device", 0))
        return event(*args, **kwargs)

    monkeypatch.setattr(cuda_rt, "Event", recording_event)
    decoder = FileDecoder("gpu", device=1)
    data = (folder / "1.jpg").read_bytes()
    done = []
    thread = threading.Thread(target=lambda: done.append(decoder.decode_bytes([data], ["request image"])))
    thread.start()
    thread.join(timeout=30)
    assert done and done[0].ready is not None and made_on == [1]
    decoder.close()


def test_the_gpu_decode_probe_runs_on_the_simulator(gpu_files):
    from tests.gpu import decode_probe

    make, folder, bus = gpu_files
    paths = [str(folder / name) for name in ("1.jpg", "2.jpg", "6.jpg")]
    report = decode_probe.probe(paths, batch=2, batches=3, threads=4)
    assert report["threads"] == 4 and len(report["batches"]) == 3
    assert all(b["on_gpu"] == 2 and b["complete_ms"] >= b["call_ms"] >= 0 for b in report["batches"])
