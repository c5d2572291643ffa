"""trtnet.weights: tensorrtx's .wts format (ours and tensorrtx's own writers'), .safetensors, errors."""

from __future__ import annotations

import hashlib
import json
import struct
from collections import OrderedDict

import numpy as np
import pytest

from trtnet.errors import TrtnetError
from trtnet.progress import track
from trtnet.weights import (
    load_weights,
    read_wts,
    resolve_weights,
    write_safetensors,
    write_sidecar,
    write_wts,
)


def sample_tensors() -> OrderedDict:
    rng = np.random.default_rng(0)
    return OrderedDict([
        ("model.0.conv.weight", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        ("model.0.bn.bias", np.array([0.0, -0.0, np.inf, -1e-38], np.float32)),
        ("fc.bias", rng.standard_normal(7).astype(np.float16)),  # written as float32
        ("empty", np.zeros((0,), np.float32)),
    ])


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def test_known_tensor_is_written_exactly_as_tensorrtx_does(tmp_path):
    path = write_wts(tmp_path / "t.wts", {"t": np.array([1.0, -2.5])})
    # struct.pack('>f', 1.0).hex() == '3f800000', struct.pack('>f', -2.5).hex() == 'c0200000'
    assert path.read_bytes() == b"1\nt 2 3f800000 c0200000\n"


def test_every_value_is_the_big_endian_hex_of_its_float32(tmp_path):
    tensors = sample_tensors()
    lines = write_wts(tmp_path / "s.wts", tensors).read_text(encoding="utf-8").splitlines()
    assert lines[0] == str(len(tensors))
    for line, (name, value) in zip(lines[1:], tensors.items()):
        flat = np.asarray(value, np.float32).reshape(-1)
        expected = [name, str(flat.size)] + [struct.pack(">f", float(v)).hex() for v in flat]
        assert line.split() == expected


def test_wts_round_trip_without_json_gives_flat_tensors(tmp_path):
    tensors = sample_tensors()
    weights = load_weights(write_wts(tmp_path / "s.wts", tensors))
    assert list(weights.tensors) == list(tensors)
    assert weights.meta == {}
    for name, value in tensors.items():
        got = weights.tensors[name]
        assert got.dtype == np.float32 and got.ndim == 1
        assert np.array_equal(bits(got), bits(value.reshape(-1)))


def test_wts_with_json_has_real_shapes_and_meta(tmp_path):
    tensors = sample_tensors()
    path = write_wts(tmp_path / "s.wts", tensors)
    write_sidecar(path, {"family": "resnet", "shapes": {k: list(v.shape) for k, v in tensors.items()}})
    weights = load_weights(path)
    assert weights.meta["family"] == "resnet"
    assert {k: v.shape for k, v in weights.tensors.items()} == {k: v.shape for k, v in tensors.items()}


def test_safetensors_and_wts_agree(tmp_path):
    tensors = sample_tensors()
    meta = {"family": "yolov5", "nc": 3, "shapes": {k: list(v.shape) for k, v in tensors.items()}}
    wts = write_wts(tmp_path / "s.wts", tensors)
    write_sidecar(wts, meta)
    from_wts = load_weights(wts)
    from_st = load_weights(write_safetensors(tmp_path / "s.safetensors", tensors, meta))
    assert from_st.meta == meta == from_wts.meta
    assert list(from_st.tensors) == list(tensors)  # state-dict order, not safetensors' sorted order
    for name in tensors:
        assert from_st.tensors[name].shape == from_wts.tensors[name].shape
        assert np.array_equal(bits(from_st.tensors[name]), bits(from_wts.tensors[name]))


def tensorrtx_style(tensors: dict, per_tensor: str) -> str:
    """A .wts the way tensorrtx's Python writers produce it, value by value with struct."""
    out = [f"{len(tensors)}\n"]
    for k, v in tensors.items():
        out.append(per_tensor.format(k, len(v)))
        out.extend(" " + struct.pack(">f", float(x)).hex() for x in v)
        out.append("\n")
    return "".join(out)


@pytest.mark.parametrize("per_tensor", ["{} {} ", "{} {}"], ids=["yolov5-two-spaces", "resnet-one-space"])
def test_reads_wts_written_by_tensorrtx(tmp_path, per_tensor):
    tensors = {"conv1.weight": [0.5, -1.25, 3.0e-7], "bn1.num_batches_tracked": [123.0]}
    path = tmp_path / "trtx.wts"
    path.write_text(tensorrtx_style(tensors, per_tensor))
    got = read_wts(path)
    assert list(got) == list(tensors)
    for name, values in tensors.items():
        assert got[name].tolist() == np.asarray(values, np.float32).tolist()


def error_of(tmp_path, text: str) -> str:
    path = tmp_path / "bad.wts"
    path.write_text(text)
    with pytest.raises(TrtnetError) as info:
        load_weights(path)
    message = str(info.value)
    assert str(path) in message
    return message.replace(str(path), "bad.wts")  # the tmp dir's name must not satisfy the assertions


def test_empty_file(tmp_path):
    assert "is empty" in error_of(tmp_path, "")


def test_header_not_a_count(tmp_path):
    message = error_of(tmp_path, "conv 1 3f800000\n")
    assert "bad.wts:1" in message and "number of tensors" in message


def test_truncated_inside_the_last_tensor(tmp_path):
    message = error_of(tmp_path, "2\na 1 3f800000\nb 3 3f800000 3f80")
    assert "bad.wts:3" in message and "tensor b" in message and "truncated" in message


def test_truncated_missing_tensors(tmp_path):
    message = error_of(tmp_path, "3\na 1 3f800000\nb 1 3f800000\n")
    assert "3 tensors" in message and "has 2" in message and "truncated" in message


def test_non_hex_value(tmp_path):
    message = error_of(tmp_path, "1\nw 3 3f800000 zz800000 3f800000\n")
    assert "bad.wts:2" in message and "tensor w value 1" in message and "'zz800000'" in message
    assert "8 hex digits" in message


def test_wrong_count(tmp_path):
    message = error_of(tmp_path, "2\na 3 3f800000 3f800000\nb 1 3f800000\n")
    assert "bad.wts:2" in message and "tensor a declares 3 values but has 2" in message
    assert "truncated" not in message


def test_json_names_disagree_with_wts(tmp_path):
    path = write_wts(tmp_path / "bad.wts", {"a": np.ones(2), "b": np.ones(3)})
    write_sidecar(path, {"shapes": {"a": [2], "c": [3]}})
    with pytest.raises(TrtnetError, match=r"disagree.*missing from the file: c.*not in the metadata: b"):
        load_weights(path)


def test_json_shape_disagrees_with_wts(tmp_path):
    path = write_wts(tmp_path / "bad.wts", {"a": np.ones(6)})
    write_sidecar(path, {"shapes": {"a": [2, 2]}})
    with pytest.raises(TrtnetError, match=r"tensor a has 6 values but its metadata shape is \[2, 2\]"):
        load_weights(path)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(TrtnetError, match="cannot read .*bad.safetensors"):
        load_weights(path)


def test_checkpoint_given_as_weights_points_to_gen_wts(tmp_path):
    path = tmp_path / "yolov5s.pt"
    path.write_bytes(b"PK")
    with pytest.raises(TrtnetError, match="trtnet.gen_wts"):
        load_weights(path)


def test_bad_name_leaves_no_file(tmp_path):
    with pytest.raises(TrtnetError, match="whitespace"):
        write_wts(tmp_path / "x.wts", {"ok": np.ones(1), "not ok": np.ones(1)})
    assert list(tmp_path.iterdir()) == []


def test_resolve_weights(tmp_path):
    wdir = tmp_path / "weights"
    wdir.mkdir()
    (wdir / "yolov5s.wts").write_text("0\n")
    (wdir / "resnet50.safetensors").write_bytes(b"")
    assert resolve_weights("yolov5s", wdir) == wdir / "yolov5s.wts"
    assert resolve_weights("resnet50", wdir) == wdir / "resnet50.safetensors"
    assert resolve_weights(wdir / "yolov5s.wts", tmp_path / "elsewhere") == wdir / "yolov5s.wts"
    with pytest.raises(TrtnetError) as info:
        resolve_weights("yolov5m", wdir)
    message = str(info.value)
    assert "yolov5m.wts" in message and "yolov5m.safetensors" in message and "trtnet.gen_wts" in message


def test_sidecar_is_json_and_vouches_for_its_wts(tmp_path):
    wts = write_wts(tmp_path / "m.wts", {"t": np.array([1.0])})
    path = write_sidecar(wts, {"nc": 2})
    partner = {"file": "m.wts", "bytes": wts.stat().st_size, "sha256": hashlib.sha256(wts.read_bytes()).hexdigest()}
    assert path.name == "m.json" and json.loads(path.read_text(encoding="utf-8")) == {"nc": 2, "partner": partner}
    assert load_weights(wts).meta == {"nc": 2}  # the pairing record is not model metadata


def test_track_yields_everything_without_a_terminal():
    assert list(track(range(5), "counting")) == [0, 1, 2, 3, 4]


def test_unreadable_sidecar_is_one_error_naming_it(tmp_path, monkeypatch):
    from pathlib import Path

    wts = write_wts(tmp_path / "m.wts", {"t": np.array([1.0])})
    sidecar = write_sidecar(wts, {"nc": 2})
    real_read_text = Path.read_text

    def denied(self, *args, **kwargs):
        if self == sidecar:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(TrtnetError, match=r"m\.json: cannot read the weights metadata .*Permission denied"):
        load_weights(wts)
    monkeypatch.undo()
    sidecar.write_bytes(b'{"nc": "\xe9"}')
    with pytest.raises(TrtnetError, match=r"m\.json: not valid JSON"):
        load_weights(wts)
