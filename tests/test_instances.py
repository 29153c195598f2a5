"""Instance sources for the instance-level studies: VOC's object PNGs as COCO, COCO's official layout."""

import numpy as np
import pytest

from nbsupport.data.datasets import DatasetLayoutError, segmentation_dataset
from nbsupport.data.datasets import coco_object as coco_mod
from nbsupport.data.datasets import voc as voc_mod
from nbsupport.data.instances import instance_dataset


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    base = tmp_path_factory.mktemp("fx")
    return {"voc": voc_mod.write_fixture(base), "coco": coco_mod.write_fixture(base)}


def test_voc_objects_become_coco_instances_of_their_class(fx):
    root = fx["voc"]["root"]["voc"]
    inst = instance_dataset("voc", root, "val")
    sem = segmentation_dataset("voc", root, "val")
    assert [im["voc_id"] for im in inst.coco.dataset["images"]] == sem.ids
    assert inst.categories[1] == "aeroplane" and inst.categories[20] == "monitor" and len(inst.categories) == 20
    n = 0
    for k, image_id in enumerate(inst.image_ids):
        _, mask = sem[k]
        masks, cats = inst.instance_masks(image_id), inst.category_ids(image_id)
        assert len(masks) == len(cats) >= 1
        for m, c in zip(masks, cats):
            assert m.any() and (mask[m] == c).all()  # every instance pixel carries its class
            assert not (m & (mask == 255)).any()  # the void band belongs to no instance
            n += 1
        # instances cover exactly the labelled object pixels
        np.testing.assert_array_equal(masks.any(0), (mask != 0) & (mask != 255))
    assert n >= 2 * len(inst.image_ids)


def test_coco_official_layout_and_errors(fx, tmp_path):
    root = fx["coco"]["root"]
    inst = instance_dataset("coco", root, "val")
    assert inst.image_ids == sorted(fx["coco"]["val_ids"])
    assert inst.image_path(inst.image_ids[0]).parent == root / "val2017"
    with pytest.raises(DatasetLayoutError, match=r"instances_train20192017\.json not found"):
        instance_dataset("coco", root, "train2019")
    with pytest.raises(ValueError, match="needs dataset_root"):
        instance_dataset("voc")
    with pytest.raises(ValueError, match="one of \\['coco', 'voc'\\]"):
        instance_dataset("ade20k", tmp_path)


def test_voc_void_band_is_kept_and_ignored(fx):
    from nbsupport.data.instances import ignore_mask, instance_map, semantic_labels

    root = fx["voc"]["root"]["voc"]
    inst = instance_dataset("voc", root, "val")
    for image_id in inst.image_ids:
        voc_id = inst.image_info(image_id)["voc_id"]
        labels, planted = fx["voc"]["masks"]["voc"][voc_id], fx["voc"]["instances"][voc_id]
        void = ignore_mask(inst, image_id)
        assert void.any() and np.array_equal(void, labels == 255)  # the planted 1-px band around each object
        ids, classes = instance_map(inst, image_id)
        assert np.array_equal(ids == -1, labels == 255)
        # object k is the k-th instance number of the PNG, its class the planted one
        np.testing.assert_array_equal(np.where(planted == 255, -1, planted), ids)
        assert classes.tolist() == [0, *(v for v, _, _ in fx["voc"]["objects"]["voc"][voc_id])]
        np.testing.assert_array_equal(semantic_labels(inst, image_id), labels)
        np.testing.assert_array_equal(semantic_labels(inst, image_id, ignore=-1), np.where(labels == 255, -1, labels))


def test_coco_crowd_is_ignored_and_small_objects_stay_on_top(fx):
    from nbsupport.data.instances import ignore_mask, object_category_ids, semantic_labels

    inst = instance_dataset("coco", fx["coco"]["root"], "val")
    # the planted class ids (COCO-Object's 1..80, 255 = crowd) as COCO category ids
    to_cat = np.array([0, *coco_mod.COCO_THING_IDS] + [0] * (255 - 81) + [255])
    for image_id in inst.image_ids:
        want = to_cat[fx["coco"]["masks"][image_id]]
        np.testing.assert_array_equal(semantic_labels(inst, image_id), want)
    # 139: the small RLE toothbrush (listed first) shows on the L-shaped person; 285: the crowd is no object
    assert (semantic_labels(inst, 139) == 90).sum() == 36
    assert object_category_ids(inst, 285) == [18] and inst.category_ids(285) == [1, 18]
    assert object_category_ids(inst, 724) == [] and not ignore_mask(inst, 724).any()
    crowd = inst.instance_masks(285)[0]
    assert np.array_equal(ignore_mask(inst, 285), crowd)  # the whole crowd region, also under the dog


def test_dataset_descriptions_and_the_synthetic_size():
    from nbsupport.data.instances import describe_dataset

    assert describe_dataset(None, "val", 3) == "synthetic val (seed 3)"
    assert describe_dataset("coco", "val") == "coco val2017" and describe_dataset("voc", "train") == "voc train"
    with pytest.raises(ValueError, match="give n_images"):
        instance_dataset(None, n_images=None)
