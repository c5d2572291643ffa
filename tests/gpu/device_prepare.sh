#!/usr/bin/env bash
# On the GPU machine, from the repository root (`tests/gpu/device_prepare.sh [FOLDER]`): unpack the wheels carried
# in FOLDER (default .whl39: tqdm, pycocotools, safetensors, pytest and its needs) for TensorRT 8.5's Python 3.9
# into /tmp/site39. The machine has no package index. trtnet itself runs from the checkout (trtnet/__init__.py
# maps networks/ and plugins/).
set -euo pipefail
mkdir -p /tmp/site39
for w in "${1:-.whl39}"/*.whl; do python3 -m zipfile -e "$w" /tmp/site39/; done
echo "wheels for Python 3.9 in /tmp/site39"
