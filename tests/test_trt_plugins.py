"""The TrtnetYoloNMS IPluginV3 classes, driven directly on the CPU (TensorRT-RTX bindings)."""

from __future__ import annotations

import gc
from dataclasses import replace
from types import SimpleNamespace

import pytest

from tests.conftest import requires_tensorrt
from trtnet.errors import TrtnetError

pytestmark = requires_tensorrt

P5_ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


@pytest.fixture(scope="module")
def tp():
    from trtnet.plugins import trt_plugins

    if not trt_plugins.python_plugins_supported():
        pytest.skip("this TensorRT's Python binding has no IPluginV3 classes")
    return trt_plugins


@pytest.fixture(scope="module")
def trt(tp):
    return tp._trt


@pytest.fixture
def settings(tp):
    # Every value off its default, and thresholds float32 cannot hold exactly.
    return tp.YoloNMSSettings(
        strides=[8, 16, 32], anchors=[[*a[:-1], a[-1] + 0.1] for a in P5_ANCHORS], nc=3, conf=0.001, iou=0.6,
        max_det=300, multi_label=True, agnostic=True, capacity=12345,
    )


def tensor_desc(trt, shape, dtype, fmt=None, max_shape=None):
    desc = trt.PluginTensorDesc()
    desc.dims, desc.type = trt.Dims(shape), dtype
    desc.format = fmt if fmt is not None else trt.TensorFormat.LINEAR
    dynamic = trt.DynamicPluginTensorDesc()
    dynamic.desc, dynamic.min, dynamic.opt = desc, trt.Dims(shape), trt.Dims(shape)
    dynamic.max = trt.Dims(max_shape or shape)
    return dynamic


def in_out(trt, input_types, dets=None, counts=None, fmt=None):
    """Descriptors for three head maps of a 3-class model (24 channels) and the two outputs."""
    heads = [tensor_desc(trt, (2, 24, s, s), t, fmt) for s, t in zip((40, 20, 10), input_types)]
    return heads + [
        tensor_desc(trt, (2, 300, 6), trt.DataType.FLOAT if dets is None else dets),
        tensor_desc(trt, (2,), trt.DataType.INT32 if counts is None else counts),
    ]


def test_plugin_names_itself_and_has_every_capability(tp, trt, settings):
    plugin = tp.YoloNMSPlugin(settings)
    assert (plugin.plugin_name, plugin.plugin_namespace, plugin.plugin_version) == ("TrtnetYoloNMS", "trtnet", "1")
    assert plugin.num_outputs == 2
    for capability in (trt.PluginCapabilityType.CORE, trt.PluginCapabilityType.BUILD,
                       trt.PluginCapabilityType.RUNTIME):
        assert plugin.get_capability_interface(capability) is plugin


def test_output_shapes_take_batch_from_input_0(tp, trt, settings, monkeypatch):
    # A real IExprBuilder only exists inside a TensorRT build; stand in for it and for DimsExprs.
    monkeypatch.setattr(trt, "DimsExprs", list)
    batch = object()
    builder = SimpleNamespace(constant=lambda v: ("constant", v))
    heads = [[batch, 24, 40, 40], [batch, 24, 20, 20], [batch, 24, 10, 10]]
    dets, counts = tp.YoloNMSPlugin(settings).get_output_shapes(heads, [], builder)
    assert dets == [batch, ("constant", 300), ("constant", 6)]
    assert counts == [batch]


@pytest.mark.parametrize("head_type", ["FLOAT", "HALF"])
def test_outputs_are_float32_dets_and_int32_counts(tp, trt, settings, head_type):
    types = tp.YoloNMSPlugin(settings).get_output_data_types([getattr(trt.DataType, head_type)] * 3)
    assert types == [trt.DataType.FLOAT, trt.DataType.INT32]


@pytest.mark.parametrize("head_type", ["FLOAT", "HALF"])
def test_formats_accepted_for_float_heads(tp, trt, settings, head_type):
    descs = in_out(trt, [getattr(trt.DataType, head_type)] * 3)
    plugin = tp.YoloNMSPlugin(settings)
    assert all(plugin.supports_format_combination(pos, descs, 3) for pos in range(5))


def test_formats_rejected(tp, trt, settings):
    plugin = tp.YoloNMSPlugin(settings)
    f, h = trt.DataType.FLOAT, trt.DataType.HALF
    assert not plugin.supports_format_combination(0, in_out(trt, [trt.DataType.INT8] * 3), 3)
    assert not plugin.supports_format_combination(1, in_out(trt, [f, h, f]), 3)  # mixed head types
    assert not plugin.supports_format_combination(0, in_out(trt, [f] * 3, fmt=trt.TensorFormat.HWC8), 3)
    assert not plugin.supports_format_combination(3, in_out(trt, [h] * 3, dets=h), 3)
    assert not plugin.supports_format_combination(4, in_out(trt, [f] * 3, counts=f), 3)


