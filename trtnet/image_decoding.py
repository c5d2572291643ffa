"""Image files → pixels for the GPU pipelines: JPEGs decoded on the GPU by nvImageCodec, the rest by OpenCV.

    decoder = FileDecoder("auto")                        # "gpu": nvImageCodec or an error; "cpu": OpenCV only
    batch = decoder.decode(["a.jpg", "b.png"])           # a DecodedBatch: per file its pixels and why there
    for rows, file in pipeline.stream_decoded(...)       # trtnet.pipelines: letterbox straight from them

A JPEG goes file bytes → nvImageCodec (nvJPEG; the hardware JPEG engines first where the GPU has them) →
an interleaved BGR uint8 image in device memory, whose address the letterbox kernel reads: no host
decode, no host copy of pixels. `decoder_for` decides per file, from its bytes and header only, and says
why: OpenCV (`cv2.imdecode`, the same pixels `trtnet.datasets.read_image` gives) decodes what is not a
plain 8-bit 3-channel JPEG (PNG, grayscale, CMYK/YCCK, 12-bit, a truncated file: nvImageCodec fills a cut
JPEG with grey where OpenCV decodes what is there) and every file when nvImageCodec or a GPU is missing.
A file nvImageCodec fails on is decoded by OpenCV afterwards. Both decoders apply the EXIF orientation.

GPU decodes run on the decoder's own stream; `DecodedBatch.ready` is the event the pipeline's stream waits
for, so the decode of the next batch overlaps the engine run of this one. The decoded images are reused
per `slot` (one per batch that holds them), as the pipelines reuse their upload buffers.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from trtnet import cuda_rt
from trtnet.errors import TrtnetError

Encoded = Union[bytes, np.ndarray]  # a file's bytes: a bytes object, or uint8 read into a `ReadArena`

MODES = ("auto", "gpu", "cpu")
JPEG_START = b"\xff\xd8"
JPEG_END = b"\xff\xd9"
END_MARKER_TAIL = 4096  # the bytes searched for a JPEG's end marker, which zero padding may follow
INSTALL_HINT = 'pip install "trtnet[gpu-decode-cu12]" (or gpu-decode-cu13, matching the trt-cuXX extra)'


@dataclass(frozen=True)
class StreamHeader:
    """What nvImageCodec's parser says about an encoded file before decoding it."""

    codec: str  # "jpeg", "png", …
    width: int
    height: int
    channels: int
    precision: int  # bits per sample


@dataclass(frozen=True)
class DecoderChoice:
    decoder: str  # "gpu" | "cpu"
    reason: str


def decoder_for(data: Encoded, header: StreamHeader | None, gpu_unavailable: str | None = None) -> DecoderChoice:
    """Which decoder takes this file (`data`: its bytes), and why. GPU only for a complete 8-bit 3-channel JPEG;
    everything else goes to OpenCV, whose pixels are the reference (see the module docstring)."""
    if gpu_unavailable:
        return DecoderChoice("cpu", gpu_unavailable)
    if bytes(data[:2]) != JPEG_START:
        return DecoderChoice("cpu", "not a JPEG")
    if not bytes(data[-END_MARKER_TAIL:]).rstrip(b"\x00\r\n ").endswith(JPEG_END):
        return DecoderChoice("cpu", "truncated JPEG (no end marker)")
    if header is None:
        return DecoderChoice("cpu", "nvImageCodec cannot parse its header")
    if header.codec.lower() != "jpeg":
        return DecoderChoice("cpu", f"nvImageCodec reads it as {header.codec}, not JPEG")
    if header.width < 1 or header.height < 1:
        return DecoderChoice("cpu", f"JPEG header gives {header.width}x{header.height} pixels")
    if header.channels == 1:
        return DecoderChoice("cpu", "grayscale JPEG")
    if header.channels == 4:
        return DecoderChoice("cpu", "CMYK/YCCK JPEG")
    if header.channels != 3:
        return DecoderChoice("cpu", f"JPEG with {header.channels} channels")
    if header.precision != 8:
        return DecoderChoice("cpu", f"{header.precision}-bit JPEG")
    return DecoderChoice("gpu", "8-bit 3-channel JPEG")


