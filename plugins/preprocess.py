"""Preprocessing on the GPU: a batch of uint8 BGR HWC images of any sizes → the network input tensor.

    lb = Letterbox(640, 640, "float16")
    lb.enqueue(stream, [img0_ptr, img1_ptr], heights=[1080, 720], widths=[810, 1280], out_ptr=input_ptr)

Letterbox's output is NCHW RGB / 255 at the engine size, equal to the official `letterbox(im, (out_h,
out_w), auto=False)` (cv2 INTER_LINEAR, border 114) + BGR→RGB + /255; see letterbox.cu for how close to
cv2. Given a smaller `out_hw` (`rect_input_hw`: the official `auto=True` shape), each image is scaled as
for the engine size and centred in that canvas.
`ImagenetPreprocess` is torchvision's Resize(256) + CenterCrop + Normalize for the classifiers
(classify_preprocess.cu). Both queue on `stream` without synchronising: the per-image parameters travel
as kernel arguments.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence

import numpy as np

from trtnet.engine_meta import DETECTION_ROW
from trtnet.errors import TrtnetError
from trtnet.plugins import cuda
from trtnet.plugins.official import letterbox_geometry, letterboxed_shape, scale_boxes

MAX_IMAGES = 64  # letterbox.cu, classify_preprocess.cu: images per launch
DTYPES = {"float32": 0, "float16": 1}


class Image(ctypes.Structure):  # letterbox.cu
    _fields_ = [
        ("src", ctypes.c_uint64), ("h", ctypes.c_int), ("w", ctypes.c_int), ("pitch", ctypes.c_int),
        ("new_w", ctypes.c_int), ("new_h", ctypes.c_int), ("left", ctypes.c_int), ("top", ctypes.c_int),
        ("scale_x", ctypes.c_double), ("scale_y", ctypes.c_double),
    ]


class Batch(ctypes.Structure):  # letterbox.cu
    _fields_ = [
        ("image", Image * MAX_IMAGES), ("out", ctypes.c_uint64), ("first", ctypes.c_int),
        ("out_h", ctypes.c_int), ("out_w", ctypes.c_int), ("half", ctypes.c_int), ("pad", ctypes.c_int),
    ]


def rows_to_image(rows, input_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """The letterbox undone on detection rows (x1, y1, x2, y2, score, class): boxes in the (input_hw) letterboxed
    input → the image's (image_hw) pixels, clipped to it, exactly as the official `scale_boxes` maps them.
    A new float32 array."""
    rows = np.array(rows, dtype=np.float32, copy=True).reshape(-1, DETECTION_ROW)
    if len(rows):
        rows[:, :4] = scale_boxes(input_hw, rows[:, :4], image_hw)
    return rows


def rows_to_images(dets: np.ndarray, counts: Sequence[int], input_hw: tuple[int, int],
                   image_hws: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """`rows_to_image` for a batch at once, with the same float32 arithmetic per image: dets [n, max_det, 6] with
    counts[i] rows for image i. Per image it took ~40 µs of numpy calls, a fifth of the host time of a 32-file
    batch (py-spy, run P). Each image's rows are a view of one new array."""
    n = len(image_hws)
    rows = np.array(dets[:n, : max(counts, default=0)], dtype=np.float32, copy=True)
    if rows.size:
        image_h, image_w = (np.array([hw[k] for hw in image_hws], np.float64) for k in (0, 1))
        gain = np.minimum(input_hw[0] / image_h, input_hw[1] / image_w)  # in double, as scale_boxes' floats
        pad_x, pad_y = (input_hw[1] - image_w * gain) / 2, (input_hw[0] - image_h * gain) / 2
        per_image = (slice(None), None, None)
        boxes = rows[..., :4]
        boxes[..., [0, 2]] -= pad_x.astype(np.float32)[per_image]
        boxes[..., [1, 3]] -= pad_y.astype(np.float32)[per_image]
        boxes /= gain.astype(np.float32)[per_image]
        boxes[..., [0, 2]] = np.clip(boxes[..., [0, 2]], np.float32(0), image_w.astype(np.float32)[per_image])
        boxes[..., [1, 3]] = np.clip(boxes[..., [1, 3]], np.float32(0), image_h.astype(np.float32)[per_image])
    return [rows[i, :k] for i, k in enumerate(counts)]


