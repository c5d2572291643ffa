"""On a GPU: the letterbox, decode and NMS kernels against the NumPy references (plugins/official.py,
themselves checked against the official goldens), torchvision's NMS and the goldens.

    python3 tests/gpu/test_kernels_gpu.py          # runs pytest on this file
    python3 -m pytest -m gpu tests/gpu/test_kernels_gpu.py

Needs an NVIDIA GPU, torch with CUDA (allocation and comparison only: the kernels run through
cuda-python), torchvision and, for the letterbox tests, opencv-python(-headless).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

torch = pytest.importorskip("torch")

from trtnet.plugins import official as ref  # noqa: E402
from trtnet.plugins import postprocess as pp  # noqa: E402
from trtnet.plugins.preprocess import Letterbox  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (torch.cuda.is_available() is False)"),
]

P5 = dict(strides=[8, 16, 32], anchors=[list(a) for a in pp.P5_ANCHORS])
P6 = dict(strides=[8, 16, 32, 64], anchors=[list(a) for a in pp.P6_ANCHORS])
P5_640 = [(80, 80), (40, 40), (20, 20)]
P6_640 = [(80, 80), (40, 40), (20, 20), (10, 10)]
GOLDENS = {"yolov5n": P5, "yolov5s_syn": P5, "yolov5n6_syn": P6, "yolov5s_v50_syn": P5}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def data(*parts: str) -> Path:
    from tests.conftest import shared

    return shared(*parts)


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def on_gpu(a: np.ndarray, dtype=None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a)).cuda()
    return t.to(dtype) if dtype is not None else t


def device_bytes(n: int) -> torch.Tensor:
    return torch.empty(max(int(n), 1), dtype=torch.uint8, device="cuda")


# ---------------------------------------------------------------- letterbox


def cv2_or_skip():
    return pytest.importorskip("cv2", reason="opencv-python is needed for the official letterbox")


def gpu_letterbox(images, out_hw, dtype="float32"):
    """Letterbox on the GPU; returns float32 [n, 3, h, w] on the host."""
    lb = Letterbox(*out_hw, dtype)
    buffers = [on_gpu(im) for im in images]
    out = torch.full((len(images), 3, *out_hw), -1.0, dtype=TORCH_DTYPES[dtype], device="cuda")
    lb.enqueue(stream(), [b.data_ptr() for b in buffers], [im.shape[0] for im in images],
               [im.shape[1] for im in images], out.data_ptr())
    torch.cuda.synchronize()
    return out.float().cpu().numpy()


def official_input(image: np.ndarray, out_hw) -> np.ndarray:
    boxed, _, _ = ref.letterbox(image, out_hw)
    return ref.to_network_input(boxed)[0]


def sample_images():
    cv2 = cv2_or_skip()
    rng = np.random.default_rng(0)
    images = {name: cv2.imread(str(data("images", name))) for name in ("bus.jpg", "zidane.jpg")}
    for shape in [(1, 1), (7, 13), (8000, 10), (10, 8000), (2, 3), (641, 639), (1080, 1920), (320, 320)]:
        images[f"{shape[0]}x{shape[1]}"] = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    return images


@pytest.mark.parametrize("out_hw", [(640, 640), (320, 320), (384, 640)])
def test_letterbox_within_one_level_of_official(out_hw):
    images = sample_images()
    got = gpu_letterbox(list(images.values()), out_hw)  # one batch of very different sizes
    worst = {}
    for i, (name, image) in enumerate(images.items()):
        want = official_input(image, out_hw)
        diff = np.abs(got[i] - want)
        worst[name] = (float(diff.max()) * 255, float((diff == 0).mean()))
        assert diff.max() <= 1 / 255 + 1e-6, f"{name}: max diff {diff.max() * 255:.2f}/255"
    print(f"letterbox {out_hw}: name → (max diff in levels, exact fraction)", worst)


def test_rect_letterbox_within_one_level_of_the_official_auto_letterbox():
    """Letterbox(640, 640) into a smaller canvas (`out_hw`): Ultralytics' LetterBox(640, auto=True) input."""
    cv2 = cv2_or_skip()
    for name, hw in (("bus.jpg", (640, 480)), ("zidane.jpg", (384, 640))):
        image = cv2.imread(str(data("images", name)))
        lb = Letterbox(640, 640)
        buffer = on_gpu(image)
        out = torch.full((1, 3, *hw), -1.0, dtype=torch.float32, device="cuda")
        lb.enqueue(stream(), [buffer.data_ptr()], [image.shape[0]], [image.shape[1]], out.data_ptr(), out_hw=hw)
        torch.cuda.synchronize()
        want = ref.to_network_input(ref.letterbox(image, 640, auto=True)[0])
        assert want.shape[2:] == hw and np.abs(out.cpu().numpy() - want).max() <= 1 / 255 + 1e-6, name


