#!/usr/bin/env bash
# One GPU session for the YOLOv8/YOLO11 family and a first INT8 look (TensorRT 8.5 / Python 3.9 via py39.sh).
# Run from the repository root on the GPU machine, after ../shared/gpu/trt85 is staged (/tmp/trt85/py39) and
# tests/gpu/device_prepare.sh has unpacked .whl39. Phases, each a separate call (builds run detached):
#
#   tests/gpu/session_v8_int8.sh build-v8   DATA            # 8 v8/v11 engines in the background → /tmp/eng
#   tests/gpu/session_v8_int8.sh build-int8 DATA2 CALIB     # yolov5n/yolov5s fp16 + INT8 (calibration files
#                                                            # made on the CPU) in the background → /tmp/eng8
#   tests/gpu/session_v8_int8.sh status                     # build progress
#   tests/gpu/session_v8_int8.sh measure-v8 OUT UL          # numerics, Detector tests, bench, official model
#   tests/gpu/session_v8_int8.sh measure-int8 OUT DATA2     # val and bench of the INT8 engines
set -u
repo=$(cd "$(dirname "$0")/../.." && pwd)
py39="$repo/tests/gpu/py39.sh"
V8_ENGINES=$(for m in yolov8s_syn yolo11s_syn; do printf '%s,' "${m}_320_fp32" "${m}_640_fp16_b1" \
    "${m}_640_fp16_b32" "${m}_640_fp16_dyn"; done)
cd /tmp  # not the checkout: its networks/ and plugins/ folders would shadow trtnet's mapping

. "$repo/tests/gpu/steps.sh"  # step NAME SECONDS COMMAND…, logs in $out (set by the measure phases)

case $1 in
build-v8)
    setsid nohup "$py39" "$repo/tests/gpu/engines_gpu.py" build --data "$2" --out /tmp/eng --jobs 8 \
        --only "${V8_ENGINES%,}" >/tmp/build_v8.log 2>&1 < /dev/null & ;;
build-int8)
    data2=$2 calib=$3
    mkdir -p /tmp/eng8
    setsid nohup bash -c "
        '$py39' -m trtnet.gen_wts '$data2/weights/yolov5n.pt' -o /tmp/eng8/yolov5n.wts &&
        '$py39' -m trtnet.gen_wts '$data2/weights/synthetic/yolov5s_syn.pt' -o /tmp/eng8/yolov5s_syn.wts || exit 1
        b() { n=\$1; shift; '$py39' -m trtnet.build \"\$@\" -o /tmp/eng8/\$n.engine > /tmp/eng8/\$n.build.log 2>&1;
              echo \"\$n: exit \$?\" >> /tmp/eng8/builds.txt; }
        det='--imgsz 640 --postprocess kernels'
        b yolov5n_fp16_b16 /tmp/eng8/yolov5n.wts --fp16 --batch 16 \$det &
        b yolov5n_int8_entropy_b16 /tmp/eng8/yolov5n.wts --int8 --batch 16 \$det --calib-cache '$calib/yolov5n_int8_entropy.calib.json' &
        b yolov5n_int8_percentile_b16 /tmp/eng8/yolov5n.wts --int8 --batch 16 \$det --calib-cache '$calib/yolov5n_int8_percentile.calib.json' &
        b yolov5s_syn_fp16_b32 /tmp/eng8/yolov5s_syn.wts --fp16 --batch 32 \$det &
        b yolov5s_syn_int8_b32 /tmp/eng8/yolov5s_syn.wts --int8 --batch 32 \$det --calib-cache '$calib/yolov5s_syn_int8.calib.json' &
        wait; echo all done >> /tmp/eng8/builds.txt" >/tmp/build_int8.log 2>&1 < /dev/null & ;;
status)
    cat /tmp/build_v8.log /tmp/eng8/builds.txt 2>/dev/null; ls /tmp/eng /tmp/eng8 2>/dev/null | grep -c engine$
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv ;;
measure-v8)
    out=$2 ul=$3
    mkdir -p "$out"
    export TRTNET_SHARED_DATA=/tmp/data TRTNET_GPU_ENGINES=/tmp/eng TRTNET_GPU_REFS=/tmp/data/refs
    step check 300 "$py39" "$repo/tests/gpu/engines_gpu.py" check --data /tmp/data --out /tmp/eng \
        --refs /tmp/data/refs --report "$out/check.json"
    step runtime_v8 400 "$py39" -m pytest -q -ra -p no:cacheprovider "$repo/tests/gpu/test_runtime_gpu.py" -k v8
    for m in yolov8s_syn yolo11s_syn; do
        step "bench_${m}_b1" 200 "$py39" -m trtnet.bench "/tmp/eng/${m}_640_fp16_b1.engine" --batch 1 \
            --cuda-graphs --json "$out/bench_${m}_b1.json"
        step "bench_${m}_b32" 200 "$py39" -m trtnet.bench "/tmp/eng/${m}_640_fp16_b32.engine" --batch 32 \
            --cuda-graphs --json "$out/bench_${m}_b32.json"
        step "torch_${m}" 300 env PYTHONPATH="$repo:$ul" python3 -m trtnet.bench \
            "/tmp/eng/${m}_640_fp16_b1.engine" --torch-only --batch 1,32 --weights-dir /tmp/data/weights/synthetic \
            --json "$out/torch_${m}.json"
    done ;;
measure-int8)
    out=$2 data2=$3
    mkdir -p "$out"
    for e in yolov5n_fp16_b16 yolov5n_int8_entropy_b16 yolov5n_int8_percentile_b16; do
        step "val_$e" 300 "$py39" -m trtnet.val "/tmp/eng8/$e.engine" --data "$data2/coco128" --square \
            --batch 16 --json "$out/val_$e.json"
    done
    for e in yolov5s_syn_fp16_b32 yolov5s_syn_int8_b32; do
        step "bench_$e" 200 "$py39" -m trtnet.bench "/tmp/eng8/$e.engine" --batch 32 --cuda-graphs \
            --json "$out/bench_$e.json"
    done
    cp /tmp/eng8/*.build.log /tmp/eng8/*.engine.json "$out/" 2>/dev/null ;;
esac
