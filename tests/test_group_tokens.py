"""Thesis 5.4 pipelines (nbsupport.analysis.group_tokens): token collection, visual grouping by KNN on planted
tokens (Table 4 by hand), Table 3 against a step-by-step re-computation (synthetic world; VOC fixture with its
21 labels and the thesis protocol at full resolution), Fig 23 embeddings of planted clusters."""

import numpy as np
import pytest
import torch
from PIL import Image

from nbsupport.analysis import group_tokens as gtok
from nbsupport.analysis import metrics
from nbsupport.data.datasets import voc
from nbsupport.data.images import image_to_tensor
from nbsupport.data.segmentation import segmentation_set
from nbsupport.models import groupvit as gv


@pytest.fixture(scope="module")
def model():
    return gv.build("small", seed=0)


@pytest.fixture(scope="module")
def sets():
    return segmentation_set(None, 4, 64, 0, "train"), segmentation_set(None, 3, 64, 0, "val")


def planted():
    """A bank of 3 owned tokens (two of class 1 along x, one of class 2 along y, plus one unowned token) and
    one query image whose token 0 points along y and token 1 along x, drawn on a 2x3 group map."""
    bank = gtok.SegmentTokens(
        features=np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.9, 0.1], [-1.0, 0.0]]]),
        soft=np.array([[[0, 1, 0], [0, 0, 1]], [[0, 1, 0], [0, 0, 0]]], float),
        groups=np.zeros((2, 2, 3), int),
    )
    query = gtok.SegmentTokens(
        features=np.array([[[0.1, 1.0], [1.0, 0.05]]]),
        soft=np.zeros((1, 2, 3)),
        groups=np.array([[[0, 0, 1], [1, 1, 1]]]),
    )
    return bank, query


def test_knn_segmentation_and_k_ablation_by_hand():
    bank, query = planted()
    feats, soft = bank.owned()
    assert feats.shape == (3, 2) and soft.argmax(-1).tolist() == [1, 2, 1]  # the unowned token is left out
    # K=1: each token takes its nearest neighbour's class; K=3: the mean soft label of all three is class 1
    np.testing.assert_array_equal(gtok.knn_segmentation(bank, query, k=1), [[[2, 2, 1], [1, 1, 1]]])
    np.testing.assert_array_equal(gtok.knn_segmentation(bank, query, k=3), np.ones((1, 2, 3), int))
    gt = torch.tensor([[[2, 2, 1], [1, 1, 1]]])
    # K=3: class 1 IoU 4/6, class 2 IoU 0, background in neither -> mean (66.67 + 0) / 2
    abl = gtok.knn_ablation(bank, query, gt, ks=[1, 3])
    assert abl[1] == pytest.approx(100.0) and abl[3] == pytest.approx(100 / 3)
    m, conf = gtok.miou_of(gtok.knn_segmentation(bank, query, k=3), gt, 3)
    assert m == pytest.approx(100 / 3) and conf.tolist() == [[0, 0, 0], [0, 4, 0], [0, 2, 0]]
    empty = gtok.SegmentTokens(bank.features, np.zeros_like(bank.soft), bank.groups)
    with pytest.raises(ValueError, match="no token"):
        gtok.knn_segmentation(empty, query)


def test_collect_tokens_matches_one_image_at_a_time(model, sets):
    train, _ = sets
    tok = gtok.collect_tokens(model, train.images, train.semantic, train.n_classes, batch_size=3)
    assert tok.features.shape == (4, 4, 96) and tok.soft.shape == (4, 4, 7) and tok.groups.shape == (4, 64, 64)
    with torch.no_grad():
        for i in range(4):
            out = model.encode_image(train.images[i : i + 1])
            grp = gv.group_segmentation(out.attn[0], out.grid, (64, 64)).numpy()
            np.testing.assert_array_equal(tok.groups[i], grp)
            np.testing.assert_allclose(tok.features[i], out.final_tokens[0].numpy(), atol=1e-5)
            np.testing.assert_allclose(tok.soft[i], gtok.soft_labels(grp, train.semantic[i].numpy(), 4, 7))
    sums = tok.soft.sum(-1)
    assert np.allclose(sums[sums > 0], 1.0)
    with pytest.raises(ValueError, match="must be"):
        gtok.collect_tokens(model, train.images, train.semantic[:2], 7)


