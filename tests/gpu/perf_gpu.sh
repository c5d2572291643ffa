#!/usr/bin/env bash
# Issue 15 on the GPU machine (TensorRT 8.5's Python 3.9): (a) the streamed-vs-engine table re-measured,
# (b) a profile of the static engines' streamed path against the dynamic one's, (c) JPEGs decoded on the GPU:
# bench --files and val's mAP with each decoder (e: probes, detect on a folder). Every log and JSON goes to $1.
#
#   TRTNET_SHARED_DATA=/tmp/data TRTNET_GPU_ENGINES=/tmp/eng tests/gpu/perf_gpu.sh $OUT [a] [b] [c]
#
# The parts (default a b c, about 10 minutes together; name some to split them across device commands):
# a = the batch-1 table, b = batch 32 and the profiles, c = files → boxes and val per decoder, e = the decoders'
# variants and probes, f = py-spy's samples of the files pass and of isolated pinned calls (e and f not by default).
#
# Before: `engines_gpu.py build --only yolov5n_640_fp16,yolov5s_syn_640_fp16_b1,yolov5s_syn_640_fp16_b32` (its
# .wts files and engines in $TRTNET_GPU_ENGINES); this script builds the static yolov5n batch-1 engine itself.
#
# nvImageCodec + nvJPEG wheels for Python 3.9 and CUDA 12 (the TensorRT 8.5 payload has cuda-python 12.9), fetched
# on the CPU machine from the repository root, into the .whl39 folder that tests/gpu/device_prepare.sh unpacks
# into /tmp/site39 (37 MB: nvidia_nvimgcodec_cu12-0.9.0.20 needs glibc >= 2.28; nvidia_nvjpeg_cu12-12.4.0.76):
#
#   pip download --only-binary=:all: --python-version 3.9 --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl39 "nvidia-nvimgcodec-cu12[nvjpeg]>=0.9"
set -u
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=$1
data=${TRTNET_SHARED_DATA:-/tmp/data}
eng=${TRTNET_GPU_ENGINES:-/tmp/eng}
py39="$repo/tests/gpu/py39.sh"
images="$data/coco128/images/train2017"
mkdir -p "$out"
cd /tmp  # not the checkout: its networks/ and plugins/ folders would shadow trtnet's mapping

. "$repo/tests/gpu/steps.sh"  # step NAME SECONDS COMMAND…

# (tests/gpu/device_prepare.sh made nvidia/ in /tmp/site39 a path-extending package at setup)
step gpu_decode_check 60 "$py39" -c "from trtnet.image_decoding import gpu_decode_unavailable as u; \
from nvidia import nvimgcodec; print('nvImageCodec', nvimgcodec.__version__, 'unavailable:', u())"

dyn=$eng/yolov5n_640_fp16.engine           # dynamic batch 1..32, size 128..672
n_b1=$eng/yolov5n_640_fp16_b1.engine       # static batch 1, 640
s_b1=$eng/yolov5s_syn_640_fp16_b1.engine   # static batch 1, 640
s_b32=$eng/yolov5s_syn_640_fp16_b32.engine
[ -f "$n_b1" ] || step build_yolov5n_b1 900 "$py39" -m trtnet.build yolov5n --weights-dir "$eng" --fp16 --batch 1 \
    --postprocess kernels -o "$n_b1" --timing-cache "$eng/yolov5n_640_fp16_b1.timing"

parts=${*:2}
parts=${parts:-a b c}
want() { [[ " $parts " == *" $1 "* ]]; }

# (a) the issue's table: engine / end to end / e2e pinned / streamed at batch 1, with and without CUDA graphs
part_a() {
for e in "$dyn" "$n_b1" "$s_b1"; do
    [ -f "$e" ] || continue  # yolov5s batch 1 where this session built it
    name=$(basename "$e" .engine)
    step "table_${name}_graphs" 240 "$py39" -m trtnet.bench "$e" --batch 1 --iters 1000 --warmup 100 --cuda-graphs \
        --json "$out/table_${name}_graphs.json"
    step "table_${name}_eager" 240 "$py39" -m trtnet.bench "$e" --batch 1 --iters 1000 --warmup 100 \
        --json "$out/table_${name}_eager.json"
done
}

