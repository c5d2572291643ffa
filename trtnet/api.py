"""trtnet's Python API: `Detector` for YOLOv5 engines, `Classifier` for ResNet engines.

    import trtnet
    with trtnet.Detector("yolov5n") as det:                 # its one engine in weights/ (yolov5n.fp16.640.engine)
        for r in det.detect(["bus.jpg", image_bgr]):
            print(r.boxes, r.scores, r.classes, r.labels)
            cv2.imwrite("out.jpg", r.draw())

Images are file paths or numpy arrays in OpenCV's BGR order (HxW grayscale, HxWx1, HxWx3 and HxWx4
are accepted; uint16 is scaled to uint8). Both classes are thread-safe (each thread gets its own
execution context) and context managers (leaving the block releases the GPU memory).
"""

from __future__ import annotations

import colorsys
import json
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from trtnet import networks
from trtnet.datasets import read_image
from trtnet.engine_meta import DETECTION_ROW
from trtnet.errors import TrtnetError

ImageLike = Union[str, os.PathLike, np.ndarray]


# ------------------------------------------------------------------------------------------ images


def to_bgr(image: np.ndarray, what: str = "image") -> np.ndarray:
    """A contiguous HxWx3 uint8 BGR copy-or-view of `image` (grayscale, 1- and 4-channel converted)."""
    image = np.asarray(image)
    if image.size == 0:
        raise TrtnetError(f"{what} is empty (shape {list(image.shape)})")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        raise TrtnetError(f"{what} has dtype {image.dtype}: pass uint8 pixels (0..255), as cv2.imread returns")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return np.ascontiguousarray(image)
    raise TrtnetError(f"{what} has shape {list(image.shape)}: expected HxW, HxWx1, HxWx3 (BGR) or HxWx4 (BGRA)")


def load_image(source: ImageLike) -> tuple[np.ndarray, str | None]:
    """(BGR image, path or None) from a path or an array; TrtnetError naming a file that cannot be read."""
    if isinstance(source, np.ndarray):
        return to_bgr(source), None
    if not isinstance(source, (str, os.PathLike)):
        raise TrtnetError(f"cannot use {type(source).__name__} as an image: pass a path or a numpy BGR array")
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise TrtnetError(f"{path}: no such image file")
    image = read_image(path)
    if image is None:
        raise TrtnetError(f"{path}: not an image OpenCV can read (empty, corrupt or another format)")
    return to_bgr(image, path), path


def as_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    if isinstance(images, (str, os.PathLike, np.ndarray)):
        return [images]
    return list(images)


# ------------------------------------------------------------------------------------------ results


