"""`QuantPlan`: what an INT8 network definition quantizes, and with which ranges."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from trtnet.errors import TrtnetError
from trtnet.quant.histogram import int8_scale


@dataclass(frozen=True)
class QuantPlan:
    """Activation amax by tensor name (the inputs of convolutions and the shortcuts of residual adds, as the fp32
    definition names them) and what stays in float (`keep_float`: convolutions or residual adds by layer or
    PyTorch module name — `raw_0`, `model.24.m.0` — or whole modules, `model.2`; they get no Q/DQ)."""

    amax: Mapping[str, float]
    keep_float: frozenset = field(default_factory=frozenset)

    def quantizes(self, *names: str) -> bool:
        """Whether the convolution known by `names` (layer name, weight prefix) is quantized."""
        return not any(n == k or n.startswith(k + ".") for n in names for k in self.keep_float)

    def has_range(self, tensor: str) -> bool:
        return tensor in self.amax

    def activation_scale(self, tensor: str, layer: str) -> np.ndarray:
        if tensor not in self.amax:
            raise TrtnetError(
                f"INT8: the calibration has no range for tensor {tensor!r} (input of {layer}): "
                "recalibrate for this network, or keep that layer in float"
            )
        return int8_scale(self.amax[tensor])
