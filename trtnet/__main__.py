"""`python -m trtnet` lists the sub-commands; `python -m trtnet COMMAND …` runs one."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "gen_wts": "checkpoint (.pt/.pth) → tensorrtx-format .wts (+ .json) or .safetensors",
    "build": "weights → TensorRT engine (fp32/fp16, static or dynamic batch, postprocess)",
    "inspect": "print a network layer by layer; run it on the CPU and compare with a golden",
    "detect": "run a YOLOv5 engine on images, folders, videos or a camera",
    "bench": "latency and throughput of an engine (and of its kernels), optionally vs PyTorch",
    "val": "COCO mAP of a detection engine / top-1 of a classifier on a dataset",
    "serve": "serve engines on Triton (PyTriton): HTTP/gRPC, dynamic batching, many instances and GPUs",
    "demo": "download yolov5n, convert, build and detect on a sample image",
}
MODULES = {"inspect": "inspection"}  # a command whose module is named otherwise (`inspect` would shadow the stdlib)


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items())
    return (
        "usage: python -m trtnet COMMAND [ARGS…]   (or python -m trtnet.COMMAND)\n\n"
        f"commands:\n{rows}\n\n`python -m trtnet COMMAND --help` describes each one."
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0].replace("-", "_"), argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"trtnet.{MODULES.get(command, command)}")
    return module.cli(rest)


if __name__ == "__main__":
    sys.exit(main())