def rect_input_hw(image_hws: Sequence[tuple[int, int]], imgsz: tuple[int, int], stride: int,
                  size_range: tuple[int, int] | None = None) -> tuple[int, int]:
    """The smallest input (h, w) holding every image letterboxed as the official `auto=True` does (scaled to
    fit `imgsz`, padded to a multiple of `stride`): the largest of their rectangular shapes (for a batch of
    one shape, exactly Ultralytics' batch). Sides below `size_range`'s smallest grow to it (more padding)."""
    shapes = [letterboxed_shape(h, w, imgsz, stride) for h, w in image_hws]
    smallest = -(-size_range[0] // stride) * stride if size_range else 1
    return max(smallest, max(s[0] for s in shapes)), max(smallest, max(s[1] for s in shapes))


class Letterbox:
    """Official YOLOv5 letterbox (auto=False, scaleup=True) to a fixed (out_h, out_w), batched on the GPU;
    given `out_hw`, images scaled as for (out_h, out_w) and centred in that smaller canvas (rect)."""

    def __init__(self, out_h: int, out_w: int, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise TrtnetError(f"letterbox output dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.out_h, self.out_w, self.dtype = int(out_h), int(out_w), dtype

    def geometry(self, h: int, w: int, out_hw: tuple[int, int] | None = None,
                 ) -> tuple[float, tuple[int, int], tuple[int, int]]:
        """(ratio, (pad_left, pad_top), (new_w, new_h)) of an h x w image: how to map boxes back."""
        r, (new_w, new_h), (top, _, left, _) = letterbox_geometry(h, w, (self.out_h, self.out_w), canvas=out_hw)
        return r, (left, top), (new_w, new_h)

    def output_bytes(self, batch: int, out_hw: tuple[int, int] | None = None) -> int:
        out_h, out_w = out_hw or (self.out_h, self.out_w)
        return batch * 3 * out_h * out_w * (2 if self.dtype == "float16" else 4)

    def enqueue(self, stream: int, images: Sequence[int], heights: Sequence[int], widths: Sequence[int],
                out_ptr: int, pitches: Sequence[int] | None = None, out_hw: tuple[int, int] | None = None) -> None:
        """Letterbox images[i] (device address of an h x w x 3 uint8 BGR image whose rows are pitches[i]
        bytes apart, default 3*w) into batch item i of `out_ptr` [len(images), 3, out_h, out_w] (or out_hw)."""
        n = len(images)
        out_h, out_w = out_hw or (self.out_h, self.out_w)
        pitches = [3 * int(w) for w in widths] if pitches is None else pitches
        if not (len(heights) == len(widths) == len(pitches) == n):
            raise TrtnetError(f"letterbox: {n} images but {len(heights)} heights, {len(widths)} widths, "
                              f"{len(pitches)} pitches")
        for first in range(0, n, MAX_IMAGES):
            count = min(MAX_IMAGES, n - first)
            batch = Batch(out=int(out_ptr), first=first, out_h=out_h, out_w=out_w, half=DTYPES[self.dtype])
            for i in range(count):
                j = first + i
                batch.image[i] = self._image(images[j], int(heights[j]), int(widths[j]), int(pitches[j]), out_hw)
            grid = (math.ceil(out_w / 32), math.ceil(out_h / 8), count)
            cuda.launch("letterbox.letterbox", grid, (32, 8), [batch], stream)

    def _image(self, src: int, h: int, w: int, pitch: int, out_hw: tuple[int, int] | None) -> Image:
        if h < 1 or w < 1 or pitch < 3 * w:
            raise TrtnetError(f"letterbox: bad image {h}x{w} with row pitch {pitch} bytes (need >= {3 * w})")
        _, (left, top), (new_w, new_h) = self.geometry(h, w, out_hw)
        # cv2.resize: scale = 1 / (dst / src), in double
        return Image(src=int(src), h=h, w=w, pitch=pitch, new_w=new_w, new_h=new_h, left=left, top=top,
                     scale_x=1.0 / (new_w / w), scale_y=1.0 / (new_h / h))


# ------------------------------------------------------------------------------------------ classifiers


def imagenet_geometry(h: int, w: int, resize: int = 256, crop: int = 224) -> tuple[int, int, int, int]:
    """torchvision Resize(resize) + CenterCrop(crop): (resized h, resized w, crop top, crop left)."""
    if w <= h:
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_h, new_w = resize, int(resize * w / h)
    return new_h, new_w, int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ClsImage(ctypes.Structure):  # classify_preprocess.cu
    _fields_ = [("src", ctypes.c_uint64), ("h", ctypes.c_int), ("w", ctypes.c_int), ("pitch", ctypes.c_int),
                ("left", ctypes.c_int), ("top", ctypes.c_int), ("scale_x", ctypes.c_float),
                ("scale_y", ctypes.c_float)]


class ClsBatch(ctypes.Structure):  # classify_preprocess.cu
    _fields_ = [("image", ClsImage * MAX_IMAGES), ("out", ctypes.c_uint64), ("first", ctypes.c_int),
                ("out_h", ctypes.c_int), ("out_w", ctypes.c_int), ("half", ctypes.c_int),
                ("mean", ctypes.c_float * 3), ("std", ctypes.c_float * 3)]


class ImagenetPreprocess:
    """torchvision's ImageNet preprocessing (Resize(resize) + CenterCrop + ToTensor + Normalize) to
    (out_h, out_w), batched on the GPU."""

    def __init__(self, out_h: int, out_w: int, dtype: str = "float32", resize: int = 256):
        if dtype not in DTYPES:
            raise TrtnetError(f"preprocess output dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.out_h, self.out_w, self.dtype, self.resize = int(out_h), int(out_w), dtype, int(resize)

    def enqueue(self, stream: int, images: Sequence, pointers: Sequence[int], out_ptr: int) -> None:
        """Preprocess images[i] (HxWx3 uint8 BGR arrays, for their sizes) staged at device address
        pointers[i] into batch item i of `out_ptr` [len(images), 3, out_h, out_w]."""
        for first in range(0, len(images), MAX_IMAGES):
            count = min(MAX_IMAGES, len(images) - first)
            params = ClsBatch(out=int(out_ptr), first=first, out_h=self.out_h, out_w=self.out_w,
                              half=DTYPES[self.dtype], mean=(ctypes.c_float * 3)(*IMAGENET_MEAN),
                              std=(ctypes.c_float * 3)(*IMAGENET_STD))
            for i in range(count):
                h, w = images[first + i].shape[:2]
                new_h, new_w, top, left = imagenet_geometry(h, w, self.resize, min(self.out_h, self.out_w))
                params.image[i] = ClsImage(int(pointers[first + i]), h, w, w * 3, left, top, w / new_w, h / new_h)
            grid = (math.ceil(self.out_w / 32), math.ceil(self.out_h / 8), count)
            cuda.launch("classify_preprocess.imagenet", grid, (32, 8), [params], stream)
