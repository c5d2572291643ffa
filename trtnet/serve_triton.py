"""Triton's own Python backend: the model repository `trtnet serve --export-repo` writes (for the stock Triton
image), and `trtnet serve --backend python`, where Triton itself hosts trtnet on it, without PyTriton's proxy.

Triton's Python backend runs the model repository `--export-repo` writes (`PYTHON_MODEL` below: the same
request handling, one runner per model instance) in its own stub processes. With PyTriton, every request also
travels from that stub to this process and back: run N (H200) measured 7.75 ms per batch-1 execution in Triton's
`compute_infer` where trtnet's own work took 2.03. The Triton binary, its Python backend and the stub for this
Python come from the PyTriton wheel, so nothing else is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

from trtnet.errors import TrtnetError
from trtnet.serve import NAMES_PARAMETER, ServeSettings, model_name

READY_S = 300  # model instances load their engines (or, on the CPU, their weights) before Triton is ready
SHM_BYTES = 4 << 20  # the Python backend's shared memory per instance, as PyTriton sets it (containers' /dev/shm)


def triton_installation(folder: Path) -> Path:
    """PyTriton's Triton (binary, backends) in `folder`, with the Python-backend stub of this Python."""
    try:
        from pytriton.utils.distribution import get_root_module_path, get_stub_path
    except ImportError as exc:
        raise TrtnetError(f"--backend python runs the Triton that PyTriton ships ({exc}): make serve-env") from None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = get_stub_path(version)
    if not stub.exists():
        raise TrtnetError(f"--backend python: PyTriton has no Python-backend stub for Python {version}")
    shutil.copytree(get_root_module_path() / "tritonserver", folder,
                    ignore=shutil.ignore_patterns("python_backend_stubs"))
    shutil.copy(stub, folder / "backends" / "python" / "triton_python_backend_stub")
    return folder


def triton_environment() -> dict[str, str]:
    """What Triton's stubs need to run trtnet: this Python's libpython before PyTriton's bundled libraries, this
    Python first on PATH (the stub's interpreter finds its packages from it), trtnet importable; and glibc's
    allocator keeping image-sized blocks (trtnet.allocator) in Triton and its stubs."""
    from pytriton.utils.distribution import get_libs_path

    from trtnet.allocator import with_allocator_env
    from trtnet.serve import use_this_libpython

    use_this_libpython()
    env = with_allocator_env(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (env.get("LD_LIBRARY_PATH"), str(get_libs_path())) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.exec_prefix) / "bin"), env.get("PATH", "")))
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def triton_command(server: Path, repository: Path, settings) -> list[str]:
    s = settings
    gpu = s.devices != ("cpu",)
    return [str(server / "bin" / "tritonserver"), "--model-repository", str(repository),
            "--backend-directory", str(server / "backends"),
            "--http-address", s.host, "--http-port", str(s.http_port),
            "--grpc-address", s.host, "--grpc-port", str(s.grpc_port),
            "--metrics-address", s.host, "--metrics-port", str(s.metrics_port),
            f"--allow-gpu-metrics={str(gpu).lower()}", "--exit-timeout-secs", str(s.exit_timeout_s),
            f"--backend-config=python,shm-default-byte-size={SHM_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={SHM_BYTES}"]


def wait_ready(process: subprocess.Popen, url: str, model: str, timeout_s: float = READY_S) -> None:
    """Until Triton says the model is ready; its exit (a model that failed to load) is an error."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise TrtnetError(f"Triton exited with status {process.returncode} before {model} was ready "
                              "(its log is above)")
        try:
            with urllib.request.urlopen(f"{url}/v2/models/{model}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TrtnetError(f"Triton did not have {model} ready after {timeout_s:.0f} s")


class _Process:
    """A Triton subprocess as `trtnet.serve.until_stopped` watches it."""

    def __init__(self, process: subprocess.Popen):
        self.process = process

    def is_alive(self) -> bool:
        return self.process.poll() is None


def stop(process: subprocess.Popen, exit_timeout_s: int) -> None:
    """SIGINT (Triton lets requests in flight finish, then stops its stubs); killed if it outstays that."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(exit_timeout_s + 20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def local_url(settings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "", "::") else settings.host
    return f"http://{host}:{settings.http_port}"


