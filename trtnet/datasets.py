"""Datasets for `python -m trtnet.val`: YOLO-format detection sets and ImageNet-style classification sets.

Detection (the Ultralytics YOLOv5 layout, read the way its `LoadImagesAndLabels` reads it):

    DIR/images/<split>/*.jpg      DIR may be the dataset root (with `images/` and `labels/`)
    DIR/labels/<split>/*.txt      or the images folder itself

The label file of an image is its path with the last `/images/` component replaced by `/labels/` and the
suffix by `.txt`; each line is `class cx cy w h`, normalised to the image size (a longer line is a polygon
`class x1 y1 x2 y2 …`, whose bounding box is used). An image without a label file, or with an empty one,
is a background image. Label files without an image and unreadable images are left out with a
`DatasetWarning`, as the official loader leaves them out; a malformed label line (wrong column count, NaN,
coordinates outside [0, 1], a class id the model does not have) is an error naming file:line, since
leaving its image out would change the mAP without saying so.

Classification: see `load_classification_dataset`.
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from trtnet.errors import TrtnetError
from trtnet.plugins.official import letterbox

# The suffixes the official loader accepts (compared lower-cased).
IMAGE_SUFFIXES = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp")


class DatasetWarning(UserWarning):
    """Something in the dataset is left out of the evaluation; the message says what and why."""


def read_image(path: str | os.PathLike) -> np.ndarray | None:
    """The image as 3-channel BGR uint8 (grayscale and 16-bit files converted), None if unreadable.

    `cv2.imread` applies the EXIF orientation, as the official loader's reads do.
    """
    return cv2.imread(os.fspath(path), cv2.IMREAD_COLOR)


# --------------------------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class DetectionSample:
    """One image and its ground truth; `labels` is float32 [n, 5]: class, cx, cy, w, h (normalised)."""

    path: Path
    width: int
    height: int
    labels: np.ndarray

    @property
    def classes(self) -> np.ndarray:
        return self.labels[:, 0].astype(np.int64)

    def boxes_xyxy(self) -> np.ndarray:
        """The label boxes in pixels of the original image, float64 [n, 4] x1, y1, x2, y2."""
        cx, cy, w, h = (self.labels[:, i].astype(np.float64) for i in range(1, 5))
        scale = np.array([self.width, self.height, self.width, self.height])
        return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) * scale


@dataclass(frozen=True)
class DetectionDataset(Sequence):
    """The readable images of a YOLO-format dataset, sorted by path like the official loader sorts them."""

    images_dir: Path
    samples: tuple[DetectionSample, ...]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]

    def __iter__(self) -> Iterator[DetectionSample]:
        return iter(self.samples)

    @property
    def instances(self) -> int:
        return sum(len(s.labels) for s in self.samples)

    @property
    def backgrounds(self) -> list[Path]:
        return [s.path for s in self.samples if len(s.labels) == 0]

    def read(self, index: int) -> np.ndarray:
        sample = self.samples[index]
        image = read_image(sample.path)
        if image is None:
            raise TrtnetError(f"cannot read {sample.path} any more: was it changed or removed during val?")
        return image


def label_path(image_path: str | os.PathLike) -> Path:
    """The official rule: last `/images/` component → `/labels/`, suffix → `.txt`."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(labels.join(os.fspath(image_path).rsplit(images, 1)).rsplit(".", 1)[0] + ".txt")


def load_detection_dataset(data: str | os.PathLike, nc: int | None = None) -> DetectionDataset:
    """Scan a YOLO-format dataset (root or images folder): sizes, labels, warnings for what is left out.
    `nc`: the model's class count; a label with a class id outside it is refused."""
    images_dir = _images_dir(Path(data))
    image_paths = _image_files(images_dir)
    if not image_paths:
        raise TrtnetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {images_dir}")
    _warn_orphan_labels(image_paths)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # cv2 decodes without the GIL
        scanned = list(pool.map(functools.partial(_scan_image, nc=nc), image_paths))
    for _, notes in scanned:  # warned here, not in the workers, so they come in file order
        for note in notes:
            warnings.warn(note, DatasetWarning, stacklevel=2)
    samples = tuple(sample for sample, _ in scanned if sample is not None)
    if not samples:
        raise TrtnetError(f"none of the {len(image_paths)} images under {images_dir} could be read")
    return DetectionDataset(images_dir, samples)


def _images_dir(data: Path) -> Path:
    if not data.is_dir():
        raise TrtnetError(f"--data {data}: not a directory; give a dataset root (with images/ and labels/) "
                          "or a folder of images")
    return data / "images" if (data / "images").is_dir() else data


def _image_files(images_dir: Path) -> list[Path]:
    # Same glob and string sort as the official loader, so batches hold the same images.
    found = glob.glob(os.path.join(os.fspath(images_dir), "**", "*.*"), recursive=True)
    return [Path(f) for f in sorted(f for f in found if f.rsplit(".", 1)[-1].lower() in IMAGE_SUFFIXES)]


