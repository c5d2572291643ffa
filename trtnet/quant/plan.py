"""`QuantPlan`: what an INT8 network definition quantizes, and with which ranges."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from trtnet.errors import TrtnetError
from trtnet.quant.histogram import int8_scale


@dataclass(frozen=True)
class QuantPlan:
    """Activation amax by tensor name (the inputs of convolutions, as the fp32 definition names them)
    and the convolution layers left in float (`keep_float`: their inputs and weights get no Q/DQ)."""

    amax: Mapping[str, float]
    keep_float: frozenset = field(default_factory=frozenset)

    def quantizes(self, layer: str) -> bool:
        return layer not in self.keep_float

    def activation_scale(self, tensor: str, layer: str) -> np.ndarray:
        if tensor not in self.amax:
            raise TrtnetError(
                f"INT8: the calibration has no range for tensor {tensor!r} (input of {layer}): "
                "recalibrate for this network, or keep that layer in float"
            )
        return int8_scale(self.amax[tensor])
