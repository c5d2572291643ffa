"""The package's layout: no module shadows the standard library, and every command still runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_running_a_module_file_directly_does_not_shadow_the_stdlib():
    # `python trtnet/build.py` puts trtnet/ first on sys.path; a trtnet/inspect.py used to crash dataclasses there.
    done = run_python("trtnet/build.py", "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: trtnet build" in done.stdout


@pytest.mark.parametrize("command", [["-m", "trtnet.inspect", "--help"], ["-m", "trtnet", "inspect", "--help"]])
def test_inspect_command_still_runs(command):
    done = run_python(*command)
    assert done.returncode == 0, done.stderr
    assert "usage: trtnet inspect" in done.stdout


def test_nothing_in_trtnet_is_an_importable_module_named_like_the_stdlib_inspect():
    assert not (ROOT / "trtnet" / "inspect.py").exists()
    assert not (ROOT / "trtnet" / "inspect" / "__init__.py").exists()
    assert sorted(p.name for p in (ROOT / "trtnet" / "inspect").glob("*.py")) == ["__main__.py"]


def test_packaging_ships_the_inspect_entry_folder():
    tomllib = pytest.importorskip("tomllib", reason="Python < 3.11 has no tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "trtnet.inspect" in config["packages"]
