"""Issue 11: no silent overwrite, no ignored Ctrl-C, verifiable file pairs, bad inputs as one clear error.

Each test asserts the exit status, the message, and that nothing was written or changed (the sha256 of every
file in the folder, hidden `.part` files included, before and after). Broken inputs are made here, in tmp_path.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, requires_tensorrt, requires_torch, shared
from trtnet import build as build_cmd
from trtnet import gen_wts
from trtnet.errors import TrtnetError

pytestmark = requires_tensorrt

SMALL = ["--imgsz", "64"]  # yolov5n at 64x64 builds in well under a second on the CPU


# -- helpers ---------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) → its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_build(capsys, *args) -> tuple[int, str]:
    code = build_cmd.cli([str(a) for a in args])
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture()
def w(tmp_path, yolov5n_weights) -> Path:
    """A fresh folder with yolov5n.wts and yolov5n.json."""
    folder = tmp_path / "w"
    shutil.copytree(yolov5n_weights, folder)
    return folder


@pytest.fixture()
def built(w, capsys) -> Path:
    """`w` plus an engine built from it: w/eng/yolov5n.engine (and its metadata)."""
    code, err = run_build(capsys, w / "yolov5n.wts", *SMALL, "-o", w / "eng" / "yolov5n.engine")
    assert code == 0, err
    return w / "eng" / "yolov5n.engine"


# -- 1. build -o never overwrites an input; engine metadata has its own name --------------------------------


def test_output_named_like_the_weights_is_refused(w, capsys):
    before = snapshot(w)
    code, err = run_build(capsys, w / "yolov5n.wts", *SMALL, "-o", w / "yolov5n.wts")
    assert code == 2 and ".engine" in one_error_line(err)
    assert snapshot(w) == before


def test_output_with_a_json_suffix_is_refused(w, tmp_path, capsys):
    code, err = run_build(capsys, w / "yolov5n.wts", *SMALL, "-o", tmp_path / "eng" / "x.json")
    assert code == 2 and "x.json" in one_error_line(err) and ".engine" in err
    assert not (tmp_path / "eng").exists()


def test_output_that_is_an_existing_directory_is_refused(w, tmp_path, capsys):
    (tmp_path / "x.engine").mkdir()
    before = snapshot(tmp_path)
    code, err = run_build(capsys, w / "yolov5n.wts", *SMALL, "-o", tmp_path / "x.engine")
    assert code == 2 and "directory" in one_error_line(err) and "x.engine" in err
    assert snapshot(tmp_path) == before and (tmp_path / "x.engine").is_dir()


def test_engine_beside_its_weights_keeps_the_weights_metadata(w, capsys):
    """The most natural call, `build w/NAME.wts -o w/NAME.engine`, used to replace w/NAME.json."""
    weights_json = (w / "yolov5n.json").read_bytes()
    code, err = run_build(capsys, w / "yolov5n.wts", *SMALL, "-o", w / "yolov5n.engine")
    assert code == 0, err
    assert (w / "yolov5n.json").read_bytes() == weights_json
    engine_meta = json.loads((w / "yolov5n.engine.json").read_text(encoding="utf-8"))
    assert engine_meta["family"] == "yolov5" and engine_meta["imgsz"] == [64, 64]
    # and the weights still build (they failed with KeyError: 'yaml' once their .json was engine metadata)
    code, err = run_build(capsys, w / "yolov5n.wts", *SMALL, "-o", w / "again.engine")
    assert code == 0, err


def test_engine_metadata_never_overwrites_a_weights_sidecar(w, capsys):
    """Weights named NAME.engine.wts have their metadata in NAME.engine.json: -o NAME.engine must not take it."""
    for suffix in (".wts", ".json"):
        (w / f"yolov5n{suffix}").rename(w / f"m.engine{suffix}")
    before = snapshot(w)
    code, err = run_build(capsys, w / "m.engine.wts", *SMALL, "-o", w / "m.engine")
    assert code == 2 and "would overwrite" in one_error_line(err) and "m.engine.json" in err
    assert snapshot(w) == before


def test_timing_cache_that_is_an_input_is_refused(w, capsys):
    """TensorRT (not -RTX) writes its timing cache after the build: it must not be the weights."""
    before = snapshot(w)
    code, err = run_build(capsys, w / "yolov5n.wts", *SMALL, "-o", w / "x.engine", "--timing-cache", w / "yolov5n.wts")
    assert code == 2 and "would overwrite" in one_error_line(err) and "yolov5n.wts" in err
    assert snapshot(w) == before


def test_engine_metadata_of_an_older_build_still_loads(tmp_path):
    """Engines built before NAME.engine.json have their metadata in NAME.json, without a sha256."""
    from trtnet.engine_files import load_metadata

    engine = tmp_path / "yolov5n.fp16.engine"
    engine.write_bytes(b"a plan")
    meta = {"family": "yolov5", "imgsz": [64, 64], "batch": {"min": 1, "opt": 1, "max": 1},
            "input": {"name": "images", "dtype": "float32"}, "outputs": ["raw_0", "raw_1", "raw_2"],
            "tensorrt": {"flavour": "tensorrt-rtx", "version": "1.0"}, "engine_bytes": 6}
    (tmp_path / "yolov5n.fp16.json").write_text(json.dumps(meta), encoding="utf-8")
    loaded = load_metadata(engine).to_dict()
    assert {k: loaded[k] for k in meta} == meta


def test_weights_metadata_is_not_taken_for_an_engines(w, built):
    """w/yolov5n.json holds the weights' metadata: it does not describe an engine w/yolov5n.engine."""
    from trtnet.engine_files import load_metadata

    shutil.copy(built, w / "yolov5n.engine")
    with pytest.raises(TrtnetError, match=r"yolov5n\.engine\.json is missing"):
        load_metadata(w / "yolov5n.engine")


