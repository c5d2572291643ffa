"""GPU verification of whole engines on a real TensorRT (run on the GPU machine, not in CI).

    python tests/gpu/engines_gpu.py refs   --data DIR --refs REFS            # on the CPU, with torch
    python tests/gpu/engines_gpu.py build  --data DIR --out ENGINES [--jobs 4] [--only session|v8|NAME,…]
    python tests/gpu/engines_gpu.py check  --data DIR --out ENGINES --refs REFS --report OUT.json

`build` converts the checkpoints with gen_wts and builds every engine of PLAN in parallel processes
(TensorRT 8.5 builds take minutes each on an H200); `check` runs the numerics engines on the goldens'
inputs and reports the error of every raw output against the official goldens (fp32 strict: TF32 off);
for the anchor-free YOLOv8/YOLO11 output `raw` [1, 4 + nc, N] also of its box rows (pixels) and score rows.
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
    "yolov8s_syn": "weights/synthetic/yolov8s_syn.pt",
    "yolo11s_syn": "weights/synthetic/yolo11s_syn.pt",
}
GOLDENS = {
    "yolov5n": "golden/golden_yolov5n_bus320.npz",
    "yolov5s_syn": "golden/golden_yolov5s_syn_bus320.npz",
    "resnet18_syn": "golden/golden_resnet18_syn.npz",
    "resnet50_syn": "golden/golden_resnet50_syn.npz",
    "yolov8s_syn": "golden/golden_yolov8s_syn_bus320.npz",
    "yolo11s_syn": "golden/golden_yolo11s_syn_bus320.npz",
}
V8_MODELS = ("yolov8s_syn", "yolo11s_syn")
# (engine name, weights, build arguments). SESSION is what one GPU session builds (see RESULTS.md):
# one dynamic yolov5n engine per precision serves detect, threads, val (rectangular batches up to
# 640 + 32) and the 320 numerics; static yolov5s/ResNet-50 engines for the benchmarks.
PLAN = [
    ("yolov5n_640_fp32", "yolov5n", ["--fp32", "--min-batch", "1", "--opt-batch", "16", "--max-batch", "32",
                                     "--min-imgsz", "128", "--max-imgsz", "672", "--postprocess", "kernels"]),
    ("yolov5n_640_fp16", "yolov5n", ["--fp16", "--min-batch", "1", "--opt-batch", "16", "--max-batch", "32",
                                     "--min-imgsz", "128", "--max-imgsz", "672", "--postprocess", "kernels"]),
    ("yolov5s_syn_640_fp16_b1", "yolov5s_syn", ["--fp16", "--batch", "1", "--postprocess", "kernels"]),
    ("yolov5s_syn_640_fp16_b32", "yolov5s_syn", ["--fp16", "--batch", "32", "--postprocess", "kernels"]),
    ("resnet50_syn_fp16_b32", "resnet50_syn", ["--fp16", "--batch", "32"]),
    ("resnet18_syn_fp32", "resnet18_syn", ["--fp32", "--batch", "2"]),
    ("resnet50_syn_fp32", "resnet50_syn", ["--fp32", "--batch", "2"]),
    # numerics at 320 with static engines (the first GPU session's)
    ("yolov5n_320_fp32", "yolov5n", ["--fp32", "--imgsz", "320", "--batch", "1"]),
    ("yolov5n_320_fp16", "yolov5n", ["--fp16", "--imgsz", "320", "--batch", "1"]),
    ("yolov5s_syn_320_fp32", "yolov5s_syn", ["--fp32", "--imgsz", "320", "--batch", "1"]),
    ("yolov5s_syn_320_fp16", "yolov5s_syn", ["--fp16", "--imgsz", "320", "--batch", "1"]),
    ("resnet18_syn_fp16", "resnet18_syn", ["--fp16", "--batch", "2"]),
    ("resnet50_syn_fp16", "resnet50_syn", ["--fp16", "--batch", "2"]),
]
SESSION = [name for name, _, _ in PLAN[:7]]
# YOLOv8 / YOLO11 (`--only v8`): 320 numerics (fp32 strict, fp16 error), 640 latency at batch 1 and 32,
# static 640 batch 1 engines (Detector's square letterbox, against the CPU reference executor's `refs`), and
# static 640x480 engines for the official rect input of golden_<name>_detect640.json.
V8 = []
for _m in V8_MODELS:
    V8 += [
        (f"{_m}_320_fp32", _m, ["--fp32", "--imgsz", "320", "--batch", "1"]),
        (f"{_m}_320_fp16", _m, ["--fp16", "--imgsz", "320", "--batch", "1"]),
        (f"{_m}_640_fp16_b1", _m, ["--fp16", "--batch", "1", "--postprocess", "kernels"]),
        (f"{_m}_640_fp16_b32", _m, ["--fp16", "--batch", "32", "--postprocess", "kernels"]),
        (f"{_m}_640_fp32_b1", _m, ["--fp32", "--batch", "1", "--postprocess", "kernels"]),
        # the official predictor's rect input of bus.jpg (640x480), as golden_*_detect640 has it: a static engine of
        # that shape, since a dynamic batch or size of these models does not build on the staged 8.5 (run H); fp32
        # only, as the Detector tests that use it (tests/gpu/test_runtime_gpu.py V8_DETECTOR_PRECISIONS)
        (f"{_m}_640x480_fp32", _m, ["--fp32", "--imgsz", "640,480", "--batch", "1", "--postprocess", "kernels"]),
    ]
PLAN += V8
GROUPS = {"session": SESSION, "v8": [name for name, _, _ in V8]}
# Reference executor outputs made on the CPU by the `refs` phase (no golden at 640 for the synthetic yolov5s).
REFS = {"yolov5s_syn_bus640": ("yolov5s_syn", 640), **{f"{m}_bus640": (m, 640) for m in V8_MODELS}}
# (engine, file of expected outputs: a golden under --data or a `refs` file under --refs)
NUMERICS = [
    ("yolov5n_640_fp32", GOLDENS["yolov5n"]),
    ("yolov5n_640_fp16", GOLDENS["yolov5n"]),
    ("yolov5n_320_fp32", GOLDENS["yolov5n"]),
    ("yolov5n_320_fp16", GOLDENS["yolov5n"]),
    ("yolov5s_syn_320_fp32", GOLDENS["yolov5s_syn"]),
    ("yolov5s_syn_320_fp16", GOLDENS["yolov5s_syn"]),
    ("yolov5s_syn_640_fp16_b1", "refs:yolov5s_syn_bus640"),
    ("resnet18_syn_fp32", GOLDENS["resnet18_syn"]),
    ("resnet18_syn_fp16", GOLDENS["resnet18_syn"]),
    ("resnet50_syn_fp32", GOLDENS["resnet50_syn"]),
    ("resnet50_syn_fp16", GOLDENS["resnet50_syn"]),
    ("resnet50_syn_fp16_b32", GOLDENS["resnet50_syn"]),
]
NUMERICS += [(f"{m}_320_{p}", GOLDENS[m]) for m in V8_MODELS for p in ("fp32", "fp16")]
NUMERICS += [(f"{m}_640_{p}_b1", f"refs:{m}_bus640") for m in V8_MODELS for p in ("fp32", "fp16")]


def run(cmd: list, log: Path) -> tuple[int, float]:
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    return code, time.perf_counter() - start


def build_all(data: Path, out: Path, jobs: int, only: set) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    plan = [p for p in PLAN if not only or p[0] in only]
    for name in sorted({weights for _, weights, _ in plan}):  # only the checkpoints this plan builds from
        if not (out / f"{name}.wts").exists():
            cmd = [sys.executable, "-m", "trtnet.gen_wts", str(data / CHECKPOINTS[name]), "-o", str(out)]
            code, _ = run(cmd, out / f"{name}.gen.log")
            assert code == 0, (out / f"{name}.gen.log").read_text(encoding="utf-8")

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


def expected_outputs(spec: str, data: Path, refs: Path) -> tuple[np.ndarray, dict]:
    """(network input, {golden key: expected}) from a golden or a `refs` file: YOLOv5's raw_<i>, ResNet's
    logits, YOLOv8/YOLO11's raw (the engine's output0)."""
    npz = np.load(refs / f"{spec[5:]}.npz" if spec.startswith("refs:") else data / spec)
    x = npz["image"].astype(np.float32) / 255.0 if "image" in npz.files else npz["x"]
    return x, {k: npz[k].astype(np.float32) for k in npz.files if k.startswith(("raw", "logits", "output"))}


def error_row(value: np.ndarray, ref: np.ndarray) -> dict:
    err = np.abs(value - ref)
    return {"max_abs": float(err.max()), "mean_abs": float(err.mean()),
            "max_rel_range": float(err.max()) / (float(ref.max() - ref.min()) or 1.0),
            "range": [float(ref.min()), float(ref.max())]}


def anchor_free_rows(value: np.ndarray, ref: np.ndarray) -> dict:
    """The anchor-free output [B, 4 + nc, N] split: box rows (cx, cy, w, h pixels) and class-score rows."""
    return {"boxes": error_row(value[:, :4], ref[:, :4]), "scores": error_row(value[:, 4:], ref[:, 4:])}


def check_all(data: Path, out: Path, refs: Path, report: Path) -> dict:
    from trtnet import networks
    from trtnet.engine import Engine
    from trtnet.inspection import tensor_for_golden_key

    results, saved = {}, {}
    for name, spec in NUMERICS:
        path = out / f"{name}.engine"
        if not path.exists():
            continue
        x, expected = expected_outputs(spec, data, refs)
        with Engine(path) as engine:
            outputs = engine.infer(x)
            meta = engine.meta.to_dict()
        row = {"against": spec}
        for key, ref in expected.items():
            value = outputs[tensor_for_golden_key(key, networks.golden_aliases(meta))].astype(np.float32)
            saved[f"{name}/{key}"] = value
            row[key] = error_row(value, ref)
            if meta.get("head") == "anchor_free":
                row[key].update(anchor_free_rows(value, ref))
        results[name] = row
        print(name, json.dumps(row), flush=True)
    np.savez_compressed(report.with_suffix(".npz"), **{k.replace("/", "__"): v for k, v in saved.items()})
    report.write_text(json.dumps(results, indent=1))
    return results


def make_refs(data: Path, refs: Path) -> None:
    """CPU reference executor outputs for inputs without a golden (needs torch; run before the session)."""
    import cv2

    from trtnet import compat
    from trtnet.checkpoint import read_checkpoint
    from trtnet.executor import run_network
    from trtnet.network import define_network
    from trtnet.plugins.official import letterbox

    refs.mkdir(parents=True, exist_ok=True)
    for ref_name, (weights, size) in REFS.items():
        if not (data / CHECKPOINTS[weights]).is_file():
            print(f"{ref_name}: skipped, no {data / CHECKPOINTS[weights]}")
            continue
        image, _, _ = letterbox(cv2.imread(str(data / "images" / "bus.jpg")), (size, size))
        x = (image[:, :, ::-1].transpose(2, 0, 1)[None] / 255.0).astype(np.float32)
        ckpt = read_checkpoint(data / CHECKPOINTS[weights])
        defined = define_network(compat.trt().Builder(compat.Logger()), ckpt.state_dict, ckpt.meta, imgsz=size)
        outputs = run_network(defined.network, {defined.input_name: x})
        np.savez_compressed(refs / f"{ref_name}.npz", x=x, **outputs)
        print(f"{ref_name}: {', '.join(f'{k} {v.shape}' for k, v in outputs.items())}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("phase", choices=("build", "check", "refs"))
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("engines"))
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--only", default="")
    p.add_argument("--report", type=Path)
    p.add_argument("--refs", type=Path, default=Path("refs"), help="folder of the `refs` phase's outputs")
    args = p.parse_args()
    if args.phase == "build":
        only = set(GROUPS[args.only]) if args.only in GROUPS else {s for s in args.only.split(",") if s}
        build_all(args.data, args.out, args.jobs, only)
    elif args.phase == "refs":
        make_refs(args.data, args.refs)
    else:
        check_all(args.data, args.out, args.refs, args.report or args.out / "check.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
