"""INT8 on the CPU: calibration math, the calibration file, the image loader, Q/DQ in the executor,
the legacy calibrator's pieces (no TensorRT 8 here)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from tests.conftest import requires_tensorrt, requires_torch
from trtnet.errors import TrtnetError
from trtnet.quant.calibrate import CalibrationImages, CalibrationWarning, TensorHistograms, find_images
from trtnet.quant.calibration_file import CalibrationFile, ImagesUsed, network_hash, read_calibration
from trtnet.quant.histogram import (
    AbsHistogram,
    amax_entropy,
    amax_percentile,
    int8_scale,
    weight_amax_per_channel,
)
from trtnet.quant.implicit import calibrator_class, fixed_batches, parse_calibration_cache, read_cache, write_cache


# -- histograms and amax ---------------------------------------------------------------------------
def test_max_is_the_largest_magnitude_over_all_batches():
    h = AbsHistogram()
    h.add(np.array([0.5, -3.0, 1.0]))
    h.add(np.array([[2.0, -2.5]]))
    assert h.amax("max") == 3.0


def test_histogram_grows_with_the_same_bin_width_and_keeps_every_count():
    h = AbsHistogram(num_bins=4)
    h.add(np.array([0.1, 0.3, 0.6, 1.0]))  # width 0.25: bins [0,.25) [.25,.5) [.5,.75) [.75,1]
    h.add(np.array([1.9, -0.2]))  # needs edges up to 2.0: 8 bins of 0.25
    assert h.width == 0.25
    assert h.counts.tolist() == [2, 1, 1, 1, 0, 0, 0, 1]
    assert h.edges[-1] == 2.0


def test_zeros_before_the_first_nonzero_batch_land_in_bin_zero():
    h = AbsHistogram(num_bins=4)
    h.add(np.zeros(5))
    assert h.amax("entropy") == 0.0  # nothing but zeros: amax 0 (scale 1, see int8_scale)
    h.add(np.array([1.0]))
    assert h.counts.tolist() == [5, 0, 0, 1]


def test_percentile_is_the_lower_edge_of_the_bin_where_the_share_is_reached():
    counts, edges = np.array([1, 1, 1, 1]), np.array([0.0, 1.0, 2.0, 3.0, 4.0])  # cdf .25 .5 .75 1
    assert amax_percentile(counts, edges, 50) == 1.0  # reached exactly in bin 1
    assert amax_percentile(counts, edges, 60) == 2.0
    assert amax_percentile(counts, edges, 100) == 3.0


def test_percentile_99_99_leaves_out_one_outlier_in_ten_thousand():
    h = AbsHistogram()
    h.add(np.concatenate([np.full(9999, 0.5), [100.0]]))
    amax = h.amax("percentile", 99.99)
    assert 0.5 - h.width < amax <= 0.5
    assert h.amax("max") == 100.0


def test_entropy_of_a_uniform_histogram_keeps_the_full_range():
    """Merging equal neighbouring counts loses nothing: Q equals P at every clipping point, every divergence
    is 0, and the last minimum — the whole range — wins."""
    counts = np.full(2048, 7)
    edges = np.linspace(0, 3.0, 2049)
    assert amax_entropy(counts, edges) == 3.0


def test_entropy_drops_a_lone_outlier_like_pytorch_quantization():
    """pytorch-quantization's test_one_tensor: uniform(0, 1) values of shape 11x7x3x3 plus one 10 — the
    entropy amax must discard the outlier (amax < 1.1)."""
    x = np.random.default_rng(0).uniform(0, 1, (11, 7, 3, 3)).astype(np.float32)
    x[1, 1, 1, 1] = 10.0
    h = AbsHistogram()
    h.add(x)
    assert 0.5 < h.amax("entropy") < 1.1


def _entropy_amax_by_the_book(counts, edges, start_bin=128, levels=128):
    """pytorch-quantization's _compute_amax_entropy written out loop by loop (a second, plain reading)."""
    from scipy.stats import entropy

    bins = [float(c) for c in counts]
    bins[0] = bins[1]
    divergences = []
    for i in range(start_bin, len(bins) + 1):
        level_edges = np.linspace(0, i, num=levels + 1)
        level_of = [int(np.digitize(j, level_edges)) - 1 for j in range(i)]
        total, filled = [0.0] * levels, [0] * levels
        for j in range(i):
            if bins[j] != 0:
                total[level_of[j]] += bins[j]
                filled[level_of[j]] += 1
        q = [total[level_of[j]] / filled[level_of[j]] if bins[j] != 0 else 0.0 for j in range(i)]
        p = bins[:i]
        p[-1] += sum(bins[i:])
        divergences.append(entropy(p, q))
    divergences = np.array(divergences)
    last_min = len(divergences) - 1 - int(np.argmin(divergences[::-1]))
    return float(edges[start_bin + last_min])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_matches_the_reference_algorithm_on_skewed_histograms(seed):
    pytest.importorskip("scipy")
    rng = np.random.default_rng(seed)
    values = np.abs(rng.laplace(0, 1 + seed, 20000))
    outliers = rng.uniform(0, 40, 5 * seed)  # a sparse tail far out, for seeds 1 and 2
    counts, edges = np.histogram(np.concatenate([values, outliers]), bins=300)
    assert amax_entropy(counts, edges) == _entropy_amax_by_the_book(counts, edges)


