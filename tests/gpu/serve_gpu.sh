#!/usr/bin/env bash
# Issue 16 on the GPU machine (TensorRT 8.5's Python 3.9 through py39.sh): `trtnet.serve` (PyTriton) on ENGINE with
# 1 and 2 instances, `--bench` at concurrency 1, 8, 32 (SERVE_REQUESTS per concurrency, default 3400: > 10,000 per
# instance setting), against the runner called directly in one process (tests/gpu/serve_direct.py) on the same
# images. Logs, JSON, server logs, Triton statistics and summary.txt go to OUT; steps.txt lists each step's exit.
#
#   tests/gpu/serve_gpu.sh install                   # only install the carried wheel folder(s) into /tmp/site39serve
#   tests/gpu/serve_gpu.sh OUT ENGINE IMAGES_DIR     # from the repository root, after tests/gpu/device_prepare.sh
#
# The wheels (78 MiB, over one call's carry limit): carry .whl_serve39/a in one call (`serve_gpu.sh install`), then
# .whl_serve39/b in the next, on the same warm machine, with the run itself. Each call installs what it carries.
# They install with the machine's Python 3.12 pip for the payload's Python 3.9 (pip keeps tritonserver's exec bit;
# `python -m zipfile` would not):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site39serve \
#       --python-version 3.9 --implementation cp --only-binary=:all: --platform manylinux_2_35_x86_64 \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
#       --platform manylinux1_x86_64 .whl_serve39/a/*.whl .whl_serve39/b/*.whl
#
# Wheel set (cp39, x86_64; numpy, OpenCV, cuda-python, TensorRT come with the payload, packaging with /tmp/site39):
#   a/ nvidia-pytriton 0.7.0 (53 MiB; manylinux_2_35: glibc >= 2.35, its binaries use symbols up to GLIBC_2.34)
#   b/ aiohappyeyeballs 2.6.1, aiohttp 3.13.5, aiosignal 1.4.0, annotated-doc 0.0.5, async-timeout 5.0.1,
#      attrs 26.1.0, brotli 1.2.1, certifi 2026.10.19.post1, click 8.1.8, frozenlist 1.8.0, gevent 25.9.1,
#      geventhttpclient 2.4.0, greenlet 3.2.5, grpcio 1.67.1, idna 3.20, importlib-metadata 8.7.1,
#      markdown-it-py 3.0.0, mdurl 0.1.2, ml-dtypes 0.5.4, multidict 6.7.1, mypy-extensions 1.1.0, propcache 0.4.1,
#      protobuf 6.33.6, pygments 2.21.0, python-rapidjson 1.23, pyzmq 27.3.0, rich 15.0.0, setuptools 82.0.1,
#      sh 2.3.0, shellingham 1.5.4, tritonclient 2.71.0, typer 0.23.2, typing-extensions 4.16.0,
#      typing-inspect 0.9.0, urllib3 2.6.3, wrapt 2.5.2, yarl 1.22.0, zipp 3.23.1, zope-event 6.0,
#      zope-interface 8.0.1 (25 MiB)
#      + Debian bullseye's libpython3.9_3.9.2-1_amd64.deb: PyTriton's Python-backend stub links libpython3.9.so.1.0,
#      which the payload's (static) python3.9 lacks; unpacked into /tmp/site39serve/libpython.
# The set is what `python3.9 -m pip download --only-binary=:all: nvidia-pytriton==0.7.0 numpy==1.23.5` resolves
# (a real 3.9 evaluates the markers: async-timeout is only needed below 3.11). To fetch it again, from the root:
#
#   P="--platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#      --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64"
#   pip download -q --no-deps --only-binary=:all: --python-version 3.9 --implementation cp $P -d .whl_serve39/a \
#       nvidia-pytriton==0.7.0
#   pip download -q --no-deps --only-binary=:all: --python-version 3.9 --implementation cp $P -d .whl_serve39/b \
#       aiohappyeyeballs==2.6.1 aiohttp==3.13.5 ...   # every b/ name==version above
#   (cd .whl_serve39/b && apt-get download libpython3.9=3.9.2-1)   # with the bullseye sources of shared/gpu/trt85
#
# Without a GPU (the same flow on the CPU path, for checking this script): TRTNET_SERVE_DEVICES=cpu, ENGINE a
# weights file, TRTNET_SERVE_IMGSZ=320, PY39=a Python 3.9 wrapper like py39.sh, SERVE_REQUESTS=100,
# SERVE_PIP_PYTHON=python3.12. Other knobs: SERVE_PORT (8000: HTTP, +1 gRPC, +2 metrics), SERVE_STARTUP_S (180),
# SERVE_QUEUE_DELAY_US (500), DIRECT_SECONDS (2 per row).
set -u
repo=$(cd "$(dirname "$0")/../.." && pwd)
site=${TRTNET_SERVE_SITE:-/tmp/site39serve}
platforms=(--platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)

