"""NumPy references for the pre/post-processing kernels: the official YOLOv5 (v7.0) math, readably.

Used by the tests, the CPU reference executor and CPU validation. Float32 throughout, with the same
operation order as the official PyTorch code and torchvision's NMS, so thresholds decide alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_WH = 7680  # official class offset: boxes + cls * MAX_WH never overlap across classes
MAX_NMS = 30000  # official cap on the candidates that enter NMS (the highest scores are kept)


# ---------------------------------------------------------------- letterbox


def letterbox_geometry(h: int, w: int, new_shape, scaleup: bool = True, *, auto: bool = False, stride: int = 32,
                       canvas: tuple[int, int] | None = None,
                       ) -> tuple[float, tuple[int, int], tuple[int, int, int, int]]:
    """Official letterbox sizes: (ratio, (new_w, new_h), (top, bottom, left, right)); without `scaleup`
    the ratio is capped at 1 (val.py's loader pads its already resized images only).

    `auto` is the official `auto=True` (Ultralytics' predictor with rect): the image is scaled as for
    `new_shape` but padded only up to a multiple of `stride`. `canvas` (h, w) pads into that shape instead
    (a batch's common input: the image scaled as for `new_shape`, centred in the canvas).

    Python's round() (half to even) on purpose: it is what the official code calls. A side that rounds
    to 0 pixels is kept at 1 (the official code would crash in cv2.resize).
    """
    out_h, out_w = (new_shape, new_shape) if isinstance(new_shape, int) else new_shape
    r = min(out_h / h, out_w / w)
    if not scaleup:
        r = min(r, 1.0)
    new_w, new_h = max(1, int(round(w * r))), max(1, int(round(h * r)))
    if canvas is not None:
        out_h, out_w = canvas
    elif auto:
        out_h, out_w = new_h + (out_h - new_h) % stride, new_w + (out_w - new_w) % stride
    dw, dh = (out_w - new_w) / 2, (out_h - new_h) / 2
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    return r, (new_w, new_h), (top, bottom, left, right)


def letterboxed_shape(h: int, w: int, new_shape, stride: int = 32, scaleup: bool = True) -> tuple[int, int]:
    """The (h, w) the official `auto=True` letterbox gives an h x w image: scaled to fit `new_shape`, padded
    up to a multiple of `stride` (bus.jpg, 1080 x 810, at 640: 640 x 480)."""
    _, (new_w, new_h), (top, bottom, left, right) = letterbox_geometry(h, w, new_shape, scaleup, auto=True,
                                                                       stride=stride)
    return new_h + top + bottom, new_w + left + right


def letterbox(img_bgr: np.ndarray, new_shape, color: int = 114, scaleup: bool = True, *, auto: bool = False,
              stride: int = 32, canvas: tuple[int, int] | None = None):
    """Official `letterbox(im, new_shape, color, auto, scaleFill=False, scaleup, stride)` (auto: Ultralytics'
    `LetterBox(auto=True)`, padded only to a multiple of `stride`; `canvas`: see `letterbox_geometry`).

    Returns (img, (r, r), (dw, dh)) like the official function: the resized, padded uint8 HWC image.
    """
    import cv2  # only the letterbox reference needs OpenCV

    h, w = img_bgr.shape[:2]
    r, (new_w, new_h), (top, bottom, left, right) = letterbox_geometry(h, w, new_shape, scaleup, auto=auto,
                                                                       stride=stride, canvas=canvas)
    if (w, h) != (new_w, new_h):
        img_bgr = cv2.resize(img_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    img = cv2.copyMakeBorder(img_bgr, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(color,) * 3)
    out_h, out_w = img.shape[:2]
    return img, (r, r), ((out_w - new_w) / 2, (out_h - new_h) / 2)


def to_network_input(img_bgr_hwc: np.ndarray) -> np.ndarray:
    """uint8 BGR HWC (letterboxed) → float32 [1, 3, H, W] RGB in [0, 1], as the official loaders do."""
    chw_rgb = img_bgr_hwc.transpose(2, 0, 1)[::-1]
    return (np.ascontiguousarray(chw_rgb)[None].astype(np.float32)) / np.float32(255)


def scale_boxes(img1_shape, boxes: np.ndarray, img0_shape, ratio_pad=None) -> np.ndarray:
    """Official `scale_boxes`: xyxy boxes from the network input (img1 h, w) back to the original image
    (img0 h, w), clipped to it. Returns a new float32 array."""
    boxes = np.array(boxes, dtype=np.float32, copy=True)
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        pad = (img1_shape[1] - img0_shape[1] * gain) / 2, (img1_shape[0] - img0_shape[0] * gain) / 2
    else:
        gain, pad = ratio_pad[0][0], ratio_pad[1]
    boxes[:, [0, 2]] -= np.float32(pad[0])
    boxes[:, [1, 3]] -= np.float32(pad[1])
    boxes[:, :4] /= np.float32(gain)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, img0_shape[1])
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, img0_shape[0])
    return boxes


# ---------------------------------------------------------------- decode


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.float32(1) / (np.float32(1) + np.exp(-x))


def decode_official(raw_maps: Sequence[np.ndarray], strides: Sequence[int], anchors) -> np.ndarray:
    """Detect's inference output [B, N, nc+5]: xywh in input pixels, objectness, class probabilities.

    raw_maps: per level the 1x1 conv output [B, na*(nc+5), h, w]; anchors: per level na*2 pixel sizes.
    Rows are ordered level, anchor, y, x — the order the official Detect concatenates them in.
    """
    levels = []
    for raw, stride, level_anchors in zip(raw_maps, strides, anchors):
        b, channels, ny, nx = raw.shape
        anchor_wh = np.asarray(level_anchors, dtype=np.float32).reshape(-1, 1, 1, 2)
        na = anchor_wh.shape[0]
        y = sigmoid(raw.reshape(b, na, channels // na, ny, nx).transpose(0, 1, 3, 4, 2))
        gy, gx = np.meshgrid(np.arange(ny, dtype=np.float32), np.arange(nx, dtype=np.float32), indexing="ij")
        grid = np.stack((gx, gy), -1) - np.float32(0.5)
        xy = (y[..., 0:2] * 2 + grid) * np.float32(stride)
        wh = (y[..., 2:4] * 2) ** 2 * anchor_wh
        levels.append(np.concatenate((xy, wh, y[..., 4:]), -1).reshape(b, -1, channels // na))
    return np.concatenate(levels, 1)


def xywh2xyxy(x: np.ndarray) -> np.ndarray:
    half_wh = x[:, 2:4] / 2
    return np.concatenate((x[:, 0:2] - half_wh, x[:, 0:2] + half_wh), 1)


def candidates(decoded_image: np.ndarray, conf: float, multi_label: bool = False) -> np.ndarray:
    """One image's [N, nc+5] decoded rows → candidates [n, 6] (x1, y1, x2, y2, score, class) in the
    official order (anchor order; anchor then class with multi_label), before any sorting."""
    conf = np.float32(conf)
    x = decoded_image[decoded_image[:, 4] > conf]
    return _scored_rows(xywh2xyxy(x[:, :4]), x[:, 5:] * x[:, 4:5], conf, multi_label)


def _scored_rows(box: np.ndarray, scores: np.ndarray, conf: np.float32, multi_label: bool) -> np.ndarray:
    """Boxes [n, 4] xyxy and class scores [n, nc] → rows (x1, y1, x2, y2, score, class) above `conf`: every
    (box, class) pair with multi_label, else each box's best class."""
    if multi_label and scores.shape[1] > 1:
        i, j = np.nonzero(scores > conf)
        rows = (box[i], scores[i, j, None], j[:, None].astype(np.float32))
    else:
        j = scores.argmax(1)
        best = scores[np.arange(len(j)), j]
        keep = best > conf
        rows = (box[keep], best[keep, None], j[keep, None].astype(np.float32))
    return np.concatenate(rows, 1).astype(np.float32, copy=False)


def decode(raw_maps, strides, anchors, conf: float, multi_label: bool = False) -> list[np.ndarray]:
    """Raw head maps → per image all candidates [n, 6] above `conf` (what the decode kernel emits,
    before its capacity cap; see `top_candidates`)."""
    decoded = decode_official(raw_maps, strides, anchors)
    return [candidates(d, conf, multi_label) for d in decoded]


def by_score(cands: np.ndarray) -> np.ndarray:
    """Candidates sorted by descending score; ties keep their order (anchor, then class)."""
    return cands[np.argsort(-cands[:, 4], kind="stable")]


def top_candidates(cands: np.ndarray, capacity: int = MAX_NMS) -> tuple[np.ndarray, int]:
    """The `capacity` highest-scoring candidates (sorted) and the true count before the cap."""
    return by_score(cands)[:capacity], len(cands)


# ---------------------------------------------------------------- NMS


def box_areas(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def iou_one_to_many(box: np.ndarray, area: np.float32, boxes: np.ndarray, areas: np.ndarray) -> np.ndarray:
    """IoU in float32 with torchvision's formula and operation order: inter / (area_a + area_b - inter)."""
    w = np.maximum(np.float32(0), np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]))
    h = np.maximum(np.float32(0), np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]))
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 (two empty boxes) → NaN → not above
        return inter / (area + areas - inter)


