"""The frozen-feature probe datasets (COCO-Stuff-27, Cityscapes-27, Potsdam-3) on fixtures in their official
layouts: planted labels come back mapped by STEGO's protocol, splits in file order, bad input gives one
clear error naming the file."""

import numpy as np
import pytest
from PIL import Image

from nbsupport.data.datasets import cityscapes, cocostuff, potsdam
from nbsupport.data.datasets.base import IGNORE, DatasetLayoutError, LabelError
from nbsupport.data.images import ImageLoadError

# COCO's thing supercategories by fine id (stuffthingmaps value = COCO category id - 1), from the COCO 2017
# category list: an independent check of STEGO's table for all 91 thing ids.
COCO_THING_SUPERCATEGORIES = {
    "person": range(0, 1), "vehicle": range(1, 9), "outdoor": range(9, 15), "animal": range(15, 25),
    "accessory": range(25, 33), "sports": range(33, 43), "kitchen": range(43, 51), "food": range(51, 61),
    "furniture": range(61, 71), "electronic": range(71, 77), "appliance": range(77, 83), "indoor": range(83, 91),
}  # fmt: skip
# COCO-Stuff's stuff supercategories by fine id (91 banner .. 181 wood, the alphabetical stuff labels 92..182
# minus one), from its label hierarchy: an independent check of STEGO's table for all 91 stuff ids.
COCO_STUFF_SUPERCATEGORIES = {
    "textile": (91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167),  # banner, blanket, cloth, ..., towel
    "plant": (93, 96, 118, 123, 128, 133, 141, 162, 168),  # branch, bush, flower, grass, ..., tree
    "building": (94, 95, 127, 150, 157, 165),  # bridge, building-other, house, roof, skyscraper, tent
    "furniture-stuff": (97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164),  # cabinet, counter, ..., table
    "structural": (98, 112, 137, 145, 163),  # cage, fence, net, railing, structural-other
    "rawmaterial": (99, 131, 138, 142),  # cardboard, metal, paper, plastic
    "floor": (100, 113, 114, 115, 116, 117),  # carpet, floor-marble, -other, -stone, -tile, -wood
    "ceiling": (101, 102),  # ceiling-other, ceiling-tile
    "sky": (105, 156),  # clouds, sky-other
    "ground": (110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158),  # dirt, gravel, ..., road, sand, snow
    "water": (119, 147, 154, 177, 178),  # fog, river, sea, water-other, waterdrops
    "food-stuff": (120, 121, 152, 169),  # food-other, fruit, salad, vegetable
    "solid": (126, 134, 149, 159, 161, 181),  # hill, mountain, rock, solid-other, stone, wood
    "wall": (170, 171, 172, 173, 174, 175, 176),  # wall-brick, -concrete, -other, -panel, -stone, -tile, -wood
    "window": (179, 180),  # window-blind, window-other
}
# cityscapesScripts labels.py: labelId -> name for the 27 non-void labels.
CITYSCAPES_LABELS = {
    7: "road", 8: "sidewalk", 9: "parking", 10: "rail track", 11: "building", 12: "wall", 13: "fence",
    14: "guard rail", 15: "bridge", 16: "tunnel", 17: "pole", 18: "polegroup", 19: "traffic light",
    20: "traffic sign", 21: "vegetation", 22: "terrain", 23: "sky", 24: "person", 25: "rider", 26: "car",
    27: "truck", 28: "bus", 29: "caravan", 30: "trailer", 31: "train", 32: "motorcycle", 33: "bicycle",
}  # fmt: skip


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return cocostuff.write_fixture(tmp_path_factory.mktemp("coco"), seed=1)


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    return cityscapes.write_fixture(tmp_path_factory.mktemp("city"), seed=1)


@pytest.fixture(scope="module")
def pots(tmp_path_factory):
    return potsdam.write_fixture(tmp_path_factory.mktemp("pots"), seed=1)


def _read_png(path):
    with Image.open(path) as im:
        return np.asarray(im)


def index_of(ds, image_id):
    return ds.ids.index(image_id)


# -- COCO-Stuff-27


def test_cocostuff_splits_use_stegos_curated_lists(coco):
    val = cocostuff.CocoStuff27(coco["root"], "val")
    assert val.ids == coco["ids"]["val"] == ["val2017/000000000632", "val2017/000000000139", "val2017/000000000285"]
    assert val.image_list == "Coco164kFull_Stuff_Coarse_7.txt"
    train = cocostuff.CocoStuff27(coco["root"], "train")
    assert train.ids == coco["ids"]["train"] and train.image_list == "Coco164kFull_Stuff_Coarse.txt"
    full = cocostuff.CocoStuff27(coco["root"], "val", image_list="Coco164kFull_Stuff_Coarse.txt")
    assert full.ids == coco["ids"]["val_full"] and len(full) == 4
    both = cocostuff.CocoStuff27(coco["root"], "train+val")
    assert both.ids == coco["ids"]["train"] + coco["ids"]["val_full"]  # STEGO: train+val uses the full lists
    assert val.num_classes == 27 and val.name == "cocostuff27"


