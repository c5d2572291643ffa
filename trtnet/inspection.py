"""`python -m trtnet.inspect`: print a network layer by layer; run it on the CPU against a golden.

    python -m trtnet.inspect yolov5n --imgsz 320
    python -m trtnet.inspect yolov5n --compare ../shared/data/golden/golden_yolov5n_bus320.npz
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

import numpy as np

from trtnet import compat, networks
from trtnet.build import BuildRequest, load_for_build
from trtnet.cli import parser, run
from trtnet.network import BatchProfile, define_network


def golden_input(golden) -> np.ndarray:
    """The network input stored in a golden: `image` (uint8, /255 as the model sees it) or `x`."""
    if "image" in golden.files:
        return golden["image"].astype(np.float32) / 255.0
    if "x" in golden.files:
        return golden["x"].astype(np.float32)
    raise SystemExit("the golden holds neither `image` nor `x`")


def tensor_for_golden_key(key: str, meta: Mapping | None = None) -> str:
    """Golden keys → our tensor names: the family's own (`golden_tensor(key, meta)`, e.g. YOLOv8's `raw` →
    output0), else layer_07 → model.7; raw_0, logits, layer1 stay as they are."""
    own = getattr(networks.for_meta(meta), "golden_tensor", None) if meta is not None else None
    if own is not None and own(key, meta):
        return own(key, meta)
    if key.startswith("layer_") and key[6:].isdigit():
        return f"model.{int(key[6:])}"
    return key


def network_tensor_names(network) -> set:
    return {network.get_layer(i).get_output(j).name for i in range(network.num_layers)
            for j in range(network.get_layer(i).num_outputs)}


def compare(outputs: dict, golden, tensors: Mapping[str, str]) -> list[tuple]:
    """(golden key, tensor, max abs err, mean abs err, max err / golden range) for each key → tensor."""
    rows = []
    for key, tensor in tensors.items():
        ours = outputs.get(tensor)
        if ours is None:
            continue
        ref = golden[key].astype(np.float32)
        if ours.shape != ref.shape:
            print(f"{key}: ours {list(ours.shape)} and the golden's {list(ref.shape)} differ in shape; skipped")
            continue
        err = np.abs(ours.astype(np.float32) - ref)
        span = float(ref.max() - ref.min()) or 1.0
        rows.append((key, tensor, float(err.max()), float(err.mean()), float(err.max()) / span))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("inspect", "Print a network layer by layer; with --compare, run it on the CPU reference "
                          "executor and report the error of every output the golden holds.")
    p.add_argument("weights", help="a name in --weights-dir or a weights path, as for build")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--imgsz", type=int, help="input size (default: the golden's, else the model's)")
    p.add_argument("--compare", metavar="GOLDEN.npz", help="golden outputs to compare with")
    p.add_argument("--weights-dir", default="weights")
    p.add_argument("--arch", help="architecture for weights without metadata")
    p.add_argument("--nc", type=int)
    p.add_argument("--quiet", action="store_true", help="no layer table")
    args = p.parse_args(argv)

    from trtnet.executor import describe_network, run_network

    _, tensors, meta = load_for_build(BuildRequest(args.weights, weights_dir=args.weights_dir, arch=args.arch,
                                                   nc=args.nc))
    golden = np.load(args.compare) if args.compare else None
    x = golden_input(golden) if golden is not None else None
    imgsz = args.imgsz or (x.shape[2] if x is not None else None)
    batch = x.shape[0] if x is not None else 1
    builder = compat.trt().Builder(compat.Logger())
    defined = define_network(builder, tensors, meta, precision=args.precision,
                             batch=BatchProfile(batch, batch, batch), imgsz=imgsz)
    if not args.quiet:
        print(f"{'#':>4}  {'layer':<40} {'type':<16} {'output':<28} dtype")
        for info in describe_network(defined.network):
            shape = str(list(info.shapes[0])) if info.shapes else ""
            dtype = info.dtypes[0] if info.dtypes else ""
            print(f"{info.index:>4}  {info.name[:40]:<40} {info.type[:16]:<16} {shape:<28} {dtype}")
    print(f"{defined.network.num_layers} layers, input {defined.input_name} {list(defined.input_shape)}, "
          f"outputs {', '.join(defined.output_names)}")
    if golden is None:
        return 0
    keys = [k for k in golden.files if k not in ("image", "x", "decoded", "det")]
    known = network_tensor_names(defined.network)
    tensors = {k: tensor_for_golden_key(k, meta) for k in keys}
    tensors = {k: t for k, t in tensors.items() if t in known}
    if set(keys) - set(tensors):
        print(f"not in the network (not compared): {', '.join(sorted(set(keys) - set(tensors)))}")
    outputs = run_network(defined.network, {defined.input_name: x}, keep=sorted(set(tensors.values())))
    print(f"\n{'golden':<10} {'tensor':<16} {'max abs err':>12} {'mean abs err':>13} {'max/range':>10}")
    for key, tensor, mx, mean, rel in compare(outputs, golden, tensors):
        print(f"{key:<10} {tensor:<16} {mx:12.3e} {mean:13.3e} {rel:10.2e}")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