def test_letterbox_bus320_equals_the_golden_input_exactly():
    cv2 = cv2_or_skip()
    image = cv2.imread(str(data("images", "bus.jpg")))
    golden = np.load(data("golden", "golden_yolov5n_bus320.npz"))["image"]
    got = gpu_letterbox([image], (320, 320))
    np.testing.assert_array_equal(got, golden.astype(np.float32) / np.float32(255))


def test_letterbox_half_output():
    images = sample_images()
    got = gpu_letterbox(list(images.values()), (640, 640), dtype="float16")
    for i, image in enumerate(images.values()):
        assert np.abs(got[i] - official_input(image, (640, 640))).max() <= 1 / 255 + 1e-3


def test_letterbox_pitched_crop():
    cv2_or_skip()
    big = np.random.default_rng(1).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    crop = big[40:250, 70:420]
    buffer = on_gpu(big)
    start = buffer.data_ptr() + (40 * 500 + 70) * 3
    lb = Letterbox(256, 320)
    out = torch.empty((1, 3, 256, 320), device="cuda")
    lb.enqueue(stream(), [start], [crop.shape[0]], [crop.shape[1]], out.data_ptr(), pitches=[500 * 3])
    torch.cuda.synchronize()
    assert np.abs(out.cpu().numpy()[0] - official_input(crop, (256, 320))).max() <= 1 / 255 + 1e-6


def test_letterbox_more_images_than_one_launch_holds():
    cv2_or_skip()
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (int(rng.integers(1, 90)), int(rng.integers(1, 90)), 3), dtype=np.uint8)
              for _ in range(70)]
    got = gpu_letterbox(images, (64, 96))
    for i, image in enumerate(images):
        assert np.abs(got[i] - official_input(image, (64, 96))).max() <= 1 / 255 + 1e-6, f"image {i}"


def test_letterbox_geometry_is_the_official_one():
    lb = Letterbox(640, 640)
    assert lb.geometry(1080, 810) == (640 / 1080, (80, 0), (480, 640))
    assert lb.geometry(720, 1280) == (0.5, (0, 140), (640, 360))


# ---------------------------------------------------------------- decode


def realistic_heads(rng, shapes, batch=2, nc=80, na=3, obj_mean=-7.0):
    """Head maps whose scores look like a detector's: few anchors above 0.25, one class dominant."""
    maps = []
    for h, w in shapes:
        m = rng.normal(0.0, 1.0, (batch, na, nc + 5, h, w)).astype(np.float32)
        m[:, :, 4] = rng.normal(obj_mean, 2.5, (batch, na, h, w))
        m[:, :, 5:] = rng.normal(-6.0, 2.0, (batch, na, nc, h, w))
        cls = rng.integers(0, nc, (batch, na, h, w))
        b, a, y, x = np.indices((batch, na, h, w))
        m[b, a, 5 + cls, y, x] += rng.uniform(3.0, 10.0, (batch, na, h, w)).astype(np.float32)
        maps.append(m.reshape(batch, na * (nc + 5), h, w))
    return maps


def run_decode(post, maps, dtype="float32", as_dict=True):
    heads = [on_gpu(m, TORCH_DTYPES[dtype]) for m in maps]
    batch, shapes = maps[0].shape[0], [tuple(m.shape[2:]) for m in maps]
    ws = device_bytes(post.workspace_bytes(batch, shapes))
    post.decode(stream(), [h.data_ptr() for h in heads], dtype, batch, shapes, ws.data_ptr())
    torch.cuda.synchronize()
    return read_candidates(post, ws, batch, as_dict)


