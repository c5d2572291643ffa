"""The GPU session driver (tests/gpu/session_gpu.py) checked on the CPU before device time is spent on it: every
planned build is a valid `trtnet.build` command on a checkpoint the test data has, and a session runs the timings of
engines carried in before it builds, builds in waves, and skips what depends on a failed build."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import shared
from trtnet import build as build_cmd

sys.path.insert(0, str(Path(__file__).parent / "gpu"))
import engines_gpu  # noqa: E402  (tests/gpu is not a package: its scripts import each other as siblings)
import session_gpu  # noqa: E402

PLANNED = sorted({(b.name, b.weights, tuple(b.args)) for plan in session_gpu.PLANS.values() for b in plan}
                 | {(name, weights, tuple(args)) for name, weights, args in engines_gpu.PLAN})


@pytest.mark.parametrize("name, weights, args", PLANNED, ids=[p[0] for p in PLANNED])
def test_every_planned_build_is_a_valid_build_command(name, weights, args):
    build_cmd.parser().parse_args([f"{weights}.wts", *args])  # exits (fails the test) on a bad option


@pytest.mark.parametrize("weights", sorted(engines_gpu.CHECKPOINTS))
def test_every_planned_checkpoint_is_in_the_test_data(weights):
    path = shared(engines_gpu.CHECKPOINTS[weights])
    if not path.parent.parent.exists():
        pytest.skip(f"no test data at {path.parent.parent}")
    assert path.is_file()


@pytest.fixture
def session(tmp_path, monkeypatch):
    """session_gpu with its folders in tmp_path and `sh` recording commands instead of running them; builds whose
    name is in `failing` exit 1."""
    eng, res = tmp_path / "eng", tmp_path / "res"
    eng.mkdir()
    monkeypatch.setattr(session_gpu, "ENG", eng)
    monkeypatch.setattr(session_gpu, "RES", res)
    monkeypatch.setattr(session_gpu, "prepare_weights", lambda: None)
    monkeypatch.setattr(session_gpu, "built", {})
    monkeypatch.setattr(session_gpu, "plan", [])
    monkeypatch.setattr(session_gpu, "plans", [])
    calls: list[str] = []
    failing: set[str] = set()

    def sh(name, cmd, timeout, env=None):
        calls.append(name)
        if name.startswith("build_"):
            time.sleep(0.05)  # a build takes a while: steps that need no engine start first
            if name[len("build_"):] in failing:
                return 1
            engine = Path(cmd[cmd.index("-o") + 1])
            engine.write_bytes(b"engine")
            engine.with_name(engine.name + ".json").write_text(json.dumps({"build_seconds": 1.0}))
        return 0

    monkeypatch.setattr(session_gpu, "sh", sh)
    return session_gpu, eng, res, calls, failing


def test_a_v8_session_times_carried_engines_first_then_builds_one_wave(session):
    module, eng, res, calls, failing = session
    for model in module.V8_MODELS:  # run I's engines, carried in
        (eng / f"{model}_640_fp16_b1.engine").write_bytes(b"engine")
        (eng / f"{model}_640_fp16_b1.engine.json").write_text("{}")
    failing.add("yolov8s_syn_640_fp16_b32")
    module.session("v8")
    builds = [c for c in calls if c.startswith("build_")]
    left = ("640x480_fp32", "640_fp16_b32")
    assert sorted(builds) == sorted(f"build_{m}_{k}" for m in module.V8_MODELS for k in left)
    first_build = calls.index(builds[0])
    for model in module.V8_MODELS:  # the carried engines' timings ran on a quiet GPU, before any build
        assert calls.index(f"bench_{model}_b1") < first_build and calls.index(f"torch_{model}") < first_build
    assert "bench_yolo11s_syn_b32" in calls and "bench_yolov8s_syn_b32" not in calls  # its engine failed
    assert {"check_v8", "runtime_v8"} <= set(calls)
    steps = (res / "steps.txt").read_text()
    assert "build_yolo11s_syn_640_fp16_b1: carried in, not rebuilt" in steps
    assert "bench_yolov8s_syn_b32: skipped (an engine it needs was not built" in steps
    assert "wave 2" not in steps and (res / "DONE").exists()


def test_an_int8_session_uses_carried_calibrations_and_runs_both_waves(session, monkeypatch):
    module, eng, res, calls, failing = session
    carried = {name: eng / Path(name).name for b in module.PLANS["int8"] for name in map(str, b.needs)}
    for path in carried.values():  # the CPU-made calibrations, carried in the pack
        path.write_text("{}")
    plan = [module.Build(b.name, b.weights, b.args, tuple(carried[str(n)] for n in b.needs))
            for b in module.PLANS["int8"]]
    monkeypatch.setitem(module.PLANS, "int8", plan)
    module.session("int8")
    assert "calibrate_yolov5n" not in calls  # carried in: no GPU pass
    assert "int8_gpu_tests" not in calls  # plan int8b's: beside int8's four builds it ran out of time (run K)
    assert "wave 2 built" in (res / "steps.txt").read_text()


def test_the_int8_gpu_tests_belong_to_the_int8b_plan_only(session, monkeypatch):
    module, eng, res, calls, failing = session
    monkeypatch.setattr(module, "wait_for_files", lambda paths, limit=900: True)  # the calibrations are there
    module.session("perf")
    assert "int8_gpu_tests" not in calls
    module.session("int8b")
    assert "int8_gpu_tests" in calls


def test_a_session_of_two_plans_builds_the_first_plan_s_engines_first_and_each_engine_once(session, monkeypatch):
    module, eng, res, calls, failing = session
    monkeypatch.setattr(module, "wait_for_files", lambda paths, limit=900: True)  # the calibrations are there
    module.session("int8,perf")
    builds = [c[len("build_"):] for c in calls if c.startswith("build_")]
    int8 = [b.name for b in module.PLANS["int8"]]
    assert sorted(builds) == sorted({b.name for p in ("int8", "perf") for b in module.PLANS[p]})
    assert len(builds) == len(set(builds))  # yolov5s_syn_640_fp16_b32 is in both plans
    perf_only = [b.name for b in module.PLANS["perf"] if b.name not in int8]
    assert [b.name for b in module.plan] == int8 + perf_only  # the build queue, in waves of BUILD_JOBS
    assert "int8_gpu_tests" not in calls  # a step of plan int8b only


def test_an_unknown_plan_is_refused_by_name():
    with pytest.raises(SystemExit, match="plan 'int9': one of v8, int8"):
        session_gpu.plan_names("int8,int9")


def test_collect_brings_back_results_and_caches_without_annotated_images(session, tmp_path):
    import tarfile

    module, eng, res, calls, failing = session
    (res / "perf" / "detect_gpu").mkdir(parents=True)
    (res / "perf" / "detect_gpu" / "bus.jpg").write_bytes(b"\xff\xd8" + b"0" * 1000)
    (res / "perf" / "detect_gpu" / "detections.json").write_text("[]")
    (res / "steps.txt").write_text("done\n")
    (eng / "yolov5n.timing").write_bytes(b"cache")
    (eng / "yolov5n.engine").write_bytes(b"engine")  # engines come back through collect-engines
    out = tmp_path / "out"
    out.mkdir()
    module.collect(out)
    with tarfile.open(out / "res.tgz") as tar:
        names = set(tar.getnames())
    assert {"res/steps.txt", "res/perf/detect_gpu/detections.json", "eng/yolov5n.timing"} <= names
    assert not any(n.endswith((".jpg", ".engine")) for n in names)


def test_yolov5n_int8_engines_are_built_as_their_fp16_reference_and_validated_alike():
    """INT8 against fp16 "of the same engine settings" (issue 14): the yolov5n INT8 engines of plan int8 (explicit
    and implicit) take the shape and postprocess options of plan perf's static batch-1 fp16 engine, and val runs
    them all with the same arguments."""
    reference = session_gpu.YOLOV5N_B1
    flags = {"--int8", "--fp16"}
    with_value = {"--calib-cache", "--int8-keep", "--int8-mode", "--calib", "--calib-images"}

    def shared(args):
        out, skip = [], False
        for a in args:
            if skip:
                skip = False
            elif a in with_value:
                skip = True
            elif a not in flags:
                out.append(a)
        return out

    int8 = [b for b in session_gpu.PLANS["int8"] if b.name.startswith("yolov5n_int8")]
    assert len(int8) == 4 and reference in session_gpu.PLANS["int8"] and reference in session_gpu.PLANS["perf"]
    assert any("implicit" in b.args for b in int8)
    for b in int8:
        assert shared(b.args) == shared(reference.args), b.name
    vals = {s.name: s.cmd for s in session_gpu.accuracy_steps() if s.name.startswith("val_yolov5n")}
    static = {tuple(a for a in cmd[cmd.index("--data"):] if not a.endswith(".json"))
              for name, cmd in vals.items() if name.endswith("_b1")}
    assert {f"val_{b.name}" for b in int8} <= set(vals)
    assert len(static) == 1 and "--square" in next(iter(static))  # one set of val arguments for all of them
