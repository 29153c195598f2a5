"""The per-image studies of notebook 09: HP's anchor example, CrOC / MaskCut object counts, the DAVIS table,
LarvSeg's prototype probe on patch-grid labels and MMC's feature variance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nbsupport.analysis import probe_studies as ps
from nbsupport.models import backbones


@pytest.fixture(scope="module")
def model():
    return backbones.load("random_tiny8")


def test_first_vit_skips_groupvit():
    assert ps.first_vit(["groupvit:small", "random_tiny8", "dino_vits16"]) == "random_tiny8"
    assert ps.vit_specs(["groupvit_groups:small", "a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="no ViT"):
        ps.first_vit(["groupvit:small"])


def test_hidden_positive_example_shapes_and_anchor(model):
    x = torch.randn(3, 3, 32, 32)
    out = ps.hidden_positive_example(model, x, anchor=(1, 2, 3), pool_size=2)
    assert out["anchor"] == (1, 2, 3) and out["grid"] == (4, 4)
    assert out["global"].shape == (3, 4, 4) and out["local"].shape == (4, 4)
    assert not out["global"][1, 2, 3]  # the anchor is not its own positive
    assert out["pool_index"].shape == (2, 3)
    assert sum(out["n_global"]) == int(out["global"].sum())
    auto = ps.hidden_positive_example(model, x)
    assert auto["anchor"][0] == 0
    with pytest.raises(ValueError, match="outside"):
        ps.hidden_positive_example(model, x, anchor=(5, 0, 0))


class _Coco:
    """Two images with 2 and 1 objects, one crowd region."""

    image_ids = [1, 2]

    def load(self, i):
        from PIL import Image

        return Image.fromarray(np.full((24, 40, 3), 60 * i, np.uint8))

    def annotations(self, i):
        return [{"iscrowd": 0}, {"iscrowd": 0}, {"iscrowd": 1}] if i == 1 else [{"iscrowd": 0}]


def test_object_counts_against_ground_truth(model):
    def masks_fn(pils):
        m = np.zeros((3, 24, 40), bool)
        m[0, :4] = True
        return [m, np.zeros((3, 24, 40), bool)]

    out = ps.object_counts(model, _Coco(), masks_fn, size=32, k_start=6, k_max=4)
    t = out["table"]
    assert t["gt"].tolist() == [2, 1] and t["maskcut"].tolist() == [1, 0]
    assert (t["croc"] == t["croc_k"] - 1).all() and t["croc_k"].between(2, 4).all()
    rows = ps.count_summary(out["summary"])
    assert rows["method"].tolist() == ["ground truth", "CrOC (k - 1)", "MaskCut"]
    assert rows.loc[2, "MAE"] == pytest.approx(1.0)


def test_davis_table_puts_published_row_beside():
    res = {"random_tiny8": {"J&F-Mean": 0.5, "J-Mean": 0.4, "F-Mean": 0.6, "per_video": {"a": 0}, "objects": [1, 2]}}
    t = ps.davis_table(res)
    assert t.loc[0, "J&F-Mean"] == pytest.approx(50.0) and t.loc[0, "objects"] == 2
    assert math.isnan(t.loc[0, "J&F-Mean (DINO paper)"])
    assert t.loc[1, "J&F-Mean (DINO paper)"] == 62.3
    t2 = ps.davis_table({"dino_vitb16": dict(res["random_tiny8"])})
    assert len(t2) == 1 and t2.loc[0, "F-Mean (DINO paper)"] == 63.9


def test_grid_labels_majority_and_void():
    lab = torch.full((1, 4, 4), 255, dtype=torch.uint8)
    lab[0, :2, :2] = 3
    lab[0, 0, 2] = 1  # one class pixel among void: the patch takes it
    lab[0, 2:, 2:] = torch.tensor([[2, 2], [2, 0]], dtype=torch.uint8)
    g = ps.grid_labels(lab, (2, 2))
    assert g.tolist() == [[[3, 1], [-1, 2]]]


def test_prototype_study_on_separable_features(model):
    x = torch.randn(2, 3, 32, 32)
    lab = torch.zeros(2, 32, 32, dtype=torch.uint8)
    lab[:, :, 16:] = 1
    out = ps.prototype_study(model, x, lab, seeds=(0, 1))
    assert out["per_image"].shape == (2, 2) and 0 <= out["miou"] <= 100
    assert out["labels"].shape == (2, 4, 4) and out["predictions"][0].shape == (4, 4)


def test_feature_variance_bounds(model):
    x = torch.randn(2, 3, 32, 32)
    for mode in ("crop", "mask"):
        v = ps.feature_variance(model, x, n_views=6, mode=mode)
        assert 0 <= v["variance"] <= 1 and 0 <= v["image_variance"] <= 1
        assert v["relative"] == pytest.approx(v["variance"] / v["image_variance"])
    one = ps.feature_variance(model, x[:1], n_views=3)
    assert math.isnan(one["relative"]) and one["variance"] >= 0
    with pytest.raises(ValueError, match="mode"):
        ps.feature_variance(model, x, n_views=2, mode="blur")
    t = ps.variance_table({"dino_vitb16": {"crop": {"variance": 0.1, "relative": 0.5}, "mask": {"variance": 0.2}}})
    assert t.loc[0, "crop (MMC paper)"] == 0.43 and t.loc[0, "crop / across images"] == 0.5
    assert math.isnan(t.loc[0, "mask / across images"])


def test_instance_anchor_lies_on_the_largest_object():
    from nbsupport.data.instances import instance_dataset

    coco = instance_dataset(None, split="val", n_images=2, seed=0, size=64)
    i = coco.image_ids[0]
    a = ps.instance_anchor(coco, i, (8, 8))
    from nbsupport.data.instances import instance_map

    ids, _ = instance_map(coco, i)
    block = ids[a[1] * 8 : a[1] * 8 + 8, a[2] * 8 : a[2] * 8 + 8]
    assert a[0] == 0 and (block > 0).any()
