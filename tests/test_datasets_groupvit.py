"""The GroupViT evaluation datasets (VOC, VOC trainaug, Pascal Context 60 / 59, COCO-Object, ADE20K) read from
tiny fixtures in their official layouts: every loader returns exactly what its fixture planted (class ids at
planted pixels, the 255 void band, the protocols' maps, ids in split order), and every bad input gives one
error naming the file."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nbsupport.data.captions import CaptionImages
from nbsupport.data.coco import CocoCaptions
from nbsupport.data.datasets import ade20k, coco_object, voc
from nbsupport.data.datasets.base import DatasetLayoutError, LabelError
from nbsupport.data.images import ImageLoadError

ALL = {**voc.DATASETS, **coco_object.DATASETS, **ade20k.DATASETS}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    base = tmp_path_factory.mktemp("groupvit_datasets")
    return {
        "voc": voc.write_fixture(base),
        "coco": coco_object.write_fixture(base),
        "ade": ade20k.write_fixture(base),
        "base": base,
    }


def _centre(box):
    y0, x0, y1, x1 = box
    return (y0 + y1) // 2, (x0 + x1) // 2


def test_local_registry_names_and_defaults(planted):
    """The names the modules provide (what the lead's registry joins), each constructible with its default
    split; no name is provided twice."""
    assert sorted(ALL) == ["ade20k", "coco_object", "context", "context59", "voc", "voc_aug"]
    assert len(ALL) == len(voc.DATASETS) + len(coco_object.DATASETS) + len(ade20k.DATASETS)
    roots = {**planted["voc"]["root"], "coco_object": planted["coco"]["root"], "ade20k": planted["ade"]["root"]}
    defaults = {"voc": "val", "voc_aug": "train_aug", "context": "val", "context59": "val"}
    for name, cls in ALL.items():
        ds = cls(roots[name], None)
        assert ds.name == name and ds.split == defaults.get(name, "val") and len(ds) >= 3


def test_class_lists_are_groupvits():
    assert (len(voc.VOC_CLASSES), voc.VOC_CLASSES[0], voc.VOC_CLASSES[-1]) == (21, "background", "monitor")
    assert voc.VOC_CLASSES[11] == "table" and voc.VOC_CLASSES[16] == "plant"
    assert voc.VOC_DEVKIT_CLASSES[11] == "diningtable" and voc.VOC_DEVKIT_CLASSES[-1] == "tvmonitor"
    assert (len(voc.CONTEXT_CLASSES), voc.CONTEXT_CLASSES[0], voc.CONTEXT_CLASSES[-1]) == (60, "background", "wood")
    assert (len(voc.CONTEXT59_CLASSES), voc.CONTEXT59_CLASSES[0]) == (59, "airplane")
    c = coco_object.COCO_OBJECT_CLASSES
    assert (len(c), c[0], c[1], c[12], c[17], c[-1]) == (81, "background", "person", "stop sign", "dog", "toothbrush")
    assert len(coco_object.COCO_THING_IDS) == 80 and coco_object.COCO_THING_IDS[11] == 13
    a = ade20k.ADE20K_CLASSES
    assert (len(a), a[0], a[7], a[-1]) == (150, "wall", "bed", "flag") and all(n == n.strip() for n in a)
    assert len(set(a)) == 150


# ------------------------------------------------------------------------------------------------------ VOC
def test_voc_returns_the_planted_labels(planted):
    p = planted["voc"]
    for split in ("train", "val"):
        ds = voc.PascalVOC(p["root"]["voc"], split)
        assert ds.ids == p["splits"]["voc"][split] and ds.num_classes == 21
        for i, image_id in enumerate(ds.ids):
            img, mask = ds[i]
            assert (img.height, img.width) == p["sizes"][image_id] and mask.dtype == np.int64
            np.testing.assert_array_equal(mask, p["masks"]["voc"][image_id])
            for value, box, _ in p["objects"]["voc"][image_id]:
                cy, cx = _centre(box)
                assert mask[cy, cx] == value  # palette index = class id
                assert mask[box[0] - 1, cx] == 255  # the void band just outside the top edge
                assert mask[box[0] - 3, cx] == 0  # background beyond it
                colour = np.asarray(img, float)[cy - 1 : cy + 2, cx - 1 : cx + 2].mean((0, 1))
                assert np.abs(colour - voc.fixture_colour(value)).max() < 25  # the JPEG shows the object
    sizes = {p["sizes"][i] for i in p["splits"]["voc"]["val"]}
    assert any(h > w for h, w in sizes) and any(w > h for h, w in sizes) and len(sizes) == 4
    with Image.open(p["root"]["voc"] / "SegmentationClass" / f"{ds.ids[0]}.png") as im:
        assert im.mode == "P"  # palette PNGs, as released


def test_voc_instances(planted):
    p = planted["voc"]
    ds = voc.PascalVOC(p["root"]["voc"], "val")
    img, sem, inst = ds.load_with_instances(1)
    np.testing.assert_array_equal(inst, p["instances"][ds.ids[1]])
    assert set(np.unique(inst)) == {0, 1, 2, 255} and ((inst == 255) == (sem == 255)).all()
    aug = voc.PascalVOCAug(p["root"]["voc_aug"])
    assert aug.instance_mask(0) is None  # an SBD-only image has no SegmentationObject PNG


def test_voc_aug_split_order_and_grey_labels(planted):
    p = planted["voc"]
    ds = voc.PascalVOCAug(p["root"]["voc_aug"])
    assert ds.split == "train_aug" and ds.ids == p["splits"]["voc_aug"]["train_aug"]
    assert ds.ids[:2] == ["2008_000019", "2008_000008"]  # file order, not sorted
    for i, image_id in enumerate(ds.ids):
        np.testing.assert_array_equal(ds[i][1], p["masks"]["voc_aug"][image_id])
    assert 255 not in ds[0][1] and 255 in ds[2][1]  # SBD labels have no void band, VOC's have
    with Image.open(p["root"]["voc"] / "SegmentationClassAug" / f"{ds.ids[0]}.png") as im:
        assert im.mode == "L"
    val = voc.PascalVOCAug(p["root"]["voc_aug"], "val")  # aug labels on VOC val = VOC's labels
    for i in range(len(val)):
        np.testing.assert_array_equal(val[i][1], voc.PascalVOC(p["root"]["voc"], "val")[i][1])


# -------------------------------------------------------------------------------------------------- Context
def test_context_60_and_59(planted):
    p = planted["voc"]
    for split in ("train", "val"):
        c60 = voc.PascalContext(p["root"]["context"], split)
        c59 = voc.PascalContext59(p["root"]["context59"], split)
        assert c60.ids == c59.ids == p["splits"]["context"][split]
        assert (c60.num_classes, c59.num_classes) == (60, 59)
        for i, image_id in enumerate(c60.ids):
            m60, m59 = c60[i][1], c59[i][1]
            np.testing.assert_array_equal(m60, p["masks"]["context"][image_id])
            np.testing.assert_array_equal(m59, p["masks"]["context59"][image_id])
            raw = p["raw"]["context"][image_id]
            assert (m60 == raw).all() and (m59[raw == 0] == 255).all() and (m59[raw > 0] == raw[raw > 0] - 1).all()
            for value, box, _ in p["objects"]["context"][image_id]:
                assert m60[_centre(box)] == value and m59[_centre(box)] == value - 1
    first = voc.PascalContext59(p["root"]["context59"], "train")[0][1]
    assert (first[:3] == 58).all()  # raw 59 "wood" -> 58, the last class of Context-59


# --------------------------------------------------------------------------------------------------- ADE20K
def test_ade20k_reduce_zero_label(planted):
    p = planted["ade"]
    for split, folder in (("train", "training"), ("val", "validation"), ("validation", "validation")):
        ds = ade20k.ADE20K(p["root"], split)
        key = "train" if folder == "training" else "val"
        assert ds.folder == folder and ds.ids == p["splits"][key] and ds.num_classes == 150
        for i, image_id in enumerate(ds.ids):
            mask = ds[i][1]
            np.testing.assert_array_equal(mask, p["masks"][image_id])
            raw = p["raw"][image_id]
            assert (mask[raw == 0] == 255).all()  # 0 = "other" -> ignore
            for value, box, _ in p["objects"][image_id]:
                assert mask[_centre(box)] == value - 1
    val0 = ade20k.ADE20K(p["root"], "val")[0][1]
    assert (val0[-3:] == 149).all() and ade20k.ADE20K_CLASSES[149] == "flag"  # raw 150 -> 149
    assert ade20k.ADE20K(p["root"]).ids[0] == "ADE_val_00000001"


# ---------------------------------------------------------------------------------------------- COCO-Object
def test_coco_object_from_instances_json(planted):
    p = planted["coco"]
    ds = coco_object.COCOObject(p["root"])
    assert ds.label_source_kind == "instances_json" and ds.ids == [139, 285, 632, 724] and ds.num_classes == 81
    masks = {}
    for i, image_id in enumerate(ds.ids):
        img, masks[image_id] = ds[i]
        assert (img.height, img.width) == p["sizes"][image_id]
        assert ds.image_path(image_id).name == f"{image_id:012d}.jpg"
        np.testing.assert_array_equal(masks[image_id], p["masks"][image_id])
        painted = np.full(p["sizes"][image_id], -1)
        for cls, (y0, x0, y1, x1) in p["objects"][image_id]:  # listed bottom to top
            painted[y0:y1, x0:x1] = cls
        drawn = painted >= 0  # polygons and RLE rasterise to exactly these boxes
        np.testing.assert_array_equal(masks[image_id][drawn], painted[drawn])
    m = masks[139]  # L-shaped polygon person (1) with a small compressed-RLE toothbrush (80) on it
    (_, upper), (_, lower), (_, small) = p["objects"][139]
    assert (m[small[0] : small[2], small[1] : small[3]] == 80).all()  # listed first, but smaller: on top
    assert m[lower[0], lower[3]] == 0  # the notch of the L is background
    assert set(np.unique(m)) == {0, 1, 80}
    m = masks[285]  # crowd (uncompressed RLE) -> 255; a two-part polygon dog (17) over it
    assert set(np.unique(m)) == {0, 17, 255} and m[_centre(p["objects"][285][0][1])] == 17
    assert set(np.unique(masks[632])) == {0, 12} and (masks[724] == 0).all()


def test_coco_object_prefers_groupvit_pngs(tmp_path):
    p = coco_object.write_fixture(tmp_path, groupvit_labels=True)
    ds = coco_object.COCOObject(p["root"])
    assert ds.label_source_kind == "groupvit_png" and ds.ids == p["val_ids"]
    assert ds.label_path(139).name == "000000000139_instanceTrainIds.png"
    for i, image_id in enumerate(ds.ids):
        np.testing.assert_array_equal(ds[i][1], p["png_masks"][image_id])
    assert (ds[3][1][:6, :6] == 80).all()  # only the PNG has this square
    assert 255 not in ds[1][1]  # GroupViT's conversion writes void as background
    forced = coco_object.COCOObject(p["root"], labels="instances_json")
    assert forced.label_source_kind == "instances_json" and (forced[3][1] == 0).all()
    # GroupViT's own tree: images/val2017 and the PNGs, without the instances JSON; ids from the image folder
    (p["root"] / "annotations" / "instances_val2017.json").unlink()
    shutil.move(p["root"] / "val2017", p["root"] / "images" / "val2017")
    bare = coco_object.COCOObject(p["root"])
    assert bare.ids == p["val_ids"] and bare.label_source_kind == "groupvit_png"
    np.testing.assert_array_equal(bare[0][1], p["png_masks"][139])
    with pytest.raises(DatasetLayoutError, match="instances_val2017.json"):
        coco_object.COCOObject(p["root"], labels="instances_json")


def test_coco_object_layout_errors(tmp_path):
    p = coco_object.write_fixture(tmp_path)
    with pytest.raises(DatasetLayoutError, match="instanceTrainIds"):
        coco_object.COCOObject(p["root"], labels="groupvit_png")
    with pytest.raises(ValueError, match="split"):
        coco_object.COCOObject(p["root"], "test")
    ann = p["root"] / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["segmentation"]["size"] = [10, 10]  # an RLE of another size: undecodable
    ann.write_text(json.dumps(data))
    with pytest.raises(LabelError, match=r"instances_val2017\.json \(image id 139\): annotation 1: unreadable"):
        coco_object.COCOObject(p["root"])[0]
    data["images"][0].update(height=50, width=50)  # image 632's record disagrees with its JPEG (56 x 40)
    ann.write_text(json.dumps(data))
    with pytest.raises(LabelError, match=r"\(image id 632\): labels are 50x50 px but the image .*000000000632\.jpg"):
        coco_object.COCOObject(p["root"])[2]
    data["categories"] = data["categories"][:20]
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetLayoutError, match="80 thing categories"):
        coco_object.COCOObject(p["root"])
    shutil.rmtree(p["root"] / "val2017")
    with pytest.raises(DatasetLayoutError, match="val2017"):
        coco_object.COCOObject(p["root"])


def test_coco_captions_files(planted):
    """The captions files of the fixture read through the GroupViT fine-tuning readers, images found in the
    official ``train2017/`` beside ``annotations/`` by default."""
    p = planted["coco"]
    ann = p["root"] / "annotations" / "captions_train2017.json"
    caps = CocoCaptions(ann)
    assert caps.image_ids == p["train_ids"] == [9, 25, 30]
    assert all(caps.captions(i) == p["captions"][i] for i in caps.image_ids)
    ds = CaptionImages(ann, image_size=32)
    assert ds.root == p["root"] / "train2017" and len(ds) == 3
    x, texts = ds[0]
    assert x.shape == (3, 32, 32) and texts == p["captions"][9]
    val = CaptionImages(p["root"] / "annotations" / "captions_val2017.json", image_size=16)
    assert val.root == p["root"] / "val2017" and [im["id"] for im in val.images] == list(coco_object.COCO_FIXTURE_VAL)
    with pytest.raises(FileNotFoundError, match="image folder"):
        CaptionImages(ann, p["root"] / "nowhere")


# --------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture
def fresh(tmp_path):
    return {"voc": voc.write_fixture(tmp_path), "ade": ade20k.write_fixture(tmp_path), "base": tmp_path}


def test_missing_split_files_are_named(fresh):
    roots = fresh["voc"]["root"]
    (roots["voc"] / "ImageSets/Segmentation/train_aug.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"ImageSets/Segmentation/train_aug\.txt not found"):
        voc.PascalVOCAug(roots["voc_aug"])
    with pytest.raises(DatasetLayoutError, match=r"test\.txt not found.*splits in .*\['train', 'trainval', 'val'\]"):
        voc.PascalVOC(roots["voc"], "test")
    (roots["context"] / "ImageSets/SegmentationContext/val.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"SegmentationContext/val\.txt not found"):
        voc.PascalContext59(roots["context59"])
    with pytest.raises(DatasetLayoutError, match="not a folder"):
        voc.PascalVOC(fresh["base"] / "VOCdevkit" / "VOC2007")
    shutil.rmtree(fresh["ade"]["root"] / "annotations" / "validation")
    with pytest.raises(DatasetLayoutError, match=r"annotations/validation not found"):
        ade20k.ADE20K(fresh["ade"]["root"], "val")
    with pytest.raises(ValueError, match="split must be one of"):
        ade20k.ADE20K(fresh["ade"]["root"], "test")


def _grey(path: Path, arr) -> None:
    Image.fromarray(np.asarray(arr, np.uint8), "L").save(path)


def test_label_size_and_values_are_checked(fresh):
    roots = fresh["voc"]["root"]
    ds = voc.PascalVOC(roots["voc"], "val")
    png = roots["voc"] / "SegmentationClass" / f"{ds.ids[0]}.png"
    h, w = fresh["voc"]["sizes"][ds.ids[0]]
    _grey(png, np.zeros((h + 2, w)))
    with pytest.raises(LabelError, match=rf"{png.name}: labels are {w}x{h + 2} px but the image .*{ds.ids[0]}\.jpg"):
        ds[0]
    _grey(png, np.full((h, w), 21))  # VOC has ids 0..20 and 255
    with pytest.raises(LabelError, match=rf"{png.name}: class ids \[21\] outside 0..20"):
        ds[0]
    c59 = voc.PascalContext59(roots["context59"], "val")
    png = roots["context"] / "SegmentationClassContext" / f"{c59.ids[1]}.png"
    raw = fresh["voc"]["raw"]["context"][c59.ids[1]].copy()
    raw[0, 0] = 60
    _grey(png, raw)
    with pytest.raises(LabelError, match=rf"{png.name}: raw label values \[60\] are not in the label map"):
        c59[1]
    ade = ade20k.ADE20K(fresh["ade"]["root"], "train")
    png = fresh["ade"]["root"] / "annotations" / "training" / f"{ade.ids[2]}.png"
    _grey(png, np.full(fresh["ade"]["sizes"][ade.ids[2]], 151))
    with pytest.raises(LabelError, match=rf"{png.name}: raw label values \[151\]"):
        ade[2]


def test_coco_png_values_are_checked(tmp_path):
    p = coco_object.write_fixture(tmp_path, groupvit_labels=True)
    png = p["root"] / "annotations" / "val2017" / "000000000632_instanceTrainIds.png"
    _grey(png, np.full(p["sizes"][632], 81))
    with pytest.raises(LabelError, match=rf"{png.name}: class ids \[81\] outside 0..80"):
        coco_object.COCOObject(p["root"])[2]


def test_corrupt_and_missing_files_are_named(fresh):
    roots = fresh["voc"]["root"]
    ds = voc.PascalVOC(roots["voc"], "train")
    jpg = roots["voc"] / "JPEGImages" / f"{ds.ids[1]}.jpg"
    jpg.write_bytes(jpg.read_bytes()[:40])  # a truncated JPEG
    with pytest.raises(ImageLoadError, match=rf"{jpg.name}"):
        ds[1]
    (roots["voc"] / "SegmentationClass" / f"{ds.ids[2]}.png").unlink()
    with pytest.raises(ImageLoadError, match=rf"{ds.ids[2]}\.png: label file does not exist"):
        ds[2]
    ade = ade20k.ADE20K(fresh["ade"]["root"], "val")
    jpg = ade.image_path(ade.ids[0])
    jpg.write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageLoadError, match=rf"{jpg.name}.*not an image"):
        ade[0]


# ------------------------------------------------------------------------------------------------ fixtures
def test_fixtures_are_deterministic_and_tiny(tmp_path):
    t = time.perf_counter()
    for seed_dir in ("a", "b"):
        voc.write_fixture(tmp_path / seed_dir, seed=0)
        coco_object.write_fixture(tmp_path / seed_dir, seed=0, groupvit_labels=True)
        ade20k.write_fixture(tmp_path / seed_dir, seed=0)
    elapsed = (time.perf_counter() - t) / 2
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert sum((tmp_path / "a" / f).stat().st_size for f in files) < 300_000 and elapsed < 3
    other = voc.write_fixture(tmp_path / "c", seed=1)
    first = voc.PascalVOC(other["root"]["voc"], "val").ids[0]
    assert not np.array_equal(other["masks"]["voc"][first], voc.write_fixture(tmp_path / "d")["masks"]["voc"][first])
