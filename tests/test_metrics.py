"""Class-agnostic COCO AP against hand-made cases, and mask recall."""
import numpy as np
import pytest

from nbsupport import maskcut as mc, metrics


def gt_dict(masks, cats):
    anns = mc.coco_annotations(masks, 1)
    for a, c in zip(anns, cats):
        a["category_id"] = c
        a.pop("score")
    return {"images": [{"id": 1, "file_name": "a.png", "height": 32, "width": 32}], "annotations": anns,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def masks():
    m = np.zeros((2, 32, 32), bool)
    m[0, 2:12, 2:12] = True
    m[1, 18:30, 16:30] = True
    return m


def test_perfect_predictions_score_100_regardless_of_class():
    m = masks()
    gt = gt_dict(m, [1, 2])  # two classes in GT; evaluation is class-agnostic
    r = metrics.coco_ap(gt, mc.coco_annotations(m, 1))
    assert r["AP"] == pytest.approx(100.0) and r["AP50"] == pytest.approx(100.0)


def test_half_found_and_empty():
    m = masks()
    gt = gt_dict(m, [1, 1])
    r = metrics.coco_ap(gt, mc.coco_annotations(m[:1], 1))
    assert r["AP50"] == pytest.approx(50.0, abs=1.0) and r["AR100"] == pytest.approx(50.0)
    assert metrics.coco_ap(gt, [])["AP"] == 0.0
    shifted = np.roll(m[:1], 6, axis=2)  # IoU = 40/160 < 0.5 -> a false positive
    assert metrics.coco_ap(gt, mc.coco_annotations(shifted, 1))["AP50"] == 0.0


def test_mask_recall():
    m = masks()
    assert metrics.mask_recall(m, m[:1]) == 0.5
    assert metrics.mask_recall(m, np.zeros((0, 32, 32), bool)) == 0.0
