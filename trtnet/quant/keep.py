"""What `--int8-keep` can keep in float on TensorRT. A tensor read by a quantized layer (through Q/DQ) and by a
kept one is quantized for both: TensorRT fuses the Q into the layer that writes the tensor (an INT8 output), so
the kept layer reads it back through a dequantize. Run N showed it: yolov5n with model.0-4 and the Detect
convolutions kept scored 0.3519 on TensorRT 8.5, the CPU's figure for model.0-4 alone (0.352), not the 0.356 it
gives with the Detect inputs in float. To keep a layer's input float, its tensor's other quantized readers are
kept too (for the Detect convolutions of a YOLOv5: the downsampling convolutions of the neck)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import replace

from trtnet.quant.plan import QuantPlan

DEQUANTIZED = ".dequantize"  # trtnet.graph names a tensor's Q/DQ copy after it


def readers_of(network) -> dict[str, list]:
    """Tensor name → the layers that read it."""
    readers = defaultdict(list)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_inputs):
            tensor = layer.get_input(j)
            if tensor is not None:
                readers[tensor.name].append(layer)
    return readers


def quantized_siblings(network, plan: QuantPlan) -> set[str]:
    """The quantized layers that read a tensor some kept layer reads in float (their names)."""
    trt_layer = _layer_types()
    readers = readers_of(network)
    siblings = set()
    for tensor, dequantized in ((t[:-len(DEQUANTIZED)], t) for t in readers if t.endswith(DEQUANTIZED)):
        kept_readers = [r for r in readers.get(tensor, ()) if r.type in trt_layer and not plan.quantizes(r.name)]
        if kept_readers:
            siblings |= {r.name for r in readers[dequantized]}
    return siblings


def _layer_types() -> tuple:
    from trtnet import compat

    kind = compat.trt().LayerType
    return kind.CONVOLUTION, kind.ELEMENTWISE


def honoured_plan(plan: QuantPlan, define: Callable[[QuantPlan], object], log=print) -> QuantPlan:
    """`plan` with the quantized siblings of its kept layers kept too, until none are left (`define(plan)`: the
    INetworkDefinition of that plan)."""
    while plan.keep_float:
        added = quantized_siblings(define(plan), plan) - set(plan.keep_float)
        if not added:
            return plan
        log(f"INT8: also kept in float, as they read a tensor a kept layer reads (TensorRT would quantize it for "
            f"both): {', '.join(sorted(added))}")
        plan = replace(plan, keep_float=plan.keep_float | added)
    return plan


def network_definer(tensors: Mapping, meta: Mapping, imgsz) -> Callable[[QuantPlan], object]:
    """`define(plan)` for `honoured_plan`: the fp32 network of these weights under `plan`."""
    from trtnet import compat
    from trtnet.network import define_network

    builder = compat.trt().Builder(compat.Logger())

    def define(plan: QuantPlan):
        return define_network(builder, tensors, meta, precision="fp32", imgsz=imgsz, quant=plan).network

    return define


def head_convolutions(network) -> tuple:
    """The convolutions from whose output no other convolution can be reached (names, in network order)."""
    conv = _layer_types()[0]
    readers = readers_of(network)
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    return tuple(layer.name for layer in layers
                 if layer.type == conv and not _reaches_convolution(layer, readers, conv))


def _reaches_convolution(layer, readers, conv) -> bool:
    seen, todo = set(), [layer]
    while todo:
        current = todo.pop()
        for i in range(current.num_outputs):
            for reader in readers.get(current.get_output(i).name, ()):
                if reader.type == conv:
                    return True
                if reader.name not in seen:
                    seen.add(reader.name)
                    todo.append(reader)
    return False
