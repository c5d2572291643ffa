"""Dataset readers: coco128 as the official loader sees it, small synthetic sets, rectangular batches."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import shared
from trtnet.datasets import (
    DatasetWarning,
    batch_shapes,
    label_path,
    letterbox_for_val,
    load_classification_dataset,
    load_detection_dataset,
)
from trtnet.errors import TrtnetError


@pytest.fixture(scope="module")
def coco128():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_detection_dataset(shared("coco128"))
    return dataset, [str(w.message) for w in caught if issubclass(w.category, DatasetWarning)]


def test_coco128_counts_like_the_official_scan(coco128):
    dataset, _ = coco128
    assert len(dataset) == 128
    assert sum(len(s.labels) > 0 for s in dataset) == 126
    assert dataset.instances == 929
    assert [p.name for p in dataset.backgrounds] == ["000000000250.jpg", "000000000508.jpg"]
    assert dataset[0].path.name == "000000000009.jpg"
    assert [s.path for s in dataset] == sorted(s.path for s in dataset)


def test_coco128_orphan_labels_are_ignored_with_a_warning(coco128):
    dataset, messages = coco128
    assert len(messages) == 1
    assert "000000000656.txt" in messages[0] and "000000000659.txt" in messages[0]
    assert not any(s.path.stem in ("000000000656", "000000000659") for s in dataset)


def test_coco128_grayscale_image_reads_as_three_channels(coco128):
    dataset, _ = coco128
    i = next(i for i, s in enumerate(dataset) if s.path.name == "000000000086.jpg")
    assert (dataset[i].width, dataset[i].height) == (512, 640)
    image = dataset.read(i)
    assert image.shape == (640, 512, 3) and image.dtype == np.uint8


def test_label_path_replaces_the_last_images_component():
    sep = os.sep
    assert label_path(f"{sep}d{sep}images{sep}x{sep}images{sep}a.b.jpg") == Path(
        f"{sep}d{sep}images{sep}x{sep}labels{sep}a.b.txt")
    assert label_path(f"{sep}d{sep}pics{sep}a.png") == Path(f"{sep}d{sep}pics{sep}a.txt")


def write_image(path: Path, width: int, height: int, channels: int = 3) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (height, width, channels) if channels > 1 else (height, width)
    assert cv2.imwrite(str(path), np.full(shape, 127, np.uint8))


def write_labels(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def tiny(tmp_path):
    """root/images/val/{a,b,d,e}, root/labels/val/…: one image of each kind the loader keeps or skips."""
    images, labels = tmp_path / "images" / "val", tmp_path / "labels" / "val"
    write_image(images / "a.jpg", 200, 100)
    write_labels(labels / "a.txt", "0 0.5 0.5 0.2 0.4\n3 0.25 0.75 0.1 0.1\n\n")
    write_image(images / "b.png", 64, 64, channels=1)  # grayscale, no label file: background
    write_image(images / "d.jpg", 40, 40)
    write_labels(labels / "d.txt", "2 0.5 0.5 0.5 0.5\n2 0.5 0.5 0.5 0.5\n")  # duplicate row
    write_image(images / "e.jpg", 100, 100)
    write_labels(labels / "e.txt", "5 0.1 0.2 0.3 0.2 0.3 0.6 0.1 0.6\n")  # polygon
    (images / "f.jpg").write_bytes(b"not a jpeg")  # unreadable
    write_labels(labels / "g.txt", "0 0.5 0.5 0.1 0.1\n")  # no image
    (images / "notes.md").write_text("not an image")
    return tmp_path


def test_tiny_dataset(tiny):
    with pytest.warns(DatasetWarning) as caught:
        dataset = load_detection_dataset(tiny)
    assert [s.path.name for s in dataset] == ["a.jpg", "b.png", "d.jpg", "e.jpg"]
    a, b, d, e = dataset
    np.testing.assert_allclose(a.boxes_xyxy(), [[80, 30, 120, 70], [40, 70, 60, 80]], atol=1e-4)
    assert a.classes.tolist() == [0, 3] and (a.width, a.height) == (200, 100)
    assert len(b.labels) == 0 and dataset.read(1).shape == (64, 64, 3)
    assert d.labels.tolist() == [[2, 0.5, 0.5, 0.5, 0.5]]
    np.testing.assert_allclose(e.labels, [[5, 0.2, 0.4, 0.2, 0.4]], atol=1e-6)
    messages = " | ".join(str(w.message) for w in caught)
    for expected in ("g.txt", "f.jpg", "d.txt: 1 duplicate"):
        assert expected in messages


def test_images_folder_or_root_give_the_same_dataset(tiny):
    with pytest.warns(DatasetWarning):
        from_root = load_detection_dataset(tiny)
    with pytest.warns(DatasetWarning):
        from_images = load_detection_dataset(tiny / "images" / "val")
    assert [s.path for s in from_root] == [s.path for s in from_images]
    assert all(np.array_equal(r.labels, i.labels) for r, i in zip(from_root, from_images))


def test_missing_or_empty_dataset_is_a_user_error(tmp_path):
    with pytest.raises(TrtnetError, match="not a directory"):
        load_detection_dataset(tmp_path / "nowhere")
    with pytest.raises(TrtnetError, match="no images"):
        load_detection_dataset(tmp_path)


def test_batch_shapes_by_hand():
    # (w, h) 640x480, 480x640, 640x640: aspect h/w 0.75, 1.33, 1.0 → order 0, 2, 1.
    # Batch [0.75, 1.0] spans 1: shape [1, 1] → ceil(640/32 + 0.5) * 32 = 672 both ways.
    # Batch [1.33]: all taller than wide: [1, 1/1.33 = 0.75] → (672, ceil(15 + 0.5) * 32 = 512).
    order, shapes = batch_shapes([(640, 480), (480, 640), (640, 640)], 640, batch=2)
    assert order.tolist() == [0, 2, 1]
    assert shapes.tolist() == [[672, 672], [672, 512]]
    # All wider than tall, max aspect 0.75: [0.75, 1] → (ceil(15 + 0.5) * 32, 672) = (512, 672).
    _, shapes = batch_shapes([(640, 480), (640, 360)], 640, batch=16)
    assert shapes.tolist() == [[512, 672]]
    # pad 0 and stride 64 at 320: 0.5625 * 320 / 64 = 2.8125 → 3 * 64 = 192; 320 / 64 = 5 → 320.
    _, shapes = batch_shapes([(640, 360)], 320, stride=64, pad=0.0)
    assert shapes.tolist() == [[192, 320]]


def test_letterbox_for_val_resizes_once_then_pads():
    # 1000x500 → long side 640: 640x320 (INTER_AREA), then padded (no second resize) into 351x675:
    # dw = 17.5 → left round(17.4) = 17, right round(17.6) = 18; dh = 15.5 → top 15, bottom 16.
    image = np.random.default_rng(0).integers(0, 256, (500, 1000, 3), dtype=np.uint8)
    padded, (gain, pad) = letterbox_for_val(image, 640, (351, 675))
    assert padded.shape == (351, 675, 3)
    assert gain == (0.64, 0.64) and pad == (17.5, 15.5)
    np.testing.assert_array_equal(padded[15:335, 17:657], cv2.resize(image, (640, 320), interpolation=cv2.INTER_AREA))
    assert (padded[:15] == 114).all() and (padded[335:] == 114).all()
    assert (padded[:, :17] == 114).all() and (padded[:, 657:] == 114).all()


def test_classification_sub_folders_with_a_wnid_index(tmp_path):
    for wnid in ("n01440764", "n01443537"):
        write_image(tmp_path / "val" / wnid / f"{wnid}_1.JPEG", 8, 8)
    write_image(tmp_path / "val" / "n01443537" / "x.JPEG", 8, 8)
    keras_style = tmp_path / "imagenet_class_index.json"
    keras_style.write_text(json.dumps({"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"],
                                       "7": ["n01514859", "hen"]}))
    dataset = load_classification_dataset(tmp_path / "val", keras_style)
    assert dataset.labels.tolist() == [0, 1, 1]
    plain = tmp_path / "index.json"
    plain.write_text(json.dumps({"n01440764": 7, "n01443537": 9}))
    assert load_classification_dataset(tmp_path / "val", plain).labels.tolist() == [7, 9, 9]
    assert dataset.read(0).shape == (8, 8, 3)


def test_classification_flat_folder_named_by_index_or_wnid(tmp_path):
    write_image(tmp_path / "207_golden.jpg", 8, 8)
    write_image(tmp_path / "n01443537_5.jpg", 8, 8)
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"n01443537": 1}))
    assert load_classification_dataset(tmp_path, index).labels.tolist() == [207, 1]
    write_image(tmp_path / "n09999999_1.jpg", 8, 8)
    with pytest.raises(TrtnetError, match="n09999999"):
        load_classification_dataset(tmp_path, index)
    write_image(tmp_path / "holiday.jpg", 8, 8)
    with pytest.raises(TrtnetError, match="cannot tell its class"):
        load_classification_dataset(tmp_path, index)


def test_classification_without_index_numbers_wnids_in_sorted_order(tmp_path):
    for wnid in ("n02000000", "n01000000"):
        write_image(tmp_path / wnid / "x.jpg", 8, 8)
    with pytest.warns(DatasetWarning, match="2 classes"):
        dataset = load_classification_dataset(tmp_path)
    assert [(p.parent.name, label) for p, label in dataset] == [("n01000000", 0), ("n02000000", 1)]


# -- label files: empty ones are background images, malformed lines are errors naming file:line ---------


def test_empty_label_file_is_a_background_image(tmp_path):
    write_image(tmp_path / "images" / "a.jpg", 100, 100)
    write_labels(tmp_path / "labels" / "a.txt", "0 0.3 0.3 0.4 0.4\n")
    write_image(tmp_path / "images" / "b.jpg", 100, 100)
    write_labels(tmp_path / "labels" / "b.txt", "")
    write_image(tmp_path / "images" / "c.jpg", 100, 100)
    write_labels(tmp_path / "labels" / "c.txt", "\n  \n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)  # nothing is left out, so nothing to warn about
        dataset = load_detection_dataset(tmp_path)
    assert [s.path.name for s in dataset] == ["a.jpg", "b.jpg", "c.jpg"]
    assert [p.name for p in dataset.backgrounds] == ["b.jpg", "c.jpg"]
    assert dataset.instances == 1


@pytest.mark.parametrize("line, problem", [
    ("0 nan 0.5 0.2 0.2", "not finite"),
    ("0 0.5 inf 0.2 0.2", "not finite"),
    ("0 0.5 0.5 0.2 1.3", r"outside \[0, 1\]"),
    ("0 0.5 -0.1 0.2 0.2", r"outside \[0, 1\]"),
    ("0 0.5 0.5 0.2", "4 columns"),
    ("0 0.5 0.5 0.2 0.2 0.1", "6 columns"),
    ("0 0.5 0.5 0.2 zero", "not a row of numbers"),
    ("1.5 0.5 0.5 0.2 0.2", "class id 1.5 is not"),
    ("-1 0.5 0.5 0.2 0.2", "class id -1 is not"),
    ("80 0.5 0.5 0.2 0.2", "class id 80 is not 0 to 79"),
    ("1e9 0.5 0.5 0.2 0.2", "class id 1e9 is not 0 to 79"),
])
def test_malformed_label_line_is_an_error_naming_file_and_line(tmp_path, line, problem):
    write_image(tmp_path / "images" / "a.jpg", 100, 100)
    write_labels(tmp_path / "labels" / "a.txt", f"0 0.5 0.5 0.2 0.2\n\n{line}\n")
    with pytest.raises(TrtnetError, match=rf"labels{re.escape(os.sep)}a\.txt:3: .*{problem}"):
        load_detection_dataset(tmp_path, nc=80)


def test_class_ids_are_bounded_only_by_the_model(tmp_path):
    write_image(tmp_path / "images" / "a.jpg", 100, 100)
    write_labels(tmp_path / "labels" / "a.txt", "200 0.5 0.5 0.2 0.2\n")
    assert load_detection_dataset(tmp_path).samples[0].classes.tolist() == [200]
    with pytest.raises(TrtnetError, match=r"a\.txt:1: class id 200 is not 0 to 2, the model's classes"):
        load_detection_dataset(tmp_path, nc=3)


def test_unreadable_label_file_is_one_error_naming_it(tmp_path, monkeypatch):
    from trtnet.datasets import read_labels

    latin1 = tmp_path / "caf\u00e9.txt"
    latin1.write_bytes("0 0.5 0.5 0.2 0.2 # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(TrtnetError, match=r"caf\u00e9\.txt: cannot read this label file \(.*utf-8"):
        read_labels(latin1)
    locked = tmp_path / "locked.txt"
    locked.write_text("0 0.5 0.5 0.2 0.2\n")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(TrtnetError, match=r"locked\.txt: cannot read this label file .*Permission denied"):
        read_labels(locked)