def serve_on_triton(settings, started: Callable[[], None] | None = None) -> None:
    """Check the model can run on every device (the runtime's message if not), write the model repository, run
    Triton on it until SIGINT/SIGTERM."""
    from trtnet.serve import open_runner, until_stopped

    # one runner a device: what cannot run is refused here, with the runtime's clear message; Triton's stubs make
    # the instances
    runners = [open_runner(settings, device) for device in settings.devices]
    try:
        first = runners[0]
        model = write_repo_args(first, settings)
    finally:
        for runner in runners:
            runner.close()
    with tempfile.TemporaryDirectory(prefix="trtnet-triton-") as work:
        repository = Path(work) / "models"
        gpus = [] if settings.devices == ("cpu",) else sorted(set(settings.devices))
        name = write_repo(settings, repository, link=True, gpus=gpus, **model).name
        server = triton_installation(Path(work) / "tritonserver")
        process = subprocess.Popen(triton_command(server, repository, settings), env=triton_environment(),
                                   start_new_session=True)
        try:
            wait_ready(process, local_url(settings), name)
            print(f"serving {name} on Triton's Python backend ({settings.instances} instance(s) on "
                  f"{','.join(map(str, settings.devices))}): http {settings.host}:{settings.http_port}, grpc "
                  f"{settings.host}:{settings.grpc_port}, metrics {settings.host}:{settings.metrics_port}", flush=True)
            if started is not None:
                started()
            until_stopped(_Process(process))
        finally:
            stop(process, settings.exit_timeout_s)


def write_repo_args(runner, settings) -> dict:
    """What the model repository needs to know of a runner: its task, class names and batch bound."""
    from trtnet.serve import batch_bound

    return {"detect": hasattr(runner, "detect_loaded"), "names": list(runner.names),
            "max_batch": batch_bound(settings, runner)}


# ------------------------------------------------------------------------------------------ the model repository


PYTHON_MODEL = '''"""Triton Python-backend model written by `trtnet serve --export-repo`: trtnet.serve's request
handling on trtnet.Detector / Classifier, one per model instance Triton makes (on the GPU it gives)."""
import json
import numpy as np
import triton_python_backend_utils as pb_utils

from trtnet.allocator import keep_freed_memory
from trtnet.serve import ServeSettings, infer_function, open_runner, warm_up


class TritonPythonModel:
    def initialize(self, args):
        keep_freed_memory()  # a request's image-sized blocks reused, not mapped afresh (trtnet.allocator)
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if params.get("device") == "cpu":  # `trtnet serve --backend python --devices cpu`: weights, NumPy
            device, target = "cpu", params["weights"]
        else:
            device = int(args.get("model_instance_device_id") or 0)
            target = args["model_repository"] + "/" + args["model_version"] + "/" + params["engine"]
        settings = ServeSettings(target=target, devices=(device,),
                                 conf=float(params["conf"]), iou=float(params["iou"]),
                                 max_det=int(params["max_det"]), topk=int(params["topk"]),
                                 imgsz=int(params.get("imgsz", 640)), decode=params.get("decode", "auto"),
                                 cuda_graphs=params.get("cuda_graphs", "True") == "True",
                                 weights_dir=params.get("weights_dir", "weights"))
        self.outputs = [o["name"] for o in config["output"]]
        self.runner = open_runner(settings, device)
        warm_up(self.runner, config["max_batch_size"])  # the stub runs execute on this thread too
        self.infer = infer_function(self.runner, settings, args.get("model_instance_name", 0))

    def execute(self, requests):
        inputs = [{t.name(): t.as_numpy() for t in request.inputs()} for request in requests]  # those sent
        return [pb_utils.InferenceResponse([pb_utils.Tensor(n, out[n]) for n in self.outputs])
                for out in self.infer(inputs)]

    def finalize(self):
        self.infer.close()
        self.runner.close()
'''