def nvimgcodec_module() -> Any:
    """nvidia.nvimgcodec, or None when it is not installed."""
    try:
        from nvidia import nvimgcodec
    except ImportError:
        return None
    return nvimgcodec


def gpu_decode_unavailable() -> str | None:
    """Why JPEGs cannot be decoded on the GPU here (no nvImageCodec, too old, no GPU), or None if they can."""
    codec = nvimgcodec_module()
    if codec is None:
        return f"nvImageCodec is not installed: {INSTALL_HINT}"
    if not hasattr(getattr(codec, "SampleFormat", None), "I_BGR"):
        return f"nvImageCodec {getattr(codec, '__version__', '?')} cannot decode to BGR: {INSTALL_HINT}"
    return cuda_rt.gpu_unavailable_reason()


def read_header(codec: Any, data: Encoded) -> StreamHeader | None:
    """The header of `data` as nvImageCodec parses it, None if it cannot."""
    return parse(codec, data)[1]


def parse(codec: Any, data: Encoded) -> tuple[Any, StreamHeader | None]:
    """nvImageCodec's code stream of `data` (decoded from later: parsed once) and its header; (None, None) where
    it cannot parse it."""
    try:
        stream = codec.CodeStream(data)
        return stream, StreamHeader(str(stream.codec_name), int(stream.width), int(stream.height),
                                    int(stream.num_channels), int(stream.precision))
    except Exception:  # nvImageCodec raises its own RuntimeErrors on data it cannot parse
        return None, None


# ------------------------------------------------------------------------------------------ decoded images


@dataclass(frozen=True)
class DeviceImage:
    """An HxWx3 uint8 BGR image in device memory, rows `pitch` bytes apart; `owner` keeps the memory alive."""

    ptr: int
    height: int
    width: int
    pitch: int
    owner: Any = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, 3

    @classmethod
    def of(cls, image: Any, owner: Any = None) -> DeviceImage:
        """From anything with a `__cuda_array_interface__` of HxWx3 uint8 (an nvImageCodec Image); `owner`
        keeps its memory alive (default: the image itself)."""
        face = image.__cuda_array_interface__
        h, w, c = (int(s) for s in face["shape"])
        if c != 3 or face["typestr"] != "|u1":
            raise TrtnetError(f"decoded image is {face['typestr']} {h}x{w}x{c}; the letterbox takes HxWx3 uint8")
        strides = face.get("strides")
        return cls(int(face["data"][0]), h, w, int(strides[0]) if strides else 3 * w, owner or image)

    def download(self, stream: cuda_rt.Stream) -> np.ndarray:
        """A host copy (for drawing and for val's CPU letterbox), after the work queued on `stream`."""
        rows = np.empty((self.height, self.pitch), np.uint8)
        cuda_rt.copy_to_host(rows.ctypes.data, self.ptr, rows.nbytes, stream)
        stream.synchronize()
        return np.ascontiguousarray(rows[:, : 3 * self.width].reshape(self.height, self.width, 3))


@dataclass
class DecodedFile:
    path: str
    choice: DecoderChoice
    image: Any = None  # np.ndarray (OpenCV) or DeviceImage (nvImageCodec); None when unreadable
    error: str = ""

    @property
    def on_gpu(self) -> bool:
        return isinstance(self.image, DeviceImage)


@dataclass
class DecodedBatch:
    """A batch of files decoded: per file its pixels (or its error), the event after which the GPU-decoded
    ones are complete (None: none were), and host time spent reading and decoding."""

    files: list[DecodedFile]
    ready: cuda_rt.Event | None = None
    read_ms: float = 0.0
    decode_ms: float = 0.0
    slot: Any = 0

    @property
    def decoded(self) -> list[DecodedFile]:
        return [f for f in self.files if f.image is not None]

    @property
    def failed(self) -> list[DecodedFile]:
        return [f for f in self.files if f.image is None]


