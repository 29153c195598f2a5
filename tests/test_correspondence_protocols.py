"""Notebook 02's protocols: prototype choice by hand, the k table against hand-counted pairs and
precisions, the shifted-copy control against an independent patch-index computation, the explorer's
round trip on planted vectors."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nbsupport.analysis import correspondence_protocols as cp
from nbsupport.analysis.correspondences import descriptors
from nbsupport.data.images import image_to_tensor
from nbsupport.models import backbones


def fake_coco(classes: dict, crowds: dict | None = None):
    """Images -> object classes, plus crowd regions (``crowds``: image -> classes) that show no instance."""
    crowds = crowds or {}

    def annotations(i):
        return [{"category_id": c} for c in classes[i]] + [{"category_id": c, "iscrowd": 1} for c in crowds.get(i, [])]

    return SimpleNamespace(image_ids=sorted(classes), annotations=annotations)


def test_choose_prototype_by_hand():
    coco = fake_coco({1: [2], 2: [1, 3], 3: [3, 3], 4: [1, 3], 5: [1]}, crowds={3: [2], 5: [2]})
    # image 1: its class 2 is nowhere else (the crowds of class 2 in images 3 and 5 are no objects to match);
    # image 2: class 1 (tried first) is also in images 4 and 5
    assert cp.choose_prototype(coco, 2) == (2, 1, [4, 5])
    assert cp.choose_prototype(coco, 1) == (2, 1, [4])
    assert cp.choose_prototype(coco, 1, ids=[3, 4, 5]) == (3, 3, [4])
    with pytest.raises(RuntimeError, match="no class is shared by 4 of the 5 images"):
        cp.choose_prototype(coco, 3)  # classes 1 and 3 are each in 3 images only
    with pytest.raises(ValueError, match="n_queries"):
        cp.choose_prototype(coco, 0)


def four_patches(salient_b=(1, 1, 1, 1)):
    """2 x 2 grids of orthogonal descriptors, identical in A and B: (i, i) are best buddies; at k = 2 ties
    (similarity 0) go to the lower index, adding exactly (0, 1) and (1, 0)."""
    e = torch.eye(4)
    a = (e, torch.ones(2, 2), (2, 2))
    b = (e.clone(), torch.tensor(salient_b, dtype=torch.float32).reshape(2, 2), (2, 2))
    return a, b


def test_k_table_counts_and_precision_by_hand():
    a, b = four_patches((1, 1, 1, 0))  # B's patch 3 is background: the pair (3, 3) is filtered out
    _, b_all = four_patches()
    relaxed = cp.match_queries([a, b, b_all], [(16, 16)] * 3, 16, 8, 8, n_pairs=0, thresh=0.05, k=2)
    lab = np.ones((16, 16), int)
    lab[:, 8:] = 2  # patch centres (4, 4), (4, 12), (12, 4), (12, 12): classes 1, 2, 1, 2
    counts, pooled = cp.k_table(relaxed, [1, 2], [lab, lab, lab])
    q1 = counts[counts["query"] == 1].set_index("k")
    assert q1["pairs (all patches)"].tolist() == [4, 6] and q1["pairs (salient)"].tolist() == [3, 5]
    # k = 1: (0,0) (1,1) (2,2) all on one class; k = 2 adds (0,1) and (1,0), both across classes
    assert q1["precision"].tolist() == pytest.approx([1.0, 3 / 5])
    # chance: A's classes at the pair ends {1: 2/3, 2: 1/3} vs B's salient patches {1: 2/3, 2: 1/3}
    assert q1["chance: salient partner"].tolist() == pytest.approx([5 / 9, 3 / 5 * 2 / 3 + 2 / 5 * 1 / 3])
    assert q1["chance: object partner"].tolist() == pytest.approx([0.5, 0.5])  # B is half class 1, half 2
    q2 = counts[counts["query"] == 2].set_index("k")
    assert q2["pairs (salient)"].tolist() == [4, 6] and q2["precision"].tolist() == pytest.approx([1.0, 4 / 6])
    # pooled: counts averaged over queries, rates weighted by the salient pairs of each query
    assert pooled.loc[2, "pairs (salient)"] == 5.5 and pooled.loc[2, "pairs (all patches)"] == 6
    assert pooled.loc[2, "precision"] == pytest.approx((3 + 4) / 11) and pooled.loc[1, "precision"] == 1.0
    plain, _ = cp.k_table(relaxed, [1, 2])  # no ground truth: counts only
    assert list(plain.columns) == ["query", "k", "pairs (all patches)", "pairs (salient)"]
    with pytest.raises(ValueError, match="labels"):
        cp.k_table(relaxed, [1], [lab])


def foreground_case():
    """1 x 3 grids. A: a0 = e0 (salient), a1 = e1 and a2 = -e0 (background); B: b0 = (1, 0.05)
    (background, a0's nearest), b1 = (0.8, 0.6) and b2 = e1 (salient).

    Plain best buddies (all patches): (a0, b0) and (a1, b2), each with a background end, so none is left
    after the saliency filter. On the salient foreground only, a0 meets b1 (k = 1) and also b2 (k = 2);
    filtering at k = 2 keeps (a0, b1) alone (rank 2: b0 stays a0's first choice)."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    b = torch.tensor([[1.0, 0.05], [0.8, 0.6], [0.0, 1.0]])
    da = (a, torch.tensor([[1.0, 0.0, 0.0]]), (1, 3))
    db = (b, torch.tensor([[0.0, 1.0, 1.0]]), (1, 3))
    return [da, db]


def test_fig2_restricted_relaxed_against_plain_best_buddies_by_hand():
    desc = foreground_case()
    fig2 = cp.fig2_correspondences(desc, [(8, 24)] * 2, (8, 24), 8, 8, n_pairs=5, thresh=0.05, k=2)
    relaxed, plain = fig2["relaxed"][0], fig2["plain"][0]
    assert relaxed.foreground == "restrict" and relaxed.k == 2 and plain.foreground == "filter" and plain.k == 1
    assert relaxed.all_pairs.tolist() == [[0, 1], [0, 2]] and relaxed.all_ranks.tolist() == [1, 2]
    assert relaxed.pairs.tolist() == [[0, 1], [0, 2]]  # fewer pairs than n_pairs: all of them are shown
    assert plain.all_pairs.tolist() == [] and plain.n_unfiltered == 2 and len(plain.pairs) == 0
    at1 = cp.fig2_correspondences(desc, [(8, 24)] * 2, (8, 24), 8, 8, n_pairs=5, k=1)["relaxed"][0]
    assert at1.all_pairs.tolist() == [[0, 1]]
    # the points of a pair: patch centres in the 8 x 24 input, x = 4 + 8 * index
    assert relaxed.points_b.tolist() == [[4.0, 12.0], [4.0, 20.0]] and relaxed.points_a.tolist() == [[4.0, 4.0]] * 2


def test_k_tables_count_both_foreground_rules_by_hand():
    relaxed, counts, pooled = cp.k_tables(foreground_case(), [(8, 24)] * 2, (8, 24), 8, 8, [1, 2], thresh=0.05)
    assert set(relaxed) == {"filter", "restrict"} and all(r[0].k == 2 for r in relaxed.values())
    assert list(counts.columns[:3]) == ["foreground", "query", "k"]
    c = counts.set_index(["foreground", "k"])
    assert c.loc[("filter", 1), "pairs (all patches)"] == 2 and c.loc[("filter", 1), "pairs (salient)"] == 0
    assert c.loc[("filter", 2), "pairs (all patches)"] == 4 and c.loc[("filter", 2), "pairs (salient)"] == 1
    assert c.loc[("restrict", 1), "pairs (salient)"] == 1 and c.loc[("restrict", 2), "pairs (salient)"] == 2
    assert c.loc[("restrict", 2), "pairs (all patches)"] == 2  # restricted: only salient patches compete
    assert pooled.index.names == ["foreground", "k"] and pooled.loc[("restrict", 2), "pairs (salient)"] == 2
    lab = np.zeros((8, 24), int)
    lab[:, :16] = 1  # patches 0 and 1 on class 1, patch 2 on background
    _, counts, pooled = cp.k_tables(
        foreground_case(), [(8, 24)] * 2, (8, 24), 8, 8, [2], 0.05, [lab, lab], ["restrict"]
    )
    assert counts.precision.tolist() == [0.5]  # (a0, b1) on class 1, (a0, b2) ends on background


def test_shifted_copy_control_against_patch_indices():
    model = backbones.load("random_tiny8")
    img = (np.random.default_rng(3).random((64, 64, 3)) * 255).astype(np.uint8)
    x = image_to_tensor(img, 64)
    d = descriptors(model, x, layer=1, facet="key", bin=False, stride=8)
    ctrl = cp.shifted_copy_control(model, x, d, [1, 2], layer=1, facet="key", bin=False, stride=8, thresh=-1.0)
    assert ctrl.shift == (8, 16)  # round(0.1 * 64 / 8) = 1 and round(0.2 * 64 / 8) = 2 strides
    assert torch.equal(ctrl.image, torch.roll(x, (8, 16), dims=(1, 2)))
    # independent: with stride = patch the grid is 8 x 8 and the answer to patch (y, x) is (y + 1, x + 2) mod 8
    i, j = ctrl.result.all_pairs[:, 0].numpy(), ctrl.result.all_pairs[:, 1].numpy()
    dy = (j // 8 - (i // 8 + 1) + 4) % 8 - 4
    dx = (j % 8 - (i % 8 + 2) + 4) % 8 - 4
    np.testing.assert_array_equal(ctrl.distance, 8 * np.maximum(abs(dy), abs(dx)))
    ranks = ctrl.result.all_ranks.numpy()
    for k in (1, 2):
        assert ctrl.table.loc[k, "pairs"] == (ranks <= k).sum()
        assert ctrl.table.loc[k, "correct"] == pytest.approx(np.mean(ctrl.correct[ranks <= k]))
    assert ctrl.table.loc[1, "correct"] > 0.5  # even random-init keys find most shifted patches


def test_round_trip_on_planted_vectors():
    e = torch.eye(3)
    a = SimpleNamespace(desc=torch.stack([e[0], e[1]]), grid=(1, 2))
    b = SimpleNamespace(desc=torch.stack([e[1], e[0] + 0.5 * e[1], e[0]]), grid=(1, 3))
    sim_ab, j, sim_ba, back = cp.round_trip(a, b, 0)
    assert j == 2 and back == 0 and sim_ab.shape == (1, 3) and sim_ba.shape == (1, 2)
    np.testing.assert_allclose(sim_ab.numpy(), [[0.0, 1 / np.sqrt(1.25), 1.0]], atol=1e-6)
    assert cp.round_trip(a, b, 1)[1:4:2] == (0, 1)
    # not mutual: B's only patch is nearest to A's patch 1, not to the patch we start from
    a2 = SimpleNamespace(desc=torch.stack([e[0] + 0.3 * e[1], e[0] + 0.05 * e[1]]), grid=(2, 1))
    b2 = SimpleNamespace(desc=e[:1].clone(), grid=(1, 1))
    assert cp.round_trip(a2, b2, 0)[1] == 0 and cp.round_trip(a2, b2, 0)[3] == 1
    with pytest.raises(ValueError, match="outside"):
        cp.round_trip(a, b, 5)


def test_prototype_queries_on_voc_and_coco_fixtures(tmp_path):
    from nbsupport.data.datasets import coco_object, voc
    from nbsupport.data.instances import instance_dataset

    planted = voc.write_fixture(tmp_path)
    inst = instance_dataset("voc", planted["root"]["voc"], "val")
    study = cp.prototype_queries(inst, 1)
    voc_ids = [inst.image_info(i)["voc_id"] for i in study.ids]
    # the val fixture: 2007_000033 cow + bus, 2007_000042 cat + person, 2007_000061 motorbike + cat, ...
    assert voc_ids == ["2007_000042", "2007_000061"] and study.class_name == "cat" and study.class_id == 8
    for v in voc_ids:
        assert 8 in {value for value, _, _ in planted["objects"]["voc"][v]}
    for lab, img, v in zip(study.labels, study.images, voc_ids):
        want = planted["masks"]["voc"][v]
        assert img.size[::-1] == want.shape
        np.testing.assert_array_equal(lab, np.where(want == 255, -1, want))  # void: unknown, never a match
    coco = instance_dataset("coco", coco_object.write_fixture(tmp_path)["root"], "val")
    # a person in 139 and a crowd of people in 285: the crowd is no instance, so no class is shared
    with pytest.raises(RuntimeError, match="no class is shared by 2 of the 4 images"):
        cp.prototype_queries(coco, 1)
