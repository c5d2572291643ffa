"""One GPU session in the background (GPU machine, TensorRT 8.5 staged): a PLAN's engines (or several plans')
built in waves of four in priority order, accuracy checks as soon as their engines exist (while later builds run),
and after each wave the timings its engines allow, on a quiet GPU. The machine's own python3 drives; TensorRT work
runs in tests/gpu/py39.sh, the official PyTorch models in python3. Plans (TensorRT 8.5 builds on an H200 take 6-10
minutes for a YOLOv5 and 6-19 for a YOLOv8s/YOLO11s at 640, so a 30-minute device budget holds two or three
waves, the rest carried over as engines): v8 (issue 12, done), int8 and int8b (issue 14), perf (15, 16),
yolov5n and s9 (14-16 in one wave of four / eight, for a session with no engines carried in), s10 (s9's
engines carried in, the INT8 builds after run N) and s11 (run O's: four serving instances, the decoder's
probes, py-spy's samples of the files pass, of isolated pinned calls and of a serving instance (carry .pyspy and
run `tests/gpu/spy.sh install` first: run P) and s11i (s11 with the implicit path's MinMax calibrator, not run yet),
s12 and s13 (issue 16 alone, steps of no other plan: the dynamic engine and serving runs, runs Q1 and Q2).

    python3 tests/gpu/session_gpu.py setup PACK_DIR   # data + wheels: PACK_DIR/c00, c01, … = one tar, split;
                                                      # its cache/ (timing caches, calibrations) goes to /tmp/eng
    python3 tests/gpu/session_gpu.py start PLAN       # detached; everything lands in /tmp/res. PLAN,PLAN…: in
                                                      # that order, a later plan's builds queued behind (budget
                                                      # an earlier plan leaves goes to them, run J left 10 min)
    python3 tests/gpu/session_gpu.py wait SECONDS     # until the session is done or SECONDS pass; the status
    python3 tests/gpu/session_gpu.py collect OUT      # OUT/res.tgz: /tmp/res + the timing caches and calibrations
    python3 tests/gpu/session_gpu.py collect-engines OUT [MiB]   # built engines not fetched yet, ≤ MiB (45)

Plan perf also serves (tests/gpu/serve_gpu.sh): its wheels must be installed before `start` when perf's engines are
carried in (their timings, the serve step with them, run first): carry .whl_serve39/b beside the last payload part
and .whl_serve39/a (53 MiB) in a call of its own, each call running `bash tests/gpu/serve_gpu.sh install`.

Keep a call running on the machine all the time (`wait` up to 540 s, then `collect`): a machine idle for ~30 s
between two calls is taken back with everything on it, the background session included (run L lost four INT8
builds so). Send the next call the moment one returns; think while a `wait` runs.

/tmp/res: steps.txt (every step: exit status, seconds), builds.txt, logs/*.log, *.json reports. Bring the timing
caches back every call (collect), and the engines too (collect-engines), and carry them in the next session's pack
(tests/gpu/make_pack.sh CACHE_DIR → cache/): an engine carried in is not rebuilt (same TensorRT, same GPU model),
and a rebuild with a carried timing cache skips the tactic timing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import engines_gpu  # tests/gpu, beside this script: its engine plan and checkpoint paths

REPO = Path(__file__).resolve().parents[2]
DATA, ENG, RES = Path("/tmp/data"), Path("/tmp/eng"), Path("/tmp/res")
PY39 = [str(REPO / "tests/gpu/py39.sh")]
IMAGES = DATA / "coco128/images"
# Four builds at once: a TensorRT 8.5 build is partly CPU-bound (two at once left the GPU at 46-98 %, run I), while
# six at once kept it at 99 % and slowed each (run H). The v8 plan's batch-1 fp16 engines come carried in (run I);
# its four others are one wave: the two 640x480 fp32 ones (Detector vs the golden) and the two batch-32 ones.
BUILD_JOBS = 4
ENV = {"TRTNET_SHARED_DATA": str(DATA), "TRTNET_GPU_ENGINES": str(ENG), "TRTNET_GPU_REFS": str(DATA / "refs"),
       "PYTHONUNBUFFERED": "1"}
V8_MODELS = ("yolo11s_syn", "yolov8s_syn")
KERNELS = ("--postprocess", "kernels")
TORCH_ENV = {"PYTHONPATH": f"{REPO}:/tmp/ul"}  # the machine's own Python: torch, and ultralytics from the pack


@dataclass(frozen=True)
class Build:
    name: str
    weights: str
    args: Sequence[str]
    needs: Sequence[Path] = ()  # files (calibrations) that must exist first
    seed: str = ""  # a carried-in engine whose timing cache starts this build's (most layers time the same)


@dataclass(frozen=True)
class Step:
    name: str
    cmd: Sequence[str]
    timeout: int
    needs: Sequence[str] = ()  # engines (build names) that must have been built
    env: dict = field(default_factory=dict)
    any_built: bool = False  # run once all `needs` are done if at least one was built (it skips what is missing)
    plan: str = ""  # only in this plan (a step that needs no engine of it)


def calib(name: str) -> Path:
    return ENG / f"{name}.calib.json"


def planned(name: str) -> Build:
    """An engine of engines_gpu.py's plan (the same name, weights and build arguments everywhere)."""
    name, weights, args = next(entry for entry in engines_gpu.PLAN if entry[0] == name)
    return Build(name, weights, tuple(args))