def greedy_nms(boxes: np.ndarray, iou: float, max_keep: int | None = None) -> np.ndarray:
    """torchvision.ops.nms on boxes ALREADY sorted by descending score: indices kept, in order.

    Stopping at `max_keep` gives the same first `max_keep` indices as running to the end.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    areas = box_areas(boxes)
    thr = np.float32(iou)
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for i in range(len(boxes)):
        if suppressed[i]:
            continue
        keep.append(i)
        if max_keep is not None and len(keep) >= max_keep:
            break
        rest = slice(i + 1, None)
        suppressed[rest] |= iou_one_to_many(boxes[i], areas[i], boxes[rest], areas[rest]) > thr
    return np.asarray(keep, dtype=np.int64)


def nms(cands: np.ndarray, iou: float, max_det: int, agnostic: bool = False, max_nms: int = MAX_NMS):
    """Official NMS of one image's candidates [n, 6]: sort by score, keep the top `max_nms`, greedy
    NMS on boxes offset by class * MAX_WH (unless agnostic), at most `max_det` rows → [k, 6]."""
    x, _ = top_candidates(np.asarray(cands, dtype=np.float32).reshape(-1, 6), max_nms)
    offset = np.float32(0 if agnostic else MAX_WH)
    keep = greedy_nms(x[:, :4] + x[:, 5:6] * offset, iou, max_det)
    return x[keep]


def candidates_anchor_free(prediction_image: np.ndarray, conf: float, multi_label: bool = False) -> np.ndarray:
    """One image's anchor-free Detect output [4 + nc, N] (YOLOv8/YOLO11: cx, cy, w, h, class scores, no
    objectness) → candidates [n, 6] in Ultralytics' order (anchor; anchor then class with multi_label)."""
    conf = np.float32(conf)
    x = np.asarray(prediction_image, dtype=np.float32).T
    x = x[x[:, 4:].max(1) > conf]
    return _scored_rows(xywh2xyxy(x[:, :4]), x[:, 4:], conf, multi_label)


