#!/usr/bin/env bash
# INT8 on the GPU machine (TensorRT 8.5, Python 3.9 through py39.sh): what issue 14 reports in RESULTS.md.
# yolov5n fp16 vs INT8 explicit (--int8-keep none and auto) and implicit at 640, mAP with trtnet.val on
# coco128; synthetic yolov5s 640 INT8 vs fp16 throughput at batch 1 and 32; ResNet-50 INT8 vs fp16 at batch
# 128; calibration time for 128 images (the build logs' "s per image" line) and build times (each engine's
# .json: build_seconds). Every log and JSON goes to $1; steps.txt lists each step's exit status and time.
#
#   TRTNET_SHARED_DATA=/tmp/data TRTNET_INT8_SENSITIVITY=yolov5n.sensitivity.json tests/gpu/int8_gpu.sh $OUT
#
# The sensitivity report (--int8-keep auto) runs on the reference executor, which needs torch and a TensorRT
# Python (TensorRT-RTX will do) in one interpreter: make it beforehand on the CPU machine and pass it in
# TRTNET_INT8_SENSITIVITY (python -m trtnet.quant sensitivity yolov5n.wts --calib coco128/images --images 4
# --calib-images 16 --imgsz 640: about 15 minutes on 2 cores); without it, TORCH_PY (a Python with torch,
# CUDA and TensorRT; default python3) measures it here with --device gpu.
set -u
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=$1
data=${TRTNET_SHARED_DATA:-/tmp/data}
eng=${TRTNET_INT8_ENGINES:-/tmp/eng_int8}
py39="$repo/tests/gpu/py39.sh"
torchpy=${TORCH_PY:-python3}
images="$data/coco128/images"
mkdir -p "$out" "$eng"
cd /tmp  # not the checkout: its networks/ and plugins/ folders would shadow trtnet's mapping

. "$repo/tests/gpu/steps.sh"  # step NAME SECONDS COMMAND…
build() {  # build NAME WEIGHTS ARGS…  → $eng/NAME.engine (+ .json, + NAME.calib.json for INT8)
    local name=$1 weights=$2
    shift 2
    step "build_$name" 900 "$py39" -m trtnet.build "$eng/$weights.wts" -o "$eng/$name.engine" "$@"
}
bench() {  # bench NAME ENGINE ARGS…
    local name=$1 engine=$2
    shift 2
    step "bench_$name" 300 "$py39" -m trtnet.bench "$eng/$engine.engine" --json "$out/bench_$name.json" "$@"
}
val() {  # val ENGINE: mAP on coco128, square 640 batches of 16 (the engines are static)
    step "val_$1" 300 "$py39" -m trtnet.val "$eng/$1.engine" --data "$data/coco128" --square --batch 16 \
        --json "$out/val_$1.json"
}

step gen_wts 300 bash -c "for m in yolov5n:weights/yolov5n.pt yolov5s_syn:weights/synthetic/yolov5s_syn.pt \
    resnet50_syn:weights/synthetic/resnet50_syn.pth; do \
    '$py39' -m trtnet.gen_wts \"$data/\${m#*:}\" -o \"$eng/\${m%%:*}.wts\" || exit 1; done"

# yolov5n accuracy: one engine setting (640, batch 16, NMS kernels), four precisions
det=(--imgsz 640 --batch 16 --postprocess kernels)
calib=(--calib "$images" --calib-images 128 --calib-device gpu)
build yolov5n_fp16 yolov5n --fp16 "${det[@]}"
build yolov5n_int8_none yolov5n --int8 "${det[@]}" "${calib[@]}" --int8-keep none \
    --calib-cache "$eng/yolov5n.calib.json"
if [ -f "${TRTNET_INT8_SENSITIVITY:-}" ]; then
    cp "$TRTNET_INT8_SENSITIVITY" "$out/yolov5n.sensitivity.json"
else
    step sensitivity 1800 env PYTHONPATH="$repo" "$torchpy" -m trtnet.quant sensitivity "$eng/yolov5n.wts" \
        --calib "$images" --images 16 --calib-cache "$eng/yolov5n.calib.json" --device gpu --imgsz 640 \
        -o "$out/yolov5n.sensitivity.json"
fi
cp "$out/yolov5n.sensitivity.json" "$eng/yolov5n.sensitivity.json"  # where --int8-keep auto finds it
build yolov5n_int8_auto yolov5n --int8 "${det[@]}" --calib-cache "$eng/yolov5n.calib.json" --int8-keep auto
build yolov5n_int8_implicit yolov5n --int8 "${det[@]}" --int8-mode implicit --calib "$images" \
    --calib-images 128 --calib-cache "$eng/yolov5n.implicit.cache"
for e in yolov5n_fp16 yolov5n_int8_none yolov5n_int8_auto yolov5n_int8_implicit; do val $e; done

# throughput: synthetic yolov5s 640 at batch 1 and 32, ResNet-50 at batch 128
for b in 1 32; do
    build "yolov5s_fp16_b$b" yolov5s_syn --fp16 --imgsz 640 --batch $b --postprocess kernels
    build "yolov5s_int8_b$b" yolov5s_syn --int8 --imgsz 640 --batch $b --postprocess kernels "${calib[@]}" \
        --calib-cache "$eng/yolov5s_syn.calib.json"
    bench "yolov5s_fp16_b$b" "yolov5s_fp16_b$b" --batch $b
    bench "yolov5s_int8_b$b" "yolov5s_int8_b$b" --batch $b
done
build resnet50_fp16_b128 resnet50_syn --fp16 --batch 128
build resnet50_int8_b128 resnet50_syn --int8 --batch 128 "${calib[@]}" --calib-cache "$eng/resnet50_syn.calib.json"
bench resnet50_fp16_b128 resnet50_fp16_b128 --batch 128
bench resnet50_int8_b128 resnet50_int8_b128 --batch 128

# the GPU calibration pass against the CPU one, and the summary of build / calibration times
step test_int8_gpu 900 "$py39" -m pytest -q -m gpu "$repo/tests/gpu/test_int8_gpu.py" -ra
grep -h "INT8: calibrated" "$out"/build_*.log >"$out/calibration_times.txt"
"$py39" - "$eng" >"$out/build_times.txt" <<'PY'
import json, pathlib, sys
for meta in sorted(pathlib.Path(sys.argv[1]).glob("*.engine.json")):
    m = json.loads(meta.read_text())
    print(f"{meta.name:40} {m['precision']:5} build {m['build_seconds']:8.1f} s  int8 {m.get('int8')}")
PY
