#!/usr/bin/env bash
# TensorRT 8.5's Python 3.9 (staged by ../shared/gpu/trt85) with this checkout and /tmp/site39 importable.
repo=$(cd "$(dirname "$0")/../.." && pwd)
PYTHONPATH=$repo:/tmp/site39${PYTHONPATH:+:$PYTHONPATH} exec /tmp/trt85/py39 "$@"
