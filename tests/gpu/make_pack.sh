#!/usr/bin/env bash
# On the CPU machine, from the repository root: everything one GPU session needs, in .x01 … .x11 (git-ignored,
# ~62 MiB each, under one call's 64 MiB carry limit): each holds one TensorRT 8.5 payload part (staged by
# ../shared/gpu/trt85/stage.sh) and one 13 MiB piece of a tar of the test data, the wheels and cache/ (timing
# caches, calibration files and engines an earlier session brought back). Then, on one warm machine, calls 1-11:
#   bash .xNN/device_setup.sh .xNN; mkdir -p /tmp/pack && cp .xNN/c?? /tmp/pack/              (carry .xNN)
# calls 12+ if any (engines carried in): mkdir -p /tmp/pack && cp .xNN/c?? /tmp/pack/          (carry .xNN)
# and in the last of them, after the copy:
#   python3 tests/gpu/session_gpu.py setup /tmp/pack && python3 tests/gpu/session_gpu.py start PLAN && \
#     python3 tests/gpu/session_gpu.py wait 400; python3 tests/gpu/session_gpu.py collect $OUT
#
#   tests/gpu/make_pack.sh [CACHE_DIR]
#
# CACHE_DIR (e.g. .gpu/cache) lands in /tmp/eng there: engines with their .json and timing caches an earlier session
# brought back (collect, collect-engines), and what the CPU makes for plan int8 here: yolov5n.<method>.calib.json
# (tests/gpu/calibrate_gpu.py --device cpu, 128 coco128 images at 640: ~40 s) and yolov5n.sensitivity.json
# (python -m trtnet.quant sensitivity … --calib-cache yolov5n.percentile.calib.json --imgsz 640), which spare the GPU
# the calibration pass and give --int8-keep auto its report.
#
# What it needs and makes when missing (after `make install`): .data/refs (the CPU reference executor's 640 outputs,
# engines_gpu.py refs, ~1 min), .whl (ultralytics + ultralytics-thop for the machine's Python 3.12) and .whl39 (tqdm,
# safetensors, pycocotools, pytest and its needs, nvImageCodec + nvJPEG for TensorRT 8.5's Python 3.9), all
# git-ignored. Plan perf also wants the serving wheels (tests/gpu/serve_gpu.sh).
set -euo pipefail
for d in .data .whl .whl39 '.x[0-9][0-9]'; do  # git-ignored, as every path this script fills
    grep -qxF "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >>.git/info/exclude
done
[ -d .data/refs ] || python tests/gpu/engines_gpu.py refs --data ../shared/data --refs .data/refs
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
compgen -G ".whl/*.whl" >/dev/null || python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl ultralytics==8.3.253 ultralytics-thop
compgen -G ".whl39/*.whl" >/dev/null || python -m pip download -q --no-deps --only-binary=:all: --python-version 3.9 \
    --implementation cp "${platforms[@]}" -d .whl39 tqdm safetensors pycocotools "pytest<9" iniconfig pluggy \
    packaging exceptiongroup tomli pygments typing_extensions
compgen -G ".whl39/nvidia_nvimgcodec_cu12-*.whl" >/dev/null || python -m pip download -q --only-binary=:all: \
    --python-version 3.9 "${platforms[@]}" -d .whl39 "nvidia-nvimgcodec-cu12[nvjpeg]>=0.9"  # GPU decode (perf_gpu.sh)
shared=../shared/data
stage=/tmp/trt85stage/parts
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
[ -f "$stage/part_aa" ] || bash ../shared/gpu/trt85/stage.sh
for d in .x[0-9][0-9]; do [ -d "$d" ] && rm -rf "$d"; done

d=$work/data
mkdir -p "$d/weights/synthetic" "$d/golden" "$d/images" "$d/refs" "$work/whl" "$work/whl39" "$work/cache"
cp "$shared"/weights/synthetic/{yolov8s_syn,yolo11s_syn,yolov5s_syn}.pt "$d/weights/synthetic/"
cp "$shared/weights/yolov5n.pt" "$d/weights/"
cp "$shared"/golden/golden_{yolov8s_syn,yolo11s_syn}_{bus320.npz,detect640.json} \
   "$shared"/golden/golden_yolov5n_{bus320.npz,detect640.json,coco128_val.json} "$d/golden/"
cp "$shared"/images/{bus,zidane}.jpg "$d/images/"
cp -r "$shared/coco128" "$d/"
cp .data/refs/* "$d/refs/"
cp .whl/*.whl "$work/whl/"
cp .whl39/*.whl "$work/whl39/"
[ -n "${1:-}" ] && cp -a "$1"/. "$work/cache/"
# the most needed first: a session can use what arrived if a later piece is missing
(cd "$work" && tar cf pack.tar cache data/golden data/images data/refs data/weights data/coco128 whl whl39)
(cd "$work" && split -b 13M -d -a 2 pack.tar c)
pieces=("$work"/c[0-9][0-9])
parts=("$stage"/part_a?)
for i in "${!parts[@]}"; do  # one payload part and one data piece a call
    x=$(printf ".x%02d" $((i + 1)))
    mkdir -p "$x"
    cp "${parts[$i]}" "$stage/MD5" "$stage/device_setup.sh" "$stage/zstd" "$x/"
    if [ -n "${pieces[$i]:-}" ]; then cp "${pieces[$i]}" "$x/"; fi
done
call=${#parts[@]}
for ((i = ${#parts[@]}; i < ${#pieces[@]}; i += 4)); do  # what is left (engines carried in): four pieces a call
    call=$((call + 1))
    x=$(printf ".x%02d" $call)
    mkdir -p "$x"
    cp "${pieces[@]:$i:4}" "$x/"
done
du -sh .x[0-9][0-9] | tr '\n' ' '; echo
echo "calls: ${#parts[@]} with a payload part, $((call - ${#parts[@]})) more with data only; setup after the last"