# yolov5n fp16 640 static batch 1: plan perf's engine (carried in), the reference of every yolov5n INT8 engine
YOLOV5N_B1 = Build("yolov5n_640_fp16_b1", "yolov5n", ("--fp16", "--batch", "1", "--postprocess", "kernels"))


def yolov5n_int8(keep: str, method: str, label: str = "") -> Build:
    """yolov5n INT8 with the settings of YOLOV5N_B1 (static batch 1 at 640), its ranges from a calibration
    carried in. Static batch 1, not the dynamic batch 1..32 profile: the dynamic INT8 build was not done after
    195 s alone on the GPU (run L), and the implicit calibrator needs a static shape anyway."""
    shape = tuple(a for a in YOLOV5N_B1.args if a != "--fp16")
    return Build(f"yolov5n_int8_{label or keep}_{method}_b1", "yolov5n",
                 ("--int8", *shape, "--calib-cache", str(calib(f"yolov5n.{method}")), "--int8-keep", keep),
                 (calib(f"yolov5n.{method}"),))


def calibrated(name: str, weights: str, args: Sequence[str], cache: str) -> Build:
    """An INT8 build that calibrates on 32 images on the GPU itself (the product path), or reuses `cache`."""
    return Build(name, weights, ("--int8", *args, "--calib", str(IMAGES), "--calib-images", "32",
                                 "--calib-device", "gpu", "--calib-cache", str(calib(cache))))


# the partial quantization the CPU found best at a useful size (run M, `val --device cpu --int8`): 0.7 point below
# fp32, not 1.7
PARTIAL_KEEP = "model.0,model.1,model.2,model.3,model.4,raw_0,raw_1,raw_2"
IMPLICIT_YOLOV5N = Build("yolov5n_int8_implicit_b1", "yolov5n",
                         ("--int8", "--int8-mode", "implicit", "--batch", "1", *KERNELS, "--calib", str(IMAGES),
                          "--calib-images", "128", "--calib-cache", str(ENG / "yolov5n.implicit.cache")))