def _warn_orphan_labels(image_paths: list[Path]) -> None:
    expected = {label_path(p) for p in image_paths}
    present = {f for folder in {p.parent for p in expected} if folder.is_dir() for f in folder.glob("*.txt")}
    orphans = sorted(present - expected)
    if orphans:
        shown = ", ".join(str(p) for p in orphans[:5]) + (" …" if len(orphans) > 5 else "")
        warnings.warn(f"{len(orphans)} label file(s) without an image are ignored: {shown}",
                      DatasetWarning, stacklevel=3)


def _scan_image(path: Path, nc: int | None = None) -> tuple[DetectionSample | None, list[str]]:
    """The sample (None if left out) and the warnings it deserves."""
    image = read_image(path)
    if image is None:
        return None, [f"cannot read image {path}: left out"]
    labels_file = label_path(path)
    labels = read_labels(labels_file, nc)
    unique = np.unique(labels, axis=0)  # the official loader drops duplicate rows too
    notes = []
    if len(unique) < len(labels):
        notes.append(f"{labels_file}: {len(labels) - len(unique)} duplicate label(s) removed")
    height, width = image.shape[:2]
    return DetectionSample(path, width, height, unique), notes


def read_labels(path: Path, nc: int | None = None) -> np.ndarray:
    """float32 [n, 5] class, cx, cy, w, h from a YOLO label file ([0, 5] if it is missing or empty: a
    background image).

    Raises TrtnetError naming file:line for a line that is not `class cx cy w h` (or a polygon `class x1
    y1 x2 y2 x3 y3 …`) with finite coordinates in [0, 1] and a whole class id from 0 to `nc` - 1.
    """
    if not path.is_file():
        return np.zeros((0, 5), np.float32)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrtnetError(f"{path}: cannot read this label file ({exc})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if fields:
            rows.append(_label_row(fields, f"{path}:{number}", nc))
    return np.array(rows, np.float32).reshape(len(rows), 5)


def _label_row(fields: list[str], where: str, nc: int | None) -> list[float]:
    """One label line, checked before anything is sized from it (a class id of 1e9 must not become 1e9
    of anything)."""
    if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
        raise TrtnetError(f"{where}: {len(fields)} columns; a label is `class cx cy w h` (5 columns) or a polygon "
                          "`class x1 y1 x2 y2 x3 y3 …` (an odd number, at least 7)")
    try:
        values = [float(v) for v in fields]
    except ValueError:
        raise TrtnetError(f"{where}: not a row of numbers: {' '.join(fields)[:80]}") from None
    if not all(math.isfinite(v) for v in values):
        raise TrtnetError(f"{where}: a label value that is not finite (NaN or Inf): {' '.join(fields)[:80]}")
    cls = values[0]
    if not cls.is_integer() or cls < 0 or (nc is not None and cls >= nc):
        allowed = f"0 to {nc - 1}, the model's classes" if nc is not None else "a whole number from 0"
        raise TrtnetError(f"{where}: class id {fields[0]} is not {allowed}")
    if not all(0 <= v <= 1 for v in values[1:]):
        raise TrtnetError(f"{where}: box coordinates outside [0, 1]: labels must be normalised to the image size")
    return [cls, *_polygon_to_xywh(values[1:])] if len(values) > 5 else values


def _polygon_to_xywh(coords: list[float]) -> list[float]:
    xy = np.array(coords, dtype=np.float32).reshape(-1, 2)
    (x1, y1), (x2, y2) = xy.min(0), xy.max(0)
    return [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]


def batch_shapes(
    image_sizes: Sequence[tuple[int, int]], imgsz: int, stride: int = 32, pad: float = 0.5, batch: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """The official val's rectangular batches (`LoadImagesAndLabels(rect=True)`).

    `image_sizes` are (width, height). Returns `(order, shapes)`: `order` indexes the images in the order
    val runs them (sorted by aspect ratio h/w), and batch `b` = images `order[b*batch:(b+1)*batch]`, each
    letterboxed (without enlarging) into `shapes[b]` = (height, width), multiples of `stride`.
    """
    sizes = np.asarray(image_sizes, dtype=np.float64).reshape(-1, 2)
    aspect = sizes[:, 1] / sizes[:, 0]
    order = aspect.argsort()  # numpy's default sort, as the official code, so ties fall the same way
    aspect = aspect[order]
    shapes = []
    for start in range(0, len(aspect), batch):
        low, high = aspect[start:start + batch].min(), aspect[start:start + batch].max()
        shapes.append([high, 1] if high < 1 else [1, 1 / low] if low > 1 else [1, 1])
    shapes = np.ceil(np.array(shapes).reshape(-1, 2) * imgsz / stride + pad).astype(np.int64) * stride
    return order, shapes


def letterbox_for_val(image: np.ndarray, imgsz: int, shape: tuple[int, int]) -> tuple[np.ndarray, tuple]:
    """The official val input of one image: BGR HWC uint8 letterboxed into `shape` (height, width).

    Two steps, as `LoadImagesAndLabels` does them with augment=False: resize so the long side is `imgsz`
    (INTER_AREA to shrink, INTER_LINEAR to enlarge, sizes truncated by int()), then pad with 114 to
    `shape` without resizing again (`letterbox(auto=False, scaleup=False)`). Returns the image and
    val.py's `ratio_pad` = ((h/h0, w/w0), (dw, dh)) for `scale_boxes` back to the original image.
    A single resize straight to the batch shape costs about 1 point of mAP@0.5:0.95 on coco128.
    """
    h0, w0 = image.shape[:2]
    r = imgsz / max(h0, w0)
    if r != 1:
        interpolation = cv2.INTER_LINEAR if r > 1 else cv2.INTER_AREA
        image = cv2.resize(image, (int(w0 * r), int(h0 * r)), interpolation=interpolation)
    h, w = image.shape[:2]
    image, (scale, _), pad = letterbox(image, tuple(shape), scaleup=False)
    return image, ((h / h0 * scale, w / w0 * scale), pad)


# ---------------------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class ClassificationDataset(Sequence):
    """Images and their class indices; `samples` are (path, class index) sorted by path."""

    root: Path
    samples: tuple[tuple[Path, int], ...]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]

    def __iter__(self):
        return iter(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.array([label for _, label in self.samples], dtype=np.int64)

    def read(self, index: int) -> np.ndarray:
        path = self.samples[index][0]
        image = read_image(path)
        if image is None:
            raise TrtnetError(f"cannot read {path}")
        return image


_WNID = re.compile(r"n\d{8}")


def load_classification_dataset(
    root: str | os.PathLike, class_index: str | os.PathLike | None = None
) -> ClassificationDataset:
    """A folder of images whose class is in their sub-folder name or at the start of their file name.

    The class token of `root/<token>/x.jpg` is the sub-folder name; of `root/x.jpg` (flat folder) the file
    name up to its first `_` or `.` (e.g. `n01440764_10026.JPEG`, `207_golden.jpg`). A token that is all
    digits is the class index itself; an ImageNet wnid (`n01440764`) is looked up in `class_index`, a JSON
    file that is either `{"n01440764": 0, …}` or the Keras/torchvision `imagenet_class_index.json`
    `{"0": ["n01440764", "tench"], …}`. Without `class_index`, wnids are numbered in sorted order like
    torchvision's `ImageFolder` — right for the full 1000-class ImageNet, wrong for a subset of classes.
    Unreadable files are checked when read, not here (decoding 50k images twice would double val time).
    """
    root = Path(root)
    if not root.is_dir():
        raise TrtnetError(f"--data {root}: not a directory of images")
    paths = _image_files(root)
    if not paths:
        raise TrtnetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    tokens = [_class_token(root, p) for p in paths]
    index = _read_class_index(Path(class_index)) if class_index else _image_folder_index(tokens)
    samples = []
    for path, token in zip(paths, tokens):
        label = int(token) if token.isdigit() else index.get(token)
        if label is None:
            raise TrtnetError(f"{path}: class {token!r} is not in the class index {class_index}")
        samples.append((path, label))
    return ClassificationDataset(root, tuple(samples))


def _class_token(root: Path, path: Path) -> str:
    if path.parent != root:
        return path.relative_to(root).parts[0]
    token = re.split(r"[_.]", path.name, maxsplit=1)[0]
    if not (token.isdigit() or _WNID.fullmatch(token)):
        raise TrtnetError(f"{path}: cannot tell its class; put images in class sub-folders (wnid or index) "
                          "or name them <wnid>_… / <index>_…")
    return token


def _image_folder_index(tokens: list[str]) -> dict[str, int]:
    wnids = sorted({t for t in tokens if not t.isdigit()})
    if wnids and len(wnids) != 1000:
        warnings.warn(f"{len(wnids)} classes found and no class index given: numbering them 0..{len(wnids) - 1} "
                      "in sorted order; pass a class index JSON if they are a subset of ImageNet",
                      DatasetWarning, stacklevel=3)
    return {wnid: i for i, wnid in enumerate(wnids)}


def _read_class_index(path: Path) -> dict[str, int]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrtnetError(f"cannot read class index {path}: {exc}") from exc
    if isinstance(raw, dict) and all(isinstance(v, int) for v in raw.values()):
        return dict(raw)
    if isinstance(raw, dict) and all(isinstance(v, list) and v and k.isdigit() for k, v in raw.items()):
        return {v[0]: int(k) for k, v in raw.items()}
    raise TrtnetError(f"{path}: expected {{wnid: index}} or {{\"index\": [wnid, name]}}")
