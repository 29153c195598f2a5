"""GroupViT's evaluation protocol scored at the original resolution (nbsupport.analysis.zero_shot): channel ->
label mapping by hand, the all-background prediction's mIoU from the planted VOC fixture masks, the protocol's
arguments reaching the sliding window, and the whole-image case against square batches."""

import numpy as np
import pytest
import torch

from nbsupport.analysis import metrics, zero_shot
from nbsupport.data.datasets import voc
from nbsupport.data.segmentation import segmentation_set
from nbsupport.models import groupvit as gv


@pytest.fixture(scope="module")
def model():
    return gv.build("small", seed=0)


@pytest.fixture(scope="module")
def voc_tree(tmp_path_factory):
    return voc.write_fixture(tmp_path_factory.mktemp("voc"))


def test_channels_to_labels_by_hand():
    pred = torch.tensor([0, 1, 2, 3, 4])  # 2 object classes, then background names
    assert zero_shot.to_labels(pred, 2, None).tolist() == [1, 2, 0, 0, 0]  # objects 0, 1 -> labels 1, 2
    assert zero_shot.to_labels(pred, 2, 0.95).tolist() == [0, 1, 2, 0, 0]  # channel 0 is the background


def test_protocol_scores_the_planted_original_resolution_masks(model, voc_tree, monkeypatch):
    """An all-background prediction: background IoU = background pixels / labelled pixels of the original
    masks, every planted object 0, mIoU their mean; segment sees each image at its original size with the
    protocol's arguments."""
    root, ids = voc_tree["root"]["voc"], voc_tree["splits"]["voc"]["val"]
    data = segmentation_set("voc", 4, 16, 0, "val", root=root)
    seen = []

    def all_background(model, image, text_embeds=None, **kw):
        seen.append((tuple(image.shape), tuple(text_embeds.shape), kw))
        return torch.zeros(image.shape[-2:], dtype=torch.int64)

    monkeypatch.setattr(zero_shot.gv, "segment", all_background)
    r = zero_shot.protocol_miou(model, data, short_side=448, window=448, stride=224, bg_thresh=0.95)
    masks = [voc_tree["masks"]["voc"][i] for i in ids]
    labelled = np.concatenate([m[m != 255] for m in masks])
    classes = np.unique(labelled)
    assert classes[0] == 0 and len(classes) > 2
    bg_iou = (labelled == 0).sum() / labelled.size
    assert r["miou"] == pytest.approx(100 * bg_iou / len(classes))
    assert r["conf"].shape == (21, 21) and r["conf"].sum() == labelled.size and r["conf"][:, 1:].sum() == 0
    assert r["iou"][0] == pytest.approx(100 * bg_iou) and np.isnan(r["iou"][classes[-1] + 1 :]).all()
    assert [s[0] for s in seen] == [(3, *voc_tree["sizes"][i]) for i in ids]
    assert all(s[1] == (20, model.cfg.proj_dim) for s in seen)  # VOC's 20 object names, no background name
    assert seen[0][2] == {"short_side": 448, "window": 448, "stride": 224, "bg_thresh": 0.95}


def test_sliding_window_protocol_equals_segment_image_by_image(model, voc_tree):
    root, ids = voc_tree["root"]["voc"], voc_tree["splits"]["voc"]["val"]
    data = segmentation_set("voc", 2, 16, 0, "val", root=root)
    r = zero_shot.protocol_miou(model, data, short_side=48, window=32, stride=16, bg_thresh=0.95)
    text = gv.text_embeddings(model, data.class_names)
    conf = np.zeros((21, 21), np.int64)
    for i in range(2):
        img, gt = data.full_resolution(i)
        pred = gv.segment(model, img, text_embeds=text, short_side=48, window=32, stride=16, bg_thresh=0.95)
        conf += metrics.confusion_matrix(pred.numpy(), voc_tree["masks"]["voc"][ids[i]], 21)
    np.testing.assert_array_equal(r["conf"], conf)
    assert r["miou"] == pytest.approx(metrics.miou(conf))


def test_whole_image_protocol_on_the_synthetic_world_matches_square_batches(model):
    """No resizing, one window: the protocol is zero_shot_miou's computation, image by image (background names
    prompted and scored as background in both)."""
    data = segmentation_set(None, 3, 64, 0, "val")
    a = zero_shot.protocol_miou(model, data, short_side=None, window=None, bg_thresh=None, templates=("a {}.",))
    b = zero_shot.zero_shot_miou(
        model, data.images, data.semantic, data.class_names, data.background_names, ("a {}.",), batch_size=1
    )
    np.testing.assert_array_equal(a["conf"], b["conf"])
    assert a["conf"].sum() == 3 * 64 * 64 and a["miou"] == pytest.approx(b["miou"])