# One plan a session, each in priority order (the queue may not finish inside a session's budget).
PLANS = {
    "v8": [planned(f"{m}_{kind}") for kind in ("640_fp16_b1", "640x480_fp32", "640_fp16_b32") for m in V8_MODELS],
    # all three INT8 targets in the first wave: yolov5n mAP (its fp16 engine is plan perf's, carried in), the
    # yolov5s batch-32 and ResNet-50 batch-128 speed (a ResNet-50 fp16 batch-32 build took 98-167 s: runs C, D)
    # issue 14's yolov5n mAP (auto, none and the implicit path against the carried fp16 engine) and the yolov5s
    # batch-32 INT8 engine with its first convolution in fp16 (run L's profile: 1.4 of its 3.9 ms), then the rest
    "int8": [
        YOLOV5N_B1,
        planned("yolov5s_syn_640_fp16_b32"),
        yolov5n_int8("auto", "percentile"),
        yolov5n_int8("none", "percentile"),
        IMPLICIT_YOLOV5N,
        calibrated("yolov5s_syn_640_int8_b32_keep0", "yolov5s_syn", ("--batch", "32", *KERNELS, "--int8-keep",
                                                                     "model.0"), "yolov5s_syn"),
        calibrated("yolov5s_syn_640_int8_b32", "yolov5s_syn", ("--batch", "32", *KERNELS), "yolov5s_syn"),
        yolov5n_int8("none", "entropy"),
        Build("resnet50_fp16_b128", "resnet50_rand", ("--fp16", "--batch", "128")),
        calibrated("resnet50_int8_b128", "resnet50_rand", ("--batch", "128"), "resnet50_rand"),
    ],
    "int8b": [
        planned("yolov5s_syn_640_fp16_b1"),
        Build("yolov5s_syn_640_int8_b1", "yolov5s_syn", ("--int8", "--batch", "1", *KERNELS, "--calib-cache",
                                                         str(calib("yolov5s_syn"))), (calib("yolov5s_syn"),)),
    ],
    # the speed pairs alone (a session whose machine was lost midway: ResNet-50 builds take 1-3 minutes)
    "int8speed": [
        planned("yolov5s_syn_640_fp16_b32"),
        Build("resnet50_fp16_b128", "resnet50_rand", ("--fp16", "--batch", "128")),
        calibrated("resnet50_int8_b128", "resnet50_rand", ("--batch", "128"), "resnet50_rand"),
        calibrated("yolov5s_syn_640_int8_b32", "yolov5s_syn", ("--batch", "32", *KERNELS), "yolov5s_syn"),
    ],
    "perf": [planned("yolov5n_640_fp16"), YOLOV5N_B1,
             planned("yolov5s_syn_640_fp16_b1"), planned("yolov5s_syn_640_fp16_b32")],
    # nothing carried in (a new checkout has no engines): one wave of yolov5n builds serves issue 14's mAP (fp16
    # against INT8 auto and none, static batch 1) and, with the dynamic engine, the decoders and the server
    "yolov5n": [planned("yolov5n_640_fp16"), YOLOV5N_B1, yolov5n_int8("auto", "percentile"),
                yolov5n_int8("none", "percentile"), IMPLICIT_YOLOV5N,
                yolov5n_int8(PARTIAL_KEEP, "percentile", "partial")],
    # what a session with half its budget left can still build: issue 14's target pair alone (two builds at once)
    "int8map": [YOLOV5N_B1, yolov5n_int8("auto", "percentile")],
    # nothing carried in, one wave of eight (TensorRT 8.5 build time barely grows with builds at once: seven took
    # 543-580 s each for the yolov5 engines in run C, four 560-595 s): issue 14's yolov5n mAP pair and partial
    # build, its two speed pairs (ResNet-50 with the residual placement, yolov5s with its first convolution in
    # fp16; calibrations carried in or made on the GPU), and the dynamic engine for issues 15 and 16
    "s9": [planned("yolov5n_640_fp16"), YOLOV5N_B1, yolov5n_int8("auto", "percentile"),
           yolov5n_int8(PARTIAL_KEEP, "percentile", "partial"),
           Build("resnet50_fp16_b128", "resnet50_rand", ("--fp16", "--batch", "128")),
           calibrated("resnet50_int8_b128", "resnet50_rand", ("--batch", "128"), "resnet50_rand"),
           planned("yolov5s_syn_640_fp16_b32"),
           calibrated("yolov5s_syn_640_int8_b32_keep0", "yolov5s_syn", ("--batch", "32", *KERNELS, "--int8-keep",
                                                                        "model.0"), "yolov5s_syn")],
}
def seeded(b: Build, engine: str) -> Build:
    return replace(b, seed=engine)


# the dynamic yolov5n engine as `trtnet.build` makes it by default (TensorRT tunes for the smallest batch of the
# profile): does it stream at batch 1 within 1.2x of the static engine? (plan perf's is tuned for batch 16)
DYNAMIC_OPT1 = Build("yolov5n_640_fp16_opt1", "yolov5n",
                     ("--fp16", "--min-batch", "1", "--max-batch", "32", "--min-imgsz", "128", "--max-imgsz", "672",
                      *KERNELS))


# run N's engines carried in (their timings first: files → boxes with OpenCV overlapping nvImageCodec, serving with
# each instance's own time), then the kept layers pinned to fp16 (built 2026-12-03 after run N; new names, so the
# carried engines of the same arguments are not taken for them), and the yolov5n INT8 builds run N did not make
PINNED = "pinned"  # engines built after kept layers got fp16 as their precision on weakly typed TensorRT
# `auto` from a report of the error each group removes when kept (and the heads), with a kept layer's quantized
# siblings kept too: tests/gpu/ carries the report (.gpu/extra/yolov5n.sensitivity.json) into /tmp/eng
AUTO_KEPT_CONTEXT = "auto_kept"
PLANS["s10"] = [
    *PLANS["s9"],
    seeded(calibrated(f"yolov5s_syn_640_int8_b32_keep0_{PINNED}", "yolov5s_syn",
                      ("--batch", "32", *KERNELS, "--int8-keep", "model.0"), "yolov5s_syn"),
           "yolov5s_syn_640_int8_b32_keep0"),
    seeded(yolov5n_int8(PARTIAL_KEEP, "percentile", f"partial_{PINNED}"), "yolov5n_int8_partial_percentile_b1"),
    seeded(yolov5n_int8("auto", "percentile", AUTO_KEPT_CONTEXT), "yolov5n_int8_auto_percentile_b1"),
    seeded(DYNAMIC_OPT1, "yolov5n_640_fp16_b1"),
    seeded(yolov5n_int8("none", "percentile"), "yolov5n_int8_auto_percentile_b1"),
    seeded(IMPLICIT_YOLOV5N, "yolov5n_int8_auto_percentile_b1"),
]
# run O's engines carried in (yolov5n: fp16 static / dynamic opt 16 / dynamic opt 1, INT8 auto / partial / none /
# implicit): the serving scale-out (four Python-backend instances), files → boxes and the decoder probe again,
# and the implicit path with TensorRT's MinMax calibrator (run O: the entropy one lost 10.3 points)
IMPLICIT_MINMAX = Build("yolov5n_int8_implicit_minmax_b1", "yolov5n",
                        ("--int8", "--int8-mode", "implicit", "--calib-method", "minmax", "--batch", "1", *KERNELS,
                         "--calib", str(IMAGES), "--calib-images", "128", "--calib-cache",
                         str(ENG / "yolov5n.implicit_minmax.cache")), seed="yolov5n_int8_implicit_b1")