# (b) batch 32 from pageable frames (the 84 MB host copy) and from pinned ones, static and dynamic; then where the
# streamed path serialises at batch 1
part_b() {
step table_yolov5s_b32_graphs 300 "$py39" -m trtnet.bench "$s_b32" --batch 32 --iters 200 --warmup 20 --cuda-graphs \
    --json "$out/table_yolov5s_b32_graphs.json"
step table_yolov5n_dyn_b32_graphs 300 "$py39" -m trtnet.bench "$dyn" --batch 32 --iters 200 --warmup 20 --cuda-graphs \
    --json "$out/table_yolov5n_dyn_b32_graphs.json"
step profile_stream_b32 600 "$py39" "$repo/tests/gpu/profile_stream.py" "$s_b32" "$dyn" --batch 32 --cuda-graphs \
    --variants --frames 60 --json "$out/profile_stream_b32.json"

# (b) where the streamed path serialises: host timers per call + CUDA-event timeline per run, each engine with
# graphs on, then graphs off, depth 1 and 3, pinned frames (--variants); the eager host cost of one call
step profile_stream 600 "$py39" "$repo/tests/gpu/profile_stream.py" "$dyn" "$n_b1" "$s_b1" --cuda-graphs --variants \
    --frames 500 --json "$out/profile_stream.json"
for e in "$n_b1" "$dyn"; do
    name=$(basename "$e" .engine)
    step "profile_detect_${name}_eager" 180 "$py39" "$repo/tests/gpu/profile_detect.py" "$e" --calls 1000
    step "profile_detect_${name}_graphs" 180 "$py39" "$repo/tests/gpu/profile_detect.py" "$e" --calls 1000 --cuda-graphs
done
if command -v nsys >/dev/null; then  # the CUDA API and kernel timeline of the static streamed path, if nsys is here
    step nsys_static_b1 300 nsys profile --trace=cuda,osrt --force-overwrite true -o "$out/nsys_static_b1" \
        "$py39" "$repo/tests/gpu/profile_stream.py" "$n_b1" --cuda-graphs --frames 300 --json "$out/nsys_run.json"
fi

}

# (c) JPEG files → boxes, OpenCV vs nvImageCodec, batch 32, beside the engine alone (the ceiling)
part_c() {
step files_yolov5n_dyn_b32 600 "$py39" -m trtnet.bench "$dyn" --files "$images" --batch 32 --decode both --iters 40 \
    --warmup 2 --cuda-graphs --json "$out/files_yolov5n_dyn_b32.json"
if [ -f "$s_b32" ]; then
    step files_yolov5s_b32 600 "$py39" -m trtnet.bench "$s_b32" --files "$images" --batch 32 --decode both \
        --iters 40 --warmup 2 --cuda-graphs --json "$out/files_yolov5s_b32.json"
fi
for d in cpu gpu; do  # the same official rectangular val letterbox: only the decoder differs
    step "val_decode_$d" 300 "$py39" -m trtnet.val "$dyn" --data "$data/coco128" --decode "$d" --json "$out/val_$d.json"
done
# the GPU-decoded pixels against cv2.imread's (the hardware decoder's IDCT may differ from libjpeg's)
step decode_pixels 300 "$py39" - "$images" "$out/decode_pixels.json" <<'EOF'
import json, sys, time
from pathlib import Path
import cv2, numpy as np
from trtnet.image_decoding import FileDecoder, host_images
paths = sorted(str(p) for p in Path(sys.argv[1]).glob("*.jpg"))
with FileDecoder("gpu") as decoder:
    start = time.perf_counter()
    gpu = [host_images(decoder, paths[i:i + 32]) for i in range(0, len(paths), 32)]
    gpu_s = time.perf_counter() - start
gpu = [image for batch in gpu for image in batch]
diffs = [np.abs(g.astype(np.int16) - cv2.imread(p).astype(np.int16)) for g, p in zip(gpu, paths)]
report = {"files": len(paths), "gpu_decode_and_download_s": gpu_s,
          "mean_abs_diff": float(np.mean([d.mean() for d in diffs])), "max_abs_diff": int(max(d.max() for d in diffs)),
          "share_of_pixels_off_by_more_than_2": float(np.mean([(d > 2).mean() for d in diffs]))}
Path(sys.argv[2]).write_text(json.dumps(report, indent=1))
print(report)
EOF
step val_compare 30 "$py39" -c "import json; c, g = (json.load(open('$out/val_' + d + '.json'))['metrics'] \
for d in ('cpu', 'gpu')); print({k: (c[k], g[k], round(g[k] - c[k], 5)) for k in c})"
}

