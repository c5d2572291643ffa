"""YOLO postprocess on the GPU: decode the engine's outputs and run exact NMS, on device pointers.

    post = YoloPostprocess(strides=[8, 16, 32], anchors=P5_ANCHORS, nc=80)      # YOLOv5: raw maps per level
    ws = post.workspace_bytes(batch, [(80, 80), (40, 40), (20, 20)])
    post.enqueue(stream, head_ptrs, "float16", batch, level_shapes, ws_ptr, dets_ptr, counts_ptr)

    post = YoloPostprocess(head="anchor_free", nc=80)                           # YOLOv8/YOLO11
    ws = post.workspace_bytes(batch, [(8400,)])                                 # output0 [B, 4 + nc, 8400]
    post.enqueue(stream, [output_ptr], "float16", batch, [(8400,)], ws_ptr, dets_ptr, counts_ptr)

For both heads `level_shapes` is each head output's shape after [B, C] (`shape[2:]`): (h, w) per level for
anchors, the one (N,) for the anchor-free output.

`dets` is float32 [batch, max_det, 6] (x1, y1, x2, y2, score, class in network-input pixels, by score
descending; rows past the count are zero) and `counts` int32 [batch]. Everything is queued on `stream`
without synchronising or copying data to the host; kernels compile on first use for the current device.
The result equals the official `non_max_suppression` (see official.py) on the same head maps.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from trtnet.errors import TrtnetError
from trtnet.plugins import cuda
from trtnet.plugins.official import MAX_WH

MAX_LEVELS = 5  # decode.cu
MAX_ANCHORS = 4  # decode.cu, per level
HIST_BINS = 65536  # decode.cu
SORT_CHUNK = 4096  # nms.cu
TILE = 2048  # nms.cu
HEAD_DTYPES = {"float32": 0, "float16": 1}
ALIGN = 256

P5_ANCHORS = ([10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326])
P6_ANCHORS = ([19, 27, 44, 40, 38, 94], [96, 68, 86, 152, 180, 137], [140, 301, 303, 264, 238, 542],
              [436, 615, 739, 380, 925, 792])

u64, i32, f32 = ctypes.c_uint64, ctypes.c_int, ctypes.c_float


@dataclass(frozen=True)
class NmsSettings:
    """The official non_max_suppression settings (its defaults), checked here for every place that takes
    them: the Detector, these kernels, the in-engine plugin and the build's metadata."""

    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 1000
    multi_label: bool = False
    agnostic: bool = False

    def __post_init__(self):
        if not (0.0 <= self.conf <= 1.0 and 0.0 <= self.iou <= 1.0):
            raise TrtnetError(f"NMS settings: conf ({self.conf}) and iou ({self.iou}) must lie in [0, 1]")
        if self.max_det < 1:
            raise TrtnetError(f"NMS settings: max_det must be at least 1 (got {self.max_det})")


class Heads(ctypes.Structure):  # decode.cu
    _fields_ = [
        ("ptr", u64 * MAX_LEVELS), ("h", i32 * MAX_LEVELS), ("w", i32 * MAX_LEVELS),
        ("first", i32 * (MAX_LEVELS + 1)), ("stride", f32 * MAX_LEVELS),
        ("anchor", f32 * (MAX_LEVELS * MAX_ANCHORS * 2)),
        ("levels", i32), ("na", i32), ("nc", i32), ("half", i32), ("multi_label", i32), ("conf", f32),
    ]


class Predictions(ctypes.Structure):  # decode.cu, the anchor-free head
    _fields_ = [("ptr", u64), ("n", i32), ("nc", i32), ("half", i32), ("multi_label", i32), ("conf", f32)]


# head → its decode, overflow-select and re-emit kernels in decode.cu
DECODE_KERNELS = {
    "anchors": ("decode.decode_candidates", "decode.select_digit", "decode.emit_top"),
    "anchor_free": ("decode.decode_anchor_free", "decode.select_digit_anchor_free", "decode.emit_top_anchor_free"),
}
HEADS = tuple(DECODE_KERNELS)


class Candidates(ctypes.Structure):  # common.cuh
    _fields_ = [("state", u64), ("hist", u64), ("key", u64), ("box", u64), ("cls", u64), ("capacity", i32)]