PLANS["s11"] = [planned("yolov5n_640_fp16"), YOLOV5N_B1, DYNAMIC_OPT1,
                yolov5n_int8("auto", "percentile", AUTO_KEPT_CONTEXT)]
PLANS["s11i"] = [*PLANS["s11"], IMPLICIT_MINMAX]  # s11 and the implicit MinMax build (~5 min of the budget)
# issue 16 alone (session 12, nothing carried in): the dynamic engine, then serving with the allocator kept from
# unmapping image-sized blocks (trtnet.allocator), each run with the CPU time per request of Triton, its stubs and
# the rest; only the steps of this plan run
PLANS["s12"] = [planned("yolov5n_640_fp16")]
# the same engine (run Q1's timing cache carried in: a 20 s build): the serving table again, then the allocator on and
# off in turns at concurrency 32 (TRTNET_KEEP_FREED_MEMORY=0: glibc's defaults in Triton, its stubs and the clients;
# run Q2: each concurrency-32-only run includes its instances' warm-up, so compare them with each other only)
PLANS["s13"] = PLANS["s12"]
# run Q's engine carried in (session 13, run R): the serving table twice, three and four instances between (these
# three steps as written here were not run as a plan: R1 ran an earlier form). Run R also measured worker threads per
# instance (`--workers`, commit 9b5f92f: steps serve14_sync, _w1, _w3 with SERVE_WORKERS 0, 1, 3); they served no
# more than instances alone and were taken out: check that commit out to repeat them
PLANS["s14"] = PLANS["s12"]
EXCLUSIVE_PLANS = {"s12", "s13", "s14"}
PLAN_JOBS = {"s9": 8, "s10": 6}  # builds at once, where a plan wants other than BUILD_JOBS
plan: list[Build] = []  # this session's builds (set by `run PLAN[,PLAN…]`)
plans: list[str] = []  # and the plans they come from
# validated with the official rect batches (the dynamic engine) or square 640 batches of one (the static ones)
YOLOV5N_VAL = ["yolov5n_640_fp16", "yolov5n_640_fp16_b1", "yolov5n_int8_auto_percentile_b1",
               "yolov5n_int8_none_percentile_b1", "yolov5n_int8_implicit_b1", "yolov5n_int8_none_entropy_b1",
               "yolov5n_int8_partial_percentile_b1", f"yolov5n_int8_partial_{PINNED}_percentile_b1",
               f"yolov5n_int8_{AUTO_KEPT_CONTEXT}_percentile_b1", "yolov5n_int8_implicit_minmax_b1"]


def py39(*args: str) -> list[str]:
    return [*PY39, *args]


def bench(name: str, engine: str, batch: str, *extra: str) -> Step:
    return Step(f"bench_{name}", py39("-m", "trtnet.bench", str(ENG / f"{engine}.engine"), "--batch", batch,
                                      "--cuda-graphs", "--json", str(RES / f"bench_{name}.json"), *extra), 300,
                (engine,))


def layers(name: str, engines: Sequence[str], batch: str, runs: str = "30") -> Step:
    """tests/gpu/layer_profile.py over `engines` (build names): where each one's time goes, layer by layer."""
    return Step(f"layers_{name}", py39(str(REPO / "tests/gpu/layer_profile.py"), *(str(ENG / f"{e}.engine")
                                                                                  for e in engines),
                                       "--batch", batch, "--runs", runs, "--json", str(RES / f"layers_{name}.json")),
                300, tuple(engines))


def accuracy_steps() -> list[Step]:
    fp16_b1 = [f"{m}_640_fp16_b1" for m in V8_MODELS]
    v8_first = [*fp16_b1, *(f"{m}_640x480_fp32" for m in V8_MODELS)]
    check = py39(str(REPO / "tests/gpu/engines_gpu.py"), "check", "--data", str(DATA), "--out", str(ENG),
                 "--refs", str(DATA / "refs"))
    pytest = py39("-m", "pytest", "-q", "-s", "-ra", "-p", "no:cacheprovider")
    runtime = str(REPO / "tests/gpu/test_runtime_gpu.py")
    # builds small engines of its own: with plan int8b's builds (beside plan int8's four it ran out of 600 s, run K)
    steps = [Step("int8_gpu_tests", [*pytest, "-m", "gpu", str(REPO / "tests/gpu/test_int8_gpu.py")], 900,
                  plan="int8b")]
    steps += [Step("check_v8", [*check, "--report", str(RES / "check_v8.json")], 300, fp16_b1, any_built=True),
              Step("fp16_control_v8", ["python3", str(REPO / "tests/gpu/fp16_control.py"), "--data", str(DATA),
                                       "--check", str(RES / "check_v8.npz"), "--json", str(RES / "fp16_control.json")],
                   300, fp16_b1, TORCH_ENV, any_built=True),
             Step("runtime_v8", [*pytest, runtime, "-k", "v8"], 600, v8_first, any_built=True)]
    steps += [Step(f"val_{e}", py39("-m", "trtnet.val", str(ENG / f"{e}.engine"), "--data", str(DATA / "coco128"),
                                    *(("--square",) if e.endswith("_b1") else ()),
                                    "--json", str(RES / f"val_{e}.json")), 300, (e,))
              for e in YOLOV5N_VAL]
    steps += [Step("runtime_yolov5n", [*pytest, runtime, "-k", "not v8 and not fp32 and not resnet and not classifier"],
                   600, ("yolov5n_640_fp16",), plan="perf")]
    return steps