# -- 2. Ctrl-C and SIGTERM stop a build; SIGKILL's leftovers are cleaned ------------------------------------

# Sends a signal to the build from inside TensorRT's build (from its first log message once
# build_serialized_network runs: that is where a real Ctrl-C lands) or while the engine's .part is written;
# "external": waits inside that log message for the test to send the signal.
HARNESS = textwrap.dedent("""
    import os, signal, sys, time
    from trtnet import build, compat

    sig, moment, engine = getattr(signal, sys.argv[1]), sys.argv[2], sys.argv[3]
    state = {"building": False, "sent": False}

    def send():
        if not state["sent"]:
            state["sent"] = True
            os.kill(os.getpid(), sig)

    def wait_for_the_test():  # it sends the signal from outside, then creates `go`
        print("inside the build", file=sys.stderr, flush=True)
        go = engine + ".go"
        for _ in range(500):
            if os.path.exists(go):
                break
            time.sleep(0.02)
        time.sleep(0.2)

    if moment in ("build", "external"):
        logger_class = type(compat.Logger())
        log = logger_class.log
        def logged(self, severity, msg):
            if state["building"] and not state["sent"]:
                state["sent"] = True
                os.kill(os.getpid(), sig) if moment == "build" else wait_for_the_test()
            log(self, severity, msg)
        logger_class.log = logged
        build_serialized = compat.build_serialized
        def building(*args):
            state["building"] = True
            return build_serialized(*args)
        compat.build_serialized = building
    else:
        fsync = os.fsync
        part = "." + os.path.basename(engine) + "."
        def syncing(fd):
            name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            if name.startswith(part) and not name.startswith(part + "json"):
                send()
            fsync(fd)
        os.fsync = syncing
    sys.exit(build.cli(sys.argv[4:] + ["-o", engine]))
""")