def class_colour(cls: int) -> tuple[int, int, int]:
    """A stable, well-separated BGR colour per class (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((cls * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


@dataclass
class Detections:
    """One image's detections: boxes are x1, y1, x2, y2 in ORIGINAL image pixels (clipped to it).

    Like Ultralytics' results: `names` is the model's {class id: name}; `labels` the name of each detection;
    `r[r.scores > 0.5]`, `r[:3]`, `r[r.classes == 0]` select detections (a new `Detections`).
    """

    boxes: np.ndarray  # float32 [n, 4]
    scores: np.ndarray  # float32 [n]
    classes: np.ndarray  # int64 [n]
    class_names: Sequence[str]
    shape: tuple[int, int]  # original (height, width)
    path: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)

    @property
    def names(self) -> dict[int, str]:
        """The model's classes: {class id: name}, as Ultralytics' `results.names`."""
        return {i: str(n) for i, n in enumerate(self.class_names)}

    @property
    def labels(self) -> list[str]:
        """The class name of each detection, in order."""
        return [self.name_of(c) for c in self.classes]

    def name_of(self, cls: int) -> str:
        return class_name(self.class_names, cls)

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index) -> Detections:
        """The detections `index` selects (an int, a slice, a boolean mask or an index array), as a new
        `Detections` of the same image."""
        if isinstance(index, (int, np.integer)):
            if not -len(self) <= int(index) < len(self):
                raise IndexError(f"detection {index} of {len(self)}")
            index = [int(index)]
        return replace(self, boxes=self.boxes[index].reshape(-1, 4), scores=self.scores[index].reshape(-1),
                       classes=self.classes[index].reshape(-1))

    def of_classes(self, classes: Iterable[int]) -> Detections:
        """Only the detections of these class ids (`--classes`)."""
        return self[np.isin(self.classes, np.asarray(list(classes), dtype=np.int64))]

    @property
    def xywhn(self) -> np.ndarray:
        """Boxes as centre x, centre y, width, height, normalised by the image size (YOLO label format)."""
        h, w = self.shape
        x1, y1, x2, y2 = (self.boxes[:, i].astype(np.float64) for i in range(4))
        return np.stack(((x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h), 1)

    def draw(self, image: np.ndarray | None = None, line_width: int | None = None, *, labels: bool = True,
             conf: bool = True) -> np.ndarray:
        """An annotated copy of the image: a box and a `name score` label per detection (`labels=False`:
        boxes only; `conf=False`: names only)."""
        image = self.image if image is None else image
        if image is None:
            raise TrtnetError("draw(): these detections hold no image; pass the one they were made on")
        canvas = to_bgr(image).copy()
        if canvas.shape[:2] != tuple(self.shape):
            raise TrtnetError(f"draw(): image is {canvas.shape[1]}x{canvas.shape[0]}, detections were made on "
                              f"{self.shape[1]}x{self.shape[0]}")
        lw = line_width or max(round(sum(canvas.shape[:2]) / 2 * 0.003), 2)
        for box, score, cls in zip(self.boxes, self.scores, self.classes):
            label = (self.name_of(int(cls)) + (f" {score:.2f}" if conf else "")) if labels else None
            _draw_box(canvas, box, label, class_colour(int(cls)), lw)
        return canvas

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "shape": [int(self.shape[0]), int(self.shape[1])],
            "detections": [
                {"xyxy": [round(float(v), 2) for v in box], "conf": round(float(score), 5), "cls": int(cls),
                 "name": self.name_of(int(cls))}
                for box, score, cls in zip(self.boxes, self.scores, self.classes)
            ],
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def yolo_lines(self, save_conf: bool = False) -> list[str]:
        """One `cls cx cy w h [conf]` line per detection, normalised (Ultralytics' `--save-txt` format)."""
        lines = []
        for cls, xywh, score in zip(self.classes, self.xywhn, self.scores):
            values = [int(cls), *(float(v) for v in xywh)] + ([float(score)] if save_conf else [])
            lines.append(" ".join(f"{v:g}" for v in values))
        return lines

    def save_txt(self, path: str | os.PathLike, save_conf: bool = False) -> Path:
        """Write `yolo_lines` to `path` (an image without detections gives an empty file)."""
        from trtnet.fileio import atomic_write

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as f:
            f.write("".join(line + "\n" for line in self.yolo_lines(save_conf)))
        return path

    def crop(self, i: int, gain: float = 1.02, pad: int = 10) -> np.ndarray:
        """Detection `i` cut out of the image, its box grown by `gain` and `pad` pixels like Ultralytics'
        `save_one_box` (clipped to the image)."""
        if self.image is None:
            raise TrtnetError("crop(): these detections hold no image")
        x1, y1, x2, y2 = (float(v) for v in self.boxes[i])
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        half_w, half_h = ((x2 - x1) * gain + pad) / 2, ((y2 - y1) * gain + pad) / 2
        h, w = self.shape
        left, right = int(np.clip(cx - half_w, 0, w)), int(np.clip(cx + half_w, 0, w))
        top, bottom = int(np.clip(cy - half_h, 0, h)), int(np.clip(cy + half_h, 0, h))
        return self.image[top:max(bottom, top + 1), left:max(right, left + 1)].copy()

    def crops(self) -> list[np.ndarray]:
        return [self.crop(i) for i in range(len(self))]

    def save_crops(self, folder: str | os.PathLike, stem: str) -> list[Path]:
        """Each detection's crop as folder/<class name>/<stem>.jpg (stem2.jpg, … when taken), as Ultralytics'
        `--save-crop` lays them out."""
        written = []
        for i, cls in enumerate(self.classes):
            target = _free_name(Path(folder) / self.name_of(int(cls)), stem, ".jpg")
            target.parent.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(target), self.crop(i)):
                raise TrtnetError(f"could not write {target}")
            written.append(target)
        return written


def _free_name(folder: Path, stem: str, suffix: str) -> Path:
    candidate, n = folder / f"{stem}{suffix}", 2
    while candidate.exists():
        candidate, n = folder / f"{stem}{n}{suffix}", n + 1
    return candidate