class Sorted(ctypes.Structure):  # nms.cu
    _fields_ = [
        ("key", u64 * 2), ("slot", u64 * 2), ("obox", u64), ("mask", u64), ("kept", u64), ("kept_box", u64),
        ("dets", u64), ("counts", u64), ("max_det", i32), ("iou", f32), ("class_offset", f32),
    ]


STATE_BYTES = 32  # sizeof(ImageState): u32 count (true candidate count), emitted, done, rank; u64 x2


@dataclass(frozen=True)
class Layout:
    """Byte offsets of the workspace parts (all ALIGN-aligned); `state` holds per image the true
    candidate count as its first uint32 (stride STATE_BYTES)."""

    state: int
    hist: int
    key: int
    box: int
    cls: int
    sort_key: tuple[int, int]
    sort_slot: tuple[int, int]
    obox: int
    mask: int
    kept: int
    kept_box: int
    total: int


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def layout(batch: int, capacity: int, max_det: int) -> Layout:
    sizes = {
        "state": batch * STATE_BYTES, "hist": batch * HIST_BINS * 4,
        "key": batch * capacity * 8, "box": batch * capacity * 16, "cls": batch * capacity * 4,
        "key_a": batch * capacity * 8, "key_b": batch * capacity * 8,
        "slot_a": batch * capacity * 4, "slot_b": batch * capacity * 4,
        "obox": batch * capacity * 16, "mask": batch * TILE * (TILE // 64) * 8,
        "kept": batch * max_det * 4, "kept_box": batch * max_det * 16,
    }
    at, offsets = 0, {}
    for name, size in sizes.items():
        offsets[name] = at
        at += _aligned(size)
    return Layout(
        state=offsets["state"], hist=offsets["hist"], key=offsets["key"], box=offsets["box"],
        cls=offsets["cls"], sort_key=(offsets["key_a"], offsets["key_b"]),
        sort_slot=(offsets["slot_a"], offsets["slot_b"]), obox=offsets["obox"], mask=offsets["mask"],
        kept=offsets["kept"], kept_box=offsets["kept_box"], total=at,
    )


_layout = functools.lru_cache(maxsize=64)(layout)  # asked for on every run: the same few batch sizes


def merge_rounds(capacity: int) -> int:
    """Merge rounds after the chunk sort: sorted runs double from SORT_CHUNK until they cover capacity."""
    return (math.ceil(capacity / SORT_CHUNK) - 1).bit_length()


class YoloPostprocess:
    """Decode + exact NMS on the GPU (the official postprocess, batched): of YOLOv5 head maps
    (`head="anchors"`, with strides and anchors) or of the YOLOv8/YOLO11 output [B, 4 + nc, N]
    (`head="anchor_free"`: boxes already decoded in the network, no strides or anchors)."""

    def __init__(self, *, nc, head="anchors", strides=(), anchors=(), conf=0.25, iou=0.45, max_det=1000,
                 multi_label=False, agnostic=False, capacity=30000):
        if head not in HEADS:
            raise TrtnetError(f"YoloPostprocess: head must be one of {', '.join(HEADS)} (got {head!r})")
        self.head = head
        self.strides = [int(s) for s in strides]
        self.anchors = [[float(a) for a in level] for level in anchors]
        nms = NmsSettings(float(conf), float(iou), int(max_det), bool(multi_label), bool(agnostic))
        self.conf, self.iou, self.max_det = nms.conf, nms.iou, nms.max_det
        self.multi_label, self.agnostic = nms.multi_label, nms.agnostic
        self.nc, self.capacity = int(nc), int(capacity)
        self._workspace_bytes: dict[tuple, int] = {}  # by (batch, level shapes)
        self._check()

    def _check(self) -> None:
        if self.nc < 1 or self.capacity < 1:
            raise TrtnetError(f"nc and capacity must be positive (got {self.nc}, {self.capacity})")
        if self.head == "anchor_free":
            if self.strides or self.anchors:
                raise TrtnetError("YoloPostprocess: the anchor-free head takes no strides or anchors")
            self.na = 1
            return
        levels = len(self.strides)
        if not 1 <= levels <= MAX_LEVELS or len(self.anchors) != levels:
            raise TrtnetError(
                f"YoloPostprocess needs 1..{MAX_LEVELS} levels with one anchor list each "
                f"(got {levels} strides, {len(self.anchors)} anchor lists)"
            )
        na = len(self.anchors[0]) // 2
        if not 1 <= na <= MAX_ANCHORS or any(len(a) != 2 * na for a in self.anchors):
            raise TrtnetError(
                f"anchors must be, per level, the same number (1..{MAX_ANCHORS}) of w,h pixel pairs; "
                f"got {self.anchors}"
            )
        self.na = na

    # ------------------------------------------------------------ sizes

    def layout(self, batch: int) -> Layout:
        return _layout(batch, self.capacity, self.max_det)

    def workspace_bytes(self, batch: int, level_shapes: Sequence[tuple[int, int]]) -> int:
        key = (batch, tuple(tuple(shape) for shape in level_shapes))
        if key not in self._workspace_bytes:  # asked for on every run: validate and size each shape once
            self._params(list(range(len(level_shapes))), "float32", level_shapes)  # validates the shapes
            self._workspace_bytes[key] = self.layout(batch).total + ALIGN  # room to align the pointer
        return self._workspace_bytes[key]

    # ------------------------------------------------------------ enqueue

    def enqueue(self, stream: int, head_ptrs: Sequence[int], head_dtype: str, batch: int,
                level_shapes: Sequence[tuple[int, int]], workspace_ptr: int, dets_ptr: int,
                counts_ptr: int) -> None:
        """Decode + NMS, asynchronously on `stream`: dets [batch, max_det, 6] float32, counts [batch] int32."""
        if batch < 1:
            return
        self.decode(stream, head_ptrs, head_dtype, batch, level_shapes, workspace_ptr)
        self.nms(stream, batch, workspace_ptr, dets_ptr, counts_ptr)

    def decode(self, stream: int, head_ptrs: Sequence[int], head_dtype: str, batch: int,
               level_shapes: Sequence[tuple[int, int]], workspace_ptr: int) -> None:
        """Head outputs → per-image candidates in the workspace (the `capacity` best; true count kept)."""
        params = self._params(head_ptrs, head_dtype, level_shapes)
        base = _aligned(int(workspace_ptr))
        lay = self.layout(batch)
        cand = self._candidates(base, lay)
        cuda.memset32(base + lay.state, 0, batch * STATE_BYTES // 4, stream)
        total = params.n if self.head == "anchor_free" else params.first[len(self.strides)]
        decode, select_digit, emit_top = DECODE_KERNELS[self.head]
        grid = (math.ceil(total / 256), batch)
        cuda.launch(decode, grid, (256,), [params, cand], stream)
        for digit in range(4):  # no-ops unless an image has more candidates than capacity
            cuda.launch(select_digit, grid, (256,), [params, cand, i32(digit)], stream)
        cuda.launch(emit_top, grid, (256,), [params, cand], stream)

    def nms(self, stream: int, batch: int, workspace_ptr: int, dets_ptr: int, counts_ptr: int) -> None:
        """NMS of the candidates that `decode` (or `nms_candidates`) left in the workspace."""
        base = _aligned(int(workspace_ptr))
        lay = self.layout(batch)
        cand, srt = self._candidates(base, lay), self._sorted(base, lay, dets_ptr, counts_ptr)
        rounds = merge_rounds(self.capacity)
        chunks = math.ceil(self.capacity / SORT_CHUNK)
        cuda.launch("nms.nms_sort_chunks", (chunks, batch), (1024,), [cand, srt, i32(rounds == 0)], stream)
        per_element = (math.ceil(self.capacity / 256), batch)
        for r in range(rounds):
            args = [cand, srt, i32(SORT_CHUNK << r), i32(r % 2), i32(r == rounds - 1)]
            cuda.launch("nms.nms_merge", per_element, (256,), args, stream)
        words = math.ceil(min(self.capacity, TILE) / 64)
        cuda.launch("nms.nms_mask", (words, words, batch), (64,), [cand, srt], stream)
        cuda.launch("nms.nms_scan", (batch,), (256,), [cand, srt, i32(rounds % 2)], stream)

    def nms_candidates(self, stream: int, boxes_ptr: int, scores_ptr: int, classes_ptr: int,
                       candidate_counts_ptr: int, batch: int, workspace_ptr: int, dets_ptr: int,
                       counts_ptr: int) -> None:
        """NMS alone on given candidates: boxes float32 [batch, capacity, 4] (xyxy), scores float32
        [batch, capacity], classes int32 [batch, capacity], counts int32 [batch] (valid rows per image).
        Ties in score keep the lower row first."""
        if batch < 1:
            return
        base = _aligned(int(workspace_ptr))
        cand = self._candidates(base, self.layout(batch))
        args = [cand, u64(boxes_ptr), u64(scores_ptr), u64(classes_ptr), u64(candidate_counts_ptr)]
        cuda.launch("nms.nms_pack", (math.ceil(self.capacity / 256), batch), (256,), args, stream)
        self.nms(stream, batch, workspace_ptr, dets_ptr, counts_ptr)

    # ------------------------------------------------------------ kernel parameters

    def _params(self, head_ptrs, head_dtype: str, level_shapes) -> Heads | Predictions:
        if head_dtype not in HEAD_DTYPES:
            raise TrtnetError(f"head dtype must be one of {sorted(HEAD_DTYPES)}, got {head_dtype!r}")
        if self.head == "anchor_free":
            return self._predictions(head_ptrs, head_dtype, level_shapes)
        return self._heads(head_ptrs, head_dtype, level_shapes)

    def _predictions(self, head_ptrs, head_dtype: str, level_shapes) -> Predictions:
        shapes = [tuple(s) for s in level_shapes]
        if len(head_ptrs) != 1 or len(shapes) != 1 or len(shapes[0]) != 1 or int(shapes[0][0]) < 1:
            raise TrtnetError(
                f"the anchor-free YoloPostprocess takes one output [B, 4 + nc, N]: one pointer and level shapes "
                f"[(N,)] (got {len(head_ptrs)} pointers, shapes {shapes})"
            )
        n = int(shapes[0][0])
        if n * self.nc >= 2**32:
            raise TrtnetError(f"{n} boxes x {self.nc} classes is too many for 32-bit candidate indices")
        return Predictions(ptr=int(head_ptrs[0]), n=n, nc=self.nc, half=HEAD_DTYPES[head_dtype],
                           multi_label=int(self.multi_label), conf=self.conf)

    def _heads(self, head_ptrs, head_dtype: str, level_shapes) -> Heads:
        levels = len(self.strides)
        if len(head_ptrs) != levels or len(level_shapes) != levels:
            raise TrtnetError(
                f"YoloPostprocess has {levels} levels but got {len(head_ptrs)} head pointers and "
                f"{len(level_shapes)} level shapes"
            )
        heads = Heads(levels=levels, na=self.na, nc=self.nc, half=HEAD_DTYPES[head_dtype],
                      multi_label=int(self.multi_label), conf=self.conf)
        total = 0
        for level, ((h, w), ptr, stride, anchors) in enumerate(
            zip(level_shapes, head_ptrs, self.strides, self.anchors)
        ):
            heads.ptr[level], heads.h[level], heads.w[level] = int(ptr), int(h), int(w)
            heads.first[level], heads.stride[level] = total, stride
            for k, value in enumerate(anchors):
                heads.anchor[level * MAX_ANCHORS * 2 + k] = value
            total += self.na * int(h) * int(w)
        heads.first[levels] = total
        if total * self.nc >= 2**32:
            raise TrtnetError(f"{total} anchors x {self.nc} classes is too many for 32-bit candidate indices")
        return heads

    def _candidates(self, base: int, lay: Layout) -> Candidates:
        return Candidates(state=base + lay.state, hist=base + lay.hist, key=base + lay.key, box=base + lay.box,
                          cls=base + lay.cls, capacity=self.capacity)

    def _sorted(self, base: int, lay: Layout, dets_ptr: int, counts_ptr: int) -> Sorted:
        srt = Sorted(obox=base + lay.obox, mask=base + lay.mask, kept=base + lay.kept,
                     kept_box=base + lay.kept_box, dets=int(dets_ptr), counts=int(counts_ptr),
                     max_det=self.max_det, iou=self.iou, class_offset=0.0 if self.agnostic else MAX_WH)
        for i in range(2):
            srt.key[i] = base + lay.sort_key[i]
            srt.slot[i] = base + lay.sort_slot[i]
        return srt
