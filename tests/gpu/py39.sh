#!/usr/bin/env bash
# TensorRT 8.5's Python 3.9 (staged by ../shared/gpu/trt85) with trtnet from /tmp/site39.
PYTHONPATH=/tmp/site39${PYTHONPATH:+:$PYTHONPATH} exec /tmp/trt85/py39 "$@"
