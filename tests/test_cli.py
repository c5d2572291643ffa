"""The `trtnet` command: one parser with a sub-command per module, and help text for every option."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from tests.conftest import REPO
from trtnet import __main__ as top
from trtnet import __version__, bench_kernels


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    parsers = {command: top.command_module(command).parser() for command in top.COMMANDS}
    parsers["bench kernels"] = bench_kernels.parser()
    return parsers


@pytest.mark.parametrize("command", [*top.COMMANDS, "bench kernels"])
def test_every_option_has_help_and_no_default_none(command):
    p = command_parsers()[command]
    assert p.prog == f"trtnet {command}"
    for action in p._actions:
        assert action.help and action.help != argparse.SUPPRESS, f"{command} {action.option_strings or action.dest}"
    text = p.format_help()
    assert "default: None" not in text and "(default: False)" not in text
    for line in text.splitlines():  # one default per option, not the help's and the formatter's
        assert line.lower().count("default") <= 1, line


def test_defaults_that_say_something_are_shown_once():
    text = top.command_module("build").parser().format_help()
    assert "(default: 0.25)" in text  # --conf: appended by the formatter
    assert "--weights-dir" in text and "(default: weights)" in text
    assert "half precision\n" in text  # not "(default: fp32)": that is the precision's default, not --fp16's


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        top.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"trtnet {__version__}"


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        top.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: trtnet ")
    for command in top.COMMANDS:
        assert f"    {command}" in out


@pytest.mark.parametrize("argv", [["build", "--help"], ["gen-wts", "--help"], ["bench", "kernels", "--help"]])
def test_sub_command_help_names_the_sub_command(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        top.main(argv)
    assert exit_.value.code == 0
    expected = {"build": "trtnet build", "gen-wts": "trtnet gen_wts", "bench": "trtnet bench kernels"}[argv[0]]
    assert capsys.readouterr().out.startswith(f"usage: {expected} ")


def test_unknown_command_and_bad_option_exit_2(capsys):
    for argv in (["nope"], ["build", "yolov5n", "--imgsz", "big"]):
        with pytest.raises(SystemExit) as exit_:
            top.main(argv)
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and "usage: trtnet build" in err


def test_sub_command_runs_the_module(tmp_path, capsys):
    assert top.main(["build", "nope", "--weights-dir", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_python_m_module_shows_the_same_usage():
    done = subprocess.run([sys.executable, "-m", "trtnet.build", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: trtnet build ")
    assert "--verbose" in done.stdout


def test_every_weights_dir_follows_trtnet_weights(monkeypatch):
    """One default for --weights-dir (and gen_wts' output folder): $TRTNET_WEIGHTS, else weights/."""
    monkeypatch.setenv("TRTNET_WEIGHTS", "/elsewhere")
    seen = {}
    for name, p in command_parsers().items():
        for action in p._actions:
            if "--weights-dir" in action.option_strings or (name == "gen_wts" and action.dest == "output"):
                seen[name] = action.default
    assert seen and set(seen.values()) == {"/elsewhere"}, seen
    assert {"build", "detect", "inspect", "gen_wts", "serve"} <= set(seen)
