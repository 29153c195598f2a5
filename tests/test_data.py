"""Robust loading and dataset layouts: every bad input gives one clear error naming the file."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from nbsupport import data
from nbsupport.data.images import ImageLoadError


def rgb(h=20, w=30, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = 255  # left half white
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif, quality=100)
    raw = Image.open(p)
    assert raw.size == (20, 10)  # stored unrotated
    out = data.load_image(p)
    assert out.size == (10, 20)  # width/height swapped
    a = np.asarray(out).astype(float)
    assert a[:8].mean() > 200 and a[-8:].mean() < 50  # the white left half ends up on top


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "I;16", "CMYK", "F"])
def test_modes_become_rgb(tmp_path, mode):
    base = Image.fromarray(rgb())
    if mode == "I;16":
        im = Image.fromarray((np.arange(600).reshape(20, 30) * 50).astype(np.uint16))
        assert im.mode == "I;16"
    elif mode == "F":
        im = Image.fromarray(np.linspace(-1, 1, 600, dtype=np.float32).reshape(20, 30))
    else:
        im = base.convert(mode)
    ext = {"CMYK": "jpg", "F": "tif"}.get(mode, "png")
    p = tmp_path / f"img_{mode.replace(';', '')}.{ext}"
    im.save(p)
    out = data.load_image(p)
    assert out.mode == "RGB" and out.size == (30, 20)
    a = np.asarray(out)
    if mode == "L":  # grey copied to the three channels
        np.testing.assert_array_equal(a[..., 0], np.asarray(base.convert("L")))
        assert (a[..., 0] == a[..., 2]).all()
    if mode == "I;16":  # 16 bit scaled by 1/257: 599 * 50 = 29950 -> 117
        assert a[-1, -1, 0] == round(29950 / 257) and a[0, 0, 0] == 0
    if mode == "F":  # float stretched to the full range
        assert a.min() == 0 and a.max() == 255


def test_alpha_composited_on_white(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)  # fully transparent black ...
    arr[0, 0] = (255, 0, 0, 255)  # ... except one opaque red pixel
    arr[0, 1] = (0, 0, 0, 128)  # and one half-transparent black one
    p = tmp_path / "clear.png"
    Image.fromarray(arr, "RGBA").save(p)
    a = np.asarray(data.load_image(p)).astype(int)
    assert a[3, 3].tolist() == [255, 255, 255] and a[0, 0].tolist() == [255, 0, 0]
    assert abs(a[0, 1, 0] - 127) <= 1
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")  # palette image, index 0 transparent
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    b = np.asarray(data.load_image(tmp_path / "pal.png"))
    assert b[0, 0].tolist() == [255, 255, 255] and b[0, 1].tolist() == [0, 255, 0]


def test_bad_files_name_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(rgb(64, 64)).save(good)
    trunc = tmp_path / "truncated.png"
    trunc.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    jpg = tmp_path / "good.jpg"
    Image.fromarray(rgb(64, 64)).save(jpg)
    trunc_jpg = tmp_path / "cut.jpg"
    trunc_jpg.write_bytes(jpg.read_bytes()[:300])
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    (tmp_path / "folder.png").mkdir()
    cases = (
        (trunc, "corrupt"),
        (trunc_jpg, "corrupt"),
        (text, "not an image"),
        (tmp_path / "missing.png", "does not exist"),
        (tmp_path / "folder.png", "directory"),
    )
    for p, reason in cases:
        with pytest.raises(ImageLoadError, match=reason) as e:
            data.load_image(p)
        assert p.name in str(e.value) and e.value.path == p and isinstance(e.value, ValueError)
    with pytest.raises(ImageLoadError, match="64x64 px is smaller than the minimum 100") as e:
        data.load_image(good, min_size=100)
    assert "good.png" in str(e.value)
    assert data.load_image(good, min_size=64).size == (64, 64)


def test_image_to_tensor_normalisation_resize_and_crop():
    arr = rgb(21, 35)
    t = data.image_to_tensor(arr, patch=8)
    assert t.shape == (3, 16, 32) and t.dtype == torch.float32
    ref = (arr[:16, :32].astype(np.float32) / 255 - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
    np.testing.assert_allclose(t.permute(1, 2, 0).numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(data.denormalize(t), arr[:16, :32] / 255, atol=1e-5)
    # int size: square, aspect ignored, LANCZOS exactly as PIL does it
    t48 = data.image_to_tensor(Image.fromarray(arr), 48)
    lz = np.asarray(Image.fromarray(arr).resize((48, 48), Image.Resampling.LANCZOS), np.float32) / 255
    np.testing.assert_allclose(data.denormalize(t48), lz, atol=1e-5)
    assert data.image_to_tensor(arr, (24, 40)).shape == (3, 24, 40)
    assert data.image_to_tensor(arr, (24, 40), patch=16).shape == (3, 16, 32)
    assert data.image_to_tensor(arr[..., 0]).shape == (3, 21, 35)  # grey array
    batch = torch.stack([t, t])
    assert data.denormalize(batch).shape == (2, 16, 32, 3)
    with pytest.raises(ValueError, match=r"35x21 px .* smaller than one 64-px patch"):
        data.image_to_tensor(arr, patch=64)
    with pytest.raises(ValueError, match="size must be"):
        data.image_to_tensor(arr, size=(0, 4))
    with pytest.raises(ValueError, match="uint8"):
        data.image_to_tensor(arr.astype(np.float32))


def test_load_images_skips_and_reports(tmp_path):
    paths = []
    for k in range(3):
        p = tmp_path / f"ok{k}.png"
        Image.fromarray(rgb(32, 32, k)).save(p)
        paths.append(p)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    tiny = tmp_path / "tiny.png"
    Image.fromarray(rgb(4, 4)).save(tiny)
    paths[1:1] = [bad, tiny]
    with pytest.warns(UserWarning, match="bad.png") as w:
        batch, kept, failures = data.load_images(paths, size=16, patch=8)
    assert "tiny.png" in str(w[0].message)
    assert batch.shape == (3, 3, 16, 16) and kept == [p for p in paths if p not in (bad, tiny)]
    assert [f[0] for f in failures] == [bad, tiny] and "bad.png" in failures[0][1]
    np.testing.assert_allclose(batch[2], data.image_to_tensor(Image.open(paths[-1]), 16), atol=1e-6)
    Image.fromarray(rgb(20, 20)).save(tmp_path / "other.png")
    with pytest.raises(ValueError, match="different sizes"):
        data.load_images([paths[0], tmp_path / "other.png"])


def test_folder_dataset_with_dataloader(tmp_path):
    for k in range(4):
        Image.fromarray(rgb(32, 24 + 8 * k, k)).save(tmp_path / f"{k}.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.PNG").write_bytes(b"junk")
    (tmp_path / "._hidden.png").write_bytes(b"mac resource fork")
    (tmp_path / "readme.txt").write_text("not listed")
    ds = data.ImageFolderDataset(tmp_path, size=16)
    assert len(ds) == 5 and ds.paths[-1].name == "x.PNG"
    assert ds[1]["orig_size"] == (32, 32) and ds[1]["image"].shape == (3, 16, 16)
    assert "error" in ds[4] and ds[4]["index"] == 4
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=data.collate_skip_bad)
    seen, failed = [], []
    for batch, failures in loader:
        seen += batch["index"]
        failed += failures
        assert batch["image"].shape[1:] == (3, 16, 16)
    assert seen == [0, 1, 2, 3] and len(failed) == 1 and "x.PNG" in failed[0][0] and "x.PNG" in failed[0][1]
    assert data.collate_skip_bad([ds[4]]) == (None, [(ds[4]["path"], ds[4]["error"])])
    assert len(data.list_images(tmp_path, recursive=False)) == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        data.list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.list_images(tmp_path / "missing")


def _coco_file(tmp_path):
    from pycocotools import mask as mu

    m = np.zeros((10, 12), np.uint8)
    m[2:5, 3:9] = 1
    rle = mu.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    crowd = np.zeros((10, 12), np.uint8)
    crowd[8:, 8:] = 1
    # uncompressed RLE: column-major run lengths starting with zeros
    flat = crowd.flatten(order="F")
    runs, cur, n = [], 0, 0
    for x in flat:
        if x != cur:
            runs.append(n)
            cur, n = x, 0
        n += 1
    runs.append(n)
    coco = {
        "images": [
            {"id": 7, "file_name": "a.png", "width": 12, "height": 10},
            {"id": 3, "file_name": "b.png", "width": 5, "height": 4},
        ],
        "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 1,
                "segmentation": rle,
                "area": 18,
                "bbox": [3, 2, 6, 3],
                "iscrowd": 0,
            },
            # polygon (rows 4..8, cols 1..6) overlapping the RLE mask in row 4: drawn later, wins in semantic_mask
            {
                "id": 2,
                "image_id": 7,
                "category_id": 2,
                "segmentation": [[0.5, 3.5, 6.5, 3.5, 6.5, 8.5, 0.5, 8.5]],
                "area": 30,
                "bbox": [0.5, 3.5, 6, 5],
                "iscrowd": 0,
            },
            {
                "id": 3,
                "image_id": 7,
                "category_id": 1,
                "segmentation": {"size": [10, 12], "counts": runs},
                "area": 8,
                "bbox": [8, 8, 4, 2],
                "iscrowd": 1,
            },
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    return tmp_path / "ann.json", m.astype(bool), crowd.astype(bool)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2, in the reference decode
def test_coco_roundtrip_polygon_and_rle(tmp_path):
    from pycocotools import mask as mu

    ann, m, crowd = _coco_file(tmp_path)
    ds = data.CocoInstances(ann, tmp_path)
    assert ds.image_ids == [3, 7] and len(ds) == 2
    assert ds.image_path(7) == tmp_path / "a.png"
    masks = ds.instance_masks(7)
    assert masks.shape == (3, 10, 12) and masks.dtype == bool
    np.testing.assert_array_equal(masks[0], m)
    poly = mu.decode(mu.merge(mu.frPyObjects([[0.5, 3.5, 6.5, 3.5, 6.5, 8.5, 0.5, 8.5]], 10, 12))).astype(bool)
    np.testing.assert_array_equal(masks[1], poly)
    assert masks[1][6, 3] and not masks[1][2, 6] and not masks[1][6, 9]
    np.testing.assert_array_equal(masks[2], crowd)
    sem = ds.semantic_mask(7)
    expected = np.zeros((10, 12), np.int32)
    expected[m] = 1
    expected[poly] = 2  # later instance overwrites the overlap
    expected[crowd] = 1
    np.testing.assert_array_equal(sem, expected)
    assert sem[4, 4] == 2 and sem[3, 4] == 1 and sem[0, 0] == 0
    assert ds.category_ids(7) == [1, 2, 1] and ds.categories == {1: "thing", 2: "other"}
    np.testing.assert_array_equal(ds.boxes(7)[0], [3, 2, 6, 3])
    assert ds.instance_masks(3).shape == (0, 4, 5) and ds.boxes(3).shape == (0, 4)
    Image.fromarray(rgb(10, 12)).save(tmp_path / "a.png")
    assert ds.load(7).size == (12, 10)
    with pytest.raises(ImageLoadError, match="b.png"):
        ds.load(3)
    with pytest.raises(KeyError, match="image id 99"):
        ds.instance_masks(99)


def test_coco_bad_files(tmp_path):
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        data.CocoInstances(tmp_path / "broken.json")
    (tmp_path / "caps.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="no 'images'"):
        data.CocoInstances(tmp_path / "caps.json")
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        data.CocoInstances(tmp_path / "nothere.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="JSON object"):
        data.CocoCaptions(tmp_path / "list.json")


def test_coco_captions(tmp_path):
    caps = {
        "images": [{"id": 1}, {"id": 2}, {"id": 5}],
        "annotations": [
            {"id": 1, "image_id": 2, "caption": "a dog"},
            {"id": 2, "image_id": 1, "caption": "x"},
            {"id": 3, "image_id": 2, "caption": "a brown dog"},
        ],
    }
    (tmp_path / "c.json").write_text(json.dumps(caps))
    c = data.CocoCaptions(tmp_path / "c.json")
    assert c.image_ids == [1, 2, 5] and c.captions(2) == ["a dog", "a brown dog"] and c.captions(5) == []


def test_voc_layout(tmp_path):
    for d in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n2007_000002\n\n")
    cmap = data.voc_colormap()
    assert cmap[1].tolist() == [128, 0, 0] and cmap[15].tolist() == [192, 128, 128]
    assert cmap[255].tolist() == [224, 224, 192]  # the VOC "void" boundary colour
    for name in ("2007_000001", "2007_000002"):
        Image.fromarray(rgb(8, 8)).save(tmp_path / f"JPEGImages/{name}.jpg")
    lab = np.zeros((8, 8), np.uint8)
    lab[2:4, 2:4] = 15
    lab[0, :] = 255
    pal = Image.fromarray(lab, "P")
    pal.putpalette(cmap.flatten().tolist())
    pal.save(tmp_path / "SegmentationClass/2007_000001.png")
    obj = Image.fromarray((lab == 15).astype(np.uint8), "P")
    obj.putpalette(cmap.flatten().tolist())
    obj.save(tmp_path / "SegmentationObject/2007_000001.png")
    Image.fromarray(cmap[lab]).save(tmp_path / "SegmentationClass/2007_000002.png")  # colour-coded RGB labels
    ds = data.PascalVOC(tmp_path)
    assert ds.ids == ["2007_000001", "2007_000002"] and ds.split == "val"
    img, sem, inst = ds.load_with_instances(0)
    assert img.size == (8, 8) and img.mode == "RGB"
    assert data.VOC_CLASSES[15] == "person" and len(data.VOC_CLASSES) == 21
    assert data.VOC_CLASSES[11] == "table" and data.VOC_DEVKIT_CLASSES[11] == "diningtable"
    np.testing.assert_array_equal(sem, lab.astype(np.int64))
    assert sem[2, 2] == 15 and sem[0, 0] == 255 and inst.sum() == 4
    img2, sem2, inst2 = ds.load_with_instances(1)
    np.testing.assert_array_equal(sem2, lab.astype(np.int64))
    assert inst2 is None
    with pytest.raises(FileNotFoundError, match=r"train\.txt.*\['val'\]"):
        data.PascalVOC(tmp_path, split="train")


def test_public_surface_lists_the_loaders_of_the_room():
    from nbsupport.data import captions, coco, images, scenes

    assert data.read_coco_json is coco.read_coco_json and data.CaptionImages is captions.CaptionImages
    assert data.synthetic_coco is scenes.synthetic_coco and data.synthetic_scenes is scenes.synthetic_scenes
    assert data.resolve_image_path is images.resolve_image_path
    assert {"synthetic_captions", "synthetic_class_names", "CocoInstances", "PascalVOC", "COCOObject"} <= set(
        data.__all__
    )
    assert all(hasattr(data, n) for n in data.__all__) and len(set(data.__all__)) == len(data.__all__)


def test_resolve_image_path(tmp_path, monkeypatch):
    from pathlib import Path

    from nbsupport.core import paths

    monkeypatch.setenv("NBSUPPORT_ROOT", str(tmp_path))
    (tmp_path / "data" / "samples").mkdir(parents=True)
    (tmp_path / "data" / "samples" / "cat.png").write_bytes(b"x")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(b"x")
    other = tmp_path / "elsewhere.png"
    other.write_bytes(b"x")
    monkeypatch.chdir(tmp_path / "pics")  # a relative name is tried as given (cwd) first
    assert data.resolve_image_path("a.png").resolve() == (tmp_path / "pics" / "a.png").resolve()
    assert data.resolve_image_path(str(other)) == other
    assert data.resolve_image_path("pics/a.png") == paths.project_root() / "pics" / "a.png"
    assert data.resolve_image_path("cat.png") == tmp_path / "data" / "samples" / "cat.png"
    assert data.resolve_image_path("nope.png") == Path("nope.png")  # unchanged: load_image names it
    with pytest.raises(ImageLoadError, match="nope.png"):
        data.load_image(data.resolve_image_path("nope.png"))


def test_synthetic_coco_and_synthetic_scenes_show_the_same_scenes(tmp_path, monkeypatch):
    monkeypatch.setenv("NBSUPPORT_GENERATED", str(tmp_path))
    coco = data.synthetic_coco(n_images=3, seed=5, size=48, split="val")
    imgs, sem = data.synthetic_scenes(3, seed=5, size=48, split="val")
    assert coco.image_ids == [1, 2, 3] and imgs.shape == (3, 3, 48, 48)
    for k, i in enumerate(coco.image_ids):
        np.testing.assert_array_equal(coco.semantic_mask(i), sem[k].numpy())
        assert torch.equal(data.image_to_tensor(coco.load(i)), imgs[k])
    assert not torch.equal(imgs[0], imgs[1])
