#!/usr/bin/env bash
# Issue 16 on the GPU machine (TensorRT 8.5's Python 3.9 through py39.sh): `trtnet.serve` (PyTriton) on ENGINE with
# 1 and 2 instances, `--bench` at concurrency 1, 8, 32 (1000, 4600, 4600 requests: 10,200 per instance setting;
# SERVE_REQUESTS_C1 and SERVE_REQUESTS change them), against the runner called directly in one process
# (tests/gpu/serve_direct.py) on the same images. Into OUT: steps.txt (each step's exit and time), server_iN.log,
# bench_iN_cC.log, stats_iN_cC.json (Triton's statistics: the dynamic batcher's mean batch), cpu_iN_cC.json (CPU
# time per request of Triton, its stubs and the rest: tests/gpu/cpu_share.py), direct.json, and
# summary.txt/.json (throughput, p50, p99, errors per row; server / best direct batch at concurrency 32, where
# `encoded` decodes the JPEGs as the server does and `decoded` starts from pixels). Estimated 3-4 minutes on an H200
# with yolov5n fp16 640 (an engine whose batch profile reaches 32); the images are IMAGES_DIR's *.jpg (bus, zidane).
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
#       aiohappyeyeballs==2.6.1 aiohttp==3.13.5 aiosignal==1.4.0 annotated-doc==0.0.5 async-timeout==5.0.1 \
#       attrs==26.1.0 brotli==1.2.1 certifi==2026.10.19.post1 click==8.1.8 frozenlist==1.8.0 gevent==25.9.1 \
#       geventhttpclient==2.4.0 greenlet==3.2.5 grpcio==1.67.1 idna==3.20 importlib-metadata==8.7.1 \
#       markdown-it-py==3.0.0 mdurl==0.1.2 ml-dtypes==0.5.4 multidict==6.7.1 mypy-extensions==1.1.0 propcache==0.4.1 \
#       protobuf==6.33.6 pygments==2.21.0 python-rapidjson==1.23 pyzmq==27.3.0 rich==15.0.0 setuptools==82.0.1 \
#       sh==2.3.0 shellingham==1.5.4 tritonclient==2.71.0 typer==0.23.2 typing-extensions==4.16.0 \
#       typing-inspect==0.9.0 urllib3==2.6.3 wrapt==2.5.2 yarl==1.22.0 zipp==3.23.1 zope-event==6.0 \
#       zope-interface==8.0.1
#   o="-oDir::Etc::SourceList=/dev/null -oDir::Etc::SourceParts=/tmp/trt85stage/apt/etc \
#      -oDir::State::Lists=/tmp/trt85stage/apt/lists"   # Debian bullseye, as ../shared/gpu/trt85/stage.sh sets it up
#   (cd .whl_serve39/b && apt-get $o download libpython3.9=3.9.2-1)
#
# Without a GPU (the same flow on the CPU path, for checking this script): TRTNET_SERVE_DEVICES=cpu, ENGINE a
# weights file, TRTNET_SERVE_IMGSZ=320, PY39=a Python 3.9 wrapper like py39.sh, SERVE_REQUESTS=32,
# SERVE_REQUESTS_C1=16, SERVE_PIP_PYTHON=python3.12, TRTNET_SERVE_SITE=another folder. Other knobs: SERVE_PORT
# (8000: HTTP, +1 gRPC, +2 metrics), SERVE_STARTUP_S (120), SERVE_QUEUE_DELAY_US (500), DIRECT_SECONDS (2 per row),
# SERVE_CONCURRENCY ("1 8 32"), SERVE_DIRECT (0: no direct baseline, for repeats within a session),
# SERVE_BENCH_PROCESSES (the clients' processes: --bench-processes, 0 = a quarter of the cores),
# SERVE_SPY (set: py-spy samples a model instance and the bench's clients at concurrency 32, spy_on_stub below).
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
    if compgen -G "$repo/.whl_serve39/b/*.whl" >/dev/null && ! compgen -G "$repo/.whl_serve39/b/libpython3.9_*.deb" \
        >/dev/null; then  # run K carried b without it: the server's Python stub could not start
        echo "no libpython3.9_*.deb in .whl_serve39/b: fetch it (this script's header, apt-get download)"
        return 1
    fi
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
requests=${SERVE_REQUESTS:-4600}  # at concurrency 8 and 32; at 1, the slowest, SERVE_REQUESTS_C1
cpu_args=()
[ "$devices" = cpu ] && cpu_args=(--imgsz "${TRTNET_SERVE_IMGSZ:-640}")
cd /tmp  # not the checkout: its networks/ and plugins/ folders would shadow trtnet's mapping

