"""Why no GPU can be used, as users read it: CUDA reports cudaErrorInsufficientDriver both without any NVIDIA
driver and with one too old for the installed cuda-python; trtnet tells the two apart."""

from __future__ import annotations

import pytest

from trtnet import cuda_rt


class _Err:
    name = "cudaErrorInsufficientDriver"

    def __int__(self) -> int:
        return 35


class _Runtime:
    @staticmethod
    def cudaGetDeviceCount():
        return _Err(), 0


@pytest.fixture
def insufficient_driver(monkeypatch):
    monkeypatch.setattr(cuda_rt, "cudart", lambda: _Runtime)


def test_without_a_driver_it_says_so(insufficient_driver, monkeypatch):
    monkeypatch.setattr(cuda_rt, "_driver_installed", lambda: False)
    assert cuda_rt.gpu_unavailable_reason() == "no NVIDIA driver is installed"


def test_with_an_old_driver_it_names_the_remedy(insufficient_driver, monkeypatch):
    monkeypatch.setattr(cuda_rt, "_driver_installed", lambda: True)
    reason = cuda_rt.gpu_unavailable_reason()
    assert "too old" in reason and "update the NVIDIA driver" in reason and "cudaErrorInsufficientDriver" in reason
