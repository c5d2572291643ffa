"""GPU verification of whole engines on a real TensorRT (run on the GPU machine, not in CI).

    python tests/gpu/engines_gpu.py build  --data DIR --out ENGINES [--jobs 4] [--only NAME,…]
    python tests/gpu/engines_gpu.py check  --data DIR --out ENGINES --report OUT.json

`build` converts the checkpoints with gen_wts and builds every engine of PLAN in parallel processes
(TensorRT 8.5 builds take minutes each on an H200); `check` runs the numerics engines on the goldens'
inputs and reports the error of every raw output against the official goldens (fp32 strict: TF32 off).
Engine outputs are saved beside the report so they can be compared with the CPU reference executor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

CHECKPOINTS = {
    "yolov5n": "weights/yolov5n.pt",
    "yolov5s_syn": "weights/synthetic/yolov5s_syn.pt",
    "resnet18_syn": "weights/synthetic/resnet18_syn.pth",
    "resnet50_syn": "weights/synthetic/resnet50_syn.pth",
}
GOLDENS = {
    "yolov5n": "golden/golden_yolov5n_bus320.npz",
    "yolov5s_syn": "golden/golden_yolov5s_syn_bus320.npz",
    "resnet18_syn": "golden/golden_resnet18_syn.npz",
    "resnet50_syn": "golden/golden_resnet50_syn.npz",
}
# (engine name, weights, build arguments); numerics at 320 (YOLO) / 224 batch 2 (ResNet), benches at 640.
PLAN = [
    ("yolov5n_320_fp32", "yolov5n", ["--fp32", "--imgsz", "320", "--batch", "1"]),
    ("yolov5n_320_fp16", "yolov5n", ["--fp16", "--imgsz", "320", "--batch", "1"]),
    ("yolov5s_syn_320_fp32", "yolov5s_syn", ["--fp32", "--imgsz", "320", "--batch", "1"]),
    ("yolov5s_syn_320_fp16", "yolov5s_syn", ["--fp16", "--imgsz", "320", "--batch", "1"]),
    ("resnet18_syn_fp32", "resnet18_syn", ["--fp32", "--batch", "2"]),
    ("resnet18_syn_fp16", "resnet18_syn", ["--fp16", "--batch", "2"]),
    ("resnet50_syn_fp32", "resnet50_syn", ["--fp32", "--batch", "2"]),
    ("resnet50_syn_fp16", "resnet50_syn", ["--fp16", "--batch", "2"]),
    # detect, threads, val (rectangular batches: dynamic size) and bench use these two
    ("yolov5n_640_fp32", "yolov5n", ["--fp32", "--min-batch", "1", "--opt-batch", "16", "--max-batch", "32",
                                     "--min-imgsz", "128", "--postprocess", "kernels"]),
    ("yolov5n_640_fp16", "yolov5n", ["--fp16", "--min-batch", "1", "--opt-batch", "16", "--max-batch", "32",
                                     "--min-imgsz", "128", "--postprocess", "kernels"]),
    ("yolov5s_syn_640_fp16_b1", "yolov5s_syn", ["--fp16", "--batch", "1", "--postprocess", "kernels"]),
    ("yolov5s_syn_640_fp16_b32", "yolov5s_syn", ["--fp16", "--batch", "32", "--postprocess", "kernels"]),
    ("resnet50_syn_fp16_b32", "resnet50_syn", ["--fp16", "--batch", "32"]),
]


def run(cmd: list, log: Path) -> tuple[int, float]:
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    return code, time.perf_counter() - start


def build_all(data: Path, out: Path, jobs: int, only: set) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for name, ckpt in CHECKPOINTS.items():
        if not (out / f"{name}.wts").exists():
            cmd = [sys.executable, "-m", "trtnet.gen_wts", str(data / ckpt), "-o", str(out)]
            code, _ = run(cmd, out / f"{name}.gen.log")
            assert code == 0, (out / f"{name}.gen.log").read_text()
    plan = [p for p in PLAN if not only or p[0] in only]

    def build_one(item):
        name, weights, args = item
        cmd = [sys.executable, "-m", "trtnet.build", weights, "--weights-dir", str(out), *args,
               "-o", str(out / f"{name}.engine"), "--timing-cache", str(out / f"{name}.timing")]
        code, seconds = run(cmd, out / f"{name}.build.log")
        print(f"{name}: exit {code} in {seconds:.0f} s", flush=True)
        return name, {"exit": code, "seconds": round(seconds, 1)}

    with ThreadPoolExecutor(jobs) as pool:
        results = dict(pool.map(build_one, plan))
    (out / "builds.json").write_text(json.dumps(results, indent=1))
    return results


def check_all(data: Path, out: Path, report: Path) -> dict:
    from trtnet.runtime import Engine

    results = {}
    saved = {}
    for name, weights, _ in PLAN[:8]:
        path = out / f"{name}.engine"
        if not path.exists():
            results[name] = {"error": "not built"}
            continue
        golden = np.load(data / GOLDENS[weights])
        x = golden["image"].astype(np.float32) / 255.0 if "image" in golden.files else golden["x"]
        engine = Engine(path)
        outputs = engine.infer(x)
        row = {}
        for key, value in outputs.items():
            saved[f"{name}/{key}"] = value
            if key in golden.files:
                ref = golden[key].astype(np.float32)
                err = np.abs(value.astype(np.float32) - ref)
                span = float(ref.max() - ref.min())
                row[key] = {"max_abs": float(err.max()), "mean_abs": float(err.mean()),
                            "max_rel_range": float(err.max()) / span}
        engine.close()
        results[name] = row
        print(name, json.dumps(row), flush=True)
    np.savez_compressed(report.with_suffix(".npz"), **{k.replace("/", "__"): v for k, v in saved.items()})
    report.write_text(json.dumps(results, indent=1))
    return results


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("phase", choices=("build", "check"))
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--only", default="")
    p.add_argument("--report", type=Path)
    args = p.parse_args()
    if args.phase == "build":
        build_all(args.data, args.out, args.jobs, {s for s in args.only.split(",") if s})
    else:
        check_all(args.data, args.out, args.report or args.out / "check.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
