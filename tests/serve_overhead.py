"""What serving costs besides inference, on the CPU: Triton (PyTriton's binary) with a Python-backend model that
handles requests as trtnet.serve's model.py does (request_inputs, detection_outputs, split_rows, a pb_utils tensor
per output) around a runner that answers at once (five boxes per image), driven by `trtnet.serve --bench`.

    .venv-serve/bin/python tests/serve_overhead.py [--requests 3000] [--concurrency 8] [--rounds 2]

Each round serves with trtnet.allocator's thresholds, then without (TRTNET_KEEP_FREED_MEMORY=0 for Triton, its stub
and the clients), and prints per request: the CPU time of Triton, of the stub and of the clients, Triton's
compute_input / compute_infer / compute_output, and the throughput. A tool, not a test: its numbers depend on the
machine (README and RESULTS.md cite them).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import free_ports  # noqa: E402
from trtnet.client import Client  # noqa: E402
from trtnet.serve import COMPUTE, ServeSettings  # noqa: E402
from trtnet.serve_triton import (  # noqa: E402
    config_pbtxt,
    stop,
    triton_command,
    triton_environment,
    triton_installation,
    wait_ready,
)

IMAGES = [REPO.parent / "shared/data/images/bus.jpg", REPO.parent / "shared/data/images/zidane.jpg"]
MODEL = '''import json
import numpy as np
import triton_python_backend_utils as pb_utils
from trtnet.allocator import keep_freed_memory
from trtnet.api import Detections
from trtnet.serve import detection_outputs, request_inputs, split_rows


class TritonPythonModel:
    def initialize(self, args):
        keep_freed_memory()
        self.outputs = [o["name"] for o in json.loads(args["model_config"])["output"]]
        self.answer = Detections(np.ones((5, 4), np.float32), np.ones(5, np.float32), np.zeros(5, np.int64),
                                 [str(i) for i in range(80)], (1080, 810), None, None)

    def execute(self, requests):
        inputs = [{t.name(): t.as_numpy() for t in request.inputs()} for request in requests]
        images = [request_inputs(r) for r in inputs]
        results = [self.answer for per_request in images for _ in per_request]
        rows = split_rows(detection_outputs(results, 300), [len(x) for x in images])
        return [pb_utils.InferenceResponse([pb_utils.Tensor(n, out[n]) for n in self.outputs]) for out in rows]
'''


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    return p


def repository(folder: Path, settings: ServeSettings) -> Path:
    model = folder / "models" / "null"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(MODEL)
    (model / "config.pbtxt").write_text(config_pbtxt("null", settings, 32, True, [str(i) for i in range(80)], "-"))
    return folder / "models"


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time of Triton and of its stub (its children)."""
    server = psutil.Process(pid)
    stub = sum(sum(c.cpu_times()[:2]) for c in server.children(recursive=True))
    return {"triton": sum(server.cpu_times()[:2]), "stub": stub}


def bench(url: str, concurrency: int, requests: int, env: dict) -> tuple[float, float]:
    """(images/s, the clients' CPU seconds): `trtnet.serve --bench` in one process of its own."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-m", "trtnet.serve", "--bench", url, "--concurrency", str(concurrency),
                           "--requests", str(requests), "--bench-processes", "1", "--images", *map(str, IMAGES)],
                          capture_output=True, text=True, env=env, cwd=REPO.parent, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = next(line.split() for line in done.stdout.splitlines() if line.split()[:1] == [str(concurrency)])
    throughput = float(row[2])  # the row of `--bench`'s table (Triton's statistics follow it)
    return throughput, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def stats(url: str) -> dict[str, int]:
    with Client(url, model="null") as client:
        model = client.statistics("null")["model_stats"][0]
    return {"requests": int(model["inference_count"]),
            **{k: int(model["inference_stats"][k]["ns"]) for k in COMPUTE}}


def one_setting(kept: bool, args) -> str:
    os.environ.pop("TRTNET_KEEP_FREED_MEMORY", None)  # triton_environment() and the clients read it from here
    if not kept:
        os.environ["TRTNET_KEEP_FREED_MEMORY"] = "0"
    env = dict(os.environ)
    http, grpc, metrics = free_ports(3)  # not another server's: wait_ready would take its answer
    settings = ServeSettings("null", devices=("cpu",), host="127.0.0.1", http_port=http, grpc_port=grpc,
                             metrics_port=metrics)
    url = f"http://127.0.0.1:{http}"
    with tempfile.TemporaryDirectory(prefix="serve-overhead-") as work:
        models = repository(Path(work), settings)
        server = triton_installation(Path(work) / "tritonserver")
        process = subprocess.Popen(triton_command(server, models, settings), env=triton_environment(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(process, url, "null")
            bench(url, 4, 300, env)  # warm: the stub's first requests import and allocate
            cpu, counted = cpu_seconds(process.pid), stats(url)
            throughput, clients = bench(url, args.concurrency, args.requests, env)
            cpu_after, counted_after = cpu_seconds(process.pid), stats(url)
        finally:
            stop(process, 5)
    n = counted_after["requests"] - counted["requests"]
    per = {k: 1e6 * (cpu_after[k] - cpu[k]) / n for k in cpu} | {"clients": 1e6 * clients / n}
    triton = {k: (counted_after[k] - counted[k]) / n / 1e3 for k in COMPUTE}
    return (f"{'kept' if kept else 'glibc':>6} {throughput:>9.0f} " + " ".join(f"{per[k]:>8.0f}" for k in
            ("triton", "stub", "clients")) + " " + " ".join(f"{triton[k]:>9.0f}" for k in COMPUTE))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    print(f"{args.requests} requests at concurrency {args.concurrency}, µs per request: CPU of Triton, its stub, "
          "the clients; Triton's statistics")
    print(f"{'blocks':>6} {'images/s':>9} {'triton':>8} {'stub':>8} {'clients':>8} " + " ".join(
        f"{k.replace('compute_', ''):>9}" for k in COMPUTE))
    for _ in range(args.rounds):
        for kept in (True, False):
            print(one_setting(kept, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
