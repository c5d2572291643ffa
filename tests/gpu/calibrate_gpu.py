"""One GPU calibration pass, several methods: the fp32 calibration engine (trtnet.quant.gpu_calibration) runs the
images once and the same histograms give one calibration file per method, so fp16-vs-INT8 comparisons of the
methods need one pass (and one calibration-engine build) instead of one per method. Run on the GPU machine:

    tests/gpu/py39.sh tests/gpu/calibrate_gpu.py WEIGHTS.wts IMAGES --count 128 --imgsz 640 \
        --methods entropy,percentile --out-prefix ENGINES/yolov5n --report times.json

writes ENGINES/yolov5n.<method>.calib.json (what `trtnet.build --calib-cache` reads) and the times: the
calibration-engine build, seconds per image (engine pass + histograms), and the amax computation per method.
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
    from trtnet import networks
    from trtnet.quant import gpu_calibration
    from trtnet.quant.calibrate import CalibrationImages, collect_histograms, find_images
    from trtnet.quant.calibration_file import ImagesUsed, network_hash
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
    args = p.parse_args()

    weights = load_weights(args.weights)
    tensors, meta = weights.tensors, weights.meta
    paths, root = find_images(args.images)
    loader = CalibrationImages(paths, args.count, networks.calibration_preprocess(meta, args.imgsz))
    report = {"weights": args.weights.name, "imgsz": args.imgsz, "batch": args.batch}
    start = time.perf_counter()
    with gpu_calibration.engine_pass(tensors, meta, args.imgsz, args.batch) as (names, infer):
        report["engine_build_s"] = round(time.perf_counter() - start, 2)
        stats, per_image = collect_histograms(infer, loader, names, args.batch)
    report.update(images=len(loader.used), tensors=len(names), s_per_image=round(per_image, 5),
                  pass_s=round(per_image * len(loader.used), 2), amax_s={})
    net_hash, used = network_hash(tensors, meta), ImagesUsed.of(loader.used, root)
    for method in args.methods.split(","):
        start = time.perf_counter()
        calibration = stats.calibration(net_hash, method, used, extra={"imgsz": args.imgsz, "device": "gpu"})
        report["amax_s"][method] = round(time.perf_counter() - start, 3)
        calibration.write(f"{args.out_prefix}.{method}.calib.json")
    args.report.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
