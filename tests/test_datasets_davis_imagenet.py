"""DAVIS-2017 videos, the ImageNet train folder and CutLER's pseudo-label JSON on fixtures in their official
layouts: planted frames, objects and sizes come back exactly; bad input gives one clear error naming the file."""

import json

import numpy as np
import pytest
from PIL import Image

from nbsupport.data.coco import read_coco_json
from nbsupport.data.datasets import davis, imagenet
from nbsupport.data.datasets.base import DatasetLayoutError, LabelError
from nbsupport.data.images import ImageLoadError


@pytest.fixture(scope="module")
def dav(tmp_path_factory):
    return davis.write_fixture(tmp_path_factory.mktemp("davis"), seed=1)


@pytest.fixture(scope="module")
def inet(tmp_path_factory):
    return imagenet.write_fixture(tmp_path_factory.mktemp("inet"), seed=1)


# -- DAVIS-2017


def test_davis_lists_videos_in_split_order(dav):
    val = davis.Davis2017(dav["root"], "val")
    assert val.videos == ["dogs-jump", "bike-packing"] == dav["videos"]["val"]
    assert [v.name for v in val] == val.videos and len(val) == 2
    assert val[1] is val["bike-packing"]
    assert davis.Davis2017(dav["root"], "train").videos == ["bear"]
    with pytest.raises(KeyError, match="no video 'bear'"):
        val["bear"]


def test_davis_frames_annotations_and_objects(dav):
    for split in ("val", "train"):
        for video in davis.Davis2017(dav["root"], split):
            h, w = dav["sizes"][video.name]
            assert video.frame_ids == dav["frames"][video.name]
            assert video.num_objects == dav["num_objects"][video.name]
            assert video.object_ids == list(range(1, video.num_objects + 1))
            for i in range(len(video)):
                frame = video.frame(i)
                assert frame.mode == "RGB" and frame.size == (w, h)
                ann = video.annotation(i)
                assert ann.dtype == np.int64
                np.testing.assert_array_equal(ann, dav["annotations"][video.name][i])
    v = davis.Davis2017(dav["root"], "val")["bike-packing"]
    assert v.frame_ids == ["00000", "00001", "00002", "00003"] and v.num_objects == 2
    with Image.open(v.annotation_path(0)) as im:
        assert im.mode == "P"  # palette PNGs, read as indices
    assert davis.Davis2017(dav["root"], "val")["dogs-jump"].frame(0).size == (32, 48)  # the portrait


def test_davis_void_is_kept_and_not_an_object(dav):
    v = davis.Davis2017(dav["root"], "val")["dogs-jump"]
    ann = v.annotation(2)
    assert (ann == 255).any() and set(np.unique(ann).tolist()) == {0, 1, 2, 255}
    assert v.num_objects == 2
    frame = np.asarray(v.frame(2), dtype=float)  # void pixels show the background, objects their colour
    assert np.abs(frame[ann == 255].mean(0) - frame[ann == 0].mean(0)).max() < 15
    assert np.abs(frame[ann == 1].mean(0) - frame[ann == 0].mean(0)).max() > 30


def test_davis_objects_still_then_moving(dav):
    for name in ("bike-packing", "dogs-jump"):
        v = davis.Davis2017(dav["root"], "val")[name]
        for k in (1, 2):
            cy = [np.argwhere(v.annotation(t) == k).mean(0) for t in range(4)]
            np.testing.assert_allclose(cy[0], cy[1])  # frames 0 and 1: still
            step1, step2 = cy[2] - cy[1], cy[3] - cy[2]
            assert np.abs(step1).max() >= 1.5 and np.abs(step2).max() >= 1.5, (name, k)  # then moving
            planted = np.array(dav["centres"][name])[:, k - 1]
            assert (np.diff(planted, axis=0)[1:] != 0).any(axis=1).all()