def test_weight_amax_is_per_output_channel():
    w = np.array([[[[1.0], [-4.0]]], [[[0.5], [0.25]]]])  # [2, 1, 2, 1]
    assert weight_amax_per_channel(w).tolist() == [4.0, 0.5]
    assert weight_amax_per_channel(w, axis=2).tolist() == [1.0, 4.0]


def test_int8_scale_is_amax_over_127_and_one_for_zero():
    assert int8_scale(np.array([127.0, 0.0, 2.54])).tolist() == pytest.approx([1.0, 1.0, 0.02])


def test_tensor_histograms_feed_named_batches():
    stats = TensorHistograms(["a", "b"])
    stats.add({"a": np.array([1.0, -2.0]), "b": np.array([0.5]), "ignored": np.array([9.0])})
    stats.add({"a": np.array([3.0]), "b": np.array([-0.25])})
    assert stats.amax("max") == {"a": 3.0, "b": 0.5}


def test_unknown_method_is_refused_and_minmax_is_max():
    h = AbsHistogram()
    h.add(np.array([1.0, -5.0]))
    with pytest.raises(TrtnetError, match="--calib-method mse: use one of entropy, percentile, max"):
        h.amax("mse")
    assert h.amax("minmax") == 5.0


# -- the calibration file --------------------------------------------------------------------------
def _calibration(**changes):
    fields = dict(network_hash="ab" * 32, method="percentile", amax={"images": 1.0, "model.0": 4.5},
                  images=ImagesUsed(2, ("a.jpg", "sub/b.jpg"), "cd" * 32), percentile=99.99, extra={"imgsz": 320})
    fields.update(changes)
    return CalibrationFile(**fields)


def test_calibration_file_round_trip(tmp_path):
    calib = _calibration()
    path = tmp_path / "out" / "yolov5n.calib.json"
    calib.write(path)
    assert read_calibration(path, expected_hash="ab" * 32) == calib
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    data = json.loads(path.read_text())
    assert data["amax"] == {"images": 1.0, "model.0": 4.5} and data["images"]["count"] == 2


def _broken(data: dict, key: str, value):
    node = data
    *parents, last = key.split(".")
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize("key, value, message", [
    ("format", "something-else", "not a trtnet calibration file"),
    ("version", 2, "format version 2"),
    ("network_hash", 5, "network_hash"),
    ("method", "kl", "method"),
    ("percentile", "high", "percentile"),
    ("amax", [], "amax"),
    ("amax", {}, "amax"),
    ("amax.model.0", "4.5", "model.0"),
    ("amax.images", -1.0, "images"),
    ("amax.images", float("nan"), "images"),
    ("amax.images", True, "images"),
    ("images", KeyError, "images"),
    ("images.count", "2", "images.count"),
    ("images.count", True, "images.count"),
    ("images.names", [1], "images.names"),
])
def test_bad_calibration_files_are_refused_with_one_clear_error(tmp_path, key, value, message):
    data = _calibration().to_json()
    if key.startswith("amax.") and value is not KeyError:
        data["amax"][key[5:]] = value
    else:
        _broken(data, key, value)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TrtnetError, match=message) as err:
        read_calibration(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe\x00", b"[1, 2]"])
def test_corrupt_calibration_files_are_refused(tmp_path, content):
    path = tmp_path / "corrupt.json"
    path.write_bytes(content)
    with pytest.raises(TrtnetError, match=str(path)):
        read_calibration(path)


def test_missing_calibration_file_is_refused(tmp_path):
    with pytest.raises(TrtnetError, match="not found"):
        read_calibration(tmp_path / "absent.json")


def test_calibration_for_another_network_is_refused(tmp_path):
    path = tmp_path / "c.json"
    _calibration().write(path)
    with pytest.raises(TrtnetError, match="another network"):
        read_calibration(path, expected_hash="ef" * 32)


def test_network_hash_follows_weights_and_architecture_not_labels():
    tensors = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "a.bias": np.zeros(2, np.float32)}
    meta = {"family": "yolov5", "yaml": {"nc": 2}, "names": ["x", "y"], "date": "today"}
    base = network_hash(tensors, meta)
    assert network_hash(dict(reversed(list(tensors.items()))), dict(meta)) == base  # order-free
    assert network_hash(tensors, {**meta, "names": ["p", "q"], "date": "tomorrow", "imgsz": 320}) == base
    nudged = dict(tensors, **{"a.bias": np.array([0.0, np.nextafter(np.float32(0), np.float32(1))], np.float32)})
    assert network_hash(nudged, meta) != base
    assert network_hash(tensors, {**meta, "yaml": {"nc": 3}}) != base
    assert network_hash({"a.weight": tensors["a.weight"].reshape(3, 2), "a.bias": tensors["a.bias"]}, meta) != base


