"""`python -m trtnet.quant sensitivity NAME --calib DIR`: which layer groups INT8 hurts most.

    python -m trtnet.quant sensitivity yolov5n --calib ../shared/data/coco128/images --images 8

Calibrates (or reads --calib-cache), then measures on the first --images calibration images how far the all-INT8
network's outputs are from fp32 and how much of that keeping each layer group alone in float removes; prints the
table (most error removed first, what `--int8-keep auto` keeps marked) and writes it as JSON (default:
NAME.sensitivity.json beside the weights, where `build --int8 --int8-keep auto --calib-cache NAME.calib.json`
finds it).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from trtnet.cli import HelpFormatter, add_weights_dir, command_parser, run


def parser():
    p = command_parser("quant", "INT8 tools.")
    sub = p.add_subparsers(dest="command", metavar="TOOL", title="tools", help="sensitivity (the only one)")
    sub.required = True
    s = sub.add_parser("sensitivity",
                       help="per layer group: the INT8 output error keeping that group alone in float removes",
                       formatter_class=HelpFormatter)
    s.add_argument("weights", help="a name in --weights-dir or a path (as trtnet.build takes it)")
    s.add_argument("--calib", required=True, help="calibration images: a folder (searched recursively) or a glob")
    s.add_argument("--images", type=int, default=8, help="images the errors are measured on (default 8)")
    s.add_argument("--calib-images", type=int, default=256,
                   help="images calibrated on without --calib-cache (default 256)")
    s.add_argument("--calib-method", default="percentile", choices=("entropy", "percentile", "minmax", "max"),
                   help="activation ranges: percentile (99.99, the default), entropy (KL) or minmax")
    s.add_argument("--calib-cache", metavar="FILE", help="an existing calibration file to use (default: calibrate)")
    s.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="where the reference executor runs (gpu: torch on CUDA)")
    s.add_argument("--imgsz", type=int, help="square input size (default: the model's)")
    add_weights_dir(s, "where names are looked up")
    s.add_argument("-o", "--output", help="report JSON (default: NAME.sensitivity.json beside the weights)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return sensitivity(parser().parse_args(argv))


def sensitivity(args) -> int:
    from trtnet.build import BuildRequest, load_for_build
    from trtnet.errors import TrtnetError
    from trtnet.network import default_imgsz
    from trtnet.quant.calibrate import calibrate
    from trtnet.quant.calibration_file import network_hash, read_calibration
    from trtnet.quant.options import measure_sensitivity, report_beside_weights

    if args.images < 1:
        raise TrtnetError(f"--images {args.images}: must be at least 1")
    weights_path, tensors, meta = load_for_build(BuildRequest(args.weights, weights_dir=args.weights_dir))
    imgsz = args.imgsz or default_imgsz(meta)
    device = "gpu" if args.device == "gpu" else "cpu"
    if args.calib_cache:
        calibration = read_calibration(args.calib_cache, network_hash(tensors, meta))
    else:
        calibration = calibrate(tensors, meta, args.calib, method=args.calib_method, count=args.calib_images,
                                imgsz=imgsz, device=device).calibration
    report = measure_sensitivity(tensors, meta, args.calib, args.images, imgsz, calibration, device,
                                 lambda line: print(line, file=sys.stderr))
    out = Path(args.output) if args.output else report_beside_weights(weights_path)
    report.write(out)
    print(report.table())
    print(f"wrote {out}")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
