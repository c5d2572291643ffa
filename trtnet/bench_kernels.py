"""Kernel benchmark (GPU): `python -m trtnet.bench kernels`.

- letterbox of 1080p frames to 640x640 vs the official cv2 letterbox + /255 on the CPU;
- decode + NMS of yolov5s-640-shaped heads (25200 anchors, detector-like scores) vs the official PyTorch
  postprocess on the GPU (Detect's sigmoid/grid decode + non_max_suppression with torchvision);
- our NMS alone vs torchvision.ops.batched_nms (the official per-image loop) on the same candidates.

GPU times are CUDA-event medians after warm-up; CPU times are perf_counter medians. torch and
torchvision are only needed here, for the baselines and to allocate device memory.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Callable

import numpy as np

from trtnet import cli
from trtnet.engine_meta import DETECTION_ROW
from trtnet.errors import TrtnetError
from trtnet.plugins import official as ref
from trtnet.plugins.postprocess import P5_ANCHORS, YoloPostprocess
from trtnet.plugins.preprocess import Letterbox

STRIDES = [8, 16, 32]
LEVELS_640 = [(80, 80), (40, 40), (20, 20)]
NC = 80


def _torch():
    try:
        import torch
        import torchvision
    except ImportError as exc:
        raise TrtnetError(f"the kernel benchmark needs torch and torchvision with CUDA ({exc})") from exc
    if not torch.cuda.is_available():
        raise TrtnetError("the kernel benchmark needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    return torch, torchvision


def gpu_median_ms(torch, fn: Callable[[], object], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(torch, launch: Callable[[], object]) -> Callable[[], object]:
    """`launch`'s kernels captured once in a CUDA graph and replayed with one launch: how the runtime
    runs them with cuda_graphs=True (at batch 1 the launches, not the GPU work, dominate)."""
    launch()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    return graph.replay


def cpu_median_ms(fn: Callable[[], object], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def detector_like_heads(rng, batch: int, levels=LEVELS_640, na: int = 3) -> list[np.ndarray]:
    """Raw head maps whose scores look like a trained detector's: ~1% of anchors above 0.25 (some
    hundred candidates at 640) in clusters of neighbouring anchors that NMS thins out, one dominant
    class per image region."""
    maps = []
    for h, w in levels:
        m = rng.normal(0.0, 0.3, (batch, na, NC + 5, h, w)).astype(np.float32)  # boxes ~ anchor-sized
        noise = rng.normal(0.0, 1.0, (batch, na, h, w))
        blurred = sum(np.roll(noise, (dy, dx), (-2, -1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 3
        m[:, :, 4] = -6.2 + 2.5 * blurred  # unit variance again, correlated with the neighbours
        m[:, :, 5:] = rng.normal(-6.0, 2.0, (batch, na, NC, h, w))
        b, a, y, x = np.indices((batch, na, h, w))
        cls = (y // 4 + x // 4) % NC  # a region votes for one class
        m[b, a, 5 + cls, y, x] += rng.uniform(3.0, 10.0, (batch, na, h, w)).astype(np.float32)
        maps.append(m.reshape(batch, na * (NC + 5), h, w))
    return maps


# ---------------------------------------------------------------- official PyTorch postprocess


class OfficialPostprocess:
    """YOLOv5 v7.0 Detect (inference decode) + utils.general.non_max_suppression, in PyTorch."""

    def __init__(self, torch, torchvision, levels, conf=0.25, iou=0.45, max_det=1000):
        self.torch, self.torchvision = torch, torchvision
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.grids, self.anchor_grids = [], []
        for (h, w), anchors in zip(levels, P5_ANCHORS):
            yv, xv = torch.meshgrid(torch.arange(h, device="cuda"), torch.arange(w, device="cuda"), indexing="ij")
            self.grids.append(torch.stack((xv, yv), 2).expand(1, 3, h, w, 2).float() - 0.5)
            a = torch.tensor(anchors, dtype=torch.float32, device="cuda").view(1, 3, 1, 1, 2)
            self.anchor_grids.append(a.expand(1, 3, h, w, 2))

    def decode(self, heads):
        torch, out = self.torch, []
        for x, grid, anchor_grid, stride in zip(heads, self.grids, self.anchor_grids, STRIDES):
            bs, _, ny, nx = x.shape
            y = x.float().view(bs, 3, NC + 5, ny, nx).permute(0, 1, 3, 4, 2).sigmoid()
            xy, wh, rest = y.split((2, 2, NC + 1), 4)
            xy = (xy * 2 + grid) * stride
            wh = (wh * 2) ** 2 * anchor_grid
            out.append(torch.cat((xy, wh, rest), 4).view(bs, -1, NC + 5))
        return torch.cat(out, 1)

    def __call__(self, heads):
        return self.non_max_suppression(self.decode(heads))

    def non_max_suppression(self, prediction):
        torch = self.torch
        xc = prediction[..., 4] > self.conf
        output = [torch.zeros((0, 6), device=prediction.device)] * prediction.shape[0]
        for xi, x in enumerate(prediction):
            x = x[xc[xi]]
            if not x.shape[0]:
                continue
            x[:, 5:] *= x[:, 4:5]
            box = torch.cat((x[:, :2] - x[:, 2:4] / 2, x[:, :2] + x[:, 2:4] / 2), 1)
            conf, j = x[:, 5:].max(1, keepdim=True)
            x = torch.cat((box, conf, j.float()), 1)[conf.view(-1) > self.conf]
            if not x.shape[0]:
                continue
            x = x[x[:, 4].argsort(descending=True)[:30000]]
            i = self.torchvision.ops.nms(x[:, :4] + x[:, 5:6] * ref.MAX_WH, x[:, 4], self.iou)[: self.max_det]
            output[xi] = x[i]
        return output


# ---------------------------------------------------------------- cases


def bench_letterbox(torch, batch: int, iters: int, warmup: int) -> dict:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8) for _ in range(batch)]
    on_gpu = [torch.from_numpy(f).cuda() for f in frames]
    out = torch.empty((batch, 3, 640, 640), device="cuda")
    lb = Letterbox(640, 640)
    stream = torch.cuda.current_stream().cuda_stream

    def ours():
        lb.enqueue(stream, [f.data_ptr() for f in on_gpu], [1080] * batch, [1920] * batch, out.data_ptr())

    def official():
        for f in frames:
            ref.to_network_input(ref.letterbox(f, 640)[0])

    return row("letterbox 1080p→640", batch, gpu_median_ms(torch, ours, iters, warmup),
               "cv2 (CPU)", cpu_median_ms(official, max(3, iters // 10), 1))


def bench_postprocess(torch, torchvision, batch: int, iters: int, warmup: int) -> dict:
    maps = detector_like_heads(np.random.default_rng(1), batch)
    heads = [torch.from_numpy(m).cuda() for m in maps]
    post = YoloPostprocess(strides=STRIDES, anchors=P5_ANCHORS, nc=NC)
    workspace = torch.empty(post.workspace_bytes(batch, LEVELS_640), dtype=torch.uint8, device="cuda")
    dets = torch.empty((batch, post.max_det, DETECTION_ROW), device="cuda")
    counts = torch.empty((batch,), dtype=torch.int32, device="cuda")
    official = OfficialPostprocess(torch, torchvision, LEVELS_640)

    def ours():
        post.enqueue(torch.cuda.current_stream().cuda_stream, [h.data_ptr() for h in heads], "float32", batch,
                     LEVELS_640, workspace.data_ptr(), dets.data_ptr(), counts.data_ptr())

    return ours_vs(torch, "decode + NMS yolov5s-640", batch, ours, iters, warmup,
                   "official PyTorch", gpu_median_ms(torch, lambda: official(heads), iters, warmup))


def bench_nms(torch, torchvision, batch: int, iters: int, warmup: int, per_image: int) -> dict:
    rng = np.random.default_rng(2)
    cands = []
    for _ in range(batch):
        xy = rng.uniform(0, 640, (per_image, 2))
        wh = rng.uniform(8, 160, (per_image, 2))
        cands.append(np.column_stack([xy, xy + wh, rng.uniform(0.25, 1, per_image),
                                      rng.integers(0, NC, per_image)]).astype(np.float32))
    post = YoloPostprocess(strides=STRIDES, anchors=P5_ANCHORS, nc=NC, capacity=per_image)
    stacked = torch.from_numpy(np.stack(cands)).cuda()
    boxes, scores = stacked[..., :4].contiguous(), stacked[..., 4].contiguous()
    classes = stacked[..., 5].int().contiguous()
    n = torch.full((batch,), per_image, dtype=torch.int32, device="cuda")
    workspace = torch.empty(post.workspace_bytes(batch, LEVELS_640), dtype=torch.uint8, device="cuda")
    dets = torch.empty((batch, post.max_det, DETECTION_ROW), device="cuda")
    counts = torch.empty((batch,), dtype=torch.int32, device="cuda")

    def ours():
        post.nms_candidates(torch.cuda.current_stream().cuda_stream, boxes.data_ptr(), scores.data_ptr(),
                            classes.data_ptr(), n.data_ptr(), batch, workspace.data_ptr(), dets.data_ptr(),
                            counts.data_ptr())

    def official():
        for b in range(batch):
            torchvision.ops.batched_nms(boxes[b], scores[b], classes[b], 0.45)[: post.max_det]

    return ours_vs(torch, f"NMS alone, {per_image} boxes/image", batch, ours, iters, warmup,
                   "torchvision batched_nms", gpu_median_ms(torch, official, iters, warmup))


def ours_vs(torch, case: str, batch: int, ours: Callable[[], object], iters: int, warmup: int, baseline: str,
            baseline_ms: float) -> list[dict]:
    """Our kernels launched one by one and replayed as a CUDA graph, each against the same baseline (its
    data-dependent shapes keep torchvision's NMS out of CUDA graphs)."""
    return [row(case, batch, gpu_median_ms(torch, ours, iters, warmup), baseline, baseline_ms),
            row(f"{case}, CUDA graph", batch, gpu_median_ms(torch, graphed(torch, ours), iters, warmup), baseline,
                baseline_ms)]


def row(case: str, batch: int, ours_ms: float, baseline: str, baseline_ms: float) -> dict:
    return {"case": case, "batch": batch, "ours_ms": round(ours_ms, 4), "baseline": baseline,
            "baseline_ms": round(baseline_ms, 4), "speedup": round(baseline_ms / ours_ms, 1)}


def bench_kernels(batch_sizes: Sequence[int] = (1, 32), iters: int = 100, warmup: int = 10) -> list[dict]:
    torch, torchvision = _torch()
    torch.zeros(1, device="cuda")  # a CUDA context for the kernels
    rows = []
    for batch in batch_sizes:
        rows.append(bench_letterbox(torch, batch, iters, warmup))
        rows += bench_postprocess(torch, torchvision, batch, iters, warmup)
        for per_image in (300, 5000):
            rows += bench_nms(torch, torchvision, batch, iters, warmup, per_image)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    header = ("case", "batch", "ours ms", "baseline", "baseline ms", "speedup")
    cells = [header] + [(r["case"], str(r["batch"]), f"{r['ours_ms']:.3f}", r["baseline"],
                         f"{r['baseline_ms']:.3f}", f"{r['speedup']}x") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def parser():
    p = cli.command_parser("bench kernels", "letterbox / decode + NMS kernels vs cv2, PyTorch and torchvision (GPU)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes")
    p.add_argument("--iters", type=int, default=100, help="timed iterations per case")
    p.add_argument("--warmup", type=int, default=10, help="untimed iterations first")
    return p


def main(argv: Sequence[str] | None = None) -> int | None:
    args = parser().parse_args(argv)
    print(format_table(bench_kernels(args.batch, args.iters, args.warmup)))
    return 0