def test_table3_rows_match_a_step_by_step_computation(model, sets):
    """The rows equal the notebook pipeline written out: segment -> confusion matrix; KNN over the bank; ground-
    truth regions labelled through the logits (Eq 50-51)."""
    train, val = sets
    bank = gtok.collect_tokens(model, train.images, train.semantic, 7)
    tok = gtok.collect_tokens(model, val.images, val.semantic, 7)
    rows, confs = gtok.grouping_vs_alignment(model, bank, tok, val, k=2)
    assert [r["type"] for r in rows] == [
        "Original",
        "Visual Grouping (K=2)",
        "Visual Grouping (WB)",
        "Visual-Text Alignment",
    ]
    text = gv.text_embeddings(model, val.class_names)
    c_orig, c_align = np.zeros((7, 7), int), np.zeros((7, 7), int)
    for x, gt in zip(val.images, val.semantic.numpy()):
        pred, logits = gv.segment(model, x, text_embeds=text, short_side=None, window=None, return_logits=True)
        c_orig += metrics.confusion_matrix(pred.numpy(), gt, 7)
        align = gtok.gt_group_labels(logits, gt)
        for c in np.unique(gt):  # one label per ground-truth region
            assert len(np.unique(align[gt == c])) == 1
        c_align += metrics.confusion_matrix(align, gt, 7)
    vg = gtok.knn_segmentation(bank, tok, k=2)
    c_vg = sum(metrics.confusion_matrix(p, g, 7) for p, g in zip(vg, val.semantic.numpy()))
    np.testing.assert_array_equal(confs["original"], c_orig)
    np.testing.assert_array_equal(confs["visual grouping"], c_vg)
    assert rows[0]["mIoU"] == pytest.approx(metrics.miou(c_orig))
    assert (
        rows[1]["mIoU"]
        == pytest.approx(metrics.miou(c_vg))
        == pytest.approx(gtok.knn_ablation(bank, tok, val.semantic, [2])[2])
    )
    assert rows[2]["mIoU"] == pytest.approx(metrics.miou(c_vg, include_background=False))
    assert rows[3]["mIoU"] == pytest.approx(metrics.miou(c_align))
    assert c_orig.sum() == 3 * 64 * 64
    with pytest.raises(ValueError, match="bg_thresh"):
        gtok.grouping_vs_alignment(model, bank, tok, val, bg_thresh=None)
    with pytest.raises(ValueError, match="2 token sets for 3 images"):
        gtok.grouping_vs_alignment(model, bank, gtok.SegmentTokens(tok.features[:2], tok.soft[:2], tok.groups[:2]), val)


@pytest.fixture(scope="module")
def voc_tree(tmp_path_factory):
    return voc.write_fixture(tmp_path_factory.mktemp("voc"))


def test_table3_on_the_voc_fixture_by_the_thesis_protocol(model, voc_tree):
    """VOC's own 21 labels (planted classes beyond the synthetic six: no IndexError), the bank from train, the
    Original row by the sliding window on every image at its original size, scored against the planted
    original-resolution masks (not the resized ones)."""
    root, ids = voc_tree["root"]["voc"], voc_tree["splits"]["voc"]["val"]
    masks = [voc_tree["masks"]["voc"][i] for i in ids]
    assert max(int(m[m != 255].max()) for m in masks) > 6  # labels the synthetic names could not index
    train = segmentation_set("voc", 3, 32, 0, "train", root=root)
    val = segmentation_set("voc", 4, 32, 0, "val", root=root)
    assert val.n_classes == 21 and val.class_names == list(voc.VOC_CLASSES[1:]) and train.source == "voc train"
    bank = gtok.collect_tokens(model, train.images, train.semantic, train.n_classes)
    tok = gtok.collect_tokens(model, val.images, val.semantic, val.n_classes)
    assert tok.soft.shape == (4, 4, 21) and bank.soft.shape == (3, 4, 21)
    rows, confs = gtok.grouping_vs_alignment(model, bank, tok, val, k=1, short_side=48, window=32, stride=16)
    assert confs["original"].shape == (21, 21) and confs["visual grouping"].shape == (21, 21)
    labelled = sum(int((m != 255).sum()) for m in masks)  # original resolution: 40x56 .. 64x48 images
    assert confs["original"].sum() == labelled != int((val.semantic != 255).sum())
    assert confs["visual grouping"].sum() == int((val.semantic != 255).sum())
    text = gv.text_embeddings(model, val.class_names)
    c_orig = np.zeros((21, 21), int)
    for image_id, mask in zip(ids, masks):
        img = image_to_tensor(Image.open(root / "JPEGImages" / f"{image_id}.jpg").convert("RGB"))
        assert tuple(img.shape[-2:]) == voc_tree["sizes"][image_id] == mask.shape
        pred = gv.segment(model, img, text_embeds=text, short_side=48, window=32, stride=16, bg_thresh=0.95)
        c_orig += metrics.confusion_matrix(pred.numpy(), mask, 21)
    np.testing.assert_array_equal(confs["original"], c_orig)
    assert rows[0]["mIoU"] == pytest.approx(metrics.miou(c_orig))
    # the synthetic world's seven labels cannot hold VOC's: a clear error, not an IndexError deep in numpy
    with pytest.raises(ValueError, match=r"labels \[.*\] outside 0..6"):
        gtok.collect_tokens(model, val.images, val.semantic, 7)


def test_embed_tokens_keeps_planted_classes_apart():
    g = np.random.default_rng(0)
    centres = g.normal(size=(3, 32)) * 5
    feats = np.concatenate([c + g.normal(size=(20, 32)) for c in centres]).reshape(12, 5, 32)
    soft = np.repeat(np.eye(4)[1:4], 20, axis=0).reshape(12, 5, 4)
    soft[0, 0] = 0  # one unowned token
    tok = gtok.SegmentTokens(feats, soft, np.zeros((12, 2, 2), int))
    (res,) = gtok.embed_tokens(tok, ["tsne"], seed=0, pca=10)
    assert res["method"] == "tsne" and res["tokens"] == 59 and res["xy"].shape == (59, 2)
    assert np.bincount(res["labels"]).tolist() == [0, 19, 20, 20]
    assert res["kNN purity"] > 0.95
    few = gtok.SegmentTokens(feats[:1, :2], soft[:1, :2], np.zeros((1, 2, 2), int))
    with pytest.raises(ValueError, match="too few"):
        gtok.embed_tokens(few)
