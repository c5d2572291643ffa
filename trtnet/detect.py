"""`python -m trtnet.detect`: run a YOLOv5 engine on images, folders, globs, videos or a camera.

    python -m trtnet.detect yolov5n bus.jpg zidane.jpg
    python -m trtnet.detect weights/yolov5s.fp16.640.engine photos/ clip.mp4 --out runs/detect --conf 0.4
    python -m trtnet.detect yolov5n 0 --show            # camera 0

    python -m trtnet.detect --device cpu yolov5n bus.jpg  # no GPU: the same network on the CPU, from the weights

Writes annotated images (same file names) and videos (`<stem>.mp4`) plus `detections.json` to a new run
folder (runs/detect/exp, exp2, …; --project/--name/--exist-ok, or --out), optionally YOLO label files
(--save-txt), crops (--save-crop) and predictions.csv (--save-csv), and prints how many objects of each
class were found. Files that cannot be read are skipped with a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from trtnet.cli import add_weights_dir, command_parser, run
from trtnet.datasets import IMAGE_SUFFIXES
from trtnet.engine import batched
from trtnet.errors import TrtnetError
from trtnet.fileio import atomic_write
from trtnet.progress import bar, track

# The official loader's video suffixes.
VIDEO_SUFFIXES = ("asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv", "webm")
GLOB_CHARS = set("*?[")


def warn(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class Source:
    kind: str  # "image" | "video" | "camera"
    location: str  # a path, or the camera index

    @property
    def name(self) -> str:
        return f"camera{self.location}" if self.kind == "camera" else Path(self.location).name


def suffix_of(path: str | os.PathLike) -> str:
    return Path(path).suffix.lower().lstrip(".")


def kind_of_file(path: str | os.PathLike) -> str | None:
    suffix = suffix_of(path)
    return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def expand_sources(arguments: Sequence[str]) -> list[Source]:
    """Images, videos and cameras named by the arguments, in order; warns about what it leaves out.

    A folder gives its images and videos (sorted, not recursive); a glob pattern the files it matches;
    a number that is not a file is a camera index. A file with an unknown suffix is tried as an image.
    """
    sources: list[Source] = []
    for argument in arguments:
        path = Path(argument)
        if argument.isdigit() and not path.exists():
            sources.append(Source("camera", argument))
        elif path.is_dir():
            sources += _folder(path)
        elif GLOB_CHARS & set(argument) and not path.exists():
            matches = sorted(p for p in glob.glob(argument, recursive=True) if os.path.isfile(p))
            if not matches:
                warn(f"{argument}: the pattern matches no files")
            sources += [Source(kind_of_file(p) or "image", p) for p in matches]
        elif path.is_file():
            sources.append(Source(kind_of_file(path) or "image", argument))
        else:
            warn(f"{argument}: no such file, folder or camera; skipped")
    return sources


def _folder(folder: Path) -> list[Source]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    media = [Source(kind, str(p)) for p in files if (kind := kind_of_file(p))]
    others = len(files) - len(media)
    if others:
        warn(f"{folder}: skipping {others} file(s) that are neither images nor videos")
    if not media:
        warn(f"{folder}: no images or videos in it")
    return media


# ------------------------------------------------------------------------------------------ reading


def read_image_or_warn(path: str) -> np.ndarray | None:
    """The image as BGR uint8, or None with a warning (empty, unreadable, not an image)."""
    from trtnet.api import load_image

    try:
        return load_image(path)[0]
    except TrtnetError as exc:
        warn(f"skipping {exc}")
        return None


def frames(capture: cv2.VideoCapture, stride: int = 1) -> Iterator[np.ndarray]:
    """The frames of `capture`; with `stride` n, every n-th (the first, the n+1-th, …: `--vid-stride`)."""
    index = 0
    while True:
        ok = capture.grab()
        if not ok:
            return
        if index % stride == 0:
            ok, frame = capture.retrieve()
            if not ok or frame is None:
                return
            yield frame
        index += 1


def increment_path(path: str | os.PathLike, exist_ok: bool = False) -> Path:
    """`path` itself when it is free (or `exist_ok`), else path2, path3, … — Ultralytics' run folders
    (runs/detect/exp, exp2, …), so a run never overwrites an earlier one."""
    path = Path(path)
    if exist_ok or not path.exists():
        return path
    n = 2
    while path.with_name(f"{path.name}{n}").exists():
        n += 1
    return path.with_name(f"{path.name}{n}")


# ------------------------------------------------------------------------------------------ output


@dataclass(frozen=True)
class SaveOptions:
    """What a run writes and how it draws (Ultralytics `predict` option names)."""

    save: bool = True  # annotated images and videos (not --nosave)
    show: bool = False
    save_txt: bool = False  # labels/<stem>.txt, YOLO format
    save_conf: bool = False  # the score as a sixth column of --save-txt
    save_crop: bool = False  # crops/<class>/<stem>.jpg
    save_csv: bool = False  # predictions.csv
    hide_labels: bool = False
    hide_conf: bool = False
    line_width: int | None = None
    classes: tuple[int, ...] | None = None  # keep only these class ids


CSV_COLUMNS = ("path", "frame", "cls", "name", "conf", "x1", "y1", "x2", "y2")


class Outputs:
    """Where results go: annotated files in `out`, the JSON records, labels, crops, the CSV, the per-class
    tally, the window."""

    def __init__(self, out: Path, save: bool = True, show: bool = False, options: SaveOptions | None = None):
        self.out = out
        self.options = options or SaveOptions(save=save, show=show)
        self.save = self.options.save
        self.show = self.options.show
        self.records: list[dict] = []
        self.csv_rows: list[tuple] = []
        self.tally: Counter = Counter()
        self.images = 0
        self.frames = 0
        self.skipped = 0
        self._used_names: set[str] = set()
        out.mkdir(parents=True, exist_ok=True)

    def unique_path(self, name: str) -> Path:
        stem, suffix = os.path.splitext(name)
        candidate, i = name, 1
        while candidate in self._used_names:
            candidate, i = f"{stem}_{i}{suffix}", i + 1
        self._used_names.add(candidate)
        return self.out / candidate

    def add(self, result, **where):
        """Record one image's or frame's detections (only --classes, when given) and write its label file,
        crops and CSV rows; returns the detections kept. `where` may give `stem` (the file name to use for
        labels and crops), `path` and `frame`."""
        o = self.options
        stem = where.pop("stem", None) or Path(result.path or "image").stem
        if o.classes is not None:
            result = result.of_classes(o.classes)
        self.records.append({**result.to_dict(), **where})
        self.tally.update(result.labels)
        frame = where.get("frame")
        name = stem if frame is None else f"{stem}_{frame}"
        if o.save_txt:
            result.save_txt(self.out / "labels" / f"{name}.txt", o.save_conf)
        if o.save_crop and result.image is not None:
            result.save_crops(self.out / "crops", name)
        if o.save_csv:
            path = where.get("path", result.path)
            self.csv_rows += [(path, "" if frame is None else frame, int(c), result.name_of(int(c)), f"{s:.5f}",
                               *(f"{v:.2f}" for v in box))
                              for box, s, c in zip(result.boxes, result.scores, result.classes)]
        return result

    def draw(self, result) -> np.ndarray:
        o = self.options
        return result.draw(line_width=o.line_width, labels=not o.hide_labels, conf=not o.hide_conf)

    def write_csv(self) -> Path | None:
        import csv

        if not self.options.save_csv:
            return None
        path = self.out / "predictions.csv"
        with atomic_write(path, "w") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(self.csv_rows)
        return path

    @property
    def annotating(self) -> bool:
        """Whether annotated images are wanted at all (drawing copies every image)."""
        return self.save or self.show

    def display(self, title: str, image: np.ndarray) -> bool:
        """Show `image`; False when the user pressed q (or no window can be opened)."""
        if not self.show:
            return True
        try:
            cv2.imshow(title, image)
            return cv2.waitKey(1) & 0xFF != ord("q")
        except cv2.error:
            warn("--show: this OpenCV has no GUI (opencv-python-headless); showing nothing")
            self.show = False
            return True

    def write_json(self) -> Path:
        import json

        path = self.out / "detections.json"
        with atomic_write(path, "w") as f:
            json.dump(self.records, f, indent=1)
        return path

    def summary(self, seconds: float) -> str:
        done = f"{self.images} image(s)" + (f", {self.frames} video frame(s)" if self.frames else "")
        lines = [f"{done} in {seconds:.1f} s" + (f"; {self.skipped} skipped" if self.skipped else "")]
        if self.tally:
            width = max(map(len, self.tally))
            lines += [f"  {name:<{width}}  {count}" for name, count in self.tally.most_common()]
        else:
            lines.append("  no objects found")
        return "\n".join(lines)


def detected_images(detector, sources: list[Source], outputs: Outputs, batch: int,
                    decode: str = "cpu") -> Iterator[tuple[Source, object]]:
    """(source, Detections) per readable image; unreadable ones are counted as skipped with a warning.
    With `decode` other than "cpu" (a GPU detector) JPEGs are decoded on the GPU (Detector.detect_files)."""
    if decode != "cpu" and hasattr(detector, "detect_files"):
        by_path = {s.location: s for s in sources}
        files = detector.detect_files(track([s.location for s in sources], "images", unit="img"), batch, decode,
                                      keep_images=outputs.annotating or outputs.options.save_crop)
        for path, result, error in files:
            if result is None:
                warn(f"skipping {path}: {error}")
                outputs.skipped += 1
            else:
                yield by_path[path], result
        return
    for group in batched(iter(track(sources, "images", unit="img")), batch):
        loaded = [(s, read_image_or_warn(s.location)) for s in group]
        outputs.skipped += sum(image is None for _, image in loaded)
        loaded = [(s, image) for s, image in loaded if image is not None]
        if loaded:
            yield from zip((s for s, _ in loaded),
                           detector.detect_loaded([image for _, image in loaded], [s.location for s, _ in loaded]))


# `--decode auto` decodes on the GPU from this many image files on: its decoder takes ~2 s to start (0.8 s to make,
# 1.1 s for its first batch, run L) and then runs 4700-6500 files/s against OpenCV's 1540-1700 (run P, batch 32),
# so it catches up near 4500 files (128 coco128 files: OpenCV 0.9-1.3 s, the GPU 2.1-2.4 s, runs L, N and P)
GPU_DECODE_MIN_FILES = 5000


def decode_mode(requested: str, files: int) -> str:
    """The decoder `detect` uses for `files` image files when `--decode requested`."""
    return "cpu" if requested == "auto" and files < GPU_DECODE_MIN_FILES else requested


def run_images(detector, sources: list[Source], outputs: Outputs, batch: int, decode: str = "cpu") -> None:
    for source, result in detected_images(detector, sources, outputs, batch, decode):
        outputs.images += 1
        target = outputs.unique_path(source.name)  # names labels and crops too: a/bus.jpg, b/bus.jpg
        result = outputs.add(result, stem=target.stem)
        if not outputs.annotating:
            continue
        annotated = outputs.draw(result)
        if outputs.save and not cv2.imwrite(str(target), annotated):
            warn(f"could not write the annotated {source.name} to {outputs.out}")
        outputs.display("trtnet", annotated)


def run_stream(detector, source: Source, outputs: Outputs, batch: int, vid_stride: int = 1) -> None:
    """A video file or a camera: frames in batches (1 for a camera), annotated video out; with `vid_stride`
    n every n-th frame."""
    is_camera = source.kind == "camera"
    capture = cv2.VideoCapture(int(source.location) if is_camera else source.location)
    if not capture.isOpened():
        warn(f"skipping {source.location}: cannot open it as a {'camera' if is_camera else 'video'}")
        outputs.skipped += 1
        return
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if not is_camera else 0
    writer = None
    index = 0
    try:
        # pipelined: the next frames are decoded and uploaded while the GPU works on these
        results = detector.stream(frames(capture, vid_stride), 1 if is_camera else batch)
        stem = Path(source.name).stem
        with bar(-(-total // vid_stride), source.name, "frame", unit_scale=False) as progress, \
                contextlib.closing(results):
            for result in results:
                outputs.frames += 1
                result = outputs.add(result, stem=stem, path=source.location, frame=index * vid_stride)
                index += 1
                progress.update(1)
                if not outputs.annotating:
                    continue
                annotated = outputs.draw(result)
                if outputs.save:
                    writer = writer or _video_writer(outputs.unique_path(Path(source.name).stem + ".mp4"),
                                                     fps, annotated.shape)
                    writer.write(annotated)
                if not outputs.display(source.name, annotated):
                    return
    except KeyboardInterrupt:
        if not is_camera:
            raise
        warn(f"{source.name}: stopped (Ctrl-C) after {index} frame(s)")  # how a camera run ends
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if index == 0:
        warn(f"{source.location}: no frames could be read")
        outputs.skipped += 1


def _video_writer(path: Path, fps: float, shape: tuple) -> cv2.VideoWriter:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (shape[1], shape[0]))
    if not writer.isOpened():
        raise TrtnetError(f"cannot write video {path}: OpenCV has no mp4v encoder here")
    return writer


# ------------------------------------------------------------------------------------------ command


def add_options(p) -> None:
    p.add_argument("model", metavar="ENGINE_OR_WEIGHTS",
                   help="an engine path, or a name in --weights-dir (yolov5n → weights/yolov5n.fp16.640.engine); with "
                        "--device cpu a weights file (.pt, .wts, .safetensors) or name (yolov5n → weights/yolov5n.wts)")
    p.add_argument("source", nargs="+", help="image or video files, folders, glob patterns, camera index (0)")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="gpu: the TensorRT engine; cpu: the same network run with NumPy on the CPU, from the weights")
    p.add_argument("--imgsz", type=int, default=640, help="--device cpu: network input size")
    p.add_argument("--rect", action="store_true",
                   help="letterbox each batch to its smallest stride-multiple shape, as Ultralytics' predictor "
                        "(GPU: an engine built with --min-imgsz/--max-imgsz)")
    p.add_argument("--conf", type=float, default=0.25, help="score threshold")
    p.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=1000, help="detections kept per image")
    p.add_argument("--classes", type=int, nargs="+", metavar="ID", help="keep only these class ids (e.g. 0 2)")
    p.add_argument("--agnostic", action="store_true", help="class-agnostic NMS")
    p.add_argument("--batch", type=int, help="images per engine run (default: the engine's largest batch)")
    p.add_argument("--project", default="runs/detect", help="results go to PROJECT/NAME")
    p.add_argument("--name", default="exp", help="run folder under --project (exp, exp2, … when taken)")
    p.add_argument("--exist-ok", action="store_true", help="reuse PROJECT/NAME instead of making exp2, exp3, …")
    p.add_argument("--out", help="exact results folder (instead of --project/--name; reused as is)")
    p.add_argument("--show", action="store_true", help="show results in a window (q quits)")
    p.add_argument("--nosave", action="store_true", help="write only detections.json, no annotated files")
    p.add_argument("--save-txt", action="store_true", help="labels/<image>.txt: cls cx cy w h, normalised (YOLO)")
    p.add_argument("--save-conf", action="store_true", help="--save-txt: add the score as a sixth column")
    p.add_argument("--save-crop", action="store_true", help="crops/<class>/<image>.jpg: each detection cut out")
    p.add_argument("--save-csv", action="store_true", help="predictions.csv: one row per detection")
    p.add_argument("--hide-labels", action="store_true", help="draw boxes without labels")
    p.add_argument("--hide-conf", action="store_true", help="draw labels without scores")
    p.add_argument("--line-width", type=int, help="box line width in pixels (default: from the image size)")
    p.add_argument("--vid-stride", type=int, default=1, help="videos and cameras: use every n-th frame")
    p.add_argument("--cuda-graphs", action="store_true", help="replay engine + NMS as CUDA graphs")
    p.add_argument("--decode", choices=("auto", "gpu", "cpu"), default="auto",
                   help="image files: JPEGs decoded on the GPU by nvImageCodec (auto: where installed, for "
                        f"{GPU_DECODE_MIN_FILES}+ files, where its start pays off) or by OpenCV")
    add_weights_dir(p, "where names are looked up")


def check_numbers(p, args) -> None:
    for option, value in (("--batch", args.batch), ("--vid-stride", args.vid_stride),
                          ("--line-width", args.line_width)):
        if value is not None and value < 1:
            p.error(f"{option} must be at least 1")


def save_options(args) -> SaveOptions:
    return SaveOptions(save=not args.nosave, show=args.show, save_txt=args.save_txt, save_conf=args.save_conf,
                       save_crop=args.save_crop, save_csv=args.save_csv, hide_labels=args.hide_labels,
                       hide_conf=args.hide_conf, line_width=args.line_width,
                       classes=tuple(args.classes) if args.classes else None)


def open_detector(args):
    """The GPU `Detector` for an engine, or with --device cpu the `CpuDetector` for weights."""
    if args.device == "cpu":
        from trtnet.cpu import CpuDetector

        return CpuDetector(args.model, args.conf, args.iou, args.max_det, agnostic=args.agnostic, imgsz=args.imgsz,
                           weights_dir=args.weights_dir, rect=args.rect)
    from trtnet.api import Detector
    from trtnet.cuda_rt import gpu_unavailable_reason

    try:
        return Detector(args.model, args.conf, args.iou, args.max_det, agnostic=args.agnostic,
                        cuda_graphs=args.cuda_graphs, weights_dir=args.weights_dir, rect=args.rect)
    except TrtnetError as exc:
        reason = gpu_unavailable_reason()
        if reason:  # whatever failed first, say that this machine cannot run an engine and what can
            raise TrtnetError(f"{exc} (and {reason} here: run the same network on the CPU with --device cpu "
                              "WEIGHTS, e.g. python -m trtnet.detect --device cpu yolov5n IMAGE)") from exc
        raise


def results_folder(args) -> Path:
    if args.out:
        return Path(args.out)
    return increment_path(Path(args.project) / args.name, args.exist_ok)


def parser() -> argparse.ArgumentParser:
    p = command_parser("detect", "Detect objects with a detection engine (or, with --device cpu, its weights on the "
                                 "CPU) in images, folders, videos or a camera.")
    add_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    check_numbers(p, args)

    sources = expand_sources(args.source)
    if not sources:
        raise TrtnetError("nothing to detect on: none of the sources is a readable file, folder or camera")
    start = time.perf_counter()
    with open_detector(args) as detector:
        batch = args.batch or detector.max_batch
        if batch > detector.max_batch:
            print(f"note: the engine takes at most {detector.max_batch} images per run; --batch {batch} is "
                  "split into runs of that size", file=sys.stderr)
        outputs = Outputs(results_folder(args), options=save_options(args))
        images = [s for s in sources if s.kind == "image"]
        if images:
            run_images(detector, images, outputs, batch, decode_mode(args.decode, len(images)))
        for source in (s for s in sources if s.kind != "image"):
            run_stream(detector, source, outputs, batch, args.vid_stride)
    if outputs.show:
        with contextlib.suppress(cv2.error):
            cv2.destroyAllWindows()
    json_path = outputs.write_json()
    outputs.write_csv()
    print(outputs.summary(time.perf_counter() - start))
    if args.device == "cpu":
        print("ran on the CPU (NumPy); on an NVIDIA GPU build an engine (python -m trtnet.build) and drop --device cpu")
    print(f"results: {json_path}" + ("" if args.nosave else f" and annotated files in {outputs.out}/"))
    if outputs.images + outputs.frames == 0:
        raise TrtnetError("no image or frame could be read from the sources given")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
