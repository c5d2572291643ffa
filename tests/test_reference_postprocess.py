"""The NumPy references (plugins/official.py) against the official goldens and an independent
brute-force NMS, plus the edge cases the GPU kernels must also get right."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import has_module, shared
from trtnet.plugins import official as ref

# Official defaults (models/yolov5s.yaml, models/hub/yolov5n6.yaml), independent of our code.
P5 = dict(strides=[8, 16, 32], anchors=[[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119],
                                        [116, 90, 156, 198, 373, 326]])
P6 = dict(strides=[8, 16, 32, 64], anchors=[[19, 27, 44, 40, 38, 94], [96, 68, 86, 152, 180, 137],
                                            [140, 301, 303, 264, 238, 542], [436, 615, 739, 380, 925, 792]])
MODELS = {"yolov5n": P5, "yolov5s_syn": P5, "yolov5n6_syn": P6, "yolov5s_v50_syn": P5}

requires_cv2 = pytest.mark.skipif(not has_module("cv2"), reason="opencv-python-headless not installed")


def golden(model: str):
    return np.load(shared("golden", f"golden_{model}_bus320.npz"))


def raw_maps(g) -> list[np.ndarray]:
    return [g[f"raw_{i}"] for i in range(4) if f"raw_{i}" in g.files]


# ---------------------------------------------------------------- goldens


@pytest.mark.parametrize("model", MODELS)
def test_decode_official_reproduces_detect_output(model):
    g = golden(model)
    decoded = ref.decode_official(raw_maps(g), **MODELS[model])
    assert decoded.shape == g["decoded"].shape
    # v5.0 computes xy as (2s - 0.5 + grid) rather than (2s + (grid - 0.5)): ulps near 0, hence atol
    np.testing.assert_allclose(decoded, g["decoded"], rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("model", MODELS)
def test_non_max_suppression_reproduces_official_det(model):
    g = golden(model)
    (det,) = ref.non_max_suppression(g["decoded"], 0.25, 0.45, max_det=1000)
    np.testing.assert_array_equal(det, g["det"])


@pytest.mark.parametrize("model", MODELS)
def test_raw_maps_to_det_end_to_end(model):
    g = golden(model)
    (det,) = ref.non_max_suppression(ref.decode_official(raw_maps(g), **MODELS[model]), 0.25, 0.45, 1000)
    assert det.shape == g["det"].shape
    np.testing.assert_array_equal(det[:, 5], g["det"][:, 5])
    np.testing.assert_allclose(det[:, :5], g["det"][:, :5], rtol=1e-5, atol=1e-4)


def test_golden_p6_has_four_levels():
    g = golden("yolov5n6_syn")
    assert len(raw_maps(g)) == 4
    assert g["decoded"].shape[1] == 3 * (40 * 40 + 20 * 20 + 10 * 10 + 5 * 5)


@requires_cv2
def test_letterbox_reproduces_golden_input_exactly():
    import cv2

    image = cv2.imread(str(shared("images", "bus.jpg")))
    boxed, ratio, (dw, dh) = ref.letterbox(image, 320)
    chw_rgb = boxed.transpose(2, 0, 1)[::-1][None]
    np.testing.assert_array_equal(chw_rgb, golden("yolov5n")["image"])
    assert ratio == (320 / 1080, 320 / 1080) and (dw, dh) == (40.0, 0.0)  # 810x1080 → 240x320, pad 40


def test_letterbox_geometry_follows_the_official_rounding():
    # zidane 1280x720 at 640: r 0.5 → 640x360, dh 140 → top 140, bottom 140
    assert ref.letterbox_geometry(720, 1280, 640) == (0.5, (640, 360), (140, 140, 0, 0))
    # odd padding: 100x99 at 64: r = 0.64 → 63x64 (round(63.36)), dw 0.5 → left 0, right 1
    assert ref.letterbox_geometry(100, 99, 64) == (0.64, (63, 64), (0, 0, 0, 1))
    # a side rounding to 0 pixels is kept at 1 (the official code would crash in cv2.resize)
    assert ref.letterbox_geometry(10000, 5, 640)[1] == (1, 640)


def test_auto_letterbox_pads_only_to_the_stride_like_ultralytics_predictor():
    # Ultralytics LetterBox(640, auto=True, stride=32): bus.jpg (810x1080) → 480x640 input, no padding at all
    assert ref.letterbox_geometry(1080, 810, 640, auto=True) == (640 / 1080, (480, 640), (0, 0, 0, 0))
    assert ref.letterboxed_shape(1080, 810, 640) == (640, 480)
    # zidane.jpg (1280x720): 640x360, dh = (640 - 360) % 32 = 24 → 12 above and below, a 384x640 input
    assert ref.letterbox_geometry(720, 1280, 640, auto=True) == (0.5, (640, 360), (12, 12, 0, 0))
    assert ref.letterboxed_shape(720, 1280, 640) == (384, 640)
    # 480x500 at 640: r 1.28 → 640x614 (round(614.4)), dh 26 % 32 = 26 → 13 and 13
    assert ref.letterbox_geometry(480, 500, 640, auto=True) == (1.28, (640, 614), (13, 13, 0, 0))
    # stride 64 (P6): 360 → 384, padding 24 → 12 and 12; 100x99 at 64, stride 32: 63 wide → 64 (0 and 1)
    assert ref.letterboxed_shape(720, 1280, 640, stride=64) == (384, 640)
    assert ref.letterbox_geometry(100, 99, 64, auto=True) == (0.64, (63, 64), (0, 0, 0, 1))


def test_canvas_letterbox_scales_for_the_size_and_centres_in_the_canvas():
    # a batch's common shape: bus scaled as for 640 (480x640) and centred in 640x640 = the square letterbox
    assert ref.letterbox_geometry(1080, 810, 640, canvas=(640, 640)) == ref.letterbox_geometry(1080, 810, 640)
    # zidane (640x360) in a 416x640 canvas: 56 rows of padding, 28 above and below
    assert ref.letterbox_geometry(720, 1280, 640, canvas=(416, 640)) == (0.5, (640, 360), (28, 28, 0, 0))


@requires_cv2
def test_auto_letterbox_image_is_the_official_one():
    image = np.random.default_rng(1).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    boxed, ratio, (dw, dh) = ref.letterbox(image, 640, auto=True)
    assert boxed.shape == (384, 640, 3) and ratio == (0.5, 0.5) and (dw, dh) == (0.0, 12.0)
    assert (boxed[:12] == 114).all() and (boxed[-12:] == 114).all() and not (boxed[12:-12] == 114).all()


@requires_cv2
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (8000, 10), (10, 8000), (720, 1280)])
def test_letterbox_output_has_the_network_size(shape):
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    boxed, _, _ = ref.letterbox(image, (384, 640))
    assert boxed.shape == (384, 640, 3)
    x = ref.to_network_input(boxed)
    assert x.shape == (1, 3, 384, 640) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1


def test_scale_boxes_inverts_the_letterbox_mapping():
    h, w = 1080, 810  # bus.jpg at 640: r = 640/1080, pad left (640 - 480) / 2 = 80
    r = 640 / 1080
    original = np.array([[10, 20, 400, 900, 0.9, 0], [0, 0, 810, 1080, 0.5, 5]], np.float32)
    boxed = original.copy()
    boxed[:, [0, 2]] = original[:, [0, 2]] * r + 80
    boxed[:, [1, 3]] = original[:, [1, 3]] * r
    back = ref.scale_boxes((640, 640), boxed, (h, w))
    np.testing.assert_allclose(back[:, :4], original[:, :4], atol=1e-3)
    clipped = ref.scale_boxes((640, 640), np.array([[0, -5, 700, 650]], np.float32), (h, w))
    np.testing.assert_array_equal(clipped[0, [0, 1]], [0, 0])
    np.testing.assert_allclose(clipped[0, [2, 3]], [w, h])


# ---------------------------------------------------------------- NMS vs brute force


def brute_force_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Textbook greedy NMS, pair by pair in float32 scalars (torchvision's IoU), stable score order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    f = np.float32
    kept: list[int] = []
    for i in order:
        a = boxes[i]
        for k in kept:
            b = boxes[k]
            w = max(f(min(a[2], b[2]) - max(a[0], b[0])), f(0))
            h = max(f(min(a[3], b[3]) - max(a[1], b[1])), f(0))
            inter = f(w * h)
            union = f(f(f((a[2] - a[0]) * (a[3] - a[1])) + f((b[2] - b[0]) * (b[3] - b[1]))) - inter)
            if union > 0 and f(inter / union) > f(iou):
                break
        else:
            kept.append(i)
    return kept


def random_candidates(rng, n, nc=4, spread=300.0, tie_levels=0):
    xy = rng.uniform(0, spread, (n, 2)).astype(np.float32)
    wh = rng.uniform(4, 120, (n, 2)).astype(np.float32)
    scores = rng.uniform(0.25, 1.0, n).astype(np.float32)
    if tie_levels:
        scores = (np.ceil(scores * tie_levels) / tie_levels).astype(np.float32)
    cls = rng.integers(0, nc, n).astype(np.float32)
    return np.concatenate([xy, xy + wh, scores[:, None], cls[:, None]], 1).astype(np.float32)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("agnostic", [False, True])
def test_nms_matches_brute_force(seed, agnostic):
    rng = np.random.default_rng(seed)
    cands = random_candidates(rng, 250, tie_levels=6 if seed % 2 else 0)
    det = ref.nms(cands, 0.45, max_det=1000, agnostic=agnostic)
    offset = 0 if agnostic else ref.MAX_WH
    kept = brute_force_nms(cands[:, :4] + cands[:, 5:6] * np.float32(offset), cands[:, 4], 0.45)
    np.testing.assert_array_equal(det, cands[kept])


def test_greedy_nms_stops_at_max_keep_with_the_same_prefix():
    cands = random_candidates(np.random.default_rng(7), 400)
    boxes = ref.by_score(cands)[:, :4]
    full = ref.greedy_nms(boxes, 0.45)
    assert len(full) > 20
    np.testing.assert_array_equal(ref.greedy_nms(boxes, 0.45, max_keep=20), full[:20])


# ---------------------------------------------------------------- edge cases


def logits(shape_levels, rng, obj=-8.0, nc=80, batch=1, na=3):
    return [rng.normal(0, 1, (batch, na * (nc + 5), h, w)).astype(np.float32) + np.float32(obj)
            for h, w in shape_levels]


P5_640 = [(80, 80), (40, 40), (20, 20)]


def test_zero_candidates():
    maps = logits(P5_640, np.random.default_rng(0), obj=-12.0)
    (cands,) = ref.decode(maps, conf=0.25, **P5)
    assert cands.shape == (0, 6)
    assert ref.nms(cands, 0.45, 300).shape == (0, 6)
    assert ref.non_max_suppression(ref.decode_official(maps, **P5))[0].shape == (0, 6)


def test_every_anchor_above_threshold():
    maps = logits(P5_640, np.random.default_rng(1), obj=9.0)
    (best,) = ref.decode(maps, conf=0.25, **P5)
    assert len(best) == 25200  # every anchor, best class
    cropped = [m[:, :, :s, :s] for m, s in zip(maps, (40, 20, 10))]  # the 320 grid: test time
    (every,) = ref.decode(cropped, conf=0.25, multi_label=True, **P5)
    assert len(every) == 3 * (40 * 40 + 20 * 20 + 10 * 10) * 80  # every anchor x class


def test_overflow_keeps_the_highest_scores_and_reports_the_count():
    rng = np.random.default_rng(2)
    cands = random_candidates(rng, 5000, tie_levels=50)
    top, count = ref.top_candidates(cands, 3000)
    assert count == 5000 and len(top) == 3000
    threshold = top[-1, 4]
    assert (cands[:, 4] > threshold).sum() <= 3000 <= (cands[:, 4] >= threshold).sum()
    assert np.all(np.diff(top[:, 4]) <= 0)
    # ties at the cut keep the lower (earlier) candidates, as a stable sort does
    at_cut = np.flatnonzero(cands[:, 4] == threshold)
    kept_at_cut = (top[:, 4] == threshold).sum()
    np.testing.assert_array_equal(top[top[:, 4] == threshold], cands[at_cut[:kept_at_cut]])
    np.testing.assert_array_equal(ref.nms(cands, 0.45, 300, max_nms=3000), ref.nms(top, 0.45, 300))


def test_more_survivors_than_max_det_keeps_the_best():
    n = 40 * 40  # a grid of disjoint boxes: nothing suppresses anything
    ys, xs = np.divmod(np.arange(n, dtype=np.float32), 40)
    scores = np.random.default_rng(3).permutation(n).astype(np.float32) / n + np.float32(0.3)
    cands = np.stack([xs * 10, ys * 10, xs * 10 + 8, ys * 10 + 8, scores, np.zeros(n, np.float32)], 1)
    det = ref.nms(cands, 0.45, max_det=300)
    assert len(det) == 300
    np.testing.assert_array_equal(det[:, 4], np.sort(scores)[::-1][:300])


def test_identical_boxes_and_scores_keep_the_first():
    box = [10, 10, 50, 60]
    cands = np.array([box + [0.5, 2], box + [0.5, 2], box + [0.5, 3], [12, 10, 52, 60, 0.5, 2]], np.float32)
    det = ref.nms(cands, 0.45, 100)
    np.testing.assert_array_equal(det, cands[[0, 2]])  # dup and shifted copy suppressed; class 3 kept
    np.testing.assert_array_equal(ref.nms(cands, 0.45, 100, agnostic=True), cands[[0]])


def test_batch_items_with_very_different_counts():
    rng = np.random.default_rng(4)
    maps = logits(P5_640, rng, obj=-12.0, batch=3)
    for m in maps:  # image 1: a few objects; image 2: a whole level lit up
        m[1, 4, :2, :2] = 6.0
        m[1, 5, :2, :2] = 6.0
    maps[2][2, 4::85] = 6.0
    maps[2][2, 5::85] = 6.0
    decoded = ref.decode_official(maps, **P5)
    dets = ref.non_max_suppression(decoded, 0.25, 0.45, max_det=1000)
    assert [len(d) > 0 for d in dets] == [False, True, True]
    for i in range(3):
        np.testing.assert_array_equal(dets[i], ref.non_max_suppression(decoded[i : i + 1], 0.25, 0.45, 1000)[0])
    assert len(ref.decode(maps, conf=0.25, **P5)[2]) >= 3 * 20 * 20


def test_p6_four_levels_decode_layout():
    rng = np.random.default_rng(5)
    shapes = [(16, 16), (8, 8), (4, 4), (2, 2)]
    maps = logits(shapes, rng, obj=-12.0, nc=3)
    maps[3][0, 8 + 4, 1, 0] = 12.0  # level 3 (stride 64), anchor 1 (channels 8..15), y=1, x=0: obj
    maps[3][0, 8 + 5 + 2, 1, 0] = 12.0  # class 2
    decoded = ref.decode_official(maps, **P6)
    assert decoded.shape == (1, 3 * (256 + 64 + 16 + 4), 8)
    (cands,) = ref.decode(maps, conf=0.25, **P6)
    assert len(cands) == 1 and cands[0, 5] == 2
    cx, cy = (cands[0, 0] + cands[0, 2]) / 2, (cands[0, 1] + cands[0, 3]) / 2
    assert abs(cx - (2 * ref.sigmoid(maps[3][0, 8, 1, 0]) - 0.5) * 64) < 1e-3  # x = 0
    assert abs(cy - (2 * ref.sigmoid(maps[3][0, 9, 1, 0]) + 0.5) * 64) < 1e-3  # y = 1
    row = 3 * (256 + 64 + 16) + 1 * 4 + 1 * 2 + 0  # rows: level, anchor, y, x
    assert decoded[0, row, 4] > 0.99 and np.sum(decoded[0, :, 4] > 0.25) == 1


def test_multi_label_emits_every_class_above_conf():
    decoded = np.zeros((1, 2, 8), np.float32)
    decoded[0, 0] = [50, 50, 20, 20, 0.9, 0.5, 0.4, 0.1]  # scores 0.45, 0.36, 0.09
    decoded[0, 1] = [50, 50, 20, 20, 0.2, 1.0, 1.0, 1.0]  # obj below conf: dropped entirely
    (multi,) = ref.non_max_suppression(decoded, 0.25, 0.45, 300, multi_label=True)
    np.testing.assert_array_equal(multi[:, 5], [0, 1])
    np.testing.assert_allclose(multi[:, 4], [0.45, 0.36], rtol=1e-6)
    (single,) = ref.non_max_suppression(decoded, 0.25, 0.45, 300)
    np.testing.assert_array_equal(single[:, 5], [0])


def test_rows_to_images_maps_a_batch_exactly_as_rows_to_image_maps_each_image():
    from trtnet.plugins.preprocess import rows_to_image, rows_to_images

    rng = np.random.default_rng(3)
    input_hw = (384, 640)
    shapes = [(1080, 810), (720, 1280), (480, 640), (1, 1), (333, 999)]
    dets = rng.uniform(-50, 700, (len(shapes) + 2, 300, 6)).astype(np.float32)  # padded rows past the images
    counts = [5, 0, 300, 1, 17]
    batched = rows_to_images(dets, counts, input_hw, shapes)
    assert [len(r) for r in batched] == counts
    for rows, k, hw, i in zip(batched, counts, shapes, range(len(shapes))):
        expected = rows_to_image(dets[i, :k], input_hw, hw)
        assert rows.dtype == np.float32
        np.testing.assert_array_equal(rows, expected)  # bit for bit: the same float32 steps
    assert [len(r) for r in rows_to_images(dets, [0, 0], input_hw, shapes[:2])] == [0, 0]
