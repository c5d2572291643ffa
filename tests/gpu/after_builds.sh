#!/usr/bin/env bash
# On the GPU machine, once `engines_gpu.py build --only session` has finished: numerics against the
# goldens, the runtime tests, COCO val, and the benchmarks; every log and JSON goes to $1.
#
#   TRTNET_SHARED_DATA=/tmp/data TRTNET_GPU_ENGINES=/tmp/eng TRTNET_GPU_REFS=/tmp/refs \
#       tests/gpu/after_builds.sh $OUT      (refs: engines_gpu.py refs, made on the CPU beforehand)
set -u
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=$1
data=${TRTNET_SHARED_DATA:-/tmp/data}
eng=${TRTNET_GPU_ENGINES:-/tmp/eng}
py39="$repo/tests/gpu/py39.sh"
mkdir -p "$out"
cd /tmp  # not the checkout: its networks/ and plugins/ folders would shadow trtnet's mapping

. "$repo/tests/gpu/steps.sh"  # step NAME SECONDS COMMAND…

step check 120 "$py39" "$repo/tests/gpu/engines_gpu.py" check --data "$data" --out "$eng" \
    --refs "${TRTNET_GPU_REFS:-/tmp/refs}" --report "$out/check.json"
for p in ${TRTNET_GPU_PRECISIONS:-fp32 fp16}; do
    step "val_$p" 180 "$py39" -m trtnet.val "$eng/yolov5n_640_$p.engine" --data "$data/coco128" \
        --json "$out/val_$p.json"
done
bench() {  # bench NAME ENGINE ARGS…
    local name=$1 engine=$2
    shift 2
    step "bench_$name" 180 "$py39" -m trtnet.bench "$eng/$engine.engine" --json "$out/bench_$name.json" "$@"
}
bench yolov5n_fp16 yolov5n_640_fp16 --batch 1,32
bench yolov5n_fp16_graphs yolov5n_640_fp16 --batch 1,32 --cuda-graphs
[ -f "$eng/yolov5n_640_fp32.engine" ] && bench yolov5n_fp32 yolov5n_640_fp32 --batch 1,32
bench yolov5s_fp16_b1 yolov5s_syn_640_fp16_b1 --batch 1
bench yolov5s_fp16_b1_graphs yolov5s_syn_640_fp16_b1 --batch 1 --cuda-graphs
bench yolov5s_fp16_b32 yolov5s_syn_640_fp16_b32 --batch 32
bench resnet50_fp16_b32 resnet50_syn_fp16_b32 --batch 32
bench resnet50_fp16_b32_graphs resnet50_syn_fp16_b32 --batch 32 --cuda-graphs
# torch lives in the machine's own Python, TensorRT in 3.9's: the PyTorch side runs right after, same GPU
step torch_resnet50_b32 180 env PYTHONPATH="$repo" python3 -m trtnet.bench "$eng/resnet50_syn_fp16_b32.engine" \
    --torch-only --batch 32 --weights-dir "$eng" --json "$out/torch_resnet50_b32.json"
# YOLOv8 / YOLO11 (engines_gpu.py build --only v8): engine latency at 1 and 32, then the official Ultralytics
# model in fp16 with a CUDA graph (the ultralytics wheel's folder in $ULTRALYTICS_PATH, installed --no-deps)
for m in yolov8s_syn yolo11s_syn; do
    [ -f "$eng/${m}_640_fp16_b1.engine" ] || continue
    bench "${m}_fp16_b1" "${m}_640_fp16_b1" --batch 1 --cuda-graphs
    bench "${m}_fp16_b32" "${m}_640_fp16_b32" --batch 32 --cuda-graphs
    step "torch_${m}" 300 env PYTHONPATH="$repo${ULTRALYTICS_PATH:+:$ULTRALYTICS_PATH}" python3 -m trtnet.bench \
        "$eng/${m}_640_fp16_b1.engine" --torch-only --batch 1,32 --weights-dir "$data/weights/synthetic" \
        --json "$out/torch_${m}.json"
done
step runtime_tests 400 env TRTNET_SHARED_DATA="$data" TRTNET_GPU_ENGINES="$eng" \
    "$py39" -m pytest -q -ra -p no:cacheprovider "$repo/tests/gpu/test_runtime_gpu.py" ${TRTNET_GPU_PYTEST_K:+-k "$TRTNET_GPU_PYTEST_K"}
cp "$eng"/*.build.log "$eng"/builds.json "$out/" 2>/dev/null
cp "$eng"/yolov5n_640_fp16.engine.json "$out/engine_meta_yolov5n_640_fp16.json" 2>/dev/null
echo "after_builds done" | tee -a "$out/steps.txt"