install_wheels() {  # whichever of .whl_serve39/a, b this call carries → $site
    local folder found=""
    for folder in "$repo/.whl_serve39/a" "$repo/.whl_serve39/b"; do
        compgen -G "$folder/*.whl" >/dev/null || continue
        found=1
        "${SERVE_PIP_PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --disable-pip-version-check --upgrade --target "$site" --python-version 3.9 --implementation cp \
            --only-binary=:all: "${platforms[@]}" "$folder"/*.whl || return 1
        echo "installed $(compgen -G "$folder/*.whl" | wc -l) wheels from $folder into $site"
    done
    for deb in "$repo"/.whl_serve39/b/libpython3.9_*.deb; do
        if [ -f "$deb" ]; then dpkg -x "$deb" "$site/libpython" || return 1; fi
    done
    [ -n "$found" ] || { echo "no wheels in $repo/.whl_serve39/a or b: carry one of them"; return 1; }
}

if [ "${1:-}" = install ]; then
    install_wheels
    exit
fi
if [ $# -ne 3 ]; then
    echo "usage: $0 OUT ENGINE IMAGES_DIR   (or: $0 install)" >&2
    exit 2
fi

mkdir -p "$1"
out=$(cd "$1" && pwd)
target=$(realpath "$2")
images=()
while IFS= read -r f; do images+=("$f"); done < <(ls "$(realpath "$3")"/*.jpg 2>/dev/null | sort)
py39=${PY39:-$repo/tests/gpu/py39.sh}
devices=${TRTNET_SERVE_DEVICES:-0}
port=${SERVE_PORT:-8000}
url=http://127.0.0.1:$port
requests=${SERVE_REQUESTS:-3400}
cpu_args=()
[ "$devices" = cpu ] && cpu_args=(--imgsz "${TRTNET_SERVE_IMGSZ:-640}")
cd /tmp  # not the checkout: its networks/ and plugins/ folders would shadow trtnet's mapping

. "$repo/tests/gpu/steps.sh"  # step NAME SECONDS COMMAND…
[ ${#images[@]} -gt 0 ] || { echo "no *.jpg in $3" | tee -a "$out/steps.txt"; exit 1; }
[ -f "$target" ] || { echo "$2: no such engine (or weights) file" | tee -a "$out/steps.txt"; exit 1; }

# PyTriton outside site-packages counts as an editable install and looks for its libraries in the wrong folder,
# so they go on the loader path, with the stub's libpython3.9; py39.sh adds $site after the checkout and /tmp/site39.
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
export LD_LIBRARY_PATH=$site/nvidia_pytriton.libs:$site/libpython/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

step install 300 bash "$repo/tests/gpu/serve_gpu.sh" install
# The stub's multiprocessing starts `python3` from PATH (PyTriton puts sys.exec_prefix/bin first, expecting a venv):
# the payload has only python3.9 there, so a python3 that is that same interpreter goes first.
mkdir -p "$site/py39bin" && ln -sf "$("$py39" -c 'import sys; print(sys.executable)')" "$site/py39bin/python3"
export PATH=$site/py39bin:$PATH
step serve_env 120 bash -c "'$py39' -c 'import sys, pytriton, tritonclient.grpc, tritonclient.http, numpy, cv2; \
from importlib.metadata import version as v; print(sys.version.split()[0], \"pytriton\", v(\"nvidia-pytriton\"), \
\"tritonclient\", v(\"tritonclient\"), \"numpy\", numpy.__version__, \"cv2\", cv2.__version__)' && \
test -x '$site/pytriton/tritonserver/bin/tritonserver' && \
! ldd '$site/pytriton/tritonserver/python_backend_stubs/3.9/triton_python_backend_stub' | grep 'not found'"
if ! grep -q "^serve_env: exit 0" "$out/steps.txt"; then
    echo "PyTriton is not usable from $py39 (see serve_env.log, install.log)" | tee -a "$out/steps.txt"
    exit 1
fi

step direct 300 "$py39" "$repo/tests/gpu/serve_direct.py" "$target" --device "${devices%%,*}" "${cpu_args[@]}" \
    --images "${images[@]}" --batches 1,8,32 --seconds "${DIRECT_SECONDS:-2}" --json "$out/direct.json"

server_ready() {  # server_ready PID LOG: Triton answers ready and trtnet.serve has loaded the model
    local pid=$1 log=$2 deadline=$((SECONDS + ${SERVE_STARTUP_S:-180}))
    while [ $SECONDS -lt $deadline ]; do
        kill -0 "$pid" 2>/dev/null || { echo "the server exited before it was ready:"; tail -30 "$log"; return 1; }
        if grep -q "^serving " "$log" && http_ok /v2/health/ready; then return 0; fi
        sleep 1
    done
    echo "the server was not ready after ${SERVE_STARTUP_S:-180} s:"
    tail -30 "$log"
    return 1
}

http_ok() {  # http_ok PATH: 200 from the server (bash's /dev/tcp: no curl needed)
    local status
    exec 3<>"/dev/tcp/127.0.0.1/$port" 2>/dev/null || return 1
    printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$1" >&3
    read -r -t 5 _ status _ <&3
    exec 3<&-
    [ "${status:-}" = 200 ]
}

stop_server() {  # stop_server PID NAME: SIGINT (PyTriton's way out), then TERM, then KILL its process group
    local pid=$1 name=$2 i
    kill -INT "$pid" 2>/dev/null
    for i in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "$name: no exit 60 s after SIGINT; SIGTERM" | tee -a "$out/steps.txt"
        kill -TERM "$pid"
        sleep 10
    fi
    wait "$pid" 2>/dev/null
    echo "$name stopped: exit $? in $i s" | tee -a "$out/steps.txt"
    for i in $(seq 10); do pgrep -g "$pid" >/dev/null || break; sleep 1; done  # its group: tritonserver, stubs
    if pgrep -g "$pid" >/dev/null; then
        echo "$name: orphans killed: $(ps -o pid=,args= -g "$pid" | cut -c1-150 | tr '\n' ';')" | tee -a "$out/steps.txt"
        kill -KILL -- "-$pid"
    fi
}

serve_and_bench() {  # serve_and_bench INSTANCES
    local n=$1 log="$out/server_i$1.log" pid
    set -m  # its own process group, and SIGINT not ignored as it is for a non-interactive shell's background job
    "$py39" -m trtnet.serve "$target" --instances "$n" --max-batch 32 --devices "$devices" "${cpu_args[@]}" \
        --max-queue-delay-us "${SERVE_QUEUE_DELAY_US:-500}" --host 127.0.0.1 --http-port "$port" \
        --grpc-port $((port + 1)) --metrics-port $((port + 2)) >"$log" 2>&1 &
    pid=$!
    set +m
    local start=$SECONDS
    server_ready "$pid" "$log" >"$out/ready_i$n.log" 2>&1
    echo "ready_i$n: exit $? in $((SECONDS - start)) s" | tee -a "$out/steps.txt"
    if grep -q "^ready_i$n: exit 0" "$out/steps.txt"; then
        step "bench_i$n" 600 "$py39" -m trtnet.serve --bench "$url" --concurrency 1,8,32 --requests "$requests" \
            --images "${images[@]}"
        step "stats_i$n" 60 "$py39" -c "import json, sys; from trtnet.client import Client; c = Client('$url'); \
json.dump(c.statistics(c.model), open('$out/stats_i$n.json', 'w'), indent=1)"
    fi
    stop_server "$pid" "server_i$n"
}

serve_and_bench 1
serve_and_bench 2

"$py39" - "$out" "$requests" <<'PY' | tee "$out/summary.txt"
"""The serving table: bench rows per instance setting, the direct rows, server / best direct at concurrency 32."""
import json, re, sys
from pathlib import Path

out, requests = Path(sys.argv[1]), int(sys.argv[2])
summary = {"requests_per_concurrency": requests, "server": {}, "direct": None}
print(f"{'':14} {'conc':>4} {'requests':>8} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'p99/p50':>7} {'errors':>6} "
      f"{'avg batch':>9}")
for n in (1, 2):
    log = out / f"bench_i{n}.log"
    rows = []
    for line in log.read_text().splitlines() if log.exists() else []:
        f = line.split()
        if len(f) == 6 and re.fullmatch(r"\d+", f[0]):
            rows.append({"concurrency": int(f[0]), "requests": int(f[1]), "throughput": float(f[2]),
                         "p50_ms": float(f[3]), "p99_ms": float(f[4]), "errors": int(f[5])})
    stats = out / f"stats_i{n}.json"
    batch = None
    if stats.exists():
        model = json.loads(stats.read_text())["model_stats"][0]
        batch = int(model.get("inference_count", 0)) / max(int(model.get("execution_count", 0)), 1)
    summary["server"][n] = {"rows": rows, "mean_batch": batch}
    (out / f"bench_i{n}.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        print(f"{f'server, {n} inst':14} {r['concurrency']:>4} {r['requests']:>8} {r['throughput']:>9.1f} "
              f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['p99_ms'] / r['p50_ms']:>7.2f} {r['errors']:>6} "
              f"{batch if batch is None else round(batch, 2)!s:>9}")
    if not rows:
        print(f"server, {n} inst: no bench rows (see steps.txt, server_i{n}.log, bench_i{n}.log)")
direct = out / "direct.json"
best = {}
if direct.exists():
    summary["direct"] = json.loads(direct.read_text())
    for r in summary["direct"]["rows"]:
        print(f"{'direct, ' + r['mode']:14} {'b' + str(r['batch']):>4} {r['images']:>8} {r['throughput']:>9.1f} "
              f"{r['ms_per_batch']:>8.2f} {'(ms per batch)':>17}")
        best[r["mode"]] = max(best.get(r["mode"], 0.0), r["throughput"])
else:
    print("direct: no rows (see direct.log)")
for n, s in summary["server"].items():
    at32 = [r for r in s["rows"] if r["concurrency"] == 32]
    total = sum(r["requests"] for r in s["rows"])
    errors = sum(r["errors"] for r in s["rows"])
    line = f"{n} instance(s): {total} requests, {errors} errors"
    if at32 and best:
        s["ratio_at_32"] = {mode: at32[0]["throughput"] / value for mode, value in best.items()}
        line += "; at concurrency 32, server / best direct: " + ", ".join(
            f"{v:.0%} of {mode}" for mode, v in s["ratio_at_32"].items())
    print(line)
(out / "summary.json").write_text(json.dumps(summary, indent=1))
PY
echo "serve_gpu done" | tee -a "$out/steps.txt"
