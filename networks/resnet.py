"""ResNet-18/34/50/101/152 — reads beside torchvision/models/resnet.py.

One constructor serves every depth: `ARCHS` says which block and how many per stage, `_make_layer`
builds each stage. Tensor names are torchvision's state-dict keys; stage outputs are named
`layer1`..`layer4`, the network output `logits` (and `probs` when softmax is asked for).
"""

from __future__ import annotations

from trtnet.errors import TrtnetError
from trtnet.graph import Graph

INPUT = "input"

ARCHS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
    "resnet152": ("bottleneck", [3, 8, 36, 3]),
}
EXPANSION = 4  # torchvision's Bottleneck.expansion


def conv_bn(g: Graph, x, conv: str, bn: str, c2: int, k: int, s: int = 1, relu: bool = True):
    y = g.conv(x, conv, c2, k, s, bn=bn)
    return g.act(y, "relu", f"{conv}.relu") if relu else y


def downsample(g: Graph, x, p: str, c2: int, stride: int):
    """The identity, or conv1x1 + BatchNorm when the block changes size (torchvision's rule)."""
    if stride == 1 and x.shape[1] == c2:
        return x
    return conv_bn(g, x, f"{p}.downsample.0", f"{p}.downsample.1", c2, 1, stride, relu=False)


def basic_block(g: Graph, x, p: str, planes: int, stride: int):
    y = conv_bn(g, x, f"{p}.conv1", f"{p}.bn1", planes, 3, stride)
    y = conv_bn(g, y, f"{p}.conv2", f"{p}.bn2", planes, 3, relu=False)
    return g.act(g.add(y, downsample(g, x, p, planes, stride), f"{p}.add"), "relu", p)


def bottleneck(g: Graph, x, p: str, planes: int, stride: int):
    y = conv_bn(g, x, f"{p}.conv1", f"{p}.bn1", planes, 1)
    y = conv_bn(g, y, f"{p}.conv2", f"{p}.bn2", planes, 3, stride)
    y = conv_bn(g, y, f"{p}.conv3", f"{p}.bn3", planes * EXPANSION, 1, relu=False)
    return g.act(g.add(y, downsample(g, x, p, planes * EXPANSION, stride), f"{p}.add"), "relu", p)


BLOCKS = {"basic": basic_block, "bottleneck": bottleneck}


def _make_layer(g: Graph, x, p: str, block: str, planes: int, blocks: int, stride: int):
    for j in range(blocks):
        x = BLOCKS[block](g, x, f"{p}.{j}", planes, stride if j == 0 else 1)
    x.name = p
    return x


def define(g: Graph, meta: dict, batch: int, imgsz: tuple[int, int], softmax: bool = False) -> list:
    arch = meta.get("arch")
    if arch not in ARCHS:
        raise TrtnetError(f"unknown ResNet architecture {arch!r}: one of {', '.join(ARCHS)}")
    block, layers = ARCHS[arch]
    x = g.input(INPUT, (batch, 3, *imgsz))
    x = conv_bn(g, x, "conv1", "bn1", 64, 7, 2)
    x = g.maxpool(x, 3, 2, 1, "maxpool")
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
        x = _make_layer(g, x, f"layer{i + 1}", block, planes, blocks, 1 if i == 0 else 2)
    x = g.global_avgpool(x, "avgpool")
    logits = g.linear(x, "fc", int(meta.get("num_classes", 1000)), name="logits")
    g.output(logits, "logits")
    outputs = [logits]
    if softmax:
        probs = g.softmax(logits, 1, "probs.softmax")
        g.output(probs, "probs")
        outputs.append(probs)
    return outputs