# (e) the decoder's variants: each backend alone, eager, nvImageCodec's host threads, detect on a folder
part_e() {
# each backend's decoder alone against FileDecoder's, on coco128 (a third of a megapixel) and on the server's
# images (bus.jpg, zidane.jpg: 1 megapixel): 32 of those took 145 ms with one host thread and all backends in one
# decoder, 3.7 ms with the hardware engines' decoder alone (run L)
step decode_probe_coco 300 "$py39" "$repo/tests/gpu/decode_probe.py" "$images" --backends \
    --json "$out/decode_probe_coco.json"
step decode_probe_large 300 "$py39" "$repo/tests/gpu/decode_probe.py" "$data/images" --backends \
    --json "$out/decode_probe_large.json"
for d in cpu gpu; do  # detect on a folder, nothing written (the decoder's start against OpenCV's none)
    step "detect_folder_${d}_nosave" 300 "$py39" -m trtnet.detect "$dyn" "$images" --batch 32 --decode "$d" \
        --nosave --out "$out/detect_${d}_nosave"
done
step files_yolov5n_dyn_b32_eager 600 "$py39" -m trtnet.bench "$dyn" --files "$images" --batch 32 --decode both \
    --iters 40 --warmup 2 --json "$out/files_yolov5n_dyn_b32_eager.json"
for t in 1 4; do  # nvImageCodec's host threads (default 0: one per core)
    step "files_yolov5n_dyn_b32_threads$t" 600 "$py39" -m trtnet.bench "$dyn" --files "$images" --batch 32 \
        --decode gpu --decode-threads "$t" --iters 40 --warmup 2 --cuda-graphs \
        --json "$out/files_yolov5n_dyn_b32_threads$t.json"
done
# where a GPU-decode batch goes (the decoder's start; does `decode` hold the host until its images are done?)
step decode_probe 300 "$py39" "$repo/tests/gpu/decode_probe.py" "$images" --threads 1,4,0 --json "$out/decode_probe.json"
for d in cpu gpu; do  # annotated images written (GPU-decoded pixels come back for drawing)
    step "detect_folder_$d" 300 "$py39" -m trtnet.detect "$dyn" "$images" --batch 32 --decode "$d" \
        --out "$out/detect_$d"
done
}

# (f) py-spy (tests/gpu/spy.sh, after `spy.sh install`): each thread's wall time and the GIL's holders in the files
# pass with GPU decode (run O: read 32 %, decode 54 % of a batch one at a time, yet together 12.5 ms a batch where
# either alone is under 7), and where an isolated call from a pinned frame spends its host time (1.42-1.47x the engine)
part_f() {
local spy="$repo/tests/gpu/spy.sh" files=(-m trtnet.bench "$dyn" --files "$images" --batch 32 --decode gpu --iters 600
                                          --warmup 2 --cuda-graphs)
# non-blocking: in its default (blocking) mode py-spy hung the files pass with --idle until the step's limit (run P)
step spy_files_wall 300 "$spy" "$out/spy" files_wall --idle --nonblocking -- "${files[@]}" \
    --json "$out/spy_files_wall.json"
step spy_files_gil 300 "$spy" "$out/spy" files_gil --gil --nonblocking -- "${files[@]}" --json "$out/spy_files_gil.json"
local calls=(--calls 20000 --cuda-graphs --pinned --no-cprofile)
step spy_pinned_calls 300 "$spy" "$out/spy" pinned_calls --idle -- "$repo/tests/gpu/profile_detect.py" "$n_b1" "${calls[@]}"
step spy_pinned_calls_native 300 "$spy" "$out/spy" pinned_calls_native --idle --native -- \
    "$repo/tests/gpu/profile_detect.py" "$n_b1" "${calls[@]}"
}

for part in a b c e f; do
    if want $part; then "part_$part"; fi
done
echo "perf_gpu done ($parts)" | tee -a "$out/steps.txt"