def _draw_box(canvas: np.ndarray, box: np.ndarray, label: str | None, colour: tuple, lw: int) -> None:
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, lw, cv2.LINE_AA)
    if not label:
        return
    scale = lw / 3
    thickness = max(lw - 1, 1)
    (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    above = y1 - th - 3 >= 0
    top = y1 - th - 3 if above else y1
    x1 = max(0, min(x1, canvas.shape[1] - tw))  # a box at the right edge keeps its whole label in view
    cv2.rectangle(canvas, (x1, top), (x1 + tw, top + th + 3), colour, -1, cv2.LINE_AA)
    text_colour = (0, 0, 0) if sum(colour) > 450 else (255, 255, 255)
    cv2.putText(canvas, label, (x1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, text_colour, thickness,
                cv2.LINE_AA)


def class_name(class_names: Sequence[str], cls: int) -> str:
    """The name of class `cls`, or its number when the engine has no name for it."""
    return str(class_names[cls]) if 0 <= cls < len(class_names) else str(cls)


def detections_from_rows(rows: np.ndarray, image: np.ndarray, class_names: Sequence[str],
                         path: str | None = None) -> Detections:
    """The pipeline's rows [k, 6] (x1, y1, x2, y2 in `image`'s pixels, score, class) → Detections."""
    rows = np.asarray(rows, dtype=np.float32).reshape(-1, DETECTION_ROW)
    shape = tuple(int(s) for s in image.shape[:2])
    boxes = rows[:, :4].copy()
    return Detections(boxes, rows[:, 4].copy(), rows[:, 5].astype(np.int64), class_names, shape, path, image)


@dataclass
class Classification:
    """One image's top classes, best first; `scores` are softmax probabilities."""

    classes: np.ndarray  # int64 [k]
    scores: np.ndarray  # float32 [k]
    class_names: Sequence[str]
    path: str | None = None

    @property
    def names(self) -> list[str]:
        return [class_name(self.class_names, c) for c in self.classes]

    def to_dict(self) -> dict:
        top = zip(self.classes, self.names, self.scores)
        return {"path": self.path,
                "top": [{"cls": int(c), "name": n, "score": round(float(s), 6)} for c, n, s in top]}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


def softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return (x / x.sum(axis=-1, keepdims=True)).astype(np.float32)


def top_k(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = max(1, min(int(k), probabilities.shape[-1]))
    order = np.argsort(-probabilities, kind="stable")[:k]
    return order.astype(np.int64), probabilities[order]


# ------------------------------------------------------------------------------------------ models


class _Model:
    """What Detector and Classifier share: the engine, its names, closing."""

    task = ""  # the networks/ TASK of the engines it runs

    def __init__(self, engine: str | Path, *, cuda_graphs: bool = False, weights_dir: str | Path = "weights",
                 device: int | None = None):
        from trtnet.engine import Engine

        self.engine = Engine(engine, weights_dir=weights_dir, cuda_graphs=cuda_graphs, device=device)
        with self.closed_on_error():
            task = networks.family(self.engine.meta.family).TASK
            if task != self.task:
                other = "Classifier" if task == "classify" else "Detector"
                raise TrtnetError(f"{self.engine.path} is a {self.engine.family} engine: use trtnet.{other}")
        self.names: list[str] = self.engine.meta.class_names

    @contextmanager
    def closed_on_error(self) -> Iterator[None]:
        """Close the engine if the rest of the constructor fails (nobody else holds it yet)."""
        try:
            yield
        except BaseException:
            self.engine.close()
            raise

    @property
    def max_batch(self) -> int:
        return self.engine.max_batch

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.engine.path)!r})"