def test_davis_bad_inputs_name_the_file(tmp_path):
    fix = davis.write_fixture(tmp_path)
    root = fix["root"]
    with pytest.raises(ValueError, match="split must be one of"):
        davis.Davis2017(root, "test")
    with pytest.raises(DatasetLayoutError, match=r"ImageSets/2017/test-dev\.txt not found"):
        davis.Davis2017(root, "test-dev")
    ann_dir = root / "Annotations/480p/bike-packing"
    (ann_dir / "00002.png").rename(tmp_path / "00002.png")
    with pytest.raises(DatasetLayoutError, match=r"bike-packing.*1 frame\(s\) lack an annotation, e\.g\. .*00002\.png"):
        davis.Davis2017(root, "val")
    # test-dev gives only the first frame's masks: the others may be absent, and asking for one says so
    (root / "ImageSets/2017/test-dev.txt").write_text("bike-packing\n")
    v = davis.Davis2017(root, "test-dev")["bike-packing"]
    assert v.num_objects == 2 and v.has_annotation(0) and not v.has_annotation(2)
    with pytest.raises(DatasetLayoutError, match=r"frame 00002 has no annotation .*00002\.png"):
        v.annotation(2)
    (tmp_path / "00002.png").rename(ann_dir / "00002.png")

    pal = davis.davis_palette()
    small = Image.fromarray(np.zeros((10, 10), np.uint8), "P")
    small.putpalette(pal)
    small.save(ann_dir / "00001.png")
    with Image.open(ann_dir / "00000.png") as im:
        arr = np.array(im)
    arr[0, 0] = 3  # a third object appears after the first frame
    bad = Image.fromarray(arr, "P")
    bad.putpalette(pal)
    bad.save(ann_dir / "00003.png")
    v = davis.Davis2017(root, "val")["bike-packing"]
    with pytest.raises(LabelError, match=r"00001\.png: annotation is 10x10 px but frame .*00001\.jpg is 48x36"):
        v.annotation(1)
    with pytest.raises(LabelError, match=r"00003\.png: object ids \[3\] are not among the video's objects 1\.\.2"):
        v.annotation(3)
    Image.fromarray(np.zeros((36, 48, 3), np.uint8)).save(ann_dir / "00002.png")  # an RGB "annotation"
    with pytest.raises(ImageLoadError, match=r"00002\.png: label PNG must be single-channel"):
        v.annotation(2)
    (root / "JPEGImages/480p/bike-packing/00000.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(ImageLoadError, match=r"bike-packing/00000\.jpg"):
        v.frame(0)
    (root / "Annotations/480p/bike-packing/00009.png").write_bytes(ann_dir.joinpath("00000.png").read_bytes())
    with pytest.raises(DatasetLayoutError, match=r"annotation .*00009\.png has no frame .*00009\.jpg"):
        davis.Davis2017(root, "val")
    (root / "JPEGImages/480p/dogs-jump").rename(tmp_path / "dogs-jump")
    with pytest.raises(DatasetLayoutError, match=r"'dogs-jump': frame folder .*JPEGImages/480p/dogs-jump not found"):
        davis.Davis2017(root, "val")


# -- ImageNet folder


def test_imagenet_listing_order_and_classes(inet):
    ds = imagenet.ImageNetFolder(inet["root"])
    assert (
        ds.files
        == inet["files"]
        == [
            "n01440764/n01440764_10026.JPEG",
            "n01440764/n01440764_10027.JPEG",
            "n01443537/n01443537_10007.JPEG",
            "n01443537/n01443537_10014.JPEG",
        ]
    )
    assert ds.labels == ["n01440764", "n01440764", "n01443537", "n01443537"] == inet["labels"]
    assert ds.wnids == ["n01440764", "n01443537"] and ds.class_index == {"n01440764": 0, "n01443537": 1}
    assert ds.image_root == inet["root"] / "train" and ds.pseudo_label_path == inet["json"]
    for i, name in enumerate(ds.files):
        img, wnid = ds[i]
        h, w = inet["sizes"][name]
        assert img.mode == "RGB" and img.size == (w, h) and wnid == name.split("/")[0]
    assert ds[1][0].size == (24, 36)  # the portrait


def test_imagenet_bad_layouts(tmp_path):
    fix = imagenet.write_fixture(tmp_path)
    with pytest.raises(DatasetLayoutError, match=r"folder .*imagenet/train/train not found"):
        imagenet.ImageNetFolder(fix["root"] / "train")  # the train folder itself passed as the root
    (fix["root"] / "train" / "annotations").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"not WordNet ids .*\['annotations'\]"):
        imagenet.ImageNetFolder(fix["root"])
    (fix["root"] / "train" / "annotations").rmdir()
    (fix["root"] / "train/n01440764/n01440764_10026.JPEG").write_bytes(b"\xff\xd8 broken")
    ds = imagenet.ImageNetFolder(fix["root"])
    with pytest.raises(ImageLoadError, match=r"n01440764_10026\.JPEG"):
        ds[0]


# -- CutLER's pseudo-label file


