"""`trtnet inspect`: a network (from weights) or an engine layer by layer; `--compare` checks it against a golden.

    trtnet inspect yolov5n --imgsz 320
    trtnet inspect weights/yolov5n.fp16.640.engine
    trtnet inspect yolov5n --compare ../shared/data/golden/golden_yolov5n_bus320.npz --max-rel 1e-3

A golden (.npz, README "Golden files"; `trtnet golden` writes one) holds the input `image` (uint8 [1,3,H,W]) and
outputs by name: raw/head outputs and `layer_XX` (model layer XX). `--compare` runs the network on the CPU
reference executor and prints pass/fail per output and per golden layer it can match; any failure → exit 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trtnet import compat, networks
from trtnet.build import BuildRequest, load_for_build
from trtnet.cli import add_weights_dir, command_parser, run
from trtnet.errors import TrtnetError
from trtnet.network import BatchProfile, define_network

NOT_COMPARED = ("image", "x", "decoded", "det", "anchors", "strides")  # inputs and post-network results
DEFAULT_MAX_REL = {"fp32": 1e-3, "fp16": 1e-2}  # of the golden's value range; fp16 goldens round at ~5e-4


# ------------------------------------------------------------------------------------------ golden


def golden_input(golden) -> np.ndarray:
    """The network input stored in a golden: `image` (uint8, /255 as the model sees it) or `x`."""
    if "image" in golden.files:
        return golden["image"].astype(np.float32) / 255.0
    if "x" in golden.files:
        return golden["x"].astype(np.float32)
    raise TrtnetError("the golden holds neither `image` (uint8 [1,3,H,W]) nor `x`: see README, Golden files")


def load_golden(path: str | Path):
    try:
        golden = np.load(path)
    except (OSError, ValueError) as exc:
        raise TrtnetError(f"--compare {path}: not a readable .npz golden ({exc})") from exc
    if not isinstance(golden, np.lib.npyio.NpzFile):
        raise TrtnetError(f"--compare {path}: a single array, not an .npz golden of named outputs (see README)")
    return golden


def tensor_for_golden_key(key: str, aliases: Mapping[str, str] | None = None) -> str:
    """Golden keys → our tensor names: the family's `aliases` (YOLOv8: raw → output0), layer_07 → model.7;
    raw_0, logits, layer1 stay as they are."""
    if aliases and key in aliases:
        return aliases[key]
    if key.startswith("layer_") and key[6:].isdigit():
        return f"model.{int(key[6:])}"
    return key


def network_tensor_names(network) -> set[str]:
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        names.update(layer.get_output(j).name for j in range(layer.num_outputs))
    return names


def compared_keys(golden) -> list[str]:
    return [k for k in golden.files if k not in NOT_COMPARED]


# ------------------------------------------------------------------------------------------ comparison


@dataclass(frozen=True)
class Tolerance:
    """Elementwise `|ours - golden| <= atol + rtol * |golden|` (numpy.allclose) when rtol or atol is given;
    `max_rel` bounds the largest error relative to the golden's value range (max - min)."""

    rtol: float | None = None
    atol: float | None = None
    max_rel: float | None = None

    def passes(self, ours: np.ndarray, ref: np.ndarray, rel: float) -> bool:
        ok = True
        if self.rtol is not None or self.atol is not None:
            ok = bool(np.allclose(ours, ref, rtol=self.rtol or 0.0, atol=self.atol or 0.0))
        if self.max_rel is not None:
            ok = ok and rel <= self.max_rel
        return ok

    def __str__(self) -> str:
        parts = [f"{name} {value:g}" for name, value in (("rtol", self.rtol), ("atol", self.atol),
                                                          ("max-rel", self.max_rel)) if value is not None]
        return ", ".join(parts)


def tolerance_of(args) -> Tolerance:
    for option, value in (("--rtol", args.rtol), ("--atol", args.atol), ("--max-rel", args.max_rel)):
        if value is not None and not value >= 0:
            raise TrtnetError(f"{option} {value}: must be a non-negative number")
    if args.rtol is None and args.atol is None and args.max_rel is None:
        return Tolerance(max_rel=DEFAULT_MAX_REL[args.precision])
    return Tolerance(args.rtol, args.atol, args.max_rel)


@dataclass(frozen=True)
class Comparison:
    key: str  # in the golden
    tensor: str  # in our network
    max_abs: float = 0.0
    mean_abs: float = 0.0
    rel: float = 0.0  # max_abs / the golden's value range
    passed: bool = False
    shapes: tuple | None = None  # (golden's, ours) when they differ


def compare_one(key: str, tensor: str, ours: np.ndarray, ref: np.ndarray, tol: Tolerance) -> Comparison:
    if ours.shape != ref.shape:
        return Comparison(key, tensor, shapes=(list(ref.shape), list(ours.shape)))
    ours, ref = ours.astype(np.float32), ref.astype(np.float32)
    err = np.abs(ours - ref)
    span = float(ref.max() - ref.min()) or 1.0
    rel = float(err.max()) / span
    return Comparison(key, tensor, float(err.max()), float(err.mean()), rel, tol.passes(ours, ref, rel))