def test_cocostuff_class_names_are_stegos():
    assert len(cocostuff.STEGO_CLASS_NAMES) == 27 and cocostuff.STEGO_CLASS_NAMES[9] == "person"
    assert cocostuff.STEGO_CLASS_NAMES[14] == cocostuff.STEGO_CLASS_NAMES[2] == "food"
    names = cocostuff.CocoStuff27.classes
    assert len(set(names)) == 27  # the repeated stuff names are told apart
    assert [n.removesuffix("-stuff") for n in names] == list(cocostuff.STEGO_CLASS_NAMES)
    assert names[12:16] == ("ceiling", "floor", "food-stuff", "furniture-stuff")


def test_cocostuff_fine_to_coarse_agrees_with_coco_supercategories():
    names = cocostuff.CocoStuff27.classes
    table = cocostuff.FINE_TO_COARSE
    assert sorted(table) == list(range(182))
    for supercategory, fines in COCO_THING_SUPERCATEGORIES.items():
        for f in fines:
            assert names[table[f]] == supercategory, f
            assert table[f] < cocostuff.NUM_THINGS
    stuff = [f for fines in COCO_STUFF_SUPERCATEGORIES.values() for f in fines]
    assert sorted(stuff) == list(range(91, 182))
    for supercategory, fines in COCO_STUFF_SUPERCATEGORIES.items():
        for f in fines:
            assert names[table[f]] == supercategory, f
            assert table[f] >= cocostuff.NUM_THINGS
    assert {table[f] for f in range(182)} == set(range(27))


def test_cocostuff_every_planted_fine_id_is_mapped(coco):
    ds = cocostuff.CocoStuff27(coco["root"], "val")
    img, mask = ds[index_of(ds, coco["mosaic"])]
    assert mask.dtype == np.int64 and mask.shape == (42, 42) and img.size == (42, 42)
    for f in range(182):
        r, c = divmod(f, 14)
        cell = mask[3 * r : 3 * r + 3, 3 * c : 3 * c + 3]
        assert (cell == cocostuff.FINE_TO_COARSE[f]).all(), f
    assert (mask[-3:] == IGNORE).all()  # the 14 cells after the 182nd are unlabeled


def test_cocostuff_scenes_match_the_planted_maps(coco):
    for split in ("train", "val"):
        ds = cocostuff.CocoStuff27(coco["root"], split, image_list="Coco164kFull_Stuff_Coarse.txt")
        for i, image_id in enumerate(ds.ids):
            fine = coco["fine"][image_id]
            img, mask = ds[i]
            assert (img.height, img.width) == fine.shape == coco["sizes"][image_id]
            assert (mask[fine == 255] == IGNORE).all() and (fine == 255).any()
            for f in np.unique(fine[fine != 255]):
                assert (mask[fine == f] == cocostuff.FINE_TO_COARSE[int(f)]).all()
            if image_id != coco["mosaic"]:  # the picture shows the regions of the map
                rgb = np.asarray(img, dtype=float)
                means = [rgb[fine == v].mean(0) for v in np.unique(fine)]
                assert min(np.abs(a - b).max() for k, a in enumerate(means) for b in means[k + 1 :]) > 20
    assert cocostuff.CocoStuff27(coco["root"], "train")[1][0].height == 30  # the portrait 20 x 30


def test_cocostuff_fixture_is_deterministic(tmp_path):
    a = cocostuff.write_fixture(tmp_path / "a", seed=3)
    b = cocostuff.write_fixture(tmp_path / "b", seed=3)
    c = cocostuff.write_fixture(tmp_path / "c", seed=4)
    name = "images/val2017/000000000139.jpg"
    assert (a["root"] / name).read_bytes() == (b["root"] / name).read_bytes() != (c["root"] / name).read_bytes()
    assert all((a["fine"][k] == b["fine"][k]).all() for k in a["fine"])