def test_network_hash_ignores_the_weights_files_provenance(tmp_path):
    from trtnet.weights import load_weights, weights_meta, write_safetensors, write_sidecar, write_wts

    tensors = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "a.bias": np.ones(2, np.float32)}
    source = tmp_path / "net.pt"
    source.write_bytes(b"checkpoint")
    meta = {"family": "yolov5", "yaml": {"nc": 2}, "nc": 2, "strides": [8], "bn_eps": 1e-3, "version": "8.1.0"}
    write_wts(tmp_path / "net.wts", tensors, progress=False)
    write_sidecar(tmp_path / "net.wts", weights_meta(meta, tensors, source, "wts"))
    write_safetensors(tmp_path / "renamed.safetensors", tensors, weights_meta(meta, tensors, source, "safetensors"))
    as_wts, as_safetensors = load_weights(tmp_path / "net.wts"), load_weights(tmp_path / "renamed.safetensors")
    base = network_hash(as_wts.tensors, as_wts.meta)
    assert network_hash(as_safetensors.tensors, as_safetensors.meta) == base
    upgraded = {**as_wts.meta, "trtnet_version": "99.0", "partner": {"file": "x.wts", "bytes": 1, "sha256": "0" * 64},
                "source_sha256": "f" * 64, "version": "8.3.0"}
    assert network_hash(as_wts.tensors, upgraded) == base
    assert network_hash(as_wts.tensors, {**as_wts.meta, "yaml": {"nc": 3}}) != base
    assert network_hash({**as_wts.tensors, "a.bias": np.zeros(2, np.float32)}, as_wts.meta) != base


# -- calibration images ----------------------------------------------------------------------------
def _write_images(folder, names, size=(12, 16)):
    import cv2

    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.full((*size, 3), 20 * i, np.uint8))


def _to_input(image):
    return image.transpose(2, 0, 1)[None].astype(np.float32) / 255


def test_image_folders_are_searched_recursively(tmp_path):
    _write_images(tmp_path, ["b.jpg", "sub/a.png", "sub/deeper/c.JPG"])
    (tmp_path / "notes.txt").write_text("not an image")
    paths, root = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["b.jpg", "sub/a.png", "sub/deeper/c.JPG"]
    assert root == tmp_path
    paths, _ = find_images(str(tmp_path / "**" / "*.png"))
    assert [p.name for p in paths] == ["a.png"]


def test_missing_or_empty_image_folders_are_errors(tmp_path):
    with pytest.raises(TrtnetError, match="no such folder"):
        find_images(tmp_path / "absent")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(TrtnetError, match="no images"):
        find_images(tmp_path / "empty")


