#!/usr/bin/env bash
# py-spy sampling TensorRT 8.5's Python 3.9 (through py39.sh) on the GPU machine: where each thread's wall time and
# the GIL go. The wheel is carried as .pyspy/py_spy-*.whl (`pip download py-spy --no-deps -d .pyspy`, 3 MB) and
# installed into /tmp/pyspy by `spy.sh install` in the call that carries it.
#
#   tests/gpu/spy.sh install
#   tests/gpu/spy.sh OUT NAME [PY-SPY OPTIONS…] -- ARGS…   # OUT/NAME.txt: raw collapsed stacks per thread, idle
#                                                          # samples included; OUT/NAME.top.txt: their summary
set -u
repo=$(cd "$(dirname "$0")/../.." && pwd)
spy=/tmp/pyspy/bin/py-spy
if [ "${1:-}" = install ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target /tmp/pyspy \
        "$repo"/.pyspy/py_spy-*.whl && "$spy" --version
    exit
fi
out=$1 name=$2
shift 2
opts=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
shift
[ -x "$spy" ] || { echo "no $spy: carry .pyspy and run $0 install"; exit 1; }
mkdir -p "$out"
"$spy" record --rate 400 --threads --format raw -o "$out/$name.txt" "${opts[@]}" -- "$repo/tests/gpu/py39.sh" "$@"
code=$?
python3 "$repo/tests/gpu/spy_summary.py" "$out/$name.txt" >"$out/$name.top.txt"
exit $code
