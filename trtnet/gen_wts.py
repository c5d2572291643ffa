"""`python -m trtnet.gen_wts`: a PyTorch checkpoint → tensorrtx-format .wts (+ .json) or .safetensors.

Reads the checkpoint without torch and without running its pickle (see trtnet.checkpoint).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trtnet import networks
from trtnet.checkpoint import Checkpoint, read_checkpoint
from trtnet.cli import command_parser, run, weights_dir_default
from trtnet.errors import TrtnetError
from trtnet.weights import FORMATS, SUFFIXES, check_finite, weights_meta, write_safetensors, write_sidecar, write_wts


@dataclass
class Converted:
    path: Path  # the .wts or .safetensors written
    sidecar: Path | None  # the .json beside a .wts
    checkpoint: Checkpoint
    seconds: float


def output_path(checkpoint: Path, output: str | Path | None, fmt: str | None, name: str | None) -> tuple[Path, str]:
    """Where to write and in which format: `-o` is a file (its suffix may pick the format) or a folder."""
    out = Path(output) if output is not None else Path(weights_dir_default())
    by_suffix = next((f for f, suffix in SUFFIXES.items() if out.suffix == suffix), None)
    if by_suffix and fmt and fmt != by_suffix:
        raise TrtnetError(f"-o {out} is a .{by_suffix} file but --format is {fmt}; make them agree")
    fmt = by_suffix or fmt or "wts"
    if by_suffix:
        return out, fmt
    if out.is_file():
        raise TrtnetError(f"-o {out}: a file without a .wts/.safetensors suffix; give a folder or a file name "
                          "ending in .wts or .safetensors")
    return out / f"{name or checkpoint.stem}{SUFFIXES[fmt]}", fmt


def convert(checkpoint: str | Path, output: str | Path | None = None, fmt: str | None = None,
            name: str | None = None, progress: bool = True) -> Converted:
    """Read `checkpoint` and write its weights (and metadata) as .wts + .json or as .safetensors."""
    start = time.perf_counter()
    checkpoint = Path(checkpoint)
    path, fmt = output_path(checkpoint, output, fmt, name)
    ckpt = read_checkpoint(checkpoint)
    check_finite(ckpt.state_dict, checkpoint)
    meta = weights_meta(ckpt.meta, ckpt.state_dict, checkpoint, fmt)
    sidecar = None
    if fmt == "wts":
        write_wts(path, ckpt.state_dict, progress=progress)
        sidecar = write_sidecar(path, meta)  # after the .wts: it records the .wts's sha256
    else:
        write_safetensors(path, ckpt.state_dict, meta)
    return Converted(path, sidecar, ckpt, time.perf_counter() - start)


def parser() -> argparse.ArgumentParser:
    p = command_parser("gen_wts", "PyTorch checkpoint → tensorrtx-format .wts (+ .json) or .safetensors, without torch")
    p.add_argument("checkpoint", help="YOLOv5 .pt or torchvision ResNet .pth checkpoint")
    p.add_argument("-o", "--output", default=weights_dir_default(),
                   help="output folder ($TRTNET_WEIGHTS, else weights/), or a file ending in .wts/.safetensors")
    p.add_argument("--format", choices=FORMATS, help="output format; unset: -o's suffix decides, else wts")
    p.add_argument("--name", help="output file name without suffix; unset: the checkpoint's stem")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    done = convert(args.checkpoint, args.output, args.format, args.name)
    values = sum(v.size for v in done.checkpoint.state_dict.values())
    also = f" and {done.sidecar}" if done.sidecar else ""
    print(f"wrote {done.path}{also}: {len(done.checkpoint.state_dict)} tensors, {values / 1e6:.2f}M values")
    print(networks.summary(done.checkpoint.meta))
    print(f"done in {done.seconds:.2f} s")
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