def compare(outputs: Mapping[str, np.ndarray], golden, tensors: Mapping[str, str], tol: Tolerance) -> list[Comparison]:
    """One Comparison per golden key (→ tensor name in `tensors`) whose tensor is in `outputs`."""
    rows = []
    for key, tensor in tensors.items():
        ours = outputs.get(tensor)
        if ours is not None:
            rows.append(compare_one(key, tensor, np.asarray(ours), golden[key], tol))
    return rows


def comparison_table(rows: Sequence[Comparison]) -> str:
    lines = [f"{'golden':<10} {'tensor':<16} {'max abs err':>12} {'mean abs err':>13} {'max/range':>10}  result"]
    for r in rows:
        if r.shapes:
            lines.append(f"{r.key:<10} {r.tensor:<16} {'':>12} {'':>13} {'':>10}  FAIL shape: golden {r.shapes[0]}, "
                         f"network {r.shapes[1]}")
        else:
            lines.append(f"{r.key:<10} {r.tensor:<16} {r.max_abs:12.3e} {r.mean_abs:13.3e} {r.rel:10.2e}  "
                         f"{'pass' if r.passed else 'FAIL'}")
    return "\n".join(lines)


def shape_mismatch_error(rows: Sequence[Comparison], golden_path: str) -> TrtnetError | None:
    bad = [r for r in rows if r.shapes]
    if not bad:
        return None
    first = bad[0]
    return TrtnetError(
        f"{golden_path} does not fit this network: {first.key} is {first.shapes[0]} in the golden but "
        f"{first.tensor} is {first.shapes[1]} here ({len(bad)} of {len(rows)} outputs differ in shape); "
        "is it a golden of another model or input size?"
    )


# ------------------------------------------------------------------------------------------ engines


def engine_facts(meta) -> list[str]:
    """What the sidecar says about an engine, one fact a line."""
    size = f"{meta.imgsz[0]}x{meta.imgsz[1]}"
    if meta.min_imgsz or meta.max_imgsz:
        size += f" (dynamic {meta.min_imgsz}..{meta.max_imgsz})"
    facts = [
        ("family", meta.family), ("precision", meta.precision + (" + tf32" if meta.tf32 else "")),
        ("input", f"{meta.input.name} {size}, batch {meta.batch.min}..{meta.batch.opt}..{meta.batch.max}"),
        ("outputs", ", ".join(meta.outputs)), ("built with", f"{meta.tensorrt.flavour} {meta.tensorrt.version}"),
        ("built at", meta.built_at), ("built on", (meta.device or {}).get("name")),
        ("target cc", ", ".join(meta.target_cc)), ("layers", meta.layers),
        ("engine bytes", meta.engine_bytes), ("weights", _with_hash(meta.weights, meta.weights_sha256)),
        ("checkpoint", _with_hash(meta.checkpoint, meta.checkpoint_sha256)),
        ("postprocess", meta.postprocess.mode if meta.postprocess else None),
    ]
    return [f"  {name:<13} {value}" for name, value in facts if value not in (None, "", 0)]


def _with_hash(name: str | None, sha256: str | None) -> str | None:
    if not name and not sha256:
        return None
    return f"{name or '?'}" + (f" (sha256 {sha256})" if sha256 else "")


def engine_layers(path: Path, meta) -> list[str]:
    """Layer information from TensorRT's engine inspector; a TrtnetError saying why when this machine cannot
    deserialize the engine."""
    from trtnet import cuda_rt
    from trtnet.engine_files import check_tensorrt, read_plan

    reason = cuda_rt.gpu_unavailable_reason()
    if reason:
        raise TrtnetError(f"cannot deserialize {path} here ({reason}): engines load only on an NVIDIA GPU")
    check_tensorrt(meta, compat.flavour())
    t = compat.trt()
    _, engine = compat.deserialize(read_plan(path, meta))
    if not hasattr(engine, "create_engine_inspector"):
        raise TrtnetError(f"{compat.flavour()} has no engine inspector (TensorRT >= 8.2 has)")
    inspector = engine.create_engine_inspector()
    return [inspector.get_layer_information(i, t.LayerInformationFormat.ONELINE) for i in range(engine.num_layers)]


def inspect_engine(path: Path, quiet: bool) -> int:
    from trtnet.engine_files import load_metadata

    meta = load_metadata(path)
    print(f"{path}:")
    print("\n".join(engine_facts(meta)))
    if quiet:
        return 0
    try:
        layers = engine_layers(path, meta)
    except TrtnetError as exc:
        print(f"\nno layer information: {exc}. The facts above are the sidecar's.")
        return 0
    print(f"\n{len(layers)} engine layers (TensorRT's engine inspector):")
    for i, line in enumerate(layers):
        print(f"{i:>4}  {line}")
    return 0