def interrupted_build(tmp_path: Path, w: Path, sig: str, moment: str, engine: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "harness.py"
    script.write_text(HARNESS, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(script), sig, moment, str(engine), str(w / "yolov5n.wts"), *SMALL],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
@pytest.mark.parametrize(("sig", "moment", "status", "said"), [
    ("SIGINT", "build", 130, "interrupted"),
    ("SIGTERM", "build", 143, "terminated"),
    ("SIGINT", "write", 130, "interrupted"),
    ("SIGTERM", "write", 143, "terminated"),
])
def test_signal_stops_the_build_and_keeps_the_old_engine(w, built, tmp_path, sig, moment, status, said):
    before = snapshot(w)
    done = interrupted_build(tmp_path, w, sig, moment, built)
    assert done.returncode == status, done.stderr
    assert said in done.stderr.splitlines()[-1] and "wrote" not in done.stdout, done.stderr
    assert snapshot(w) == before  # old engine and metadata as they were, no .part left


@pytest.mark.parametrize(("sig", "status", "said"), [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_signal_from_another_process_stops_the_build(w, built, tmp_path, sig, status, said):
    before = snapshot(w)
    script = tmp_path / "harness.py"
    script.write_text(HARNESS, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen([sys.executable, str(script), sig, "external", str(built), str(w / "yolov5n.wts"), *SMALL],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as child:
        for line in child.stderr:
            if "inside the build" in line:
                break
        child.send_signal(getattr(signal, sig))
        Path(str(built) + ".go").touch()
        out, err = child.communicate(timeout=300)
    Path(str(built) + ".go").unlink()
    assert child.returncode == status, err
    assert said in err.splitlines()[-1] and "wrote" not in out, err
    assert snapshot(w) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_parts_of_a_killed_build_are_removed_by_the_next(w, built, tmp_path, capsys):
    done = interrupted_build(tmp_path, w, "SIGKILL", "write", built)
    assert done.returncode == -signal.SIGKILL
    leftovers = list(built.parent.glob(".yolov5n.engine.*.part"))
    assert len(leftovers) == 1  # SIGKILL cannot be handled: it leaves its .part
    code, err = run_build(capsys, w / "yolov5n.wts", *SMALL, "-o", built)
    assert code == 0, err
    assert list(built.parent.glob(".yolov5n.engine.*.part")) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock")
def test_a_part_another_process_is_writing_is_kept(w, built, capsys):
    import fcntl

    live = built.parent / ".yolov5n.engine.live1234.part"
    with open(live, "wb") as f:  # another writer: holds the lock on its .part
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        code, err = run_build(capsys, w / "yolov5n.wts", *SMALL, "-o", built)
        assert code == 0, err
        assert live.exists()


# -- 3. sidecars vouch for their partner ------------------------------------------------------------------


def test_weights_sidecar_records_the_sha256_of_its_wts(w):
    meta = json.loads((w / "yolov5n.json").read_text(encoding="utf-8"))
    wts = (w / "yolov5n.wts").read_bytes()
    assert meta["partner"] == {"file": "yolov5n.wts", "bytes": len(wts), "sha256": hashlib.sha256(wts).hexdigest()}


def same_size_other_content(path: Path) -> None:
    """Change one hex digit of the last value: same size, another file."""
    data = bytearray(path.read_bytes())
    i = data.rstrip().rfind(b" ") + 1
    data[i] = ord("1") if data[i] != ord("1") else ord("2")
    path.write_bytes(bytes(data))


def test_replaced_wts_is_refused_by_its_sidecar(w, capsys):
    same_size_other_content(w / "yolov5n.wts")
    before = snapshot(w)
    code, err = run_build(capsys, w / "yolov5n.wts", *SMALL, "-o", w / "x.engine")
    line = one_error_line(err)
    assert code == 2 and "stale or mismatched sidecar" in line and "yolov5n.json does not match" in line
    assert "yolov5n.wts" in line and "written by trtnet" in line
    assert snapshot(w) == before


def test_replaced_engine_is_refused_by_its_sidecar(built):
    from trtnet.engine_files import load_metadata

    data = bytearray(built.read_bytes())
    data[len(data) // 2] ^= 0xFF
    built.write_bytes(bytes(data))
    with pytest.raises(TrtnetError, match=r"stale or mismatched sidecar: .*yolov5n\.engine\.json does not match"):
        load_metadata(built)


def test_crash_between_engine_and_sidecar_is_detected(w, built, monkeypatch, capsys):
    """The new engine is written, the process dies before its metadata: the old metadata must not vouch for it."""
    from trtnet.engine_files import load_metadata

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # stands for the process dying here

    monkeypatch.setattr(build_cmd.json, "dump", crash)
    code, _ = run_build(capsys, w / "yolov5n.wts", "--imgsz", "96", "-o", built)
    assert code == 130
    monkeypatch.undo()
    with pytest.raises(TrtnetError, match="stale or mismatched sidecar"):
        load_metadata(built)


def test_sidecar_without_a_sha256_still_loads(w, capsys):
    """Sidecars of older trtnet versions have no partner record."""
    meta = json.loads((w / "yolov5n.json").read_text(encoding="utf-8"))
    meta.pop("partner", None)
    (w / "yolov5n.json").write_text(json.dumps(meta), encoding="utf-8")
    code, err = run_build(capsys, w / "yolov5n.wts", *SMALL, "-o", w / "x.engine")
    assert code == 0, err


# -- 4. bad inputs: one clear error, nothing written ------------------------------------------------------


def _first_conv(meta):
    return next(k for k, v in meta["shapes"].items() if len(v) == 4)


BAD_WEIGHTS_META = {
    "negative shape": (lambda m: m["shapes"].__setitem__(_first_conv(m), [-16, -3, 6, 6]), '"shapes"'),
    "text shape": (lambda m: m["shapes"].__setitem__(_first_conv(m), ["a"]), '"shapes"'),
    "shapes as a list": (lambda m: m.__setitem__("shapes", list(m["shapes"].values())), '"shapes"'),
    "yaml as a string": (lambda m: m.__setitem__("yaml", "yolov5n.yaml"), '"yaml"'),
    "bn_eps text": (lambda m: m.__setitem__("bn_eps", "x"), '"bn_eps"'),
    "stride 0": (lambda m: m.__setitem__("strides", [0, 16, 32]), '"strides"'),
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS_META))
def test_weights_sidecar_with_wrong_types(w, capsys, case):
    change, key = BAD_WEIGHTS_META[case]
    meta = json.loads((w / "yolov5n.json").read_text(encoding="utf-8"))
    change(meta)
    (w / "yolov5n.json").write_text(json.dumps(meta), encoding="utf-8")
    before = snapshot(w)
    code, err = run_build(capsys, w / "yolov5n.wts", *SMALL, "-o", w / "x.engine")
    line = one_error_line(err)
    assert code == 2 and "yolov5n.json" in line and key in line and "must be" in line
    assert snapshot(w) == before


def test_safetensors_metadata_as_a_list(tmp_path):
    from safetensors.numpy import save_file

    from trtnet.weights import load_weights

    path = tmp_path / "m.safetensors"
    save_file({"t": np.zeros(2, np.float32)}, str(path), metadata={"trtnet": "[1, 2]"})
    with pytest.raises(TrtnetError, match=r"m\.safetensors.*expected a JSON object"):
        load_weights(path)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_build_refuses_non_finite_weights(w, capsys, bad):
    from trtnet.weights import read_wts, write_wts

    tensors = read_wts(w / "yolov5n.wts")
    name = "model.2.cv1.conv.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][3] = float(bad)
    write_wts(w / "yolov5n.wts", tensors)
    meta = json.loads((w / "yolov5n.json").read_text(encoding="utf-8"))
    meta.pop("partner", None)  # the .wts was changed on purpose
    (w / "yolov5n.json").write_text(json.dumps(meta), encoding="utf-8")
    before = snapshot(w)
    code, err = run_build(capsys, w / "yolov5n.wts", *SMALL, "-o", w / "x.engine")
    line = one_error_line(err)
    assert code == 2 and name in line and "NaN or infinite" in line
    assert snapshot(w) == before


@requires_torch
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_gen_wts_refuses_non_finite_weights_before_writing(tmp_path, capsys, bad):
    import torch

    state = torch.load(shared("weights", "synthetic", "resnet18_syn.pth"), weights_only=True)
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float(bad)
    checkpoint = tmp_path / "broken.pth"
    torch.save(state, checkpoint)
    out = tmp_path / "out"
    assert gen_wts.cli([str(checkpoint), "-o", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "broken.pth" in line and "layer2.0.conv1.weight" in line and "NaN or infinite" in line
    assert not out.exists()


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("resnet18")
    assert gen_wts.cli([str(shared("weights", "synthetic", "resnet18_syn.pth")), "-o", str(out)]) == 0
    return out


@pytest.mark.parametrize(("weights", "args", "option"), [
    ("yolov5n", ["--imgsz", "0"], "--imgsz 0"),  # once silently built 640
    ("resnet18_syn", ["--imgsz", "1"], "--imgsz 1"),
    ("yolov5n", ["--imgsz", "-32"], "--imgsz -32"),
    ("yolov5n", ["--imgsz", "64", "--max-imgsz", "-64"], "--max-imgsz -64"),
    ("yolov5n", ["--imgsz", "64", "--workspace", "-1"], "--workspace -1"),
    ("yolov5n", ["--imgsz", "64", "--timing-cache", "{dir}"], "is a directory"),
])
def test_bad_build_options(w, resnet_dir, tmp_path, capsys, weights, args, option):
    folder = w if weights == "yolov5n" else resnet_dir
    cache_dir = tmp_path / "cache_dir"
    cache_dir.mkdir()
    out = tmp_path / "out"
    before = snapshot(folder)
    args = [a.format(dir=cache_dir) for a in args]
    code, err = run_build(capsys, folder / f"{weights}.wts", *args, "-o", out / "x.engine")
    assert code == 2 and option in one_error_line(err)
    assert snapshot(folder) == before and not out.exists()


def no_space(real_fsync):
    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".part"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)
    return fsync


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_disk_full_while_writing_the_engine(w, built, monkeypatch, capsys):
    before = snapshot(w)
    monkeypatch.setattr(os, "fsync", no_space(os.fsync))
    code, err = run_build(capsys, w / "yolov5n.wts", "--imgsz", "96", "-o", built)
    line = one_error_line(err)
    assert code == 2 and f"cannot write {built}" in line and "No space left on device" in line
    assert "it needs" in line and "MB" in line
    assert snapshot(w) == before


def test_disk_too_full_for_the_engine_is_seen_before_writing(w, built, monkeypatch, capsys):
    before = snapshot(w)
    usage = shutil.disk_usage(built.parent)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    code, err = run_build(capsys, w / "yolov5n.wts", "--imgsz", "96", "-o", built)
    line = one_error_line(err)
    assert code == 2 and f"cannot write {built}" in line and "the disk has 1000 bytes free" in line
    assert snapshot(w) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_disk_full_while_writing_weights(w, monkeypatch, capsys):
    before = snapshot(w)
    monkeypatch.setattr(os, "fsync", no_space(os.fsync))
    assert gen_wts.cli([str(shared("weights", "yolov5n.pt")), "-o", str(w)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot write {w / 'yolov5n.wts'}" in line and "No space left on device" in line and "MB" in line
    assert snapshot(w) == before