def test_cutler_fixture_swaps_sizes_as_released(inet):
    raw = read_coco_json(inet["json"])
    assert inet["json"].name == "imagenet_train_fixsize480_tau0.15_N3.json"
    for im in raw["images"]:
        h, w = inet["sizes"][im["file_name"]]
        assert (im["width"], im["height"]) == (h, w)  # as CutLER's MaskCut writes them: swapped
    for a in raw["annotations"]:
        name = raw["images"][a["image_id"] - 1]["file_name"]
        assert (
            tuple(a["segmentation"]["size"]) == inet["sizes"][name] and (a["height"], a["width"]) == inet["sizes"][name]
        )
    assert len(raw["annotations"]) == 5 and inet["swapped"] == 3


def test_read_pseudo_labels_fixes_sizes_from_the_rle(inet):
    before = json.loads(inet["json"].read_text())
    with pytest.warns(RuntimeWarning, match=r"N3\.json: swapped width/height back in 3 of 4 image records"):
        res = imagenet.read_pseudo_labels(inet["json"])
    assert (res.fixed, res.checked, res.unverified, res.conflicts) == (3, 4, 0, 0)
    for im in res.data["images"]:
        h, w = inet["sizes"][im["file_name"]]
        assert (im["height"], im["width"]) == (h, w)
        with Image.open(inet["root"] / "train" / im["file_name"]) as f:
            assert f.size == (im["width"], im["height"])
    again = imagenet.fix_swapped_sizes(res.data)
    assert again.fixed == 0 and again.data["images"] == res.data["images"]  # a correct file is left alone
    raw = read_coco_json(inet["json"])
    imagenet.fix_swapped_sizes(raw)
    assert raw["images"] == before["images"]  # the input dict is not modified


def test_fixed_pseudo_labels_load_in_the_cutler_trainer(inet):
    """CutLER's trainer reads the released file through the size fix: without it, every non-square image
    would be dropped (its decoded image disagrees with the swapped JSON size)."""
    from nbsupport.training.cutler.data import PseudoMaskDataset

    root = inet["root"] / "train"
    raw = read_coco_json(inet["json"])
    with pytest.warns(RuntimeWarning, match=r"image size differs from the JSON .*file 30x40, JSON 40x30"):
        unfixed = PseudoMaskDataset(None, root, train=True, data=raw)
        items = [unfixed[i] for i in range(len(unfixed))]
    assert sum(it is None for it in items) == 3  # every non-square image lost as released
    assert unfixed.problems["image size differs from the JSON"] == 3
    with pytest.warns(RuntimeWarning, match="swapped width/height back in 3 of 4"):
        fixed = PseudoMaskDataset(inet["json"], root)
    for i in range(len(fixed)):
        image, target = fixed[i]
        name = fixed.records[i][0]["file_name"]
        assert tuple(image.shape[1:]) == inet["sizes"][name]
        np.testing.assert_array_equal(target["masks"].numpy().astype(bool), inet["masks"][name])
    assert not fixed.problems


def test_fix_from_image_files_without_rle(inet):
    raw = read_coco_json(inet["json"])
    raw["annotations"] = [a for a in raw["annotations"] if a["image_id"] != 2]  # the portrait: no masks left
    assert imagenet.fix_swapped_sizes(raw).unverified == 1
    res = imagenet.fix_swapped_sizes(raw, image_root=inet["root"] / "train")
    assert (res.fixed, res.checked, res.unverified) == (3, 4, 0)
    assert (res.data["images"][1]["height"], res.data["images"][1]["width"]) == (36, 24)


def test_fix_rejects_sizes_that_fit_neither_way(inet):
    raw = read_coco_json(inet["json"])
    raw["images"][3]["width"] = 50
    with pytest.raises(
        LabelError, match=r"image 4 \(n01443537/n01443537_10014\.JPEG\): the record says 50x44 .* is 44x28"
    ):
        imagenet.fix_swapped_sizes(raw, source="labels.json")
    raw = read_coco_json(inet["json"])
    raw["annotations"][1]["segmentation"]["size"] = [31, 40]
    with pytest.raises(
        LabelError, match=r"tau0\.15_N3\.json: image 1 .*RLE sizes disagree: \[\(30, 40\), \(31, 40\)\]"
    ):
        imagenet.fix_swapped_sizes(raw, source=str(inet["json"]))
    lenient = imagenet.fix_swapped_sizes(raw, strict=False)  # readers that drop such items themselves
    assert (lenient.fixed, lenient.checked, lenient.conflicts) == (2, 3, 1)
    assert lenient.data["images"][0] == raw["images"][0]  # the conflicting record is left as it was
    with pytest.raises(FileNotFoundError, match="missing.json"):
        imagenet.read_pseudo_labels(inet["root"] / "missing.json")