def test_unreadable_images_are_skipped_with_a_warning_and_batches_fill_up(tmp_path):
    _write_images(tmp_path, ["0.jpg", "1.jpg", "3.jpg", "4.jpg", "5.jpg"])
    (tmp_path / "2.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "2b.jpg").write_bytes(b"")
    paths, _ = find_images(tmp_path)
    loader = CalibrationImages(paths, 4, _to_input)
    with pytest.warns(CalibrationWarning, match="skipping") as caught:
        batches = list(loader.batches(3))
    assert sum("skipping" in str(w.message) for w in caught) == 2
    assert [b.shape for b in batches] == [(3, 3, 12, 16), (1, 3, 12, 16)]
    assert [p.name for p in loader.used] == ["0.jpg", "1.jpg", "3.jpg", "4.jpg"]


def test_fewer_images_than_asked_warns_and_goes_on(tmp_path):
    _write_images(tmp_path, ["a.jpg", "b.jpg"])
    loader = CalibrationImages(find_images(tmp_path)[0], 8, _to_input)
    with pytest.warns(CalibrationWarning, match="8 calibration images asked, 2"):
        assert sum(len(b) for b in loader.batches(4)) == 2


def test_no_readable_image_is_an_error(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"junk")
    loader = CalibrationImages(find_images(tmp_path)[0], 8, _to_input)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        with pytest.raises(TrtnetError, match="none of the 1 image"):
            list(loader.batches(1))


# -- the legacy calibrator -------------------------------------------------------------------------
CACHE = b"TRT-8503-EntropyCalibration2\nimages: 3c010204\nmodel.0.conv: 3f800000\n"


def test_calibration_cache_is_read_and_written_atomically(tmp_path):
    path = tmp_path / "calib.cache"
    assert read_cache(path) is None
    write_cache(path, CACHE)
    assert read_cache(path) == CACHE
    parsed = parse_calibration_cache(CACHE)
    assert parsed.header == "TRT-8503-EntropyCalibration2"
    assert parsed.scales["model.0.conv"] == 1.0
    assert parsed.scales["images"] == pytest.approx(0.00787406, rel=1e-5)  # 0x3c010204 ≈ 1/127


@pytest.mark.parametrize("data, message", [
    (b"", "first line"), (b"hello\nx: 3f800000\n", "first line"), (b"\xff\xfe", "not text"),
    (b"TRT-8503-EntropyCalibration2\nimages 3c010204\n", "line 2"),
    (b"TRT-8503-EntropyCalibration2\nimages: zz\n", "line 2"),
])
def test_broken_calibration_caches_are_refused(tmp_path, data, message):
    path = tmp_path / "bad.cache"
    path.write_bytes(data)
    with pytest.raises(TrtnetError, match=message):
        read_cache(path)


def test_fixed_batches_regroup_images_and_leave_out_a_remainder():
    images = (np.full((n, 3, 2, 2), i, np.float64) for i, n in enumerate([1, 3, 2, 1]))  # 7 images
    with pytest.warns(CalibrationWarning, match="last 1 image"):
        batches = list(fixed_batches(images, 3))
    assert [b.shape for b in batches] == [(3, 3, 2, 2), (3, 3, 2, 2)]
    assert all(b.dtype == np.float32 and b.flags.c_contiguous for b in batches)
    assert [b[:, 0, 0, 0].tolist() for b in batches] == [[0, 1, 1], [1, 2, 2]]
    with pytest.raises(TrtnetError, match="fewer images"):
        list(fixed_batches([np.zeros((2, 3, 2, 2))], 3))


def test_calibrator_hands_tensorrt_batches_then_none_and_keeps_the_cache(tmp_path):
    class FakeTensorRTCalibrator:  # stands in for trt.IInt8EntropyCalibrator2
        def __init__(self):
            self.base_initialized = True

    uploads = []
    cls = calibrator_class(FakeTensorRTCalibrator)
    cache_path = tmp_path / "c.cache"
    cal = cls([np.ones((4, 3, 2, 2))], 2, cache_path, lambda a: uploads.append(a.copy()) or 1000 + len(uploads))
    assert cal.base_initialized and cal.get_batch_size() == 2
    assert cal.get_batch(["images"]) == [1001]
    assert cal.get_batch(["images"]) == [1002]
    assert cal.get_batch(["images"]) is None
    assert [u.shape for u in uploads] == [(2, 3, 2, 2)] * 2
    assert cal.read_calibration_cache() is None
    cal.write_calibration_cache(memoryview(CACHE))
    assert cal.read_calibration_cache() == CACHE == cache_path.read_bytes()


def test_implicit_mode_uses_tensorrts_calibrator_for_the_method(monkeypatch):
    """Entropy (EntropyCalibrator2, the default) or minmax (IInt8MinMaxCalibrator): run O's entropy engine lost
    10.3 points; percentile has no TensorRT calibrator and stays explicit's."""
    import types

    from trtnet import compat
    from trtnet.quant import implicit
    from trtnet.quant.options import Int8Options

    class Entropy:
        pass

    class MinMax:
        pass

    fake = types.SimpleNamespace(IInt8EntropyCalibrator2=Entropy, IInt8MinMaxCalibrator=MinMax)
    monkeypatch.setattr(compat, "trt", lambda: fake)
    monkeypatch.setattr(compat, "implicit_int8_support", lambda: None)
    method = Int8Options(mode="implicit", calib_method="minmax").checked().calib_method
    assert method == "max" and Int8Options(mode="implicit").checked().calib_method == "entropy"
    assert isinstance(implicit.tensorrt_calibrator(method, [], 1, None, lambda a: 0), MinMax)
    assert isinstance(implicit.tensorrt_calibrator("entropy", [], 1, None, lambda a: 0), Entropy)


@requires_tensorrt
def test_implicit_mode_is_refused_where_tensorrt_has_no_calibrators():
    from trtnet import compat
    from trtnet.quant.implicit import tensorrt_calibrator

    if compat.implicit_int8_support() is None:
        pytest.skip(f"{compat.flavour()} has calibrators")
    with pytest.raises(TrtnetError, match="--int8-mode implicit: .*explicit"):
        tensorrt_calibrator("entropy", [], 1, None, lambda a: 0)
    with pytest.raises(TrtnetError, match="no INT8 calibrators"):
        compat.set_implicit_int8(object(), None)


# -- Q/DQ in the reference executor ----------------------------------------------------------------
def _qdq_network(x_shape, scale, axis):
    from trtnet import compat

    t = compat.trt()
    builder = t.Builder(compat.Logger())
    network = compat.create_network(builder)
    x = network.add_input("x", t.float32, x_shape)
    s = np.asarray(scale, np.float32)
    const = network.add_constant(() if s.ndim == 0 else s.shape, t.Weights(s.reshape(-1)))
    q = compat.quantize(network, x, const.get_output(0), axis)
    q.get_output(0).name = "q"
    dq = compat.dequantize(network, q.get_output(0), const.get_output(0), np.float32, axis)
    network.mark_output(dq.get_output(0))
    return builder, network, s, dq.get_output(0).name


@requires_tensorrt
@requires_torch
def test_executor_quantizes_half_to_even_and_clamps_per_tensor():
    from trtnet.executor import run_network

    x = np.array([0.25, 0.75, -0.25, 1.25, -1.25, 100.0, -100.0, 0.1, 63.75], np.float32)
    builder, network, _, out = _qdq_network(x.shape, 0.5, None)
    # x / 0.5 = .5, 1.5, -.5, 2.5, -2.5, 200, -200, .2, 127.5 → half to even, clamped to [-128, 127]
    expected_q = [0, 2, 0, 2, -2, 127, -128, 0, 127]
    got = run_network(network, {"x": x}, keep="q")
    assert got["q"].dtype == np.int8
    assert got["q"].tolist() == expected_q
    assert got[out].tolist() == [v * 0.5 for v in expected_q]


@requires_tensorrt
@requires_torch
def test_executor_quantizes_per_channel_along_the_axis():
    from trtnet.executor import run_network

    x = np.array([[[1.0, -2.0], [0.26, 0.25]]], np.float32)  # [1, 2, 2], channels on axis 1
    builder, network, _, out = _qdq_network(x.shape, [1.0, 0.1], 1)
    got = run_network(network, {"x": x}, keep="q")
    assert got["q"].tolist() == [[[1, -2], [3, 2]]]  # 2.6 → 3, 2.5 → 2 (half to even)
    np.testing.assert_allclose(got[out], [[[1.0, -2.0], [0.3, 0.2]]], rtol=1e-6)


# -- build options ---------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    (dict(mode="implicit", calib_method="percentile"), "implicit calibrates with TensorRT's entropy .*or minmax"),
    (dict(mode="implicit", keep=("model.2",)), "--int8-keep applies to --int8-mode explicit"),
    (dict(keep=("auto", "model.2")), "auto and none stand alone"),
    (dict(calib_device="tpu"), "--calib-device tpu: use cpu or gpu"),
    (dict(mode="fast"), "--int8-mode fast"),
    (dict(calib_images=0), "--calib-images 0"),
    (dict(calib_method="kl"), "--calib-method kl"),
])
def test_contradicting_int8_options_are_refused(changes, message):
    from trtnet.quant.options import Int8Options

    with pytest.raises(TrtnetError, match=message):
        Int8Options(calib="images", **changes).checked()