def unreadable(exc: OSError) -> str:
    return f"cannot read it ({exc.strerror or exc})"


class ReadArena:
    """Host memory that a batch of files is read into, reused batch after batch. A new buffer per file costs
    its page faults on every batch: 32 coco128 files took 3.5 ms with `read()` and 0.8 ms read into reused
    memory on the CPU machine; run O's GPU batches spent 3.8-6.5 ms reading."""

    def __init__(self):
        self.memory = np.empty(0, np.uint8)

    def read(self, paths: Sequence[str]) -> list[Encoded | str]:
        """Each file's bytes (a view of this arena, valid until its next `read`), or why it cannot be read."""
        sizes: list[int | str] = []
        for path in paths:
            try:
                sizes.append(os.stat(path).st_size)
            except OSError as exc:
                sizes.append(unreadable(exc))
        starts = np.cumsum([0, *(-(-s // 64) * 64 if isinstance(s, int) else 0 for s in sizes)])
        if starts[-1] > self.memory.size:  # room for this batch and some larger files later
            self.memory = np.empty(int(starts[-1] * 1.5), np.uint8)
        return [self._read_one(path, size, int(start)) if isinstance(size, int) else size
                for path, size, start in zip(paths, sizes, starts)]

    def _read_one(self, path: str, size: int, start: int) -> Encoded | str:
        try:
            with open(path, "rb", buffering=0) as f:
                got = f.readinto(memoryview(self.memory)[start:start + size])
        except OSError as exc:
            return unreadable(exc)
        return self.memory[start:start + got] if got else "empty file"


@dataclass
class FileContents:
    """A batch of files read (`read_now`): per file its bytes or why it cannot be read. `release()` gives the
    arena back for a later batch once nothing reads them any more (its decode has returned)."""

    datas: list[Encoded | str]
    arena: ReadArena | None = None

    def release(self) -> None:
        if self.arena is not None:
            with _arenas_lock:
                _free_arenas.append(self.arena)
            self.arena = None


_free_arenas: list[ReadArena] = []
_arenas_lock = threading.Lock()


class _GpuDecoded:
    """An nvImageCodec image with what must outlive it. Freed after its decoder or after the stream it was
    decoded on, it crashed the process (H200, run J); images outlive the FileDecoder (yielded to callers), so
    the last one of them releases the decoder, then the stream."""

    def __init__(self, image: Any, decoder: Any, stream: cuda_rt.Stream):
        self.image, self.decoder, self.stream = image, decoder, stream

    def __del__(self):  # in this order
        self.image = None
        self.decoder = None
        self.stream = None


def cpu_decode(data: Encoded) -> np.ndarray | None:
    """OpenCV's BGR pixels of encoded `data` (as `cv2.imread(path, IMREAD_COLOR)`), None if it cannot."""
    import cv2

    if not len(data):  # OpenCV asserts on an empty buffer
        return None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return image if image is not None and image.size else None


@functools.lru_cache(maxsize=1)
def _io_pool() -> ThreadPoolExecutor:
    """OpenCV's decodes."""
    return ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="trtnet-decode")


@functools.lru_cache(maxsize=1)
def _reader() -> ThreadPoolExecutor:
    """Reads the next batch's files while this one is decoded."""
    return ThreadPoolExecutor(1, thread_name_prefix="trtnet-read")


class FileDecoder:
    """Decodes batches of image files: JPEGs on the GPU (nvImageCodec) where `mode` allows, the rest with
    OpenCV on a thread pool. `mode`: "auto" (GPU where available), "gpu" (an error where it is not),
    "cpu" (OpenCV only). `device`: the GPU to decode on (None: the thread's current one); the engine that
    takes the pixels must run on the same GPU (pass its `device_index` after its `use_device()`)."""

    def __init__(self, mode: str = "auto", device: int | None = None, cpu_threads: int = 0):
        if mode not in MODES:
            raise TrtnetError(f"--decode {mode}: choose one of {', '.join(MODES)}")
        if cpu_threads < 0:
            raise TrtnetError(f"{cpu_threads} decode threads: give 0 (one per core) or more")
        self.mode = mode
        self.unavailable = "--decode cpu" if mode == "cpu" else gpu_decode_unavailable()
        if mode == "gpu" and self.unavailable:
            raise TrtnetError(f"--decode gpu: {self.unavailable}")
        self.device, self.cpu_threads = device, cpu_threads
        self._codec = None if self.unavailable else nvimgcodec_module()
        self._decoders: list[Any] = []  # tried in turn: the hardware engines alone, then every GPU backend
        self._params: Any = None
        self.stream: cuda_rt.Stream | None = None
        self._reusable: dict[Any, list] = {}  # slot → nvImageCodec Images to decode into again
        if self._codec is not None:
            self._start_gpu()

    def _start_gpu(self) -> None:
        """Make the nvImageCodec decoder now; where it cannot start, "auto" decodes with OpenCV, "gpu" fails."""
        try:
            self._gpu()
        except Exception as exc:  # nvImageCodec raises RuntimeError("Internal error - Could not create decoder…")
            self.unavailable = f"nvImageCodec could not start ({type(exc).__name__}: {exc})"
            self._codec, self._decoders = None, []
            if self.mode == "gpu":
                raise TrtnetError(f"--decode gpu: {self.unavailable}") from exc

    @property
    def uses_gpu(self) -> bool:
        return self._codec is not None

    def choose(self, data: Encoded) -> DecoderChoice:
        return self._parsed_choice(data)[1]

    def _parsed_choice(self, data: Encoded | str) -> tuple[Any, DecoderChoice]:
        """nvImageCodec's code stream of `data` (None where it is not parsed) and the decoder for it; a str is
        why the file could not be read."""
        if isinstance(data, str):
            return None, DecoderChoice("cpu", data)
        stream, header = parse(self._codec, data) if self._codec is not None else (None, None)
        return stream, decoder_for(data, header, self.unavailable)

    def decode(self, paths: Sequence[str | os.PathLike], slot: Any = 0, contents: Future | None = None) -> DecodedBatch:
        """Decode `paths`; the GPU part is queued on `self.stream` (complete once `ready` has). `contents`: their
        `FileContents` being read already (`read_all`); read_ms is then the wait for them."""
        start = time.perf_counter()
        read = contents.result() if contents is not None else read_now(paths)
        read_ms = (time.perf_counter() - start) * 1000.0
        try:
            batch = self.decode_bytes(read.datas, [os.fspath(p) for p in paths], slot)
        finally:
            read.release()
        batch.read_ms = read_ms
        return batch

    def decode_bytes(self, datas: Sequence[Encoded | str], names: Sequence[str], slot: Any = 0) -> DecodedBatch:
        """Decode encoded images held in memory (a str in `datas`: why that one could not be read), each
        named for its errors by `names`; as `decode`."""
        start = time.perf_counter()
        parsed = [self._parsed_choice(d) for d in datas]
        files = [DecodedFile(name, choice, error=d if isinstance(d, str) else "")
                 for name, d, (_, choice) in zip(names, datas, parsed)]
        gpu = [i for i, f in enumerate(files) if f.choice.decoder == "gpu"]
        # OpenCV's files decode on the I/O threads while nvImageCodec holds this one (run N: one grayscale JPEG
        # in a batch of 32 coco128 files doubled the batch's 3 ms when decoded after the GPU's)
        cpu = [i for i, f in enumerate(files) if f.choice.decoder == "cpu" and not f.error]
        on_host = _io_pool().map(cpu_decode, [datas[i] for i in cpu])
        ready = self._decode_on_gpu(files, [parsed[i][0] for i in gpu], gpu, slot) if gpu else None
        rejected = [i for i in gpu if files[i].image is None]  # by every GPU decoder: OpenCV's now
        images = [*on_host, *_io_pool().map(cpu_decode, [datas[i] for i in rejected])]
        for i, image in zip(cpu + rejected, images):
            files[i].image = image
            if image is None:
                files[i].error = "not an image OpenCV can read (empty, corrupt or another format)"
        return DecodedBatch(files, ready, 0.0, (time.perf_counter() - start) * 1000.0, slot)

    def _decode_on_gpu(self, files: list[DecodedFile], streams: list, where: list[int],
                       slot: Any) -> cuda_rt.Event | None:
        """nvImageCodec over code `streams` (files[where]) into this slot's images; a file no decoder takes is left
        for OpenCV with the reason changed. The event after the decodes, None when none succeeded."""
        _, decoders, _ = self._gpu()
        cuda_rt.set_device(self.device)  # its event on the decoder's GPU, whichever thread decodes (serve's instances)
        decoded = self._decoded_in_turn(streams, decoders, slot)
        for i, made in zip(where, decoded):
            if made is None:
                files[i].choice = DecoderChoice("cpu", "nvImageCodec could not decode it")
            else:
                files[i].image = DeviceImage.of(made[0], _GpuDecoded(made[0], made[1], self.stream))
        first = [made[0] for made in decoded if made is not None and made[1] is decoders[0]]
        if len(first) == len(decoded) and len(first) > len(self._reusable.get(slot, [])):
            self._reusable[slot] = first
        if not any(decoded):
            return None
        ready = cuda_rt.Event(timing=False)
        ready.record(self.stream)
        return ready

    def _decoded_in_turn(self, streams: list, decoders: list, slot: Any) -> list[tuple[Any, Any] | None]:
        """(image, the decoder that made it) per code stream, None where none could: each decoder takes what
        the ones before it left; the first decodes into this slot's images from before."""
        decoded: list[tuple[Any, Any] | None] = [None] * len(streams)
        todo = list(range(len(streams)))
        for decoder in decoders:
            reuse = self._reusable.get(slot, []) if decoder is decoders[0] else []
            kwargs = {"images": reuse[: len(todo)]} if len(reuse) >= len(todo) else {}
            images = decoder.decode([streams[i] for i in todo], params=self._params, cuda_stream=self.stream.handle,
                                    **kwargs)
            for i, image in zip(todo, images):
                decoded[i] = (image, decoder) if image is not None else None
            todo = [i for i in todo if decoded[i] is None]
            if not todo:
                break
        return decoded

    def _gpu(self) -> tuple[Any, list[Any], Any]:
        """nvImageCodec, its decoders and parameters, made on first use. First a decoder of the hardware JPEG
        engines alone, where the GPU has them: beside other backends nvImageCodec left them mostly idle (32
        baseline 1-megapixel JPEGs on an H200: 3.7 ms alone, 15-17 ms with the CUDA and hybrid backends
        listed after them, run L). Then one with the hardware, CUDA and hybrid CPU+GPU backends, for what
        the engines do not take (progressive JPEGs, say)."""
        codec = self._codec
        if not self._decoders:
            if self.device is None:
                self.device = cuda_rt.current_device()
            else:
                cuda_rt.set_device(self.device)  # its stream and decoded images on the same GPU
            kinds = codec.BackendKind
            hardware = self._hardware_decoder(codec)
            every = self._new_decoder(codec, (kinds.HW_GPU_ONLY, kinds.GPU_ONLY, kinds.HYBRID_CPU_GPU))
            self._decoders = [*([hardware] if hardware is not None else []), every]
            self._params = codec.DecodeParams(apply_exif_orientation=True, color_spec=codec.ColorSpec.SRGB,
                                              allow_any_depth=False, sample_format=codec.SampleFormat.I_BGR)
            # held by every image decoded on it (_GpuDecoded); not destroyed at exit, where order is arbitrary
            self.stream = cuda_rt.Stream(destroy_at_exit=False)
        return codec, self._decoders, self._params

    def _new_decoder(self, codec: Any, kinds: Sequence[Any]) -> Any:
        # fancy upsampling: the chroma upsampling libjpeg-turbo (OpenCV) does, so pixels stay close to it
        return codec.Decoder(device_id=self.device, max_num_cpu_threads=self.cpu_threads,
                             backends=[codec.Backend(kind) for kind in kinds], options=":fancy_upsampling=1")

    def _hardware_decoder(self, codec: Any) -> Any:
        """The decoder of the hardware JPEG engines alone, None where it cannot be made (no such engines)."""
        try:
            return self._new_decoder(codec, (codec.BackendKind.HW_GPU_ONLY,))
        except Exception:  # nvImageCodec raises RuntimeError("Internal error - Could not create decoder…")
            return None

    def close(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
        self._reusable.clear()
        self._decoders = []
        self.stream = None  # the decoder and stream go with the last image decoded on them (_GpuDecoded)

    def __enter__(self) -> FileDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_decoded(decoder: FileDecoder, paths: Iterable[str | os.PathLike], batch: int,
                 depth: int = 2) -> Iterator[DecodedBatch]:
    """`paths` decoded `batch` at a time, in order, for `DetectPipeline.stream_decoded` with `depth` batches
    in flight. A thread of its own decodes the next batch while the caller queues this one (nvImageCodec's
    `decode` holds its calling thread until its images are done, with the GIL released: on the caller's
    thread it serialised with the batch's Python work, 11.6 ms a batch where decode alone took 7.4 ms in
    run K), and the batch after it is read meanwhile. So `depth` + 1 batches hold decoded images at once: the
    `depth` - 1 still on the GPU when the caller takes the next one (`DetectPipeline._pipelined` collects the
    oldest as soon as `depth` are queued), the one handed out and the one being decoded. Batch k uses slot
    k % (depth + 1)."""
    from trtnet.engine import batched

    slots = depth + 1
    ahead: deque[Future] = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="trtnet-decode-ahead") as pool:
        try:
            for k, (chunk, contents) in enumerate(_read_ahead(batched(paths, batch))):
                ahead.append(pool.submit(decoder.decode, chunk, k % slots, contents))
                if len(ahead) > 1:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            for decoding in ahead:  # a caller that stopped early: nothing more is started
                decoding.cancel()


def _read_ahead(chunks: Iterable[list]) -> Iterator[tuple[list, Future]]:
    """(chunk, its files' bytes being read), the next chunk's reads started before this one is handed out."""
    pending = None
    for chunk in chunks:
        started = (chunk, read_all(chunk))
        if pending is not None:
            yield pending
        pending = started
    if pending is not None:
        yield pending


def read_now(paths: Sequence[str | os.PathLike]) -> FileContents:
    """The files' bytes (or why each cannot be read), read one after the other into a free `ReadArena` (from the
    page cache, threads made it slower: 3.5 ms for 32 coco128 files against 1.2 ms, CPU machine)."""
    with _arenas_lock:
        arena = _free_arenas.pop() if _free_arenas else ReadArena()
    return FileContents(arena.read([os.fspath(p) for p in paths]), arena)


def read_all(paths: Sequence[str | os.PathLike]) -> Future:
    """`read_now` in the background."""
    return _reader().submit(read_now, paths)


def host_images(decoder: FileDecoder, paths: Sequence[str | os.PathLike]) -> list[np.ndarray]:
    """`paths` decoded (JPEGs on the GPU where `decoder` allows) and brought to the host as BGR arrays: for
    preprocessing that runs on the CPU (val's official rectangular letterbox), so that only the decoder
    differs. TrtnetError naming a file that cannot be decoded."""
    batch = decoder.decode(paths)
    for file in batch.failed:
        raise TrtnetError(f"{file.path}: {file.error}")
    return [f.image.download(decoder.stream) if f.on_gpu else f.image for f in batch.files]