def is_engine(model: str) -> bool:
    return Path(model).suffix == ".engine"


# ------------------------------------------------------------------------------------------ networks


def print_network(defined) -> None:
    from trtnet.executor import describe_network

    print(f"{'#':>4}  {'layer':<40} {'type':<16} {'output':<28} dtype")
    for info in describe_network(defined.network):
        shape = str(list(info.shapes[0])) if info.shapes else ""
        dtype = info.dtypes[0] if info.dtypes else ""
        print(f"{info.index:>4}  {info.name[:40]:<40} {info.type[:16]:<16} {shape:<28} {dtype}")


def compare_with_golden(defined, golden, golden_path: str, x: np.ndarray, tol: Tolerance,
                        aliases: Mapping[str, str]) -> int:
    from trtnet.executor import run_network

    keys = compared_keys(golden)
    present = network_tensor_names(defined.network)
    tensors = {k: tensor_for_golden_key(k, aliases) for k in keys}
    tensors = {k: t for k, t in tensors.items() if t in present}
    outputs = run_network(defined.network, {defined.input_name: x}, keep=sorted(set(tensors.values())))
    rows = compare(outputs, golden, tensors, tol)
    if not rows:
        raise TrtnetError(f"{golden_path}: none of its keys ({', '.join(keys)}) names an output or layer of this "
                          f"network ({', '.join(defined.output_names)}); see README, Golden files")
    print(f"\ntolerance: {tol}")
    print(comparison_table(rows))
    error = shape_mismatch_error(rows, golden_path)
    if error:
        raise error
    skipped = [k for k in keys if k not in {r.key for r in rows}]
    if skipped:
        print(f"not in this network (not compared): {', '.join(skipped)}")
    failed = [r.key for r in rows if not r.passed]
    print(f"{len(rows) - len(failed)} of {len(rows)} passed" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def parser() -> argparse.ArgumentParser:
    p = command_parser("inspect", "Print a network (from weights) or an engine layer by layer; with --compare, run "
                                  "the network on the CPU reference executor and check every output and layer the "
                                  "golden holds (exit status 1 when one fails).")
    p.add_argument("model", metavar="WEIGHTS_OR_ENGINE",
                   help="a name in --weights-dir or a weights path, as for build; or an engine file (.engine)")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="precision of the network defined")
    p.add_argument("--imgsz", type=int, help="input size (default: the golden's, else the model's)")
    p.add_argument("--compare", metavar="GOLDEN.npz", help="golden outputs to compare with (README: Golden files)")
    p.add_argument("--rtol", type=float, help="--compare: elementwise relative tolerance (as numpy.allclose)")
    p.add_argument("--atol", type=float, help="--compare: elementwise absolute tolerance (as numpy.allclose)")
    p.add_argument("--max-rel", type=float, metavar="E",
                   help="--compare: largest error allowed relative to the golden's value range (default without "
                        f"--rtol/--atol: {DEFAULT_MAX_REL['fp32']:g} for fp32, {DEFAULT_MAX_REL['fp16']:g} for fp16)")
    add_weights_dir(p, "where names are looked up")
    p.add_argument("--arch", help="architecture for weights without metadata, e.g. yolov5s or resnet50")
    p.add_argument("--nc", type=int, help="class count with --arch (default: the family's, e.g. 80)")
    p.add_argument("--quiet", action="store_true", help="no layer table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if is_engine(args.model):
        if args.compare:
            raise TrtnetError(f"--compare runs the network on the CPU from its weights: pass the weights "
                              f"{args.model} was built from (see its sidecar: trtnet inspect {args.model})")
        from trtnet.engine_files import resolve_engine

        return inspect_engine(resolve_engine(args.model, args.weights_dir), args.quiet)
    tol = tolerance_of(args)
    _, tensors, meta = load_for_build(BuildRequest(args.model, weights_dir=args.weights_dir, arch=args.arch,
                                                   nc=args.nc))
    golden = load_golden(args.compare) if args.compare else None
    x = golden_input(golden) if golden is not None else None
    imgsz = args.imgsz or (x.shape[2] if x is not None else None)
    batch = x.shape[0] if x is not None else 1
    builder = compat.trt().Builder(compat.Logger())
    defined = define_network(builder, tensors, meta, precision=args.precision,
                             batch=BatchProfile(batch, batch, batch), imgsz=imgsz)
    if not args.quiet:
        print_network(defined)
    print(f"{defined.network.num_layers} layers, input {defined.input_name} {list(defined.input_shape)}, "
          f"outputs {', '.join(defined.output_names)}")
    if golden is None:
        return 0
    if imgsz != x.shape[2] or x.shape[2] != x.shape[3]:
        raise TrtnetError(f"--compare {args.compare}: its image is {list(x.shape)}; inspect builds a square "
                          f"{imgsz} input (leave --imgsz out to take the golden's)")
    return compare_with_golden(defined, golden, args.compare, x, tol, networks.golden_aliases(meta))


def cli(argv: Sequence[str] | None = None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
