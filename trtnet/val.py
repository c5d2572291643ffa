"""`python -m trtnet.val`: COCO mAP of a detection engine, top-1/top-5 of a classifier, on a dataset.

The loops here know nothing about engines: they take a `predict` callable, so anything that maps images
to detections (an engine, the PyTorch model, a file of saved results) can be evaluated the same way.

To reproduce the official `val.py` numbers (golden_yolov5n_coco128_val.json: batch 16, 640, conf 0.001,
NMS IoU 0.6, max_det 300, multi-label NMS) a predictor must prepare each image of a batch as
`trtnet.datasets.letterbox_for_val(image, imgsz, shape)` does (resize the long side to imgsz with
INTER_AREA, then pad to the batch's shape without resizing again) and map boxes back with its ratio_pad
(official `scale_boxes`, clipped). Run this way on the CPU reference executor, yolov5n's detections
give the official numbers to 4 decimals under YOLOv5's own statistics, and trtnet's (pycocotools)
numbers sit slightly above them (see trtnet.metrics). Square 640 batches, or one resize straight to
the batch shape, lose about 1.2 points of mAP@0.5:0.95 and 2 of mAP@0.5.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from trtnet.cli import command_parser, run
from trtnet.datasets import (
    ClassificationDataset,
    DetectionDataset,
    batch_shapes,
    letterbox_for_val,
    load_classification_dataset,
    load_detection_dataset,
)
from trtnet.errors import TrtnetError
from trtnet.fileio import atomic_write
from trtnet.metrics import (
    ClassificationMetrics,
    DetectionMetrics,
    Detections,
    classification_metrics,
    detection_metrics,
)
from trtnet.quant.options import add_int8_arguments, int8_options

# (BGR images of one batch, letterbox shape (height, width)) -> per image (boxes xyxy in original-image
# pixels, scores, classes), after NMS with val.py's settings.
DetectionPredictor = Callable[[list, tuple], Sequence[Detections]]
# BGR images of one batch -> class scores [batch, classes].
ClassificationPredictor = Callable[[list], np.ndarray]


def evaluate_detection(
    dataset: DetectionDataset,
    predict: DetectionPredictor,
    imgsz: int = 640,
    batch: int = 16,
    stride: int = 32,
    pad: float = 0.5,
    rect: bool = True,
    max_det: int = 300,
    verbose: bool = False,
    check_shapes: Callable[[np.ndarray], None] | None = None,
    read: Callable[[list], list] | None = None,
    progress: bool | None = None,
) -> DetectionMetrics:
    """Run `predict` over the dataset in val.py's batches and score the detections. `check_shapes` sees
    every batch's (height, width) before the first batch runs (e.g. to refuse an engine that cannot
    take them). `read` maps a batch's sample indices to their BGR images (default: `dataset.read`). `progress`:
    a progress bar (default: with `verbose`)."""
    order, shapes = val_batches(dataset, imgsz, batch, stride, pad, rect)
    if check_shapes is not None:
        check_shapes(shapes)
    detections: list = [None] * len(dataset)
    progress = verbose if progress is None else progress
    for b, (height, width) in enumerate(tqdm(shapes, desc="val", unit="batch", disable=not progress)):
        indices = order[b * batch:(b + 1) * batch]
        images = read(list(indices)) if read is not None else [dataset.read(i) for i in indices]
        outputs = predict(images, (int(height), int(width)))
        if len(outputs) != len(indices):
            raise ValueError(f"predict returned {len(outputs)} results for a batch of {len(indices)} images")
        for i, output in zip(indices, outputs):
            detections[i] = output
    return detection_metrics(dataset.samples, detections, max_det=max_det, verbose=verbose)


def val_batches(dataset: DetectionDataset, imgsz: int = 640, batch: int = 16, stride: int = 32, pad: float = 0.5,
                rect: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Image order and per-batch letterbox (height, width). With `rect` (val.py's choice for PyTorch
    models) batches are grouped by aspect ratio and each has its own shape, up to imgsz + stride;
    without it every batch is `imgsz` x `imgsz` in file order (val.py's choice for exported engines)."""
    if rect:
        return batch_shapes([(s.width, s.height) for s in dataset], imgsz, stride, pad, batch)
    return np.arange(len(dataset)), np.full(((len(dataset) + batch - 1) // batch, 2), imgsz)


def dataset_reader(dataset: DetectionDataset, decode: str, engine=None) -> Callable[[list], list] | None:
    """Batch reads through trtnet.image_decoding (GPU decode on `engine`'s GPU, pixels back to the host for
    val's letterbox); None for "cpu", which keeps `dataset.read`."""
    if decode == "cpu":
        return None
    from trtnet.image_decoding import FileDecoder, host_images

    if engine is not None:
        engine.use_device()
    decoder = FileDecoder(decode, device=engine.device_index if engine is not None else None)
    return lambda indices: host_images(decoder, [dataset.samples[i].path for i in indices])


def check_engine_takes(engine, shapes: np.ndarray) -> None:
    """Refuse before the first batch when the engine cannot take every batch shape."""
    for height, width in {(int(h), int(w)) for h, w in shapes}:
        engine.check_size((height, width))


def evaluate_classification(
    dataset: ClassificationDataset, predict: ClassificationPredictor, batch: int = 32, verbose: bool = False
) -> ClassificationMetrics:
    scores = []
    for start in tqdm(range(0, len(dataset), batch), desc="val", unit="batch", disable=not verbose):
        scores.append(np.asarray(predict([dataset.read(i) for i in range(start, min(start + batch, len(dataset)))])))
    return classification_metrics(np.concatenate(scores), dataset.labels)


def engine_predictor(engine: str, task: str, args) -> tuple[Callable, Any]:
    """A predictor that runs a trtnet engine, and the engine: the official val preprocessing on the CPU
    (it decides the mAP: see the module docstring), the engine and decode + NMS kernels on the GPU."""
    if task == "classify":
        from trtnet.api import Classifier

        classifier = Classifier(engine)
        return classifier.pipeline.run, classifier.engine
    from trtnet.api import Detector

    iou = args.iou if args.iou is not None else val_iou(engine)
    detector = Detector(engine, conf=args.conf, iou=iou, max_det=args.max_det, multi_label=True)
    return functools.partial(predict_letterboxed, detector.pipeline, args.imgsz), detector.engine


def cpu_predictor(args) -> tuple[Callable, Any]:
    """A predictor that runs the network trtnet.build would build from the weights `args.engine` on the CPU
    (the reference executor; with --int8 the Q/DQ network of that calibration), val.py's batch preprocessing
    and the official decode + NMS; and the CpuDetector."""
    from trtnet import networks
    from trtnet.cpu import CpuDetector

    detector = CpuDetector(args.engine, conf=args.conf, iou=0.0, max_det=args.max_det, multi_label=True,
                           imgsz=args.imgsz, rect=True, int8=int8_options(args))
    family = networks.family(detector.model.family)
    iou = args.iou if args.iou is not None else float(getattr(family, "VAL_IOU", 0.6))
    detector.settings = dataclasses.replace(detector.settings, iou=iou)
    return functools.partial(predict_on_cpu, detector, args.imgsz), detector


def predict_on_cpu(detector, imgsz: int, images: list, shape: tuple) -> list:
    """One batch as `predict_letterboxed`, each image through the CPU network in turn."""
    x, ratio_pads = val_input(images, imgsz, shape)
    rows = [detector.rows_of_input(x[i:i + 1]) for i in range(len(images))]
    return to_image_pixels(rows, images, shape, ratio_pads)


def val_iou(engine: str) -> float:
    """The NMS IoU of the engine family's official validator (`VAL_IOU`: Ultralytics' 0.7), else val.py's 0.6."""
    from trtnet import networks
    from trtnet.engine_files import load_metadata, resolve_engine

    family = networks.family(load_metadata(resolve_engine(engine)).family)
    return float(getattr(family, "VAL_IOU", 0.6))


def predict_letterboxed(pipeline, imgsz: int, images: list, shape: tuple) -> list:
    """One batch: official letterbox into `shape`, engine + decode/NMS, boxes back to image pixels."""
    x, ratio_pads = val_input(images, imgsz, shape)
    return to_image_pixels(pipeline.run_letterboxed(x), images, shape, ratio_pads)


def val_input(images: list, imgsz: int, shape: tuple) -> tuple[np.ndarray, list]:
    """val.py's batch preprocessing: every image letterboxed into `shape` and stacked as the network input
    (float32 RGB NCHW / 255), with each image's (ratio, pad) for mapping boxes back."""
    from trtnet.plugins.official import to_network_input

    prepared = [letterbox_for_val(image, imgsz, shape) for image in images]
    return np.concatenate([to_network_input(padded) for padded, _ in prepared]), [rp for _, rp in prepared]


def to_image_pixels(rows: list, images: list, shape: tuple, ratio_pads: list) -> list:
    """Detection rows (x1, y1, x2, y2, score, class) on the `shape` input → (boxes in image pixels, scores,
    classes) per image, as val.py's scale_boxes does."""
    from trtnet.plugins.official import scale_boxes

    return [(scale_boxes(shape, r[:, :4], image.shape[:2], ratio_pad), r[:, 4].copy(), r[:, 5].astype(np.int64))
            for r, image, ratio_pad in zip(rows, images, ratio_pads)]


def parser() -> argparse.ArgumentParser:
    p = command_parser("val", "COCO mAP of a YOLOv5 engine, or top-1/top-5 of a ResNet engine, on a dataset.")
    p.add_argument("engine", help="the TensorRT engine to evaluate (path or name in weights/); with --device cpu, "
                                  "weights (a checkpoint, .wts or name)")
    p.add_argument("--data", required=True,
                   help="detect: YOLO dataset root (images/, labels/) or images folder; "
                        "classify: folder of images in class sub-folders or named <wnid>_…")
    p.add_argument("--task", choices=("detect", "classify"), default="detect",
                   help="detect: COCO mAP of a detector; classify: top-1/top-5 of a classifier")
    p.add_argument("--imgsz", type=int, default=640, help="inference size (long side), detect")
    p.add_argument("--batch", type=int, default=16, help="images per batch")
    p.add_argument("--conf", type=float, default=0.001, help="confidence threshold (val.py's)")
    p.add_argument("--iou", type=float, help="NMS IoU threshold (default: the official validator's: YOLOv5 "
                   "val.py's 0.6, Ultralytics' 0.7 for YOLOv8/YOLO11)")
    p.add_argument("--max-det", type=int, default=300, help="detections kept per image")
    p.add_argument("--square", action="store_true", help="letterbox every batch to imgsz x imgsz "
                   "instead of val.py's per-batch rectangles")
    p.add_argument("--class-index", help="classify: JSON {wnid: index} or imagenet_class_index.json")
    p.add_argument("--decode", choices=("cpu", "gpu", "auto"), default="cpu",
                   help="detect: decode JPEGs by OpenCV, or on the GPU by nvImageCodec (the letterbox stays val.py's)")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="cpu: ENGINE is a weights file or name, its network run on the CPU (reference executor): "
                        "the mAP an engine built from it will have; with --int8, an INT8 engine's")
    p.add_argument("--int8", dest="precision", action="store_const", const="int8", default="fp32",
                   help="--device cpu: the INT8 network trtnet.build --int8 defines (the INT8 options below)")
    add_int8_arguments(p)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--verbose", action="store_true", help="per-class rows, progress, pycocotools output")
    return p


def main(argv: Sequence[str] | None = None) -> int | None:
    args = parser().parse_args(argv)
    if args.batch < 1:
        raise TrtnetError(f"--batch {args.batch}: must be at least 1")
    if int8_options(args) is not None and args.device != "cpu":  # first: it refuses INT8 options without --int8
        raise TrtnetError("--int8 applies to --device cpu (an INT8 engine is validated as any engine is)")
    metrics = validate_classifier(args) if args.task == "classify" else validate_detector(args)
    if args.json:
        with atomic_write(args.json, "w") as f:
            f.write(metrics.to_json() + "\n")
    return 0


def validate_detector(args) -> DetectionMetrics:
    if args.device == "cpu":
        predict, detector = cpu_predictor(args)
        dataset = load_detection_dataset(args.data, nc=len(detector.names))
        rect, check, read = not args.square, None, dataset_reader(dataset, args.decode)
    else:
        predict, engine = engine_predictor(args.engine, args.task, args)
        dataset = load_detection_dataset(args.data, nc=engine.meta.nc)
        rect = not args.square and engine.size_range is not None
        if not args.square and not rect:
            print(f"{engine.path.name} has a static input size: every batch is letterboxed to "
                  f"{args.imgsz}x{args.imgsz} (build with --min-imgsz 128 --max-imgsz {args.imgsz + 32} for "
                  "val.py's rectangular batches)", file=sys.stderr)
        check = functools.partial(check_engine_takes, engine)
        read = dataset_reader(dataset, args.decode, engine)
    metrics = evaluate_detection(dataset, predict, args.imgsz, args.batch, rect=rect, max_det=args.max_det,
                                 verbose=args.verbose, check_shapes=check, read=read,
                                 progress=args.verbose or args.device == "cpu")
    print(metrics.to_table(per_class=args.verbose))
    return metrics


def validate_classifier(args) -> ClassificationMetrics:
    if args.device == "cpu":
        raise TrtnetError("--device cpu validates detectors (--task detect)")
    predict, _ = engine_predictor(args.engine, args.task, args)
    dataset = load_classification_dataset(args.data, args.class_index)
    metrics = evaluate_classification(dataset, predict, args.batch, verbose=args.verbose)
    print(metrics.to_table())
    return metrics


def cli(argv: Sequence[str] | None = None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