def test_int8_options_name_methods_canonically_and_none_keeps_nothing():
    from trtnet.quant.options import Int8Options

    checked = Int8Options(calib="images", calib_method="minmax", keep=("none",)).checked()
    assert checked.calib_method == "max" and checked.keep == ()


TENSORS = {"w": np.ones((2, 2), np.float32)}
META = {"family": "yolov5", "yaml": {"nc": 1}}


def _no_calibration(*args, **kwargs):
    raise AssertionError("calibrated although a calibration file was given")


def test_an_existing_calibration_file_is_used_without_calibrating(tmp_path, monkeypatch):
    from trtnet.quant import options

    monkeypatch.setattr(options, "calibrate", _no_calibration)
    monkeypatch.setattr(options, "honoured_plan", lambda plan, define, log: plan)  # stand-in weights: no network
    path = tmp_path / "c.json"
    _calibration(network_hash=network_hash(TENSORS, META)).write(path)
    plan, calib, used = options.explicit_plan(options.Int8Options(calib_cache=str(path), keep=("model.0",)),
                                              TENSORS, META, 320, tmp_path / "e.engine", log=lambda _: None)
    assert used == path and plan.amax == {"images": 1.0, "model.0": 4.5} and not plan.quantizes("model.0.conv")
    other = {"w": np.zeros((2, 2), np.float32)}
    with pytest.raises(TrtnetError, match="another network"):
        options.explicit_plan(options.Int8Options(calib_cache=str(path)), other, META, 320, tmp_path / "e.engine",
                              log=lambda _: None)


