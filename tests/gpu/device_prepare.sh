#!/usr/bin/env bash
# On the GPU machine, from the repository root: make trtnet importable for both Pythons there, without
# installing (the machine has no package index): /tmp/site (the machine's python3) and /tmp/site39
# (TensorRT 8.5's Python 3.9, plus the wheels carried in .whl39: tqdm, pycocotools, safetensors).
set -euo pipefail
for site in /tmp/site /tmp/site39; do
  rm -rf "$site/trtnet" && mkdir -p "$site"
  cp -r trtnet "$site/" && cp -r networks "$site/trtnet/networks" && cp -r plugins "$site/trtnet/plugins"
done
if [ -d .whl39 ]; then
  for w in .whl39/*.whl; do python3 -m zipfile -e "$w" /tmp/site39/; done
fi
echo "trtnet staged in /tmp/site and /tmp/site39"
