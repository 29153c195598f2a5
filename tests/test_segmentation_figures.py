"""Data of the GroupViT qualitative figures: group concepts on planted groups (Fig 9-10), class colours, images
of chosen classes, per-class IoU disparity by hand (Fig 21-22), the Fig 15 maps against the Table 3 pieces,
token assignments (Fig 23) and the inference entropy over labels (Eq 34 -> Eq 38: uniform -> log C, one-hot -> 0)."""

import math

import numpy as np
import pytest
import torch

from nbsupport.analysis import entropy as E
from nbsupport.analysis import group_tokens
from nbsupport.analysis import segmentation_figures as SF
from nbsupport.data.segmentation import segmentation_set
from nbsupport.models import groupvit as gv


@pytest.fixture(scope="module")
def model():
    return gv.build("small", seed=0)


@pytest.fixture(scope="module")
def data():
    return segmentation_set(None, 3, 64, seed=0, split="val")


# ---------------------------------------------------------------------------------------------- entropy
def test_inference_label_entropy_uniform_is_log_c_and_one_hot_is_zero(model, data):
    x = data.images[:2]
    # identical class names -> identical text embeddings -> L_affinity uniform over the C kept classes
    for c in (2, 3):
        h = E.inference_label_entropy(model, x, ["cat"] * c, topk=5)
        assert h.shape == (2, 64, 64)
        assert torch.allclose(h, torch.full_like(h, math.log(c)), atol=1e-5)
    # top-1: only one class survives Eq 31 -> one-hot L_affinity -> 0
    h1 = E.inference_label_entropy(model, x, ["cat", "dog", "sky"], topk=1)
    assert torch.allclose(h1, torch.zeros_like(h1), atol=1e-6)
    # distinct classes: strictly between, never above log min(topk, N)
    h3 = E.inference_label_entropy(model, x, ["cat", "dog", "sky", "car"], topk=3)
    assert float(h3.max()) <= math.log(3) + 1e-5 and float(h3.min()) >= 0


def test_pixel_label_entropy_hand_values():
    la = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 3.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    h = E.pixel_label_entropy(la)
    assert torch.allclose(h, torch.tensor([math.log(4), 0.0, math.log(2)]), atol=1e-6)


# ---------------------------------------------------------------------------------------------- Fig 9-10
def _planted_tokens():
    # 3 images 4x4, 2 groups; group 0 covers class 1 in image 0, class 2 in image 1, background in image 2
    groups = np.zeros((3, 4, 4), np.int64)
    groups[:, :, 2:] = 1  # right half: group 1
    sem = np.zeros((3, 4, 4), np.int64)
    sem[0, :, :2] = 1
    sem[1, :, :2] = 2
    sem[:, :, 2:] = 3  # group 1 is always class 3
    sem[0, 0, 0] = 3  # one impure pixel: purity 7/8
    sem[2, :2, 0] = 2  # image 2: group 0 mostly background, 2 of 8 pixels class 2 -> concept 2, purity 1/4
    soft = np.stack([group_tokens.soft_labels(g, s, 2, 4) for g, s in zip(groups, sem)])
    return group_tokens.SegmentTokens(np.zeros((3, 2, 5), np.float32), soft, groups)


def test_group_concepts_and_images_for_group():
    names = ["background", "a", "b", "c"]
    rows = SF.group_concepts(_planted_tokens(), names)
    assert len(rows) == 6
    r00 = next(r for r in rows if r["image"] == 0 and r["group"] == 0)
    assert r00["class"] == "a" and r00["share"] == 0.5 and r00["purity"] == pytest.approx(7 / 8)
    # group 0: distinct concepts a, b (background skipped); group 1: only c
    r20 = next(r for r in rows if r["image"] == 2 and r["group"] == 0)
    assert r20["class"] == "b" and r20["purity"] == pytest.approx(1 / 4)
    sem_only_bg = SF.group_concepts(_planted_tokens(), names, skip_labels=())
    assert next(r for r in sem_only_bg if r["image"] == 2 and r["group"] == 0)["label"] == 0
    assert SF.groups_by_concepts(rows)[0][:2] == (0, 2)
    assert [r["label"] for r in SF.images_for_group(rows, 0, n=5, distinct=True)] == [1, 2]
    assert [r["image"] for r in SF.images_for_group(rows, 1, n=2)] == [0, 1]


def test_group_attention_is_a_distribution_over_groups(model, data):
    att = SF.group_attention(model, data.images, batch_size=2)
    assert att.shape == (3, 4, 64, 64)  # the small config has 4 final groups
    assert np.allclose(att.sum(1), 1.0, atol=1e-4)


# ---------------------------------------------------------------------------------------------- maps
def test_palette_colorize_and_images_with_classes():
    pal = SF.label_palette(5)
    assert pal.shape == (5, 3) and (pal[0] == 0).all() and len({tuple(c) for c in pal}) == 5
    lab = np.array([[0, 1], [255, 4]])
    rgb = SF.colorize(lab, pal)
    assert (rgb[0, 1] == pal[1]).all() and (rgb[1, 0] == 255).all() and (rgb[1, 1] == pal[4]).all()
    with pytest.raises(ValueError, match="no colour"):
        SF.colorize(np.array([[7]]), pal)
    sem = np.zeros((3, 2, 2), np.int64)
    sem[0, 0, 0] = 2  # class 2: 1/4 of image 0, 3/4 of image 2
    sem[2] = 2
    sem[2, 0, 0] = 0
    sem[1] = 1
    assert SF.images_with_classes(sem, [2, 1, 5], n=1) == [(2, 2), (1, 1)]
    assert SF.images_with_classes(sem, [2], n=3) == [(2, 2), (2, 0)]