def test_without_images_or_an_existing_file_int8_is_refused(tmp_path):
    from trtnet.quant.options import Int8Options, explicit_plan

    with pytest.raises(TrtnetError, match="--calib-cache .*absent.json does not exist and no calibration images"):
        explicit_plan(Int8Options(calib_cache=str(tmp_path / "absent.json")), TENSORS, META, 320, tmp_path / "e.engine")
    with pytest.raises(TrtnetError, match="--int8: no calibration images"):
        explicit_plan(Int8Options(), TENSORS, META, 320, tmp_path / "e.engine")


def test_auto_keep_needs_a_report_or_images_to_measure_one(tmp_path, monkeypatch):
    from trtnet.quant import options
    from trtnet.quant.sensitivity import rank

    monkeypatch.setattr(options, "calibrate", _no_calibration)
    monkeypatch.setattr(options, "honoured_plan", lambda plan, define, log: plan)  # stand-in weights: no network
    path = tmp_path / "e.calib.json"
    _calibration(network_hash=network_hash(TENSORS, META)).write(path)
    auto = options.Int8Options(calib_cache=str(path), keep=("auto",))
    with pytest.raises(TrtnetError, match="--int8-keep auto: no sensitivity report .*e.sensitivity.json"):
        options.explicit_plan(auto, TENSORS, META, 320, tmp_path / "e.engine", log=lambda _: None)
    with pytest.raises(TrtnetError, match=r"\(.*w\.sensitivity\.json or .*e\.sensitivity\.json\)"):  # every place
        options.explicit_plan(auto, TENSORS, META, 320, tmp_path / "e.engine", log=lambda _: None,
                              weights_path=tmp_path / "w.wts")
    errors = {"model.0": 1.0, "model.1": 0.01, "model.2": 0.01}
    rank(errors, {}, 2, network_hash(TENSORS, META), full_error=1.5).write(tmp_path / "e.sensitivity.json")
    plan, _, _ = options.explicit_plan(auto, TENSORS, META, 320, tmp_path / "e.engine", log=lambda _: None)
    assert plan.keep_float == {"model.0"}


def test_calibration_is_written_beside_the_engine(tmp_path, monkeypatch):
    from trtnet.quant import options
    from trtnet.quant.calibrate import CalibrationRun

    seen = {}

    def fake_calibrate(tensors, meta, images, **kwargs):
        seen.update(kwargs, images=images)
        return CalibrationRun(_calibration(), 0.1, 0.0)

    monkeypatch.setattr(options, "calibrate", fake_calibrate)
    plan, calib, path = options.explicit_plan(options.Int8Options(calib="imgs", calib_images=8), TENSORS, META, 320,
                                              tmp_path / "yolov5n.int8.engine", log=lambda _: None)
    assert path == tmp_path / "yolov5n.int8.calib.json" and read_calibration(path) == calib
    assert seen["images"] == "imgs" and seen["count"] == 8 and seen["imgsz"] == 320 and seen["method"] == "percentile"