SERVE_PYTHON = {"SERVE_BACKENDS": "python", "SERVE_REQUESTS": "8000"}  # Triton's Python backend, 8000 requests


def serving(name: str, env: dict, plan: str = "") -> Step:
    """tests/gpu/serve_gpu.sh on the dynamic yolov5n engine and the images, into RES/name, with `env`."""
    return Step(name, ["bash", str(REPO / "tests/gpu/serve_gpu.sh"), str(RES / name),
                       str(ENG / "yolov5n_640_fp16.engine"), str(DATA / "images")], 600, ("yolov5n_640_fp16",),
                env, plan=plan)


def timing_steps() -> list[Step]:
    perf = ["bash", str(REPO / "tests/gpu/perf_gpu.sh"), str(RES / "perf")]
    # first, so that their samples come back while the session runs on (a fix can follow on the same machine)
    steps = [Step("perf_f", [*perf, "f"], 600, ("yolov5n_640_fp16", "yolov5n_640_fp16_b1"), plan="s11"),  # py-spy
             Step("perf_c", [*perf, "c"], 600, ("yolov5n_640_fp16",)),  # with yolov5s b32 where it is built
             serving("serve", {**SERVE_PYTHON, "SERVE_SPY": "1"})]  # PyTriton too: runs N, O
    for m in V8_MODELS:
        steps += [bench(f"{m}_b1", f"{m}_640_fp16_b1", "1"), bench(f"{m}_b32", f"{m}_640_fp16_b32", "32"),
                  Step(f"torch_{m}", ["python3", "-m", "trtnet.bench", str(ENG / f"{m}_640_fp16_b1.engine"),
                                      "--torch-only", "--batch", "1,32", "--weights-dir",
                                      str(DATA / "weights/synthetic"), "--json", str(RES / f"torch_{m}.json")], 400,
                       (f"{m}_640_fp16_b1",), TORCH_ENV)]
    for b in ("32", "1"):
        steps += [bench(f"yolov5s_{p}_b{b}", f"yolov5s_syn_640_{p}_b{b}", b) for p in ("fp16", "int8")]
    steps += [bench("yolov5s_int8_keep0_b32", "yolov5s_syn_640_int8_b32_keep0", "32"),
              bench("yolov5s_int8_keep0_pinned_b32", f"yolov5s_syn_640_int8_b32_keep0_{PINNED}", "32")]
    steps += [bench(f"resnet50_{p}_b128", f"resnet50_{p}_b128", "128", "--iters", "100") for p in ("fp16", "int8")]
    yolov5s_fp16_b32 = "yolov5s_syn_640_fp16_b32"
    steps += [layers("yolov5s_keep0_b32", (yolov5s_fp16_b32, "yolov5s_syn_640_int8_b32_keep0"), "32"),
              layers("yolov5s_keep0_pinned_b32", (yolov5s_fp16_b32, f"yolov5s_syn_640_int8_b32_keep0_{PINNED}"), "32")]
    steps += [layers(e, (e,), "1")
              for e in ("yolov5n_int8_partial_percentile_b1", f"yolov5n_int8_partial_{PINNED}_percentile_b1")]
    steps += [layers("yolov5s_b32", (yolov5s_fp16_b32, "yolov5s_syn_640_int8_b32"), "32"),
              layers("resnet50_b128", ("resnet50_fp16_b128", "resnet50_int8_b128"), "128", runs="20")]
    steps += [Step("perf_a", [*perf, "a"], 600, ("yolov5n_640_fp16", "yolov5n_640_fp16_b1")),  # yolov5s b1 if built
              bench("yolov5n_dyn_b32", "yolov5n_640_fp16", "32"),
              bench("yolov5n_fp16_b1", "yolov5n_640_fp16_b1", "1"),
              bench("yolov5n_int8_auto_b1", "yolov5n_int8_auto_percentile_b1", "1"),
              bench("yolov5n_int8_partial_b1", "yolov5n_int8_partial_percentile_b1", "1"),
              bench("yolov5n_int8_partial_pinned_b1", f"yolov5n_int8_partial_{PINNED}_percentile_b1", "1"),
              bench("yolov5n_int8_none_b1", "yolov5n_int8_none_percentile_b1", "1"),
              bench("yolov5n_int8_implicit_b1", "yolov5n_int8_implicit_b1", "1"),
              bench("yolov5n_int8_auto_kept_b1", f"yolov5n_int8_{AUTO_KEPT_CONTEXT}_percentile_b1", "1"),
              bench("yolov5n_int8_implicit_minmax_b1", "yolov5n_int8_implicit_minmax_b1", "1"),
              bench("yolov5n_dyn_opt1_b1", "yolov5n_640_fp16_opt1", "1", "--iters", "1000", "--warmup", "100"),
              bench("yolov5n_fp16_b1_again", "yolov5n_640_fp16_b1", "1", "--iters", "1000", "--warmup", "100"),
              bench("yolov5n_dyn_opt1_b32", "yolov5n_640_fp16_opt1", "32")]
    # more instances, and the batcher waiting longer to fill larger batches (run O: 8.1 images per execution at
    # concurrency 32 with two instances, where batch 8 runs at 0.47 ms an image directly and batch 32 at 0.32)
    steps += [serving("serve_scale", {**SERVE_PYTHON, "SERVE_INSTANCES": "4", "SERVE_SPY": "1"}, "s11"),
              serving("serve_delay", {**SERVE_PYTHON, "SERVE_INSTANCES": "2", "SERVE_QUEUE_DELAY_US": "3000"}, "s11")]
    steps += [Step("perf_e", [*perf, "e"], 600, ("yolov5n_640_fp16",), plan="s11")]  # the decoder's variants
    for name, env in (("serve12", {"SERVE_INSTANCES": "1 2"}),
                      ("serve12_delay", {"SERVE_INSTANCES": "2 3", "SERVE_QUEUE_DELAY_US": "3000"}),
                      ("serve12_spy", {"SERVE_INSTANCES": "2", "SERVE_SPY": "1"})):
        steps += [serving(name, {**SERVE_PYTHON, **env}, "s12")]
    repeat = {**SERVE_PYTHON, "SERVE_INSTANCES": "2", "SERVE_CONCURRENCY": "32", "SERVE_DIRECT": "0"}
    off = {"TRTNET_KEEP_FREED_MEMORY": "0"}
    for name, env in (("serve13", {**SERVE_PYTHON, "SERVE_INSTANCES": "2 1"}), ("serve13_off", {**repeat, **off}),
                      ("serve13_on", repeat), ("serve13_off2", {**repeat, **off}),
                      ("serve13_on2", {**repeat, "SERVE_DIRECT": "1"})):
        steps += [serving(name, env, "s13")]
    more = {**SERVE_PYTHON, "SERVE_DIRECT": "0", "SERVE_INSTANCES": "3 4", "SERVE_BENCH_PROCESSES": "16"}
    for name, env in (("serve14", {**SERVE_PYTHON, "SERVE_INSTANCES": "1 2"}), ("serve14_more", more),
                      ("serve14_again", {**SERVE_PYTHON, "SERVE_INSTANCES": "2 1"})):
        steps += [serving(name, env, "s14")]
    return steps