. "$repo/tests/gpu/steps.sh"  # step NAME SECONDS COMMAND…
[ ${#images[@]} -gt 0 ] || { echo "no *.jpg in $3" | tee -a "$out/steps.txt"; exit 1; }
[ -f "$target" ] || { echo "$2: no such engine (or weights) file" | tee -a "$out/steps.txt"; exit 1; }

export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}  # py39.sh puts it after the checkout and /tmp/site39
# For the server alone: PyTriton outside site-packages counts as an editable install and looks for its libraries in
# the wrong folder, so they go on the loader path, with the stub's libpython3.9 (the payload's python3.9 is static).
server_libs=$site/nvidia_pytriton.libs:$site/libpython/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

step install 120 bash "$repo/tests/gpu/serve_gpu.sh" install
# The stub's multiprocessing starts `python3` from PATH (PyTriton puts sys.exec_prefix/bin first, expecting a venv):
# the payload has only python3.9 there, so the server's PATH starts with a python3 that is that same interpreter.
mkdir -p "$site/py39bin" && ln -sf "$("$py39" -c 'import sys; print(sys.executable)')" "$site/py39bin/python3"
step serve_env 60 bash -c "'$py39' -c 'import sys, pytriton, tritonclient.grpc, tritonclient.http, numpy, cv2; \
from importlib.metadata import version as v; print(sys.version.split()[0], \"pytriton\", v(\"nvidia-pytriton\"), \
\"tritonclient\", v(\"tritonclient\"), \"numpy\", numpy.__version__, \"cv2\", cv2.__version__)' && \
test -x '$site/pytriton/tritonserver/bin/tritonserver' && \
! LD_LIBRARY_PATH='$server_libs' ldd '$site/pytriton/tritonserver/python_backend_stubs/3.9/triton_python_backend_stub' \
| grep 'not found'"
if ! grep -q "^serve_env: exit 0" "$out/steps.txt"; then
    echo "PyTriton is not usable from $py39 (see serve_env.log, install.log)" | tee -a "$out/steps.txt"
    exit 1
fi

[ "${SERVE_DIRECT:-1}" = 0 ] || step direct 150 "$py39" "$repo/tests/gpu/serve_direct.py" "$target" --device "${devices%%,*}" "${cpu_args[@]}" \
    --images "${images[@]}" --batches 1,8,32 --seconds "${DIRECT_SECONDS:-2}" --json "$out/direct.json"

server_ready() {  # server_ready PID LOG: Triton answers ready and trtnet.serve has loaded the model
    local pid=$1 log=$2 deadline=$((SECONDS + ${SERVE_STARTUP_S:-120}))
    while [ $SECONDS -lt $deadline ]; do
        kill -0 "$pid" 2>/dev/null || { echo "the server exited before it was ready:"; tail -30 "$log"; return 1; }
        if grep -q "^serving " "$log" && http_ok /v2/health/ready; then return 0; fi
        sleep 1
    done
    echo "the server was not ready after ${SERVE_STARTUP_S:-120} s:"
    tail -30 "$log"
    return 1
}

http_ok() {  # http_ok PATH: 200 from the server (bash's /dev/tcp in a subshell: no curl needed)
    (
        exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
        printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$1" >&3
        read -r -t 5 _ status _ <&3
        [ "${status:-}" = 200 ]
    ) 2>/dev/null
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
        echo "$name: orphans killed: $(ps -o pid=,args= -g "$pid" | cut -c1-150 | tr '\n' ';')" \
            | tee -a "$out/steps.txt"
        kill -KILL -- "-$pid"
    fi
}

spy_on_stub() {  # spy_on_stub TAG: with SERVE_SPY set, py-spy samples the first model instance's stub (Triton's
    # Python backend process that runs our model) for SERVE_SPY_S seconds (2) after SERVE_SPY_DELAY_S (2), in the
    # background while the concurrency-32 bench runs: spy_stub_iTAG.txt (raw stacks per thread, 400 a second: fewer
    # samples than 800 per thread say how long it ran no Python) and .top.txt (tests/gpu/spy_summary.py)
    local stub
    [ -n "${SERVE_SPY:-}" ] && [ -x /tmp/pyspy/bin/py-spy ] || return 0
    stub=$(pgrep -f triton_python_backend_stub | head -1)
    [ -n "$stub" ] || { echo "spy_i$1: no triton_python_backend_stub process" | tee -a "$out/steps.txt"; return 0; }
    ( sleep "${SERVE_SPY_DELAY_S:-2}"  # the clients' processes start and connect first
      /tmp/pyspy/bin/py-spy record --pid "$stub" --duration "${SERVE_SPY_S:-2}" --rate 400 --idle --threads \
        --nonblocking \
        --format raw -o "$out/spy_stub_i$1.txt" >"$out/spy_stub_i$1.log" 2>&1 \
      && python3 "$repo/tests/gpu/spy_summary.py" "$out/spy_stub_i$1.txt" >"$out/spy_stub_i$1.top.txt" ) &
    spy_pid=$!
}
spy_pid=""

serve_and_bench() {  # serve_and_bench INSTANCES [BACKEND]: bench_iTAG_cC.log per concurrency, Triton's statistics
    # after each; TAG is INSTANCES, with "py" after it for --backend python (Triton's own Python backend)
    local n=$1 backend=${2:-pytriton} pid c
    local tag=$n$([ "$backend" = python ] && echo py)
    local log="$out/server_i$tag.log"
    set -m  # its own process group, and SIGINT not ignored as it is for a non-interactive shell's background job
    env LD_LIBRARY_PATH="$server_libs" PATH="$site/py39bin:$PATH" \
        "$py39" -m trtnet.serve "$target" --instances "$n" --max-batch 32 --devices "$devices" "${cpu_args[@]}" \
        --backend "$backend" \
        --max-queue-delay-us "${SERVE_QUEUE_DELAY_US:-500}" --host 127.0.0.1 --http-port "$port" \
        --grpc-port $((port + 1)) --metrics-port $((port + 2)) >"$log" 2>&1 &
    pid=$!
    set +m
    local start=$SECONDS
    server_ready "$pid" "$log" >"$out/ready_i$tag.log" 2>&1
    echo "ready_i$tag: exit $? in $((SECONDS - start)) s" | tee -a "$out/steps.txt"
    if grep -q "^ready_i$tag: exit 0" "$out/steps.txt"; then
        for c in ${SERVE_CONCURRENCY:-1 8 32}; do
            local client=("$py39")
            if [ "$c" = 32 ] && [ -n "${SERVE_SPY:-}" ]; then  # the clients sampled too: are they the bound?
                spy_on_stub "$tag"
                client=("$repo/tests/gpu/spy.sh" "$out" "spy_clients_i$tag" --idle --subprocesses --nonblocking --)
            fi
            local n_requests=$([ "$c" = 1 ] && echo "${SERVE_REQUESTS_C1:-1000}" || echo "$requests")
            python3 "$repo/tests/gpu/cpu_share.py" snapshot "$out/cpu_before.json"
            step "bench_i${tag}_c$c" 200 "${client[@]}" -m trtnet.serve --bench "$url" --concurrency "$c" \
                --requests "$n_requests" --bench-processes "${SERVE_BENCH_PROCESSES:-0}" --images "${images[@]}"
            python3 "$repo/tests/gpu/cpu_share.py" snapshot "$out/cpu_after.json"
            python3 "$repo/tests/gpu/cpu_share.py" diff "$out/cpu_before.json" "$out/cpu_after.json" "$n_requests" \
                --json "$out/cpu_i${tag}_c$c.json" >/dev/null
            step "stats_i${tag}_c$c" 30 "$py39" -c "import json; from trtnet.client import Client; c = Client('$url'); \
json.dump(c.statistics(c.model), open('$out/stats_i${tag}_c$c.json', 'w'), indent=1)"
        done
    fi
    if [ -n "$spy_pid" ]; then wait "$spy_pid"; spy_pid=""; fi  # its recording written
    stop_server "$pid" "server_i$tag"
}

for backend in ${SERVE_BACKENDS:-python pytriton}; do  # Triton's own Python backend (the default), PyTriton
    for n in ${SERVE_INSTANCES:-1 2}; do
        serve_and_bench "$n" "$backend"
    done
done

"$py39" - "$out" <<'PY' | tee "$out/summary.txt"
"""The serving table from bench_iN_cC.log (trtnet.serve --bench's table), stats_iN_cC.json (Triton's cumulative
statistics: the dynamic batcher's mean batch per concurrency is the difference) and direct.json."""
import json, os, re, sys
from pathlib import Path

from trtnet.serve import server_stats

out = Path(sys.argv[1])


def bench_row(log):
    for line in log.read_text().splitlines() if log.exists() else []:
        f = line.split()
        if len(f) == 6 and re.fullmatch(r"\d+", f[0]):
            return {"concurrency": int(f[0]), "requests": int(f[1]), "throughput": float(f[2]),
                    "p50_ms": float(f[3]), "p99_ms": float(f[4]), "errors": int(f[5])}
    return None


def reading(path):  # Triton's statistics as the bench's step saved them (cumulative since the server started)
    return json.loads(path.read_text()) if path.exists() else None


summary = {"server": {}, "direct": None}
print(f"{'server':10} {'conc':>4} {'requests':>8} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'p99/p50':>7} "
      f"{'errors':>6} {'mean batch':>10}")
def instances(tag):
    return int(tag.removesuffix("py"))


tags = sorted((p.name[len("server_i"):-len(".log")] for p in out.glob("server_i*.log")),
              key=lambda t: (not t.endswith("py"), instances(t)))
for n in tags:  # instances, "py": --backend python
    label = f"{instances(n)} inst{', py' if n.endswith('py') else ''}"
    rows, before = [], {}
    for c in map(int, os.environ.get("SERVE_CONCURRENCY", "1 8 32").split()):
        row, after = bench_row(out / f"bench_i{n}_c{c}.log"), reading(out / f"stats_i{n}_c{c}.json")
        if row is None:
            print(f"{label}: no result at concurrency {c} (steps.txt, server_i{n}.log, bench_i{n}_c{c}.log)")
            continue
        if after is not None:
            counted = server_stats(before, after)
            row["mean_batch"], before = (counted.mean_batch if counted else None), after
        rows.append(row)
        batch = row.get("mean_batch")
        print(f"{label:10} {c:>4} {row['requests']:>8} {row['throughput']:>9.1f} {row['p50_ms']:>8.2f} "
              f"{row['p99_ms']:>8.2f} {row['p99_ms'] / row['p50_ms']:>7.2f} {row['errors']:>6} "
              f"{'-' if batch is None else f'{batch:.2f}':>10}")
    summary["server"][n] = {"rows": rows, "requests": sum(r["requests"] for r in rows),
                            "errors": sum(r["errors"] for r in rows)}
best = {}
direct = out / "direct.json"
if direct.exists():
    summary["direct"] = json.loads(direct.read_text())
    print(f"\n{'direct':10} {'batch':>5} {'images/s':>9} {'ms/batch':>9}")
    for r in summary["direct"]["rows"]:
        print(f"{r['mode']:10} {r['batch']:>5} {r['throughput']:>9.1f} {r['ms_per_batch']:>9.2f}")
        best[r["mode"]] = max(best.get(r["mode"], 0.0), r["throughput"])
else:
    print("\ndirect: no result (direct.log)")
print()
for n, s in summary["server"].items():
    line = f"{n.replace('py', ' (python backend)')} instance(s): {s['requests']} requests, {s['errors']} errors"
    at32 = [r for r in s["rows"] if r["concurrency"] == 32]
    if at32 and best:
        s["ratio_at_32"] = {mode: at32[0]["throughput"] / value for mode, value in best.items()}
        line += "; concurrency 32 / best direct batch: " + ", ".join(
            f"{v:.0%} ({mode})" for mode, v in s["ratio_at_32"].items())
    print(line)
    log = out / f"server_i{n}.log"  # each instance's own time (trtnet.serve prints it at shutdown)
    own = [x.strip() for x in log.read_text(errors="replace").splitlines() if " own time " in x] if log.exists() else []
    s["own_time"] = own
    for x in own:
        print("  " + x)
    cpu = out / f"cpu_i{n}_c32.json"  # tests/gpu/cpu_share.py: CPU time per request at concurrency 32
    if cpu.exists():
        s["cpu_at_32"] = json.loads(cpu.read_text())
        print(f"  CPU at concurrency 32: cores busy {s['cpu_at_32']['machine_busy_fraction']:.0%} of "
              f"{s['cpu_at_32']['cores']}; us per request: " + ", ".join(
                  f"{g} {v:.0f}" for g, v in s["cpu_at_32"]["us_per_request"].items()))
(out / "summary.json").write_text(json.dumps(summary, indent=1))
PY
echo "serve_gpu done" | tee -a "$out/steps.txt"
