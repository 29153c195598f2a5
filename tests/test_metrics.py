"""Class-agnostic COCO AP against hand-made cases, and mask recall."""

import numpy as np
import pytest

import nbsupport.maskcut as mc
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


def test_mask_iou_hand_cases_and_the_empty_convention():
    a = np.zeros((4, 6), bool)
    a[:2, :3] = True  # 6 pixels
    b = np.zeros((4, 6), bool)
    b[1:3, 1:4] = True  # 6 pixels, 2 shared with a
    assert metrics.mask_iou(a, b) == pytest.approx(2 / 10)
    assert metrics.mask_iou(a, a) == 1.0 and metrics.mask_iou(a, ~a) == 0.0
    empty = np.zeros((4, 6), bool)
    assert metrics.mask_iou(empty, empty) == 1.0  # two empty masks agree everywhere
    assert metrics.mask_iou(empty, b) == 0.0 and metrics.mask_iou(a, empty) == 0.0
    import torch

    assert metrics.mask_iou(torch.from_numpy(a), b.astype(np.uint8)) == pytest.approx(0.2)  # torch / 0-1 masks
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.mask_iou(a, b.T)


def test_maskcut_results_do_not_depend_on_the_empty_iou_convention(monkeypatch):
    """MaskCut rejects a pass whose mask is empty by its area rule whatever IoU two empty masks get, so
    the old private convention (0.0) and the shared one (1.0) give the same masks, rejections included."""
    import torch

    from nbsupport.maskcut import engine

    g = torch.Generator().manual_seed(0)
    lab = torch.zeros(16, 16, dtype=torch.long)
    lab[3:11, 3:11] = 1  # one object: later passes are rejected and come back empty
    f = torch.randn(2, 8, generator=g)[lab] + 0.5 * torch.randn(16, 16, 8, generator=g)
    new = {mode: mc.maskcut(f, 4, after_reject=mode) for mode in ("reference", "stop")}
    assert not new["reference"][1:].flatten(1).any(1).all()  # some pass was rejected (empty)

    def old_iou(a, b):
        u = np.logical_or(a, b).sum()
        return float(np.logical_and(a, b).sum() / u) if u else 0.0

    monkeypatch.setattr(engine, "mask_iou", old_iou)
    for mode, masks in new.items():
        assert torch.equal(mc.maskcut(f, 4, after_reject=mode), masks)