class Detector(_Model):
    """YOLOv5 engine + GPU letterbox + decode/NMS: images in, boxes in original-image pixels out.

    `conf`, `iou`, `max_det`, `multi_label`, `agnostic` are the NMS settings (official defaults). An engine
    built with `--postprocess plugin` has them baked in; a different `conf` above the built one is applied
    afterwards, anything else draws a warning.

    `rect=True` (engines built with --min-imgsz/--max-imgsz) letterboxes each batch to its smallest shape
    instead of the engine's square, as Ultralytics' predictor does (bus.jpg at 640: 640x480).
    """

    task = "detect"

    def __init__(self, engine: str | Path, conf: float = 0.25, iou: float = 0.45, max_det: int = 1000, *,
                 multi_label: bool = False, agnostic: bool = False, cuda_graphs: bool = False,
                 weights_dir: str | Path = "weights", rect: bool = False, device: int | None = None):
        from trtnet.pipelines import DetectPipeline
        from trtnet.plugins.postprocess import NmsSettings

        self.settings = NmsSettings(conf, iou, max_det, multi_label, agnostic)  # refused before loading
        super().__init__(engine, cuda_graphs=cuda_graphs, weights_dir=weights_dir, device=device)
        with self.closed_on_error():
            self.pipeline = DetectPipeline(self.engine, self.settings, rect=rect)

    @property
    def imgsz(self) -> tuple[int, int]:
        return self.engine.imgsz

    def detect(self, images: ImageLike | Sequence[ImageLike]) -> list[Detections]:
        """One `Detections` per image, in order (a single image gives a list of one)."""
        loaded = [load_image(x) for x in as_list(images)]
        return self.detect_loaded([image for image, _ in loaded], [path for _, path in loaded])

    def detect_loaded(self, images: Sequence[np.ndarray],
                      paths: Sequence[str | None] | None = None) -> list[Detections]:
        """Like `detect` for images already converted with `to_bgr` (no copies, no checks)."""
        paths = list(paths) if paths is not None else [None] * len(images)
        rows = self.pipeline.run(list(images))
        return [detections_from_rows(r, image, self.names, path)
                for r, image, path in zip(rows, images, paths)]

    def detect_files(self, paths: Iterable[str | os.PathLike], batch: int | None = None, decode: str = "auto",
                     keep_images: bool = True) -> Iterator[tuple[str, Detections | None, str]]:
        """(path, Detections, "") per image file, in order, or (path, None, why) for one that cannot be read.
        JPEGs are decoded on the GPU by nvImageCodec where `decode` ("auto", "gpu", "cpu") allows, straight
        into the letterbox (trtnet.image_decoding), the next batch's decode overlapping this one's engine run;
        `keep_images` copies GPU-decoded pixels back to the host for `Detections.draw`/`crop`."""
        from trtnet.image_decoding import DeviceImage, FileDecoder, iter_decoded

        batch = max(1, min(int(batch or self.max_batch), self.max_batch))
        self.engine.use_device()
        with FileDecoder(decode, device=self.engine.device_index) as decoder:
            for file, rows in self.pipeline.stream_decoded(iter_decoded(decoder, paths, batch)):
                if rows is None:
                    yield file.path, None, file.error
                    continue
                image = file.image
                if isinstance(image, DeviceImage):
                    image = image.download(decoder.stream) if keep_images else None
                result = detections_from_rows(rows, file.image, self.names, file.path)
                yield file.path, replace(result, image=image), ""

    def detect_decoded(self, batch) -> list[Detections | None]:
        """One result per file of an `image_decoding.DecodedBatch` (from `FileDecoder.decode_bytes`, or made of
        host arrays), in order: its Detections (without pixels), or None for a file that was not decoded. Pixels
        decoded on the GPU are letterboxed where they are, once the batch's `ready` event has passed."""
        from trtnet.image_decoding import DecodedBatch

        self.engine.use_device()
        size = self.max_batch
        parts = [DecodedBatch(batch.files[i:i + size], batch.ready, slot=k % 2)
                 for k, i in enumerate(range(0, len(batch.files), size))]
        return [replace(detections_from_rows(rows, file.image, self.names), image=None) if rows is not None
                else None for file, rows in self.pipeline.stream_decoded(parts, depth=2)]

    def stream(self, images: Iterable[ImageLike], batch: int = 1, depth: int = 2) -> Iterator[Detections]:
        """`detect` for a stream of images (video frames, a camera, many files): one `Detections` per image,
        in order, while the next `batch` of images is uploaded and queued as the GPU runs the previous one.
        Holds the engine while it is consumed (see `DetectPipeline.stream`)."""
        loaded: deque[tuple[np.ndarray, str | None]] = deque()  # the images in flight, oldest first

        def images_in_order() -> Iterator[np.ndarray]:
            for source in images:
                loaded.append(load_image(source))
                yield loaded[-1][0]

        for rows in self.pipeline.stream(images_in_order(), batch, depth):
            image, path = loaded.popleft()
            yield detections_from_rows(rows, image, self.names, path)

    __call__ = detect


class Classifier(_Model):
    """ResNet engine + GPU ImageNet preprocessing (resize 256, centre crop 224, mean/std)."""

    task = "classify"

    def __init__(self, engine: str | Path, *, cuda_graphs: bool = False, weights_dir: str | Path = "weights",
                 device: int | None = None):
        super().__init__(engine, cuda_graphs=cuda_graphs, weights_dir=weights_dir, device=device)
        from trtnet.pipelines import ClassifyPipeline

        with self.closed_on_error():
            self.pipeline = ClassifyPipeline(self.engine)

    def probabilities(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Softmax probabilities [N, classes]."""
        return softmax(self.pipeline.run([load_image(x)[0] for x in as_list(images)]))

    def classify(self, images: ImageLike | Sequence[ImageLike], topk: int = 5) -> list[Classification]:
        """The `topk` classes of each image, best first."""
        items = as_list(images)
        paths = [os.fspath(x) if not isinstance(x, np.ndarray) else None for x in items]
        results = []
        for probs, path in zip(self.probabilities(items), paths):
            classes, scores = top_k(probs, topk)
            results.append(Classification(classes, scores, self.names, path))
        return results

    __call__ = classify