def test_clone_is_independent(tp, settings):
    plugin = tp.YoloNMSPlugin(settings)
    for clone in (plugin.clone(), plugin.attach_to_context(None)):
        assert type(clone) is type(plugin) and clone is not plugin
        assert clone.settings == settings
        clone.settings = replace(clone.settings, conf=0.9, max_det=7)
        clone.get_fields_to_serialize()
        assert plugin.settings == settings
        assert {f.name: f.data.tolist() for f in plugin.get_fields_to_serialize()}["max_det"] == [300]


def test_fields_round_trip_through_the_creator(tp, trt, settings):
    plugin = tp.YoloNMSPlugin(settings)
    fields = plugin.get_fields_to_serialize()
    gc.collect()  # the arrays behind the fields must still be alive
    creator = tp.register()
    assert {f.name for f in fields} == {f.name for f in creator.field_names} == {
        "conf", "iou", "max_det", "agnostic", "multi_label", "capacity", "nc", "strides", "anchors", "head"}
    rebuilt = creator.create_plugin("yolo_nms", fields, trt.TensorRTPhase.RUNTIME)
    assert isinstance(rebuilt, tp.YoloNMSPlugin)
    assert rebuilt.settings == settings  # exact, floats included
    assert rebuilt.phase == trt.TensorRTPhase.RUNTIME


def test_creator_names_missing_fields(tp, trt, settings):
    fields = [f for f in tp.YoloNMSPlugin(settings).get_fields_to_serialize() if f.name != "anchors"]
    with pytest.raises(TrtnetError, match=r"missing \['anchors'\].*Rebuild"):
        tp.register().create_plugin("yolo_nms", trt.PluginFieldCollection(fields), trt.TensorRTPhase.RUNTIME)


def test_registration_is_idempotent(tp, trt):
    registry = trt.get_plugin_registry()
    found = registry.get_creator("TrtnetYoloNMS", "1", "trtnet")
    assert found is not None  # the import registered it
    assert tp.register() is tp.register() is found
    ours = [c for c in registry.all_creators if getattr(c, "name", None) == "TrtnetYoloNMS"]
    assert len(ours) == 1


class FakePostprocess:
    """Records what the plugin asks of `YoloPostprocess`."""

    def __init__(self):
        self.calls = {}

    def workspace_bytes(self, batch, level_shapes):
        self.calls["workspace_bytes"] = (batch, level_shapes)
        return 4096

    def enqueue(self, *args):
        self.calls["enqueue"] = args


def test_workspace_and_enqueue_go_to_yolo_postprocess(tp, trt, settings, monkeypatch):
    host = FakePostprocess()
    plugin = tp.YoloNMSPlugin(settings)
    monkeypatch.setattr(plugin, "postprocess", lambda: host)
    heads = [tensor_desc(trt, (1, 24, s, s), trt.DataType.HALF, max_shape=(8, 24, 2 * s, 2 * s)) for s in (40, 20, 10)]
    assert plugin.get_workspace_size(heads, []) == 4096
    assert host.calls["workspace_bytes"] == (8, [(80, 80), (40, 40), (20, 20)])  # the profile's largest

    plugin.enqueue([h.desc for h in heads], [], [11, 12, 13], [21, 22], 31, 41)
    assert host.calls["enqueue"] == (41, [11, 12, 13], "float16", 1, [(40, 40), (20, 20), (10, 10)], 31, 21, 22)


class FakeNetwork:
    def __init__(self):
        self.added = None

    def add_plugin_v3(self, inputs, shape_inputs, plugin):
        self.added = (inputs, shape_inputs, plugin)
        outputs = [SimpleNamespace(name=None), SimpleNamespace(name=None)]
        return SimpleNamespace(name=None, get_output=outputs.__getitem__)


def fake_heads(channels):
    return [SimpleNamespace(shape=(-1, channels, s, s)) for s in (40, 20, 10)]


def test_add_yolo_nms_adds_one_plugin_layer(tp, settings):
    network, heads = FakeNetwork(), fake_heads(24)
    dets, counts = tp.add_yolo_nms(network, heads, settings)
    inputs, shape_inputs, plugin = network.added
    assert inputs == heads and shape_inputs == []
    assert isinstance(plugin, tp.YoloNMSPlugin) and plugin.settings == settings
    assert (dets.name, counts.name) == ("dets", "counts")


def test_add_yolo_nms_checks_the_heads(tp, settings):
    with pytest.raises(TrtnetError, match=r"head 0 has shape \[-1, 255, 40, 40\], expected \[B, 24, h, w\]"):
        tp.add_yolo_nms(FakeNetwork(), fake_heads(255), settings)
    with pytest.raises(TrtnetError, match="2 head maps for 3 strides"):
        tp.add_yolo_nms(FakeNetwork(), fake_heads(24)[:2], settings)


