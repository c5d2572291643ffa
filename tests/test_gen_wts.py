"""`python -m trtnet.gen_wts`: every shared checkpoint converts bit-exactly; the CLI's contract.

The expected tensors come from torch itself (`torch.load` + `module.state_dict()`), with YOLOv5's
model classes replaced by plain nn.Modules so no ultralytics code is needed — independent of trtnet's
own reader.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

from tests.conftest import CHECKPOINTS, REPO, requires_torch, shared
from trtnet import __version__
from trtnet.gen_wts import cli, convert
from trtnet.weights import load_weights


def permissive_pickle_module() -> types.ModuleType:
    """A pickle module for torch.load whose `models.*` classes are bare nn.Modules (test-only, trusted files)."""
    from torch import nn

    classes: dict[tuple[str, str], type] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module.split(".")[0] in ("models", "utils"):
                return classes.setdefault((module, name), type(name, (nn.Module,), {}))
            return super().find_class(module, name)

    module = types.ModuleType("permissive_pickle")
    module.Unpickler = Unpickler
    module.load = lambda f, **kwargs: Unpickler(f, **kwargs).load()
    return module


def torch_state_dict(path) -> dict[str, np.ndarray]:
    """The checkpoint's state dict as torch sees it, each tensor converted to float32 by torch."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=permissive_pickle_module())
    if isinstance(obj, dict) and isinstance(obj.get("ema") or obj.get("model"), torch.nn.Module):
        obj = (obj.get("ema") or obj["model"]).state_dict()
    return {k: v.float().numpy() for k, v in obj.items()}


def assert_bit_identical(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        assert np.array_equal(got[name].view(np.uint32), value.view(np.uint32)), name


@requires_torch
@pytest.mark.parametrize("model", list(CHECKPOINTS))
def test_checkpoint_converts_bit_exactly(tmp_path, model):
    checkpoint = shared("weights", *CHECKPOINTS[model])
    done = convert(checkpoint, tmp_path)
    assert done.path == tmp_path / f"{model}.wts" and done.sidecar == tmp_path / f"{model}.json"
    weights = load_weights(done.path)
    expected = torch_state_dict(checkpoint)
    assert_bit_identical(weights.tensors, expected)
    meta = weights.meta
    assert meta["format"] == "wts" and meta["source"] == checkpoint.name
    assert meta["source_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert meta["trtnet_version"] == __version__
    assert meta["shapes"] == {k: list(v.shape) for k, v in expected.items()}
    assert meta["family"] == ("resnet" if model.startswith("resnet") else "yolov5")


@requires_torch
@pytest.mark.parametrize("model", ["yolov5n", "resnet50_syn"])
def test_safetensors_agrees_with_wts(tmp_path, model):
    checkpoint = shared("weights", *CHECKPOINTS[model])
    wts = load_weights(convert(checkpoint, tmp_path).path)
    st = load_weights(convert(checkpoint, tmp_path / "model.safetensors").path)
    assert st.path.suffix == ".safetensors" and not (tmp_path / "model.json").exists()
    assert_bit_identical(st.tensors, wts.tensors)
    assert {**st.meta, "format": "wts"} == wts.meta


def test_cli_writes_and_summarises(tmp_path, capsys):
    checkpoint = shared("weights", "synthetic", "resnet18_syn.pth")
    assert cli([str(checkpoint), "-o", str(tmp_path), "--name", "r18", "--format", "safetensors"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'r18.safetensors'}: 122 tensors" in out
    assert "resnet18: 1000 classes" in out and "done in" in out
    assert load_weights(tmp_path / "r18.safetensors").meta["arch"] == "resnet18"


def test_cli_output_suffix_and_format_must_agree(tmp_path, capsys):
    checkpoint = shared("weights", "synthetic", "resnet18_syn.pth")
    assert cli([str(checkpoint), "-o", str(tmp_path / "x.wts"), "--format", "safetensors"]) == 2
    assert "error: -o " in capsys.readouterr().err
    assert not (tmp_path / "x.wts").exists()


def test_cli_missing_checkpoint(tmp_path, capsys):
    assert cli([str(tmp_path / "nope.pt"), "-o", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: checkpoint not found: {tmp_path / 'nope.pt'}\n"


def test_cli_unreadable_checkpoint(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    assert cli([str(tmp_path / "junk.pt")]) == 2
    assert "not a valid PyTorch checkpoint" in capsys.readouterr().err


def run_module(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "trtnet.gen_wts", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_help(tmp_path):
    result = run_module("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "usage: trtnet gen_wts" in result.stdout and "--format {wts,safetensors}" in result.stdout


class Calls:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as archive:  # torch.save's layout, without needing torch
        archive.writestr("archive/data.pkl", pickle.dumps({"model": Calls(os.system, f"touch {marker}")}, protocol=2))
    result = run_module(str(evil), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: refusing to load {evil}: its pickle calls {os.system.__module__}.system")
    assert "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


@requires_torch
def test_malicious_torch_save_is_refused(tmp_path, capsys):
    import torch

    marker = tmp_path / "pwned"
    torch.save({"epoch": 0, "model": Calls(eval, f"open({str(marker)!r}, 'w')")}, tmp_path / "evil.pt")
    assert cli([str(tmp_path / "evil.pt"), "-o", str(tmp_path)]) == 2
    assert "calls builtins.eval, which is not allowed" in capsys.readouterr().err
    assert not marker.exists()
