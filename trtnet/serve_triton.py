"""`trtnet serve --backend python`: Triton itself hosts trtnet, without PyTriton's proxy.

Triton's Python backend runs the model repository `--export-repo` writes (`trtnet.serve.PYTHON_MODEL`: the same
request handling, one runner per model instance) in its own stub processes. With PyTriton, every request also
travels from that stub to this process and back: run N (H200) measured 7.75 ms per batch-1 execution in Triton's
`compute_infer` where trtnet's own work took 2.03. The Triton binary, its Python backend and the stub for this
Python come from the PyTriton wheel, so nothing else is installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from trtnet.errors import TrtnetError

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
    Python first on PATH (the stub's interpreter finds its packages from it), trtnet importable."""
    from pytriton.utils.distribution import get_libs_path

    from trtnet.serve import use_this_libpython

    use_this_libpython()
    env = dict(os.environ)
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
    """Check every instance can run (the runtime's message if not), write the model repository, run Triton on
    it until SIGINT/SIGTERM."""
    from trtnet.serve import open_runners, until_stopped, write_repo

    runners = open_runners(settings)  # refused here, in this process, with the runtime's clear message
    try:
        first = runners[0]
        model = write_repo_args(first, settings)
    finally:
        for runner in runners:
            runner.close()
    with tempfile.TemporaryDirectory(prefix="trtnet-triton-") as work:
        repository = Path(work) / "models"
        name = write_repo(settings, repository, link=True, **model).name
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