def test_cocostuff_bad_inputs_name_the_file(tmp_path):
    fix = cocostuff.write_fixture(tmp_path)
    root = fix["root"]
    with pytest.raises(ValueError, match="split must be one of"):
        cocostuff.CocoStuff27(root, "test")
    (root / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"val2017/Coco164kFull_Stuff_Coarse_7\.txt"):
        cocostuff.CocoStuff27(root, "val")
    with pytest.raises(DatasetLayoutError, match="is not a folder"):
        cocostuff.CocoStuff27(tmp_path / "nowhere", "val")
    (root / "images/train2017/000000000025.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match=r"000000000025\.jpg \(listed in Coco164kFull_Stuff_Coarse\.txt\)"):
        cocostuff.CocoStuff27(root, "train")

    ds = cocostuff.CocoStuff27(root, "val", image_list="Coco164kFull_Stuff_Coarse.txt")
    ann = root / "annotations/val2017"
    lab = _read_png(ann / "000000000139.png").copy()
    Image.fromarray(lab[:, :-2]).save(ann / "000000000139.png")  # 38 px wide, image 40
    with pytest.raises(
        LabelError, match=r"000000000139\.png: labels are 38x30 px but the image .*000000000139\.jpg is 40x30"
    ):
        ds[index_of(ds, "val2017/000000000139")]
    lab = _read_png(ann / "000000000285.png").copy()
    lab[0, 0] = 200  # not a stuffthingmaps id
    Image.fromarray(lab).save(ann / "000000000285.png")
    with pytest.raises(LabelError, match=r"000000000285\.png: raw label values \[200\] are not stuffthingmaps ids"):
        ds[index_of(ds, "val2017/000000000285")]
    (root / "images/val2017/000000000724.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageLoadError, match=r"000000000724\.jpg"):
        ds[index_of(ds, "val2017/000000000724")]
    assert ds[index_of(ds, "val2017/000000000632")][1].shape == (42, 42)  # the others still load


# -- Cityscapes-27


def test_cityscapes_ids_sorted_by_city_then_file(city):
    val = cityscapes.Cityscapes27(city["root"], "val")
    assert val.ids == [
        "frankfurt/frankfurt_000000_000294",
        "frankfurt/frankfurt_000000_000576",
        "lindau/lindau_000000_000019",
        "munster/munster_000000_000019",
    ]
    train = cityscapes.Cityscapes27(city["root"], "train")
    assert train.ids == ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019", "bochum/bochum_000000_000313"]
    assert val.label_path(val.ids[0]).name == "frankfurt_000000_000294_gtFine_labelIds.png"


def test_cityscapes_label_ids_map_to_27_classes(city):
    ds = cityscapes.Cityscapes27(city["root"], "val")
    img, mask = ds[index_of(ds, city["mosaic"])]
    assert mask.shape == (6, 51) and img.size == (51, 6)
    for v in range(34):
        r, c = divmod(v, 17)
        cell = mask[3 * r : 3 * r + 3, 3 * c : 3 * c + 3]
        if v < 7:  # unlabeled, ego vehicle, rectification border, out of roi, static, dynamic, ground
            assert (cell == IGNORE).all(), v
        else:
            assert (cell == v - 7).all(), v
            assert ds.classes[v - 7] == CITYSCAPES_LABELS[v]
    assert ds.num_classes == 27


def test_cityscapes_streets_match_the_planted_maps(city):
    for split in ("train", "val"):
        ds = cityscapes.Cityscapes27(city["root"], split)
        for i, image_id in enumerate(ds.ids):
            planted = city["label_ids"][image_id]
            img, mask = ds[i]
            assert (img.height, img.width) == planted.shape == city["sizes"][image_id]
            expected = np.where(planted >= 7, planted.astype(np.int64) - 7, IGNORE)
            np.testing.assert_array_equal(mask, expected)
    ds = cityscapes.Cityscapes27(city["root"], "val")
    _, mask = ds[index_of(ds, "lindau/lindau_000000_000019")]  # the portrait
    assert mask.shape == (32, 18) and ds.classes[mask[-3, 5]] == "road" and mask[-1, 5] == IGNORE  # ego vehicle
    assert "car" in {ds.classes[c] for c in np.unique(mask) if c != IGNORE}


def test_cityscapes_bad_inputs_name_the_file(tmp_path):
    fix = cityscapes.write_fixture(tmp_path)
    root = fix["root"]
    gt = root / "gtFine/val/frankfurt"
    lab = _read_png(gt / "frankfurt_000000_000294_gtFine_labelIds.png").copy()
    lab[0, 0] = 40
    Image.fromarray(lab).save(gt / "frankfurt_000000_000294_gtFine_labelIds.png")
    Image.fromarray(np.zeros((16, 30), np.uint8)).save(gt / "frankfurt_000000_000576_gtFine_labelIds.png")
    ds = cityscapes.Cityscapes27(root, "val")
    with pytest.raises(
        LabelError, match=r"000294_gtFine_labelIds\.png: raw label values \[40\] are not Cityscapes labelIds"
    ):
        ds[0]
    with pytest.raises(LabelError, match=r"000576_gtFine_labelIds\.png: labels are 30x16 px but the image .* is 32x16"):
        ds[1]
    (root / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ImageLoadError, match=r"lindau_000000_000019_leftImg8bit\.png"):
        ds[2]
    (root / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelIds.png").unlink()
    with pytest.raises(
        DatasetLayoutError, match=r"1 images have no label file, e\.g\. .*bochum_000000_000313_gtFine_labelIds\.png"
    ):
        cityscapes.Cityscapes27(root, "train")
    (root / "gtFine/val").rename(root / "gtFine/val_moved")
    with pytest.raises(DatasetLayoutError, match=r"folder .*gtFine/val not found"):
        cityscapes.Cityscapes27(root, "val")


# -- Potsdam-3


def test_potsdam_splits_are_stegos_files(pots):
    files = pots["ids"]
    for split, names in potsdam.SPLIT_FILES.items():
        ds = potsdam.Potsdam3(pots["root"], split)
        assert ds.ids == [i for n in names for i in files[n]], split
    assert potsdam.Potsdam3(pots["root"], "val").ids == ["3080", "12"]
    assert potsdam.Potsdam3(pots["root"], "train+val").ids == ["731", "5", "3080", "12"]
    with pytest.raises(ValueError, match="split must be one of"):
        potsdam.Potsdam3(pots["root"], "test")


def test_potsdam_image_is_the_rgb_of_the_four_channel_tile(pots):
    ds = potsdam.Potsdam3(pots["root"], "all")
    for i, image_id in enumerate(ds.ids):
        img, mask = ds[i]
        stored = pots["rgbir"][image_id]
        assert stored.shape[2] == 4 and img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), stored[..., :3])
        assert (img.height, img.width) == mask.shape == pots["sizes"][image_id]
    assert ds[ds.ids.index("3080")][0].size == (18, 28)  # the portrait tile


def test_potsdam_six_classes_group_into_three(pots):
    ds = potsdam.Potsdam3(pots["root"], "train+val")
    by_name = {"road": "roads and cars", "car": "roads and cars", "building": "buildings and clutter",
               "clutter": "buildings and clutter", "low vegetation": "trees and vegetation",
               "tree": "trees and vegetation"}  # fmt: skip
    seen = set()
    for i, image_id in enumerate(ds.ids):
        gt = pots["gt"][image_id]
        _, mask = ds[i]
        for f in np.unique(gt):
            coarse = np.unique(mask[gt == f])
            assert len(coarse) == 1 and ds.classes[coarse[0]] == by_name[potsdam.FINE_NAMES[f]]
            seen.add(int(f))
        assert IGNORE not in mask
    assert seen == set(range(6))


def test_potsdam_unlabelled_tiles_are_ignored(pots):
    ds = potsdam.Potsdam3(pots["root"], "unlabelled_train")
    for i in range(len(ds)):
        img, mask = ds[i]
        assert (mask == IGNORE).all() and mask.shape == (img.height, img.width)
    assert "absent: unlabelled tile" in ds.label_source("901")
    full = potsdam.Potsdam3(pots["root"], "all")
    assert (full[full.ids.index("44")][1] == IGNORE).all() and (full[full.ids.index("5")][1] != IGNORE).all()


def test_potsdam_bad_inputs_name_the_file(tmp_path):
    from scipy.io import savemat

    fix = potsdam.write_fixture(tmp_path)
    root = fix["root"]
    (root / "labelled_test.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"labelled_test\.txt not found"):
        potsdam.Potsdam3(root, "val")
    (root / "gt/731.mat").unlink()
    with pytest.raises(DatasetLayoutError, match=r"gt/731\.mat \(listed in labelled_train\.txt\) not found"):
        potsdam.Potsdam3(root, "train")
    ds = potsdam.Potsdam3(root, "all")
    gt = fix["gt"]["5"].copy()
    gt[0, 0] = 7
    savemat(str(root / "gt/5.mat"), {"gt": gt})
    with pytest.raises(LabelError, match=r"gt/5\.mat: raw label values \[7\] are not Potsdam classes"):
        ds[ds.ids.index("5")]
    savemat(str(root / "gt/12.mat"), {"gt": fix["gt"]["12"][:, :-1]})
    with pytest.raises(LabelError, match=r"gt/12\.mat: labels are 19x20 px but the image .*imgs/12\.mat is 20x20"):
        ds[ds.ids.index("12")]
    (root / "imgs/3080.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(ImageLoadError, match=r"imgs/3080\.mat: unreadable \.mat file"):
        ds[ds.ids.index("3080")]
    savemat(str(root / "imgs/44.mat"), {"image": fix["rgbir"]["44"]})
    with pytest.raises(ImageLoadError, match=r"imgs/44\.mat: no 'img' array .*\['image'\]"):
        ds[ds.ids.index("44")]
    savemat(str(root / "imgs/901.mat"), {"img": fix["rgbir"]["901"].astype(np.float32) / 255})
    with pytest.raises(ImageLoadError, match=r"imgs/901\.mat: 'img' must be uint8"):
        ds[ds.ids.index("901")]
