"""How far fp16 moves the synthetic YOLOv8s / YOLO11s, ours and the official model's own, on the same input: the
control for the fp16 error `engines_gpu.py check` reports (GPU machine, its own Python with torch; ultralytics on
PYTHONPATH, no TensorRT needed: our fp16 engines' outputs come from the check's saved .npz).

    python3 tests/gpu/fp16_control.py --data DATA --check check_v8.npz --json OUT.json

Against the CPU reference executor's fp32 output for bus.jpg letterboxed to 640x640 (REFS/<model>_bus640.npz):
the official model in fp32 (TF32 off: cuDNN's TF32 alone moves these boxes by tens of pixels) and in fp16, and our
fp16 engine; per output the box / score errors and the share of the reference's detections (official NMS, conf 0.25,
IoU 0.45) each one keeps. Random weights make these models chaotic: the fp16 numbers compare, they do not grade.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).parent)]

from test_runtime_gpu import matched_fraction  # noqa: E402

from trtnet.plugins.official import non_max_suppression_anchor_free  # noqa: E402

MODELS = ("yolov8s_syn", "yolo11s_syn")


def detections(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    (found,) = non_max_suppression_anchor_free(raw, 0.25, 0.45, 300)
    return found[:, :4], found[:, 4], found[:, 5].astype(int)


def official_outputs(checkpoint: Path, x: np.ndarray, device: str) -> tuple[np.ndarray, np.ndarray]:
    """The official model's raw output in fp32 (strict) and fp16."""
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model = torch.load(checkpoint, weights_only=False, map_location=device)["model"].float().fuse().eval()
    images = torch.from_numpy(x).to(device)
    with torch.no_grad():
        fp32 = model(images)[0].float().cpu().numpy()
        fp16 = model.half()(images.half())[0].float().cpu().numpy()
    return fp32, fp16


def compare(output: np.ndarray, reference: np.ndarray) -> dict:
    error = np.abs(output - reference)
    kept, worst_iou, _ = matched_fraction(*detections(output), *detections(reference))
    return {"boxes_max_px": float(error[:, :4].max()), "boxes_mean_px": float(error[:, :4].mean()),
            "scores_max": float(error[:, 4:].max()), "detections": int(len(detections(output)[0])),
            "reference_detections_kept": kept, "worst_iou": float(worst_iou)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--check", type=Path, required=True, help="engines_gpu.py check's .npz (our fp16 outputs)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    ours = np.load(args.check)
    report = {}
    for model in MODELS:
        refs = np.load(args.data / "refs" / f"{model}_bus640.npz")
        fp32, fp16 = official_outputs(args.data / "weights/synthetic" / f"{model}.pt", refs["x"], args.device)
        outputs = {"official fp32": fp32, "official fp16": fp16}
        engine_output = f"{model}_640_fp16_b1__output0"
        if engine_output in ours.files:
            outputs["trtnet fp16 engine"] = ours[engine_output]
        report[model] = {name: compare(output, refs["output0"]) for name, output in outputs.items()}
    args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
