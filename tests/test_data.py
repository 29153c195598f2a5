"""Robust loading and dataset layouts."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from nbsupport import data
from nbsupport.data import ImageLoadError


def rgb(h=20, w=30, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = 255  # left half white
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW when displayed
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif, quality=100)
    out = data.load_image(p)
    assert out.size == (10, 20)  # width/height swapped
    a = np.asarray(out)
    assert a[:5].mean() > 200 and a[-5:].mean() < 50  # left half ends up on top


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_modes_become_rgb(tmp_path, mode):
    base = Image.fromarray(rgb())
    if mode == "I;16":
        im = Image.fromarray((np.arange(600).reshape(20, 30) * 50).astype(np.uint16))
    else:
        im = base.convert(mode)
    p = tmp_path / f"img_{mode.replace(';', '')}.png"
    im.save(p)
    out = data.load_image(p)
    assert out.mode == "RGB" and out.size == (30, 20)


def test_rgba_alpha_composited_on_white(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    p = tmp_path / "clear.png"
    Image.fromarray(arr, "RGBA").save(p)
    assert np.asarray(data.load_image(p)).min() == 255


def test_bad_files_name_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(rgb(64, 64)).save(good)
    trunc = tmp_path / "truncated.png"
    trunc.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    for p, reason in ((trunc, "corrupt"), (text, "not an image"), (tmp_path / "missing.png", "does not exist")):
        with pytest.raises(ImageLoadError, match=reason) as e:
            data.load_image(p)
        assert p.name in str(e.value) and e.value.path == p
    with pytest.raises(ImageLoadError, match="smaller than the minimum 100"):
        data.load_image(good, min_size=100)


def test_image_to_tensor_normalisation_and_crop():
    arr = rgb(21, 35)
    t = data.image_to_tensor(arr, patch=8)
    assert t.shape == (3, 16, 32)
    ref = (arr[:16, :32].astype(np.float32) / 255 - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
    np.testing.assert_allclose(t.permute(1, 2, 0).numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(data.denormalize(t), arr[:16, :32] / 255, atol=1e-5)
    assert data.image_to_tensor(arr, 48).shape == (3, 48, 48)
    assert data.image_to_tensor(arr, (24, 40)).shape == (3, 24, 40)
    with pytest.raises(ValueError, match="smaller than one 64-px patch"):
        data.image_to_tensor(arr, patch=64)


def test_load_images_skips_and_reports(tmp_path):
    paths = []
    for k in range(3):
        p = tmp_path / f"ok{k}.png"
        Image.fromarray(rgb(32, 32, k)).save(p)
        paths.append(p)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    paths.insert(1, bad)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        batch, kept, failures = data.load_images(paths, size=16)
    assert batch.shape == (3, 3, 16, 16) and kept == [p for p in paths if p != bad]
    assert failures[0][0] == bad and "bad.png" in failures[0][1]
    assert any("bad.png" in str(x.message) for x in w)


def test_folder_dataset_with_dataloader(tmp_path):
    for k in range(4):
        Image.fromarray(rgb(32, 32, k)).save(tmp_path / f"{k}.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.PNG").write_bytes(b"junk")
    ds = data.ImageFolderDataset(tmp_path, size=16)
    assert len(ds) == 5
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=data.collate_skip_bad)
    batch, failures = next(iter(loader))
    assert batch["image"].shape == (4, 3, 16, 16) and len(failures) == 1 and "x.PNG" in failures[0][0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        data.list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.list_images(tmp_path / "missing")


def test_coco_roundtrip_polygon_and_rle(tmp_path):
    from pycocotools import mask as mu

    m = np.zeros((10, 12), np.uint8)
    m[2:5, 3:9] = 1
    rle = mu.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    coco = {"images": [{"id": 7, "file_name": "a.png", "width": 12, "height": 10}],
            "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 1, "segmentation": rle, "area": 18, "bbox": [3, 2, 6, 3], "iscrowd": 0},
                {"id": 2, "image_id": 7, "category_id": 2, "segmentation": [[0, 6, 4, 6, 4, 9, 0, 9]],
                 "area": 12, "bbox": [0, 6, 4, 3], "iscrowd": 0}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    ds = data.CocoInstances(tmp_path / "ann.json", tmp_path)
    masks = ds.instance_masks(7)
    assert masks.shape == (2, 10, 12)
    np.testing.assert_array_equal(masks[0], m.astype(bool))
    assert masks[1][7, 1] and not masks[1][2, 6]
    sem = ds.semantic_mask(7)
    assert sem[3, 4] == 1 and sem[7, 1] == 2 and sem[0, 0] == 0
    assert ds.category_ids(7) == [1, 2] and ds.categories == {1: "thing", 2: "other"}
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        data.CocoInstances(tmp_path / "broken.json")
    (tmp_path / "caps.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="no 'images'"):
        data.CocoInstances(tmp_path / "caps.json")


def test_voc_layout(tmp_path):
    for d in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n")
    Image.fromarray(rgb(8, 8)).save(tmp_path / "JPEGImages/2007_000001.jpg")
    lab = np.zeros((8, 8), np.uint8)
    lab[2:4, 2:4] = 15
    lab[0, :] = 255
    pal = Image.fromarray(lab, "P")
    pal.putpalette([0, 0, 0, 128, 0, 0] * 128)
    pal.save(tmp_path / "SegmentationClass/2007_000001.png")
    ds = data.VocSegmentation(tmp_path)
    img, sem, inst = ds.load(ds.ids[0])
    assert data.VOC_CLASSES[15] == "person" and sem[2, 2] == 15 and sem[0, 0] == 255 and inst is None
    with pytest.raises(FileNotFoundError, match="VOC root"):
        data.VocSegmentation(tmp_path, split="train")