# -- running ---------------------------------------------------------------------------------------
_lock = threading.Lock()
built: dict[str, int] = {}  # build name → exit status


def note(file: str, line: str) -> None:
    with _lock, open(RES / file, "a") as f:
        f.write(line + "\n")
    print(line, flush=True)


def sh(name: str, cmd: Sequence[str], timeout: int, env: dict | None = None) -> int:
    start = time.time()
    log = RES / "logs" / f"{name}.log"
    with open(log, "w") as f:
        try:
            code = subprocess.call(list(cmd), stdout=f, stderr=subprocess.STDOUT, cwd="/tmp", timeout=timeout,
                                   env={**os.environ, **ENV, **(env or {})})
        except subprocess.TimeoutExpired:
            code = 124
    note("steps.txt", f"{time.strftime('%H:%M:%S')} {name}: exit {code} in {time.time() - start:.0f} s")
    return code


def wait_for_files(paths: Sequence[Path], limit: float = 900) -> bool:
    deadline = time.time() + limit
    while not all(p.exists() for p in paths):
        if time.time() > deadline:
            return False
        time.sleep(3)
    return True


def wait_for_builds(names: Sequence[str], any_built: bool = False) -> bool:
    planned_names = {b.name for b in plan}
    names = [n for n in names if n in planned_names] if any_built else names
    if not names or not set(names) <= planned_names:
        return False  # not in this session's plan
    while True:
        with _lock:
            if all(n in built for n in names):
                return (any if any_built else all)(built[n] == 0 for n in names)
        time.sleep(3)