def test_iou_disparity_and_lowest_labels_by_hand():
    names = ["background", "a", "b", "c", "d"]
    # A: every pixel right; B: class a half wrong (-> d), class c unseen by both
    conf_a = np.diag([10, 4, 4, 0, 6])
    conf_b = conf_a.copy()
    conf_b[1, 1], conf_b[1, 4] = 2, 2  # a: IoU 2/4 (-50); d: IoU 6/8 (-25)
    a, b = {"conf": conf_a}, {"conf": conf_b}
    df = SF.iou_disparity(a, b, names, n=10)
    assert set(df["class"][:2]) == {"background", "b"} and list(df["class"][2:]) == ["d", "a"]
    assert list(df["difference"]) == pytest.approx([0, 0, -25, -50])
    top = SF.iou_disparity(a, b, names, n=1, skip_labels=(0,))
    assert list(top["class"]) == ["b", "a"]
    iou_b = {"iou": np.array([100, 50, 100, np.nan, 75.0]), "conf": conf_b}
    assert SF.lowest_iou_labels(iou_b, n=2) == [1, 4]


def test_per_class_iou_matches_protocol_miou(model, data):
    from nbsupport.analysis.zero_shot import protocol_miou
    from nbsupport.analysis.zero_shot_protocol import EvalSettings

    s = EvalSettings(short_side=None, window=None, bg_thresh=0.5)
    res = SF.per_class_iou(model, data, s)
    ref = protocol_miou(model, data, None, None, 224, 0.5)
    assert np.array_equal(res["conf"], ref["conf"]) and res["miou"] == pytest.approx(ref["miou"])
    assert res["iou"].shape == (data.n_classes,)


def test_fig15_maps_agree_with_the_table3_pieces(model, data):
    tokens = group_tokens.collect_tokens(model, data.images, data.semantic, data.n_classes)
    maps = SF.grouping_alignment_maps(model, tokens, tokens, data, indices=[2, 0], k=1)
    assert set(maps) == {"Visual-Text Alignment", "Visual Grouping", "Original", "Ground truth"}
    assert np.array_equal(maps["Ground truth"], data.semantic[[2, 0]].numpy())
    vg = group_tokens.knn_segmentation(tokens, tokens, 1)
    assert np.array_equal(maps["Visual Grouping"], vg[[2, 0]])
    # alignment labels whole ground-truth regions: one label per region
    for pred, gt in zip(maps["Visual-Text Alignment"], maps["Ground truth"]):
        for c in np.unique(gt):
            assert len(np.unique(pred[gt == c])) == 1
    orig = SF.predict_maps(model, data, 0.95, [0], background_names=())
    assert np.array_equal(maps["Original"][1], orig[0]) and orig.max() <= len(data.class_names)


def test_assigned_tokens_label_every_pixel_of_their_group(model, data):
    tok = SF.assigned_tokens(model, data, batch_size=2)
    n_obj = len(data.class_names)
    assert tok["features"].shape[0] == len(tok["assigned"]) == len(tok["majority"])
    assert ((tok["assigned"] >= 0) & (tok["assigned"] <= n_obj)).all()
    # without a background threshold the model's map gives each group's pixels the group's assigned label
    pred = SF.predict_maps(model, data, None, [0])[0]
    groups = gv.group_segmentation(model.encode_image(data.images[:1]).attn[0].detach(), (8, 8), (64, 64)).numpy()
    for g, lab in zip(np.unique(groups), tok["assigned"][tok["image"] == 0]):
        assert (pred[groups == g] == lab).all()
    emb = SF.embed_assigned(tok, labels=None, method="tsne", seed=0)
    assert emb["xy"].shape == (len(tok["assigned"]), 2) and 0 <= emb["agreement"] <= 1
    none = SF.embed_assigned(tok, labels=[999])
    assert emb["xy"].ndim == 2 and len(none["xy"]) == 0 and len(none["assigned"]) == 0


# ---------------------------------------------------------------------------------------------- drawing
def test_drawing_helpers_draw_the_planted_values():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from nbsupport.notebook import viz_segmentation as VS

    pal = SF.label_palette(3)
    fig, axes = plt.subplots(1, 3)
    VS.show_labels(axes[0], np.array([[0, 2], [1, 255]]), pal)
    shown = axes[0].get_images()[0].get_array()
    assert np.allclose(shown[0, 1], pal[2] / 255.0) and np.allclose(shown[1, 1], 1.0)
    seen = VS.map_row(axes[1:], np.zeros((2, 2, 3)), {"B": np.array([[1, 1], [0, 0]])}, pal)
    assert seen == {0, 1}
    leg = VS.label_legend(axes[0], [2, 0, 2, 255], ["bg", "a", "b"], pal)
    assert [t.get_text() for t in leg.get_texts()] == ["bg", "b"]
    fig2, ax = plt.subplots()
    VS.disparity_bars(ax, pd.DataFrame({"class": ["x", "y"], "difference": [5.0, -3.0]}))
    bars = ax.patches
    assert [b.get_width() for b in bars] == [5.0, -3.0] and bars[0].get_y() > bars[1].get_y()
    assert bars[0].get_facecolor() != bars[1].get_facecolor()
    plt.close("all")