def read_candidates(post, ws, batch, as_dict=True):
    """Per image (true count, {candidate index: (x1, y1, x2, y2, score, class)}) from the workspace;
    with as_dict=False (true count, indices, rows)."""
    host = ws.cpu().numpy()
    base = pp._aligned(ws.data_ptr()) - ws.data_ptr()
    lay, cap = post.layout(batch), post.capacity

    def part(offset, dtype, shape):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return host[base + offset: base + offset + n].view(dtype).reshape(shape)

    counts = part(lay.state, np.uint32, (batch, pp.STATE_BYTES // 4))[:, 0]
    keys = part(lay.key, np.uint64, (batch, cap))
    boxes = part(lay.box, np.float32, (batch, cap, 4))
    classes = part(lay.cls, np.int32, (batch, cap))
    out = []
    for b in range(batch):
        n = min(int(counts[b]), cap)
        index = (keys[b, :n] & np.uint64(0xFFFFFFFF)).astype(np.int64)
        score = (~(keys[b, :n] >> np.uint64(32)).astype(np.uint32)).view(np.float32)
        rows = np.concatenate([boxes[b, :n], score[:, None], classes[b, :n, None].astype(np.float32)], 1)
        out.append((int(counts[b]), dict(zip(index.tolist(), rows))) if as_dict else (int(counts[b]), index, rows))
    return out


def reference_candidates(maps, strides, anchors, conf, multi_label, nc):
    """Per image {candidate index (anchor * nc + class): row}, by the official rules."""
    out = []
    for d in ref.decode_official(maps, strides, anchors):
        anchors_in = np.flatnonzero(d[:, 4] > np.float32(conf))
        x = d[anchors_in]
        scores = x[:, 5:] * x[:, 4:5]
        box = ref.xywh2xyxy(x[:, :4])
        if multi_label:
            i, j = np.nonzero(scores > np.float32(conf))
        else:
            j = scores.argmax(1)
            i = np.flatnonzero(scores[np.arange(len(j)), j] > np.float32(conf))
            j = j[i]
        rows = np.concatenate([box[i], scores[i, j, None], j[:, None].astype(np.float32)], 1)
        out.append(dict(zip((anchors_in[i] * nc + j).tolist(), rows)))
    return out


def assert_same_candidates(got, want, conf):
    """Same candidates and values; only scores within float rounding of `conf` may be on one side only."""
    only_got, only_want = set(got) - set(want), set(want) - set(got)
    for k in only_got:
        assert abs(got[k][4] - conf) < 1e-5, f"extra candidate {k}: {got[k]}"
    for k in only_want:
        assert abs(want[k][4] - conf) < 1e-5, f"missing candidate {k}: {want[k]}"
    common = sorted(set(got) & set(want))
    g = np.array([got[k] for k in common]).reshape(-1, 6)
    w = np.array([want[k] for k in common]).reshape(-1, 6)
    np.testing.assert_array_equal(g[:, 5], w[:, 5])
    np.testing.assert_allclose(g[:, :5], w[:, :5], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("multi_label", [False, True])
def test_decode_equals_reference(dtype, multi_label):
    maps = realistic_heads(np.random.default_rng(10), P5_640, batch=3)
    post = pp.YoloPostprocess(**P5, nc=80, conf=0.25, multi_label=multi_label)
    got = run_decode(post, maps, dtype)
    as_run = [m.astype(np.float16).astype(np.float32) for m in maps] if dtype == "float16" else maps
    want = reference_candidates(as_run, conf=0.25, multi_label=multi_label, nc=80, **P5)
    for (count, g), w in zip(got, want):
        assert abs(count - len(w)) <= 2 and count == len(g)
        assert 50 < count < 30000  # the test means something
        assert_same_candidates(g, w, 0.25)


def test_decode_p6_equals_reference():
    maps = realistic_heads(np.random.default_rng(11), P6_640, batch=2)
    post = pp.YoloPostprocess(**P6, nc=80, conf=0.1)
    want = reference_candidates(maps, conf=0.1, multi_label=False, nc=80, **P6)
    for (count, g), w in zip(run_decode(post, maps), want):
        assert count == len(g) and any(k // 80 >= 3 * (80 * 80 + 40 * 40 + 20 * 20) for k in w)  # 4th level read
        assert_same_candidates(g, w, 0.1)


def test_decode_zero_candidates():
    maps = [np.full((2, 255, h, w), -20.0, np.float32) for h, w in P5_640]
    post = pp.YoloPostprocess(**P5, nc=80)
    assert [count for count, _ in run_decode(post, maps)] == [0, 0]


def test_decode_overflow_keeps_exactly_the_best_capacity():
    """Every anchor x class above conf (2,016,000 at 640): the stored candidates are exactly the
    capacity smallest keys (score descending, index ascending) of the full set, and the count is true."""
    rng = np.random.default_rng(12)  # every logit >= 1: every score in (0.53, 1), all different
    maps = [(1.0 + np.abs(rng.normal(0.0, 2.0, (2, 255, h, w)))).astype(np.float32) for h, w in P5_640]
    full = run_decode(pp.YoloPostprocess(**P5, nc=80, multi_label=True, capacity=2_100_000), maps, as_dict=False)
    capped = run_decode(pp.YoloPostprocess(**P5, nc=80, multi_label=True, capacity=30000), maps, as_dict=False)
    for (n_full, index, rows), (n_capped, kept, kept_rows) in zip(full, capped):
        assert n_full == n_capped == 25200 * 80 == len(index)
        best = index[np.lexsort((index, -rows[:, 4]))[:30000]]
        np.testing.assert_array_equal(np.sort(kept), np.sort(best))
        np.testing.assert_array_equal(kept_rows[np.argsort(kept)], rows[np.argsort(index)][np.sort(kept)])


def test_decode_overflow_with_all_scores_equal():
    """Constant maps: every score is the same, so the best `capacity` are the lowest indices."""
    maps = [np.full((1, 255, h, w), 6.0, np.float32) for h, w in P5_640]
    post = pp.YoloPostprocess(**P5, nc=80, multi_label=True, capacity=30000)
    ((count, kept),) = run_decode(post, maps)
    assert count == 25200 * 80
    assert set(kept) == set(range(30000))


# ---------------------------------------------------------------- NMS


def run_nms(post, cands_per_image):
    """NMS on given candidates (lists of [n, 6] float32 rows); per image dets [k, 6] and all of counts."""
    batch, cap = len(cands_per_image), post.capacity
    boxes = np.zeros((batch, cap, 4), np.float32)
    scores = np.zeros((batch, cap), np.float32)
    classes = np.zeros((batch, cap), np.int32)
    counts = np.array([len(c) for c in cands_per_image], np.int32)
    for b, c in enumerate(cands_per_image):
        boxes[b, : len(c)], scores[b, : len(c)], classes[b, : len(c)] = c[:, :4], c[:, 4], c[:, 5]
    tensors = [on_gpu(a) for a in (boxes, scores, classes, counts)]
    ws = device_bytes(post.workspace_bytes(batch, [(1, 1)] * len(post.strides)))
    dets = torch.full((batch, post.max_det, 6), -1.0, device="cuda")
    out_counts = torch.full((batch,), -1, dtype=torch.int32, device="cuda")
    post.nms_candidates(stream(), *[t.data_ptr() for t in tensors], batch, ws.data_ptr(), dets.data_ptr(),
                        out_counts.data_ptr())
    torch.cuda.synchronize()
    dets, out_counts = dets.cpu().numpy(), out_counts.cpu().numpy()
    assert np.all(dets[np.arange(post.max_det)[None] >= out_counts[:, None]] == 0), "rows past count not zeroed"
    return [dets[b, : out_counts[b]] for b in range(batch)]


def nms_post(capacity=30000, max_det=1000, iou=0.45, agnostic=False):
    return pp.YoloPostprocess(**P5, nc=80, iou=iou, max_det=max_det, agnostic=agnostic, capacity=capacity)


def random_candidates(rng, n, nc=80, quantized=False, spread=640.0):
    """Random boxes with unique scores (ties are tested on their own); `quantized`: coordinates on a
    1/16 grid, so that every NMS formulation (class offsets of any size) computes identical IoUs —
    torchvision's batched_nms included."""
    xy = rng.uniform(0, spread, (n, 2))
    wh = rng.uniform(4, 200, (n, 2))
    if quantized:
        xy, wh = np.round(xy * 16) / 16, np.round(wh * 16) / 16
    scores = 0.25 + 0.75 * (rng.permutation(n) + 1) / (n + 1)
    cls = rng.integers(0, nc, n)
    return np.column_stack([xy, xy + wh, scores, cls]).astype(np.float32)


def torchvision_nms(cands, iou, max_det, batched=True):
    """Indices torchvision keeps: batched_nms on the GPU, or (batched=False) the official
    torchvision.ops.nms(boxes + cls * 7680) on the CPU."""
    torchvision = pytest.importorskip("torchvision")
    t = torch.from_numpy(cands)
    if batched:
        t = t.cuda()
        keep = torchvision.ops.batched_nms(t[:, :4], t[:, 4], t[:, 5].long(), iou)
    else:
        keep = torchvision.ops.nms(t[:, :4] + t[:, 5:6] * ref.MAX_WH, t[:, 4], iou)
    return keep[:max_det].cpu().numpy()


@pytest.mark.parametrize("n", [1, 7, 300, 2000, 2049, 6000, 30000])
def test_nms_equals_torchvision_batched_nms(n):
    cands = random_candidates(np.random.default_rng(n), n, quantized=True)
    (got,) = run_nms(nms_post(), [cands])
    np.testing.assert_array_equal(got, cands[torchvision_nms(cands, 0.45, 1000)])


@pytest.mark.parametrize("seed", range(3))
def test_nms_equals_official_torchvision_nms_on_offset_boxes(seed):
    cands = random_candidates(np.random.default_rng(100 + seed), 3000, nc=5)
    (got,) = run_nms(nms_post(iou=0.6, max_det=300), [cands])
    np.testing.assert_array_equal(got, cands[torchvision_nms(cands, 0.6, 300, batched=False)])


def test_nms_agnostic():
    cands = random_candidates(np.random.default_rng(5), 1500, quantized=True)
    (got,) = run_nms(nms_post(agnostic=True), [cands])
    torchvision = pytest.importorskip("torchvision")
    t = torch.from_numpy(cands).cuda()
    keep = torchvision.ops.nms(t[:, :4], t[:, 4], 0.45)[:1000].cpu().numpy()
    np.testing.assert_array_equal(got, cands[keep])


def test_nms_survivors_past_the_tile():
    """More candidates than the bitmask tile, most of the first tile suppressed: the chunked path keeps
    candidates beyond it."""
    rng = np.random.default_rng(6)
    crowd = random_candidates(rng, 3000, nc=2, quantized=True, spread=20.0)
    crowd[:, 4] = 0.9 + crowd[:, 4] / 100
    spread = random_candidates(rng, 3000, nc=80, quantized=True)
    spread[:, 4] = 0.25 + spread[:, 4] / 2
    cands = np.concatenate([spread, crowd])
    (got,) = run_nms(nms_post(), [cands])
    keep = torchvision_nms(cands, 0.45, 1000)
    assert (np.argsort(-cands[:, 4], kind="stable").argsort()[keep] >= pp.TILE).sum() > 100
    np.testing.assert_array_equal(got, cands[keep])
    np.testing.assert_array_equal(got, ref.nms(cands, 0.45, 1000))


def test_nms_zero_candidates():
    dets = run_nms(nms_post(), [np.zeros((0, 6), np.float32)] * 3)
    assert [len(d) for d in dets] == [0, 0, 0]


def test_nms_more_survivors_than_max_det():
    ys, xs = np.divmod(np.arange(2500, dtype=np.float32), 50)
    scores = np.random.default_rng(7).permutation(2500).astype(np.float32) / 2500 + np.float32(0.3)
    cands = np.stack([xs * 12, ys * 12, xs * 12 + 10, ys * 12 + 10, scores, np.zeros(2500, np.float32)], 1)
    (got,) = run_nms(nms_post(max_det=300), [cands])
    assert len(got) == 300
    np.testing.assert_array_equal(got, ref.nms(cands, 0.45, 300))


def test_nms_duplicated_boxes():
    base = random_candidates(np.random.default_rng(8), 300, nc=3, quantized=True)
    cands = np.concatenate([base, base[::-1], base])  # every box and score three times
    (got,) = run_nms(nms_post(), [cands])
    np.testing.assert_array_equal(got, ref.nms(cands, 0.45, 1000))  # ties: the lowest index is kept
    keep = torchvision_nms(cands, 0.45, 1000)  # whichever copy torchvision keeps, the rows are equal
    np.testing.assert_array_equal(got, cands[keep])


def test_nms_equal_scores_keep_the_official_order():
    cands = random_candidates(np.random.default_rng(9), 600, nc=3)
    cands[:, 4] = np.ceil(cands[:, 4] * 4) / 4  # four score values: order among ties decides
    (got,) = run_nms(nms_post(), [cands])
    np.testing.assert_array_equal(got, ref.nms(cands, 0.45, 1000))


def test_nms_batch_items_with_very_different_counts():
    rng = np.random.default_rng(10)
    items = [np.zeros((0, 6), np.float32), random_candidates(rng, 1, quantized=True),
             random_candidates(rng, 5000, quantized=True), random_candidates(rng, 30000, quantized=True),
             random_candidates(rng, 40, quantized=True)]
    dets = run_nms(nms_post(), items)
    for got, cands in zip(dets, items):
        want = cands[torchvision_nms(cands, 0.45, 1000)] if len(cands) else cands
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- decode + NMS


def run_postprocess(post, maps, dtype="float32"):
    heads = [on_gpu(m, TORCH_DTYPES[dtype]) for m in maps]
    batch, shapes = maps[0].shape[0], [tuple(m.shape[2:]) for m in maps]
    ws = device_bytes(post.workspace_bytes(batch, shapes))
    dets = torch.empty((batch, post.max_det, 6), device="cuda")
    counts = torch.empty((batch,), dtype=torch.int32, device="cuda")
    post.enqueue(stream(), [h.data_ptr() for h in heads], dtype, batch, shapes, ws.data_ptr(), dets.data_ptr(),
                 counts.data_ptr())
    torch.cuda.synchronize()
    dets, counts = dets.cpu().numpy(), counts.cpu().numpy()
    return [dets[b, : counts[b]] for b in range(batch)]


def assert_same_dets(got, want):
    assert got.shape == want.shape, f"{len(got)} detections, expected {len(want)}"
    np.testing.assert_array_equal(got[:, 5], want[:, 5])
    np.testing.assert_allclose(got[:, :5], want[:, :5], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("model", GOLDENS)
def test_postprocess_reproduces_the_golden_det(model):
    g = np.load(data("golden", f"golden_{model}_bus320.npz"))
    maps = [g[f"raw_{i}"] for i in range(4) if f"raw_{i}" in g.files]
    post = pp.YoloPostprocess(**GOLDENS[model], nc=80, conf=0.25, iou=0.45, max_det=1000)
    (got,) = run_postprocess(post, maps)
    assert_same_dets(got, g["det"])


@pytest.mark.parametrize("settings", [
    dict(), dict(multi_label=True, conf=0.05, max_det=300, iou=0.6), dict(agnostic=True), dict(max_det=5),
])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_postprocess_equals_official_reference(settings, dtype):
    maps = realistic_heads(np.random.default_rng(20), P5_640, batch=3)
    for m in maps:
        m[0] = -20.0  # image 0: nothing at all
    post = pp.YoloPostprocess(**P5, nc=80, **settings)
    as_run = [m.astype(np.float16).astype(np.float32) for m in maps] if dtype == "float16" else maps
    want = ref.non_max_suppression(ref.decode_official(as_run, **P5), post.conf, post.iou, post.max_det,
                                   post.multi_label, post.agnostic)
    got = run_postprocess(post, maps, dtype)
    assert len(got[0]) == 0 and len(got[1]) > 0
    for g, w in zip(got, want):
        assert_same_dets(g, w)


def test_postprocess_after_overflow_equals_reference_on_the_kept_candidates():
    maps = realistic_heads(np.random.default_rng(21), P5_640, batch=1, obj_mean=4.0)
    post = pp.YoloPostprocess(**P5, nc=80, conf=0.001, iou=0.6, max_det=300, multi_label=True, capacity=30000)
    ((count, index, rows),) = run_decode(post, maps, as_dict=False)
    assert count > 30000 and len(index) == 30000
    cands = rows[np.argsort(index)]  # index order = the official order
    (got,) = run_postprocess(post, maps)
    np.testing.assert_array_equal(got, ref.nms(cands, 0.6, 300))


# ---------------------------------------------------------------- anchor-free head (YOLOv8 / YOLO11)

ANCHOR_FREE_GOLDENS = ["yolov8s_syn", "yolo11s_syn", "yolo11n_nc3_syn"]


def realistic_predictions(rng, batch=3, nc=80, n=8400, logit_mean=-10.0):
    """Detect outputs [B, 4 + nc, n]: cx, cy in a 640 image, w, h up to 300 px, sigmoid class scores."""
    xy = rng.uniform(0.0, 640.0, (batch, 2, n))
    wh = rng.uniform(2.0, 300.0, (batch, 2, n))
    scores = 1.0 / (1.0 + np.exp(-rng.normal(logit_mean, 3.0, (batch, nc, n))))
    return np.concatenate([xy, wh, scores], 1).astype(np.float32)


def reference_anchor_free_candidates(pred, conf, multi_label):
    """Per image {candidate index (box * nc + class): row}, by Ultralytics' rules."""
    nc = pred.shape[1] - 4
    out = []
    for image in pred:
        x = image.T
        rows_in = np.flatnonzero(x[:, 4:].max(1) > np.float32(conf))
        cands = ref.candidates_anchor_free(image, conf, multi_label)
        if multi_label and nc > 1:
            i, j = np.nonzero(x[rows_in, 4:] > np.float32(conf))
            index = rows_in[i] * nc + j
        else:
            index = rows_in * nc + x[rows_in, 4:].argmax(1)
        out.append(dict(zip(index.tolist(), cands)))
    return out


@pytest.mark.parametrize("model", ANCHOR_FREE_GOLDENS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_anchor_free_postprocess_reproduces_the_golden_det(model, dtype):
    g = np.load(data("golden", f"golden_{model}_bus320.npz"))
    post = pp.YoloPostprocess(head="anchor_free", nc=g["raw"].shape[1] - 4, conf=0.25, iou=0.45, max_det=300)
    (got,) = run_postprocess(post, [g["raw"]], dtype)
    if dtype == "float32":
        assert_same_dets(got, g["det"])
    else:  # the same math on the half-rounded output
        (want,) = ref.non_max_suppression_anchor_free(g["raw"].astype(np.float16).astype(np.float32), 0.25, 0.45, 300)
        assert_same_dets(got, want)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("multi_label", [False, True])
def test_anchor_free_decode_equals_reference(dtype, multi_label):
    pred = realistic_predictions(np.random.default_rng(30), batch=2)
    as_run = pred.astype(np.float16).astype(np.float32) if dtype == "float16" else pred
    post = pp.YoloPostprocess(head="anchor_free", nc=80, conf=0.25, multi_label=multi_label)
    got = run_decode(post, [pred], dtype)
    want = reference_anchor_free_candidates(as_run, 0.25, multi_label)
    for (count, g), w in zip(got, want):
        assert count == len(g) and len(g) > 0
        assert_same_candidates(g, w, 0.25)


@pytest.mark.parametrize("settings", [
    dict(), dict(multi_label=True, conf=0.05, max_det=300, iou=0.6), dict(agnostic=True), dict(max_det=5),
])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_anchor_free_postprocess_equals_official_reference(settings, dtype):
    pred = realistic_predictions(np.random.default_rng(31), batch=3)
    pred[0, 4:] = 0.0  # image 0: nothing at all
    post = pp.YoloPostprocess(head="anchor_free", nc=80, **settings)
    as_run = pred.astype(np.float16).astype(np.float32) if dtype == "float16" else pred
    want = ref.non_max_suppression_anchor_free(as_run, post.conf, post.iou, post.max_det, post.multi_label,
                                               post.agnostic)
    got = run_postprocess(post, [pred], dtype)
    assert len(got[0]) == 0 and len(got[1]) > 0
    for g, w in zip(got, want):
        assert_same_dets(g, w)


def test_anchor_free_overflow_keeps_exactly_the_best_capacity():
    pred = realistic_predictions(np.random.default_rng(32), batch=1, logit_mean=2.0)
    post = pp.YoloPostprocess(head="anchor_free", nc=80, conf=0.001, iou=0.6, max_det=300, multi_label=True,
                              capacity=30000)
    ((count, index, rows),) = run_decode(post, [pred], as_dict=False)
    (want,) = reference_anchor_free_candidates(pred, 0.001, True)
    assert count == len(want) > 30000 and len(index) == 30000
    keys = np.array(sorted(want))
    scores = np.array([want[k][4] for k in keys])
    best = keys[np.lexsort((keys, -scores))[:30000]]
    np.testing.assert_array_equal(np.sort(index), np.sort(best))
    (got,) = run_postprocess(post, [pred])
    np.testing.assert_array_equal(got, ref.nms(rows[np.argsort(index)], 0.6, 300))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-rs", "-p", "no:cacheprovider"]))