def test_add_yolo_nms_without_add_plugin_v3_says_use_kernels(tp, trt, settings):
    from trtnet import compat

    builder = trt.Builder(compat.Logger())
    network = compat.create_network(builder)
    if hasattr(network, "add_plugin_v3"):
        pytest.skip(f"{compat.flavour()} can add Python plugins")
    heads = [network.add_input(f"raw_{i}", trt.float32, (1, 24, s, s)) for i, s in enumerate((40, 20, 10))]
    with pytest.raises(TrtnetError, match=r"no add_plugin_v3.*--postprocess kernels"):
        tp.add_yolo_nms(network, heads, settings)


def test_tensorrt_without_plugin_classes_says_use_kernels(tp, settings, monkeypatch):
    from trtnet import compat

    monkeypatch.setattr(compat, "trt", lambda: SimpleNamespace(__name__="tensorrt"))  # as TensorRT 8.5's binding
    with pytest.raises(TrtnetError, match=r"TensorRT >= 10.*--postprocess kernels"):
        tp.add_yolo_nms(FakeNetwork(), fake_heads(24), settings)


def test_settings_reject_anchors_that_do_not_fit(tp):
    with pytest.raises(TrtnetError, match="do not fit strides"):
        tp.YoloNMSSettings(strides=[8, 16], anchors=P5_ANCHORS, nc=80)
    with pytest.raises(TrtnetError, match="do not fit strides"):
        tp.YoloNMSSettings(strides=[8, 16, 32], anchors=[[10, 13], [30, 61, 62, 45], [116, 90]], nc=80)


@pytest.fixture
def anchor_free(tp):
    return tp.YoloNMSSettings(head="anchor_free", nc=3, conf=0.001, iou=0.7, max_det=300, multi_label=True)


def test_anchor_free_settings_round_trip_through_the_creator(tp, trt, anchor_free):
    plugin = tp.YoloNMSPlugin(anchor_free)  # owns the arrays behind the fields
    fields = plugin.get_fields_to_serialize()
    assert {f.name: f.data.tolist() for f in fields}["head"] == [1]
    rebuilt = tp.register().create_plugin("yolo_nms", fields, trt.TensorRTPhase.RUNTIME)
    assert rebuilt.settings == anchor_free
    assert rebuilt.settings.postprocess_kwargs()["head"] == "anchor_free"


def test_engines_serialized_before_the_head_field_decode_anchors(tp, trt, settings):
    plugin = tp.YoloNMSPlugin(settings)
    fields = [f for f in plugin.get_fields_to_serialize() if f.name != "head"]
    rebuilt = tp.register().create_plugin("yolo_nms", trt.PluginFieldCollection(fields), trt.TensorRTPhase.RUNTIME)
    assert rebuilt.settings == settings and rebuilt.settings.head == "anchors"


def test_anchor_free_settings_refuse_strides_and_unknown_heads(tp):
    with pytest.raises(TrtnetError, match="anchor-free head takes no strides"):
        tp.YoloNMSSettings(head="anchor_free", nc=3, strides=[8, 16, 32])
    with pytest.raises(TrtnetError, match="head must be one of"):
        tp.YoloNMSSettings(head="anchorless", nc=3)


def test_anchor_free_workspace_and_enqueue_pass_the_row_count(tp, trt, anchor_free, monkeypatch):
    host = FakePostprocess()
    plugin = tp.YoloNMSPlugin(anchor_free)
    monkeypatch.setattr(plugin, "postprocess", lambda: host)
    output = tensor_desc(trt, (2, 7, 2100), trt.DataType.FLOAT, max_shape=(4, 7, 8400))
    assert plugin.get_workspace_size([output], []) == 4096
    assert host.calls["workspace_bytes"] == (4, [(8400,)])
    plugin.enqueue([output.desc], [], [11], [21, 22], 31, 41)
    assert host.calls["enqueue"] == (41, [11], "float32", 2, [(2100,)], 31, 21, 22)


def test_add_yolo_nms_checks_the_anchor_free_output(tp, anchor_free):
    network = FakeNetwork()
    output = SimpleNamespace(shape=(-1, 7, -1))
    tp.add_yolo_nms(network, [output], anchor_free)
    assert network.added[0] == [output]
    with pytest.raises(TrtnetError, match=r"one output \[B, 7, N\]"):
        tp.add_yolo_nms(FakeNetwork(), [SimpleNamespace(shape=(-1, 84, 2100))], anchor_free)
    with pytest.raises(TrtnetError, match=r"one output \[B, 7, N\]"):
        tp.add_yolo_nms(FakeNetwork(), fake_heads(24), anchor_free)


def test_build_settings_for_an_anchor_free_family(tp):
    from trtnet import networks
    from trtnet.engine_meta import PostprocessSettings, nms_kwargs

    decode = networks.family("yolov8").postprocess_kwargs({"nc": 3, "strides": [8, 16, 32]})
    settings = tp.YoloNMSSettings(**decode, **nms_kwargs(PostprocessSettings(mode="plugin", conf=0.3)))
    assert (settings.head, settings.channels, settings.strides, settings.conf) == ("anchor_free", 7, (), 0.3)
