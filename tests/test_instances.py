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
