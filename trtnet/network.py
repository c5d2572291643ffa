"""From weights + metadata to a TensorRT network definition (no building here)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from trtnet import compat, networks
from trtnet.engine_meta import BatchProfile
from trtnet.errors import TrtnetError
from trtnet.graph import Graph, WeightStore

if TYPE_CHECKING:
    from trtnet.quant.plan import QuantPlan

# State-dict entries that are not weights of any layer: Detect's anchor buffers (the anchors travel
# in the metadata) and BatchNorm's step counters.
NOT_WEIGHTS = (".anchors", ".anchor_grid", ".num_batches_tracked")


BATCH_1 = BatchProfile()  # a static batch of one (frozen: safe as a default)


@dataclass
class DefinedNetwork:
    network: Any
    graph: Graph
    family: str
    input_name: str
    input_shape: tuple  # with -1 for a dynamic batch or size
    output_names: list
    strides: list = field(default_factory=list)  # YOLO heads: input size / head size, per level
    imgsz: tuple = ()  # (h, w): the static size, or the size a dynamic size range is tuned for
    min_imgsz: int | None = None  # dynamic size: the smallest side
    max_imgsz: int | None = None  # dynamic size: the largest side

    def profiles(self, batch: BatchProfile) -> list:
        if not batch.dynamic and self.min_imgsz is None:
            return []
        h, w = self.imgsz
        lo = (self.min_imgsz, self.min_imgsz) if self.min_imgsz else (h, w)
        hi = (self.max_imgsz, self.max_imgsz) if self.max_imgsz else (h, w)
        return [(self.input_name, (batch.min, 3, *lo), (batch.opt, 3, h, w), (batch.max, 3, *hi))]


def hw_of(size: int | tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an input size given as one side or as (h, w)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def default_imgsz(meta: Mapping) -> int:
    return int(meta.get("imgsz") or networks.for_meta(meta).DEFAULT_IMGSZ)


def define_network(builder, tensors: Mapping[str, np.ndarray] | WeightStore, meta: Mapping, *, precision: str = "fp32",
                   batch: BatchProfile = BATCH_1, imgsz: int | tuple[int, int] | None = None,
                   softmax: bool = False, source: str = "weights", min_imgsz: int | None = None,
                   max_imgsz: int | None = None, weakly_typed: bool = False,
                   quant: QuantPlan | None = None) -> DefinedNetwork:
    """Define the network that `meta` describes with `tensors` in a new INetworkDefinition.

    With `min_imgsz` and/or `max_imgsz`, height and width are dynamic from `min_imgsz` to `max_imgsz`
    (each defaults to `imgsz`, the size TensorRT tunes for), e.g. for the rectangular batches of
    validation; otherwise the input size is static. With `quant`, an INT8 network quantized by that plan."""
    family = networks.for_meta(meta)
    size = imgsz or default_imgsz(meta)
    top = hw_of(size)
    min_imgsz, max_imgsz = size_range(top, min_imgsz, max_imgsz)
    hw = (-1, -1) if min_imgsz is not None else top
    network = compat.create_weakly_typed_network(builder) if weakly_typed else compat.create_network(builder)
    store = tensors if isinstance(tensors, WeightStore) else WeightStore(tensors, source)
    g = Graph(network, store, compat.compute_dtype(precision), bn_eps=float(meta.get("bn_eps", 1e-5)),
              quant=quant)
    family.define(g, dict(meta), batch.check().dim, hw, **networks.define_options(family, {"softmax": softmax}))
    store.ensure_all_used(ignore=NOT_WEIGHTS)
    heads = [network.get_output(i) for i in range(network.num_outputs)]
    strides = networks.output_strides(family, heads, hw, meta)
    return DefinedNetwork(network, g, family.FAMILY, family.INPUT, (batch.dim, 3, *hw), [t.name for t in heads],
                          strides, top, min_imgsz, max_imgsz)


MIN_IMGSZ = 32  # the largest stride of ResNet and YOLOv5/YOLOv8 P5 models: a smaller input has no last feature map


def size_range(imgsz: tuple, min_imgsz: int | None, max_imgsz: int | None) -> tuple:
    """(smallest, largest) side of a dynamic input size, or (None, None) for a static one."""
    if min_imgsz is None and max_imgsz is None:
        return None, None
    lo = min(imgsz) if min_imgsz is None else min_imgsz
    hi = max(imgsz) if max_imgsz is None else max_imgsz
    if not MIN_IMGSZ <= lo <= min(imgsz):
        raise TrtnetError(f"--min-imgsz {lo} must lie between {MIN_IMGSZ} and the input size {min(imgsz)}")
    if hi < max(imgsz):
        raise TrtnetError(f"--max-imgsz {hi} must be at least the input size {max(imgsz)}")
    return lo, hi
