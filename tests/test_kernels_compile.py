"""The CUDA kernels compile with NVRTC for every supported GPU generation (no GPU needed), the cubin
cache works, compile errors are readable, and the ctypes parameter structs match the C structs."""

from __future__ import annotations

import ctypes

import pytest

from trtnet.errors import TrtnetError
from trtnet.plugins import cuda, postprocess, preprocess

ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRTNET_CACHE", str(tmp_path))
    try:
        cuda.nvrtc_version()
    except TrtnetError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles_to_a_cubin(arch):
    cubins = cuda.compile_all(arch)
    assert set(cubins) == set(cuda.MODULES)
    for name, cubin in cubins.items():
        assert cubin[:4] == b"\x7fELF", f"{name} for {arch} is not a cubin (ELF)"
        assert len(cubin) > 1000


def test_second_compile_is_a_cache_hit(tmp_path, monkeypatch):
    first = cuda.compile_module("letterbox", 86)
    assert len(list((tmp_path / "kernels").glob("letterbox-sm_86-*.cubin"))) == 1

    def no_compiler(*args, **kwargs):
        raise AssertionError("NVRTC was called although the cubin is cached")

    monkeypatch.setattr(cuda, "_nvrtc_compile", no_compiler)
    assert cuda.compile_module("letterbox", "sm_86") == first


def test_cache_key_depends_on_arch_and_source(tmp_path):
    cuda.compile_cubin("extern \"C\" __global__ void k(int* p) { *p = 1; }", 80, "probe")
    cuda.compile_cubin("extern \"C\" __global__ void k(int* p) { *p = 2; }", 80, "probe")
    cuda.compile_cubin("extern \"C\" __global__ void k(int* p) { *p = 2; }", 86, "probe")
    assert len(list((tmp_path / "kernels").glob("probe-*.cubin"))) == 3


def test_compile_error_raises_with_the_nvrtc_log():
    source = 'extern "C" __global__ void broken(float* p) { p[0] = undefined_name; }'
    with pytest.raises(TrtnetError, match="undefined_name") as info:
        cuda.compile_cubin(source, "sm_80", "broken", use_cache=False)
    assert "broken.cu" in str(info.value) and "sm_80" in str(info.value)


def test_bad_arch_is_a_user_error():
    with pytest.raises(TrtnetError, match="architecture"):
        cuda.arch_name("ampere")


def layout_asserts(struct: type[ctypes.Structure], c_name: str) -> list[str]:
    lines = [f'static_assert(sizeof({c_name}) == {ctypes.sizeof(struct)}, "sizeof {c_name}");']
    for field, _ in struct._fields_:
        offset = getattr(struct, field).offset
        lines.append(
            f'static_assert(__builtin_offsetof({c_name}, {field}) == {offset}, "{c_name}.{field}");'
        )
    return lines


@pytest.mark.parametrize(
    "module, structs",
    [
        ("decode", {"Heads": postprocess.Heads, "Candidates": postprocess.Candidates}),
        ("nms", {"Sorted": postprocess.Sorted, "Candidates": postprocess.Candidates}),
        ("letterbox", {"Image": preprocess.Image, "Batch": preprocess.Batch}),
    ],
)
def test_ctypes_structs_match_the_kernel_structs(module, structs):
    checks = [line for c_name, struct in structs.items() for line in layout_asserts(struct, c_name)]
    checks.append(f'static_assert(sizeof(ImageState) == {postprocess.STATE_BYTES}, "ImageState");')
    source = cuda.module_source(module) + "\n" + "\n".join(checks) + "\n"
    cuda.compile_cubin(source, "sm_80", f"{module}_layout", use_cache=False)  # raises on a mismatch


def test_kernel_constants_match_the_host_side():
    sources = {name: cuda.module_source(name) for name in cuda.MODULES}
    assert f"#define MAX_LEVELS {postprocess.MAX_LEVELS}" in sources["decode"]
    assert f"#define MAX_ANCHORS {postprocess.MAX_ANCHORS}" in sources["decode"]
    assert f"#define HIST_BINS {postprocess.HIST_BINS}" in sources["decode"]
    assert f"#define SORT_CHUNK {postprocess.SORT_CHUNK}" in sources["nms"]
    assert f"#define TILE {postprocess.TILE}" in sources["nms"]
    assert f"#define MAX_IMAGES {preprocess.MAX_IMAGES}" in sources["letterbox"]
