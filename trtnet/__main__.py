"""`trtnet` (or `python -m trtnet`): one argparse parser, a sub-command per command module.

`trtnet --version`, `trtnet --help` lists the commands, `trtnet COMMAND --help` describes one; each command also
runs as `python -m trtnet.COMMAND`. The sub-parsers are the command modules' own `parser()`s, so both ways take
exactly the same options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from trtnet import __version__
from trtnet.cli import PROG, HelpFormatter

COMMANDS = {
    "gen_wts": "checkpoint (.pt/.pth) → tensorrtx-format .wts (+ .json) or .safetensors",
    "build": "weights → TensorRT engine (fp32/fp16/int8, static or dynamic batch, postprocess)",
    "quant": "INT8: sensitivity of each layer group to quantization (what --int8-keep auto keeps in fp16)",
    "inspect": "a network or engine layer by layer; compare with a golden (.npz) per output and layer",
    "golden": "run the official model code on an image and write a golden .npz for inspect --compare",
    "detect": "run a detection engine (or its weights on the CPU) on images, folders, videos or a camera",
    "bench": "latency and throughput of an engine (`bench kernels`: of the pre/post-processing kernels)",
    "val": "COCO mAP of a detection engine / top-1 of a classifier on a dataset",
    "serve": "serve engines on Triton (PyTriton): HTTP/gRPC, dynamic batching, many instances and GPUs",
    "demo": "convert yolov5n, build, and detect on a sample image (GPU, or CPU when there is none)",
}
# a command whose module is named otherwise (`inspect` would shadow the stdlib)
MODULES = {"inspect": "inspection", "quant": "quant.__main__"}


def command_module(command: str):
    return importlib.import_module(f"trtnet.{MODULES.get(command, command)}")


def top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="PyTorch checkpoints → TensorRT engines without ONNX.",
                                formatter_class=HelpFormatter,
                                epilog=f"`{PROG} COMMAND --help` describes each command.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}", help="print the version")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    for command, summary in COMMANDS.items():
        own = command_module(command).parser()
        aliases = [command.replace("_", "-")] if "_" in command else []
        sub.add_parser(command, aliases=aliases, parents=[own], conflict_handler="resolve", help=summary,
                       description=own.description, formatter_class=HelpFormatter)
    return p


def canonical(command: str) -> str:
    return command.replace("-", "_")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "kernels"]:  # bench's second command: its own parser
        return command_module("bench").cli(argv[1:])
    args = top_parser().parse_args(argv)  # --help, --version, unknown commands and option errors end here
    return command_module(canonical(args.command)).cli(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
