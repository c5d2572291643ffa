#!/usr/bin/env bash
# On the GPU machine, from the repository root (`tests/gpu/device_prepare.sh [FOLDER]`): unpack the wheels carried
# in FOLDER (default .whl39: tqdm, pycocotools, safetensors, pytest and its needs, nvImageCodec + nvJPEG) for
# TensorRT 8.5's Python 3.9 into /tmp/site39. The machine has no package index. trtnet itself runs from the checkout
# (trtnet/__init__.py maps networks/ and plugins/).
set -euo pipefail
mkdir -p /tmp/site39
for w in "${1:-.whl39}"/*.whl; do python3 -m zipfile -e "$w" /tmp/site39/; done
# The nvImageCodec wheel ships a regular nvidia/__init__.py, which would hide the payload's own nvidia.* packages
# (NVRTC): a path-extending one lets `nvidia.nvimgcodec` and them import side by side.
if [ -f /tmp/site39/nvidia/__init__.py ]; then
    echo '__path__ = __import__("pkgutil").extend_path(__path__, __name__)' >/tmp/site39/nvidia/__init__.py
fi
echo "wheels for Python 3.9 in /tmp/site39"
