"""One GPU calibration pass, several methods: `calibrate(..., device="gpu")` (the fp32 calibration engine of
trtnet.quant.gpu_calibration) runs the images once, and the histograms it returns give the other methods' files,
so fp16-vs-INT8 comparisons of the methods need one pass (and one calibration-engine build), not one per method.
Run on the GPU machine:

    tests/gpu/py39.sh tests/gpu/calibrate_gpu.py WEIGHTS.wts IMAGES --count 128 --imgsz 640 \
        --methods entropy,percentile --out-prefix ENGINES/yolov5n --report times.json

writes ENGINES/yolov5n.<method>.calib.json (what `trtnet.build --calib-cache` reads) and the times: the whole
calibration (calibration-engine build included), seconds per image (engine pass + histograms), and the amax
computation per method.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `trtnet` importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    from trtnet.quant.calibrate import calibrate
    from trtnet.weights import load_weights

    p = argparse.ArgumentParser()
    p.add_argument("weights", type=Path)
    p.add_argument("images")
    p.add_argument("--count", type=int, default=128)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--methods", default="entropy,percentile")
    p.add_argument("--out-prefix", type=Path, required=True)
    p.add_argument("--report", type=Path, required=True)
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="cpu: the reference executor, for files made here and carried to the GPU machine")
    args = p.parse_args()

    first, *others = args.methods.split(",")
    weights = load_weights(args.weights)
    start = time.perf_counter()
    run = calibrate(weights.tensors, weights.meta, args.images, method=first, count=args.count, imgsz=args.imgsz,
                    device=args.device, batch=args.batch)
    report = {"weights": args.weights.name, "device": args.device, "imgsz": args.imgsz, "batch": args.batch,
              "images": run.calibration.images.count, "tensors": len(run.calibration.amax),
              "calibrate_s": round(time.perf_counter() - start, 2), "s_per_image": round(run.seconds_per_image, 5),
              "amax_s": {first: round(run.amax_seconds, 3)}}
    run.calibration.write(f"{args.out_prefix}.{first}.calib.json")
    for method in others:
        start = time.perf_counter()
        calibration = run.histograms.calibration(run.calibration.network_hash, method, run.calibration.images,
                                                 extra=run.calibration.extra)
        report["amax_s"][method] = round(time.perf_counter() - start, 3)
        calibration.write(f"{args.out_prefix}.{method}.calib.json")
    args.report.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