def carried_in(b: Build) -> bool:
    engine = ENG / f"{b.name}.engine"
    return engine.exists() and engine.with_name(engine.name + ".json").exists()


def seed_timing_cache(b: Build) -> None:
    cache, seed = ENG / f"{b.name}.timing", ENG / f"{b.seed}.timing"
    if b.seed and seed.exists() and not cache.exists():
        shutil.copyfile(seed, cache)
        note("steps.txt", f"build_{b.name}: timing cache seeded from {seed.name}")


def run_build(b: Build) -> None:
    code = 125
    if carried_in(b):
        code = 0  # from an earlier session (cache/): same TensorRT, same GPU model
        note("steps.txt", f"build_{b.name}: carried in, not rebuilt")
    elif wait_for_files(b.needs):
        seed_timing_cache(b)
        code = sh(f"build_{b.name}", py39("-m", "trtnet.build", str(ENG / f"{b.weights}.wts"), "-o",
                                          str(ENG / f"{b.name}.engine"), "--timing-cache",
                                          str(ENG / f"{b.name}.timing"), *b.args), 1800)
    with _lock:
        built[b.name] = code
    seconds = json.loads((ENG / f"{b.name}.engine.json").read_text()).get("build_seconds") if code == 0 else None
    note("builds.txt", f"{b.name}: exit {code}, TensorRT build {seconds} s")


_steps_turn = threading.Lock()  # one step at a time: a timing never shares the GPU with an accuracy check


def run_steps(steps: Sequence[Step]) -> None:
    exclusive = set(plans) <= EXCLUSIVE_PLANS
    for s in steps:
        if (s.plan or exclusive) and s.plan not in plans:  # another plan's step, or not one of an exclusive plan's
            continue
        if s.needs and not wait_for_builds(s.needs, s.any_built):
            note("steps.txt", f"{s.name}: skipped (an engine it needs was not built: failed, or not in this plan)")
            continue
        if s.cmd[0] == "bash" and not Path(s.cmd[1]).exists():
            note("steps.txt", f"{s.name}: skipped ({s.cmd[1]} not here)")
            continue
        with _steps_turn:
            sh(s.name, s.cmd, s.timeout, s.env)


def run_ready(steps: list[Step]) -> list[Step]:
    """Run the steps whose engines are all built (between two waves of builds: a quiet GPU); the others back."""
    with _lock:
        ready = [s for s in steps if all(built.get(n) == 0 for n in s.needs)]
    run_steps(ready)
    return [s for s in steps if s not in ready]


def prepare_weights() -> None:
    """The .wts of every checkpoint this plan builds from."""
    for name in sorted({b.weights for b in plan}):
        if name == "resnet50_rand":  # torchvision's random initialisation (speed only: 100 MB need not travel)
            sh("resnet50_rand", ["python3", "-c", "import torch, torchvision; torch.manual_seed(0); torch.save("
                                 f"torchvision.models.resnet50().state_dict(), '{ENG}/resnet50_rand.pth')"], 300)
            source = ENG / "resnet50_rand.pth"
        else:
            source = DATA / engines_gpu.CHECKPOINTS[name]
        sh(f"gen_wts_{name}", py39("-m", "trtnet.gen_wts", str(source), "-o", str(ENG / f"{name}.wts")), 300)


def calibrate_yolov5n() -> None:
    """One GPU pass over 128 images, entropy and percentile ranges from it (tests/gpu/calibrate_gpu.py)."""
    sh("calibrate_yolov5n", py39(str(REPO / "tests/gpu/calibrate_gpu.py"), str(ENG / "yolov5n.wts"), str(IMAGES),
                                 "--count", "128", "--imgsz", "640", "--methods", "entropy,percentile",
                                 "--out-prefix", str(ENG / "yolov5n"), "--report", str(RES / "calibrate_yolov5n.json")),
       900)


def plan_names(text: str) -> list[str]:
    names = text.split(",")
    unknown = [n for n in names if n not in PLANS]
    if unknown:
        sys.exit(f"plan {', '.join(map(repr, unknown))}: one of {', '.join(PLANS)}")
    return names


