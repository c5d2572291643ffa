"""`trtnet golden`: run the official model code on an image and write a golden .npz for `trtnet inspect --compare`.

    trtnet golden my_yolov5.pt --image bus.jpg --yolov5-src ~/yolov5     # YOLOv5: a clone of ultralytics/yolov5
    trtnet golden my_yolo11.pt --image bus.jpg --imgsz 320               # YOLOv8/11: pip install ultralytics
    trtnet inspect my_yolo11 --compare golden_my_yolo11_bus320.npz       # layer by layer against PyTorch

The checkpoint's family (read without torch, as gen_wts does) runs its official code through its optional
`official_golden(torch, checkpoint_path, image_chw, official_src) -> {key: array}`; this module letterboxes the
image, writes the file (format: README, Golden files) and knows no family.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from trtnet import networks
from trtnet.cli import command_parser, run
from trtnet.errors import TrtnetError
from trtnet.fileio import atomic_write

SOURCE_ENV = "YOLOV5_SRC"


def letterboxed_image(path: str | Path, imgsz: int) -> np.ndarray:
    """The golden's `image`: uint8 [3, imgsz, imgsz] RGB, letterboxed as the official code does (pad 114)."""
    import cv2

    from trtnet.plugins.official import letterbox

    bgr = cv2.imread(str(path))
    if bgr is None:
        raise TrtnetError(f"--image {path}: not a readable image")
    padded, _, _ = letterbox(bgr, imgsz)
    return np.ascontiguousarray(padded.transpose(2, 0, 1)[::-1])


@contextlib.contextmanager
def recorded_outputs(modules: Mapping[str, object]) -> Iterator[dict[str, np.ndarray]]:
    """While inside, each torch module's forward output (when it is one tensor) is kept under its key, as float32
    numpy: what a family's `official_golden` uses to collect per-layer outputs."""
    kept: dict[str, np.ndarray] = {}

    def keeper(key: str):
        def hook(_module, _inputs, output):
            if hasattr(output, "detach"):
                kept[key] = output.detach().float().cpu().numpy()

        return hook

    handles = [module.register_forward_hook(keeper(key)) for key, module in modules.items()]
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


def official_model(torch, checkpoint_path: str | Path, official_src: str | None, modules: Sequence[str],
                   code: str, hint: str, fuse: bool = False):
    """The checkpoint's model through its official code, float32, eval (fused when `fuse`): `official_src` goes
    first on sys.path, `modules` (what unpickling needs, and what the caller uses) must import, else a
    TrtnetError '`code` is not importable (why): `hint`'. The .pt is fully unpickled: only for trusted files."""
    if official_src:
        sys.path.insert(0, str(Path(official_src).resolve()))
    try:
        for name in modules:
            importlib.import_module(name)
    except ImportError as exc:
        raise TrtnetError(f"{code} is not importable ({exc}): {hint}") from exc
    ckpt = torch.load(str(checkpoint_path), map_location="cpu", weights_only=False)
    model = (ckpt.get("ema") or ckpt["model"]).float()
    return (model.fuse() if fuse else model).eval()


def top_level_layers(model) -> dict[str, object]:
    """`layer_XX` → each top-level layer of `model.model` but the last (the head), as the goldens key them."""
    head = model.model[-1]
    return {f"layer_{i:02d}": m for i, m in enumerate(model.model) if m is not head}


def write_golden(path: str | Path, image_chw: np.ndarray, outputs: Mapping[str, np.ndarray]) -> Path:
    """`image` uint8 [1,3,H,W] plus every output as float32 (as compressed .npz), written atomically."""
    if image_chw.dtype != np.uint8 or image_chw.ndim != 3 or image_chw.shape[0] != 3:
        raise TrtnetError(f"a golden's image must be uint8 [3,H,W], got {image_chw.dtype} {list(image_chw.shape)}")
    if "image" in outputs:
        raise TrtnetError("a model output may not be named 'image' (the golden's input)")
    arrays = {"image": image_chw[None], **{k: np.asarray(v, dtype=np.float32) for k, v in outputs.items()}}
    path = Path(path)
    with atomic_write(path) as f:
        np.savez_compressed(f, **arrays)
    return path


def import_torch():
    try:
        import torch
    except ImportError:
        raise TrtnetError("trtnet golden runs the official PyTorch code: pip install torch (CPU is enough)") from None
    return torch


def default_output(checkpoint: Path, image: Path, imgsz: int) -> Path:
    return Path(f"golden_{checkpoint.stem}_{image.stem}{imgsz}.npz")


def parser() -> argparse.ArgumentParser:
    p = command_parser("golden", "Run the official model code (the yolov5 repo, or the ultralytics package) on "
                                 "one image and write a golden .npz: the input image, the raw outputs and every "
                                 "layer's output, for trtnet inspect --compare.")
    p.add_argument("checkpoint", help="the PyTorch checkpoint (.pt) to run")
    p.add_argument("--image", required=True, help="the image to run it on")
    p.add_argument("--imgsz", type=int, default=320, help="square letterboxed input size")
    p.add_argument("-o", "--output", help="the .npz to write (default: golden_<checkpoint>_<image><imgsz>.npz)")
    p.add_argument("--yolov5-src", dest="official_src", default=os.environ.get(SOURCE_ENV),
                   help=f"YOLOv5: folder of the official ultralytics/yolov5 code, put on sys.path (${SOURCE_ENV})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from trtnet.checkpoint import read_checkpoint

    args = parser().parse_args(argv)
    checkpoint, image = Path(args.checkpoint), Path(args.image)
    if args.imgsz < 32 or args.imgsz % 32:
        raise TrtnetError(f"--imgsz {args.imgsz}: must be a multiple of 32, at least 32")
    if not checkpoint.is_file():
        raise TrtnetError(f"{checkpoint}: no such checkpoint")
    meta = read_checkpoint(checkpoint).meta
    image_chw = letterboxed_image(image, args.imgsz)
    outputs = networks.official_golden(meta, import_torch(), checkpoint, image_chw, args.official_src)
    out = write_golden(args.output or default_output(checkpoint, image, args.imgsz), image_chw, outputs)
    for key, value in outputs.items():
        print(f"  {key:<10} {list(np.shape(value))}")
    print(f"wrote {out}: check a network against it with trtnet inspect WEIGHTS --compare {out}")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