def non_max_suppression_anchor_free(prediction: np.ndarray, conf: float = 0.25, iou: float = 0.45,
                                    max_det: int = 300, multi_label: bool = False,
                                    agnostic: bool = False) -> list[np.ndarray]:
    """Ultralytics `utils.nms.non_max_suppression(prediction, conf, iou, agnostic=, multi_label=, max_det=)`
    on the anchor-free output [B, 4 + nc, N] (max_wh 7680, max_nms 30000) → per image [k, 6]."""
    return [nms(candidates_anchor_free(p, conf, multi_label), iou, max_det, agnostic) for p in np.asarray(prediction)]


def non_max_suppression(decoded: np.ndarray, conf: float = 0.25, iou: float = 0.45, max_det: int = 300,
                        multi_label: bool = False, agnostic: bool = False) -> list[np.ndarray]:
    """Official `non_max_suppression(prediction, conf, iou, classes=None, agnostic, multi_label,
    max_det)` on Detect's output [B, N, nc+5] → per image [k, 6] (x1, y1, x2, y2, conf, cls)."""
    return [nms(candidates(d, conf, multi_label), iou, max_det, agnostic) for d in np.asarray(decoded)]


def postprocess(outputs: Sequence[np.ndarray], *, nc: int, head: str = "anchors", strides=(), anchors=(),
                conf: float = 0.25, iou: float = 0.45, max_det: int = 300, multi_label: bool = False,
                agnostic: bool = False) -> list[np.ndarray]:
    """The official decode + NMS of a detection network's outputs, for either head kind; takes the keywords of
    plugins.postprocess.YoloPostprocess (a family's `postprocess_kwargs` plus the NMS settings)."""
    if head == "anchor_free":
        return non_max_suppression_anchor_free(outputs[0], conf, iou, max_det, multi_label, agnostic)
    decoded = decode_official(outputs, strides, anchors)
    return non_max_suppression(decoded, conf, iou, max_det, multi_label, agnostic)