def config_pbtxt(name: str, settings: ServeSettings, max_batch: int, detect: bool, names: Sequence[str],
                 engine_file: str, gpus: Sequence[int] = ()) -> str:
    """A Python-backend config.pbtxt with the same inputs and outputs as the PyTriton model. `engine_file`: the
    engine beside model.py, or with --devices cpu the weights. `gpus`: the instances' GPUs (none: every GPU)."""
    def tensor(n: str, dtype: str, dims: Sequence[int], optional: bool = False) -> str:
        extra = ", optional: true" if optional else ""
        return f'  {{ name: "{n}", data_type: {dtype}, dims: [{", ".join(map(str, dims))}]{extra} }}'

    ins = [tensor("image", "TYPE_STRING", [1], True), tensor("pixels", "TYPE_UINT8", [-1, -1, 3], True)]
    m, k = settings.max_det, settings.topk
    if detect:
        ins += [tensor("conf", "TYPE_FP32", [1], True), tensor("iou", "TYPE_FP32", [1], True),
                tensor("classes", "TYPE_INT32", [-1], True)]
        outs = [tensor("boxes", "TYPE_FP32", [m, 4]), tensor("scores", "TYPE_FP32", [m]),
                tensor("classes", "TYPE_INT32", [m]), tensor("count", "TYPE_INT32", [1]),
                tensor("shape", "TYPE_INT32", [2]), tensor("error", "TYPE_STRING", [1])]
    else:
        outs = [tensor("topk_ids", "TYPE_INT32", [k]), tensor("topk_scores", "TYPE_FP32", [k]),
                tensor("error", "TYPE_STRING", [1])]
    cpu = settings.devices == ("cpu",)
    params = {"engine": engine_file, "conf": settings.conf, "iou": settings.iou, "max_det": m, "topk": k,
              "decode": settings.decode, "cuda_graphs": settings.cuda_graphs,
              NAMES_PARAMETER: json.dumps([str(n) for n in names])}
    if cpu:
        weights = params.pop("engine")
        params = {**params, "device": "cpu", "weights": weights, "imgsz": settings.imgsz,
                  "weights_dir": str(Path(settings.weights_dir).resolve())}
    group = f"count: {settings.instances}, kind: {'KIND_CPU' if cpu else 'KIND_GPU'}"
    if gpus and not cpu:
        group += f", gpus: [{', '.join(map(str, gpus))}]"
    param_text = "\n".join(f'  {{ key: "{key}", value: {{ string_value: {json.dumps(str(v))} }} }}'
                           for key, v in params.items())
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
            f"dynamic_batching {{ max_queue_delay_microseconds: {settings.max_queue_delay_us} }}\n"
            f"instance_group [ {{ {group} }} ]\n"
            f"input [\n{(',' + chr(10)).join(ins)}\n]\n"
            f"output [\n{(',' + chr(10)).join(outs)}\n]\n"
            f"parameters [\n{(',' + chr(10)).join(param_text.splitlines())}\n]\n")


def export_repo(settings: ServeSettings, folder: str | Path) -> Path:
    """DIR/NAME/{config.pbtxt, 1/model.py, 1/ENGINE, 1/ENGINE.json}: a Triton model repository
    for the stock Triton image (Python backend; trtnet must be installed in the image)."""
    from trtnet import networks
    from trtnet.engine_files import load_metadata, resolve_engine

    meta = load_metadata(resolve_engine(settings.target, settings.weights_dir))
    return write_repo(settings, folder, detect=networks.family(meta.family).TASK == "detect",
                      names=meta.class_names, max_batch=min(settings.max_batch, meta.batch.max))


def write_repo(settings: ServeSettings, folder: str | Path, *, detect: bool, names: Sequence[str],
               max_batch: int, link: bool = False, gpus: Sequence[int] = ()) -> Path:
    """The model repository's NAME folder: the engine and its sidecar beside model.py (`link`: symbolic links,
    for a repository that lives as long as the server), or with --devices cpu the weights named in the config.
    `gpus`: the GPUs Triton puts the instances on (none: every GPU it sees)."""
    from trtnet.engine_files import find_engine_sidecar, resolve_engine

    cpu = settings.devices == ("cpu",)
    target = Path(settings.target) if cpu else resolve_engine(settings.target, settings.weights_dir)
    name = model_name(str(target))
    version = Path(folder) / name / "1"
    if version.exists():
        raise TrtnetError(f"--export-repo {folder}: {name}/1 exists already; choose another folder")
    version.mkdir(parents=True)
    if cpu:
        file = str(target.resolve()) if target.exists() else settings.target  # a name: found in --weights-dir
    else:
        for path in (target, find_engine_sidecar(target)):  # names kept: the sidecar names its engine
            if link:
                (version / path.name).symlink_to(path.resolve())
            else:
                shutil.copyfile(path, version / path.name)
        file = target.name
    (version / "model.py").write_text(PYTHON_MODEL)
    (version.parent / "config.pbtxt").write_text(config_pbtxt(name, settings, max_batch, detect, names, file, gpus))
    return version.parent
