#!/usr/bin/env bash
# GPU JPEG decoding measured without TensorRT (no 11-part staging: one device call): nvImageCodec for CUDA 13 in the
# GPU machine's own Python 3.12 (cuda-bindings 13, OpenCV), tests/gpu/decode_probe.py over two folders of JPEGs,
# OpenCV's rows beside the GPU decoders'. Into OUT: backends_<folder>.json, probe_<first folder>.json.
#
#   tests/gpu/decode_probe_312.sh OUT WHEELS_DIR JPEG_DIR...       # on the GPU machine, from the repository root
#
# The wheels (29 MB), fetched here into a git-ignored folder carried with the call (with the JPEG folders):
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl312 "nvidia-nvimgcodec-cu13[nvjpeg]"
set -u
out=$1 wheels=$2
shift 2
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --target /tmp/nv "$wheels"/*.whl 2>&1 | tail -2
lib=$(dirname "$(find /tmp/nv -name 'libnvjpeg.so*' | head -1)")
export LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}" PYTHONPATH="$PWD:/tmp/nv"
python3 -c "from trtnet.image_decoding import gpu_decode_unavailable as u; from nvidia import nvimgcodec; \
print('nvImageCodec', nvimgcodec.__version__, 'unavailable:', u())"
quiet() { grep -v -e nvjpeg2k -e nvtiff; }  # nvImageCodec names the extensions it did not find
for d in "$@"; do
    timeout 200 python3 tests/gpu/decode_probe.py "$d" --backends --json "$out/backends_$(basename "$d").json" 2>&1 | quiet
done
timeout 120 python3 tests/gpu/decode_probe.py "$1" --threads 1,0 --json "$out/probe_$(basename "$1").json" 2>&1 | quiet
