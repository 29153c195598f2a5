"""Class-agnostic COCO AP against hand-made cases, and mask recall."""

import numpy as np
import pytest

from nbsupport import maskcut as mc
from nbsupport.analysis import metrics


def gt_dict(masks, cats):
    anns = mc.coco_annotations(masks, 1)
    for a, c in zip(anns, cats):
        a["category_id"] = c
        a.pop("score")
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": 32, "width": 32}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }


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


def test_confusion_and_miou_hand_case():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    conf = metrics.confusion_matrix(pred, gt, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    ious = metrics.iou_per_class(conf)
    np.testing.assert_allclose(ious, [1 / 2, 2 / 3, 1.0])
    assert metrics.miou(conf) == pytest.approx(100 * (1 / 2 + 2 / 3 + 1) / 3)
    assert metrics.miou(conf, include_background=False) == pytest.approx(100 * (2 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="labels outside"):
        metrics.confusion_matrix(np.array([3]), np.array([0]), 3)


def test_miou_matches_sklearn_jaccard():
    from sklearn.metrics import jaccard_score

    g = np.random.default_rng(0)
    gt, pred = g.integers(0, 5, 1000), g.integers(0, 5, 1000)
    ref = jaccard_score(gt, pred, average="macro") * 100
    assert metrics.miou(metrics.confusion_matrix(pred, gt, 5)) == pytest.approx(ref)


def test_iou_disparity_sorted():
    a = np.diag([10, 10, 10])
    b = a.copy()
    b[1, 2] = 10  # 10 extra cat pixels predicted as dog: cat IoU 10/20, dog IoU 10/20
    df = metrics.iou_disparity(a, b, ["bg", "cat", "dog"])
    assert df["class"].iloc[0] == "bg" and df["difference"].iloc[0] == 0
    assert df.set_index("class")["difference"].loc[["cat", "dog"]].tolist() == [-50.0, -50.0]