def session(name: str) -> None:
    plans[:] = plan_names(name)
    builds = {}  # one build a name, where two plans share it, in the first plan's place
    for b in (b for n in plans for b in PLANS[n]):
        builds.setdefault(b.name, b)
    plan[:] = builds.values()
    (RES / "logs").mkdir(parents=True, exist_ok=True)
    ENG.mkdir(parents=True, exist_ok=True)
    note("steps.txt", f"{time.strftime('%H:%M:%S')} session start: plan {name}")
    prepare_weights()
    accuracy = threading.Thread(target=run_steps, args=(accuracy_steps(),))
    timings = timing_steps()
    jobs = max(PLAN_JOBS.get(n, BUILD_JOBS) for n in plans)
    with ThreadPoolExecutor(jobs) as pool:
        if any(not need.exists() and need.name.startswith("yolov5n.") for b in plan for need in b.needs):
            pool.submit(calibrate_yolov5n)  # a carried-in calibration (cache/) spares the GPU pass
        # the timings of engines carried in first, on a quiet GPU (the accuracy checks of those engines would
        # run beside them: they start after); then the builds in waves, each wave's timings before the next: a
        # session cut short by the budget still has some
        carried = [b for b in plan if carried_in(b)]
        for b in carried:
            run_build(b)
        timings = run_ready(timings)
        accuracy.start()
        to_build = [b for b in plan if b not in carried]
        for wave in range(0, len(to_build), jobs):
            list(pool.map(run_build, to_build[wave:wave + jobs]))
            note("steps.txt", f"{time.strftime('%H:%M:%S')} wave {wave // jobs + 1} built; its timings")
            timings = run_ready(timings)
    accuracy.join()
    note("steps.txt", f"{time.strftime('%H:%M:%S')} builds and accuracy done; the timings left")
    run_steps(timings)
    note("steps.txt", f"{time.strftime('%H:%M:%S')} session done")
    (RES / "DONE").write_text("done\n")


def setup(pack: Path) -> None:
    """Join and unpack the carried tar (data → /tmp/data, wheels → /tmp/whl*), then the wheels: Python 3.9's
    into /tmp/site39, ultralytics (no deps: the machine has torch) into /tmp/ul for the official models."""
    chunks = sorted(pack.glob("c[0-9][0-9]"))
    subprocess.run(f"cat {' '.join(map(str, chunks))} | tar xf - -C /tmp", shell=True, check=True)
    if Path("/tmp/cache").is_dir():  # timing caches and calibration files of earlier sessions
        ENG.mkdir(parents=True, exist_ok=True)
        subprocess.run("cp -a /tmp/cache/. " + str(ENG), shell=True, check=True)
    subprocess.run(["bash", str(REPO / "tests/gpu/device_prepare.sh"), "/tmp/whl39"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", "/tmp/ul",
                    *map(str, Path("/tmp/whl").glob("*.whl"))], check=True)
    print("setup done:", sorted(p.name for p in DATA.iterdir()))


def wait(seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and not (RES / "DONE").exists():
        time.sleep(5)
    for name in ("builds.txt", "steps.txt"):
        path = RES / name
        print(f"--- {name}\n" + (path.read_text() if path.exists() else "(none yet)"))


def collect_engines(out: Path, budget_mib: float) -> None:
    """The built engines (with their .json) not fetched by an earlier call, as many as fit `budget_mib`, in one tar
    split into 15 MiB pieces OUT/engNN (a call brings back at most 8 files of 16 MiB); `cat engNN | tar x` here.
    Carried in as cache/ they spare the next session's builds."""
    fetched_list = RES / "fetched.txt"
    fetched = set(fetched_list.read_text().split()) if fetched_list.exists() else set()
    chosen, total = [], 0
    for engine in sorted(ENG.glob("*.engine"), key=lambda p: p.stat().st_size):
        size = engine.stat().st_size / 2**20
        complete = engine.with_name(engine.name + ".json").exists()
        if engine.name not in fetched and complete and total + size <= budget_mib:
            chosen.append(engine.name)
            total += size
    if not chosen:
        return
    names = [n for name in chosen for n in (name, name + ".json")]
    subprocess.run(f"tar cf - -C {ENG} {' '.join(names)} | split -b 15M -d -a 2 - {out}/eng", shell=True, check=True)
    with open(fetched_list, "a") as f:
        f.write("\n".join(chosen) + "\n")
    print(f"engines fetched ({total:.0f} MiB): {', '.join(chosen)}")


def collect(out: Path) -> None:
    kept = [p.name for p in ENG.glob("*") if p.name.endswith((".timing", ".calib.json", ".cache"))]
    engines = ["-C", str(ENG.parent), *(f"{ENG.name}/{name}" for name in sorted(kept))] if kept else []
    # not the annotated images `detect` writes (37 MB in run K: the tar was too large to come back)
    subprocess.run(["tar", "czf", str(out / "res.tgz"), "--exclude=*.jpg", "--exclude=*.png", "-C", str(RES.parent),
                    RES.name, *engines], check=False)


def main() -> int:
    verb = sys.argv[1]
    if verb == "setup":
        setup(Path(sys.argv[2]))
    elif verb == "start":
        plan_names(sys.argv[2])
        RES.mkdir(parents=True, exist_ok=True)
        with open(RES / "driver.log", "w") as log:
            subprocess.Popen([sys.executable, __file__, "run", sys.argv[2]], stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        print("session started")
    elif verb == "run":
        session(sys.argv[2])
    elif verb == "collect":
        collect(Path(sys.argv[2]))
    elif verb == "collect-engines":
        collect_engines(Path(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 45)
    elif verb == "wait":
        wait(float(sys.argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
