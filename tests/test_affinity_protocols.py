"""The feature-affinity pipelines of notebooks 01 and 07: parity with direct feature extraction and an
independent re-draw of the patch sample, planted features with known scores, a hand-computed contrast."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nbsupport.analysis import affinity_protocols as ap
from nbsupport.analysis.grid_truth import GridTruth
from nbsupport.data.images import image_to_tensor
from nbsupport.models import backbones, features


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    from nbsupport.data.coco import CocoInstances
    from nbsupport.data.synthetic import make_dataset

    root = make_dataset(tmp_path_factory.mktemp("syn"), 3, seed=4, size=64, split="val", scale=(0.4, 0.6))
    return CocoInstances(root / "instances_val.json")


def test_study_inputs_and_feature_summaries_match_direct_extraction(coco):
    model = backbones.load("random_tiny8")
    models = {"model": model, "floor": backbones.random_like(model, seed=1)}
    images, truth = ap.study_inputs(coco, coco.image_ids, 64, 8)
    assert torch.equal(images, torch.stack([image_to_tensor(coco.load(i), 64) for i in coco.image_ids]))
    ref = GridTruth.from_coco(coco, coco.image_ids, 64, (8, 8), 8)
    assert np.array_equal(truth.semantic, ref.semantic) and np.array_equal(truth.instances, ref.instances)
    requests = [("key", 1), ("token", -1)]
    out = ap.summarise_features(models, images, truth, requests, ("key", 1), patches_per_image=5, batch_size=2)
    # the patch sample, re-drawn independently: one generator, images in order, object patches only
    g = np.random.default_rng(0)
    keep = []
    for b in range(len(images)):
        cand = np.flatnonzero(truth.semantic[b].ravel() >= 1)
        keep.append(g.choice(cand, min(5, len(cand)), replace=False))
    for tag, m in models.items():
        s = out[tag]
        for facet, layer in requests:
            grids = features.extract(m, images, facet, layer)
            if (facet, layer) == ("key", 1):
                torch.testing.assert_close(s.main, grids, atol=1e-5, rtol=1e-5)
            desc, cls = s.objects[(facet, layer)]
            want, want_cls = [], []
            for b in range(len(images)):
                for k in range(1, len(truth.instance_class[b])):
                    mask = torch.from_numpy(truth.instances[b] == k)
                    if mask.any():
                        want.append(grids[b][mask].mean(0))
                        want_cls.append(truth.instance_class[b][k])
            torch.testing.assert_close(desc, torch.stack(want), atol=1e-5, rtol=1e-5)
            assert cls.tolist() == want_cls and len(cls) >= 3
            pf, pl = s.patches[(facet, layer)]
            flat = [grids[b].reshape(-1, grids.shape[-1])[keep[b]] for b in range(len(images))]
            torch.testing.assert_close(pf, torch.cat(flat), atol=1e-5, rtol=1e-5)
            assert pl.tolist() == np.concatenate([truth.semantic[b].ravel()[keep[b]] for b in range(3)]).tolist()
    with pytest.raises(ValueError, match="main_key"):
        ap.summarise_features(models, images, truth, requests, ("value", 1))


def planted_summary(noise=0.01, seed=0):
    """Four objects of classes [1, 1, 2, 2] as two orthogonal directions (+ small noise), and one 4 x 4
    grid with a 2 x 2 object of class 1 (direction e0) on a background along e1."""
    g = torch.Generator().manual_seed(seed)
    e = torch.eye(8)
    desc = torch.stack([e[0], e[0], e[1], e[1]]) + noise * torch.randn(4, 8, generator=g)
    grid = e[1].repeat(1, 4, 4, 1).clone()
    grid[0, 1:3, 1:3] = e[0]
    inst = np.zeros((1, 4, 4), np.int64)
    inst[0, 1:3, 1:3] = 1
    truth = GridTruth(inst.copy(), inst, [np.array([0, 1])])
    pf = torch.cat([e[0].repeat(3, 1), e[2].repeat(3, 1)])
    s = ap.FeatureSummary(
        {("key", 0): (desc, np.array([1, 1, 2, 2]))}, {("key", 0): (pf, np.array([1] * 3 + [2] * 3))}, grid
    )
    return s, truth


def test_tables_on_planted_features():
    s, truth = planted_summary()
    summaries = {"model": s, "floor": s}
    table = ap.object_separability(summaries, ["cosine", "euclidean"], max_pairs=100, seed=0)
    assert table["model"].tolist() == ["model", "model", "floor", "floor"]
    assert table["auc"].tolist() == [1.0] * 4 and table["n_same"].tolist() == [2] * 4
    assert table["n_diff"].tolist() == [4] * 4 and list(table.columns[:3]) == ["facet", "layer", "measure"]
    # prompt sweep: similarity 1 on the object, 0 on the background; t = -0.5 takes the whole 16-patch grid
    sweep = ap.prompt_sweep(summaries, truth, [-0.5, 0.1, 0.5])
    assert sweep.loc["model", -0.5] == pytest.approx(4 / 16) and sweep.loc["model", 0.1] == 1.0
    assert sweep.loc["floor", "opt"] == 1.0 and list(sweep.index) == ["model", "floor"]
    # object patches only (background excluded): 4 patches of one class -> 6 intra pairs, no inter pair
    pairs, main_table = ap.main_patch_pairs(summaries, truth, max_pairs=100)
    intra, inter = pairs["model"]
    np.testing.assert_allclose(intra, 1.0, atol=1e-6)
    assert len(intra) == 6 and len(inter) == 0 and main_table["n_same"].tolist() == [6, 6]
    patch = ap.patch_separability(summaries, max_pairs=100)
    assert patch["auc"].tolist() == [1.0, 1.0] and patch["mean_same"].tolist() == pytest.approx([1.0, 1.0])
    assert patch["mean_diff"].tolist() == pytest.approx([0.0, 0.0]) and patch["n_diff"].tolist() == [9, 9]


def test_contrast_summary_hand_case():
    A = torch.tensor([[1.0, 0.8, -0.2], [0.8, 1.0, 0.1], [-0.2, 0.1, 1.0]])
    table, samples = ap.contrast_summary({"X": [A], "Y": [A]}, [np.array([0, 0, 1])])
    off = np.array([0.8, -0.2, 0.8, 0.1, -0.2, 0.1])
    row = table.set_index("features").loc["X"]
    assert row["std of similarities"] == pytest.approx(off.std())
    assert row["mean same"] == pytest.approx(0.8) and row["mean different"] == pytest.approx(-0.05)
    assert row["gap"] == pytest.approx(0.85) and sorted(samples["Y"][1].tolist()) == pytest.approx(
        [-0.2, -0.2, 0.1, 0.1]
    )
    # an unlabelled patch (-1) leaves every pair it is in; the spread still counts all pairs
    t2, _ = ap.contrast_summary({"X": [A]}, [np.array([[0, 0, -1]])])
    assert t2["mean same"][0] == pytest.approx(0.8) and np.isnan(t2["mean different"][0])
    assert t2["std of similarities"][0] == pytest.approx(off.std())
    with pytest.raises(ValueError, match="does not match"):
        ap.contrast_summary({"X": [A]}, [np.array([0, 1])])


def test_dino_groupvit_affinities_share_the_dino_grid():
    from nbsupport.models import groupvit as gv

    dino = backbones.load("random_tiny8")
    gvit = gv.load("small", seed=0)
    img = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    aff = ap.dino_groupvit_affinities(dino, gvit, [img], layer=1, image_size=32)
    assert set(aff) == {"DINO", "GroupViT"}
    for mats in aff.values():
        A = mats[0]
        assert A.shape == (16, 16) and torch.allclose(A, A.T, atol=1e-5)
        torch.testing.assert_close(A.diagonal(), torch.ones(16), atol=1e-5, rtol=0)
    k = F.normalize(features.extract(dino, image_to_tensor(img, 32)[None], "key", 1)[0].reshape(16, -1), dim=1)
    torch.testing.assert_close(aff["DINO"][0], k @ k.T, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def voc_fx(tmp_path_factory):
    from nbsupport.data.datasets import voc as voc_mod

    return voc_mod.write_fixture(tmp_path_factory.mktemp("vocfx"))


def test_contrast_inputs_read_voc_with_its_instances(voc_fx):
    root = voc_fx["root"]["voc"]
    images, truth, source = ap.contrast_inputs("voc", root, "val", n_images=3, image_size=32, patch=8)
    ids = voc_fx["splits"]["voc"]["val"][:3]
    assert source == "voc val" and len(images) == len(truth) == 3
    assert [im.size[::-1] for im in images] == [voc_fx["sizes"][i] for i in ids]
    # the one rule, computed here from the planted label maps
    ref = GridTruth.from_label_maps(
        [voc_fx["masks"]["voc"][i] for i in ids], 32, (4, 4), [voc_fx["instances"][i] for i in ids], 8
    )
    assert np.array_equal(truth.semantic, ref.semantic) and np.array_equal(truth.instances, ref.instances)
    assert [c.tolist() for c in truth.instance_class] == [
        [0, *(v for v, _, _ in voc_fx["objects"]["voc"][i])] for i in ids
    ]
    assert (truth.instances >= 1).any() and set(np.unique(truth.semantic)) <= {-1, 0, *range(1, 21)}
    # asking for more images than the split has gives the split; another dataset has no instances
    assert len(ap.contrast_inputs("voc", root, "val", n_images=50, image_size=32, patch=8)[0]) == 4
    _, t_ctx, src = ap.contrast_inputs("context", voc_fx["root"]["context"], "val", 2, 32, 8)
    assert src == "context val" and (t_ctx.instances == -1).all() and (t_ctx.semantic >= 0).any()
    with pytest.raises(ValueError, match="needs dataset_root"):
        ap.contrast_inputs("voc", None)


def test_example_object_is_the_first_with_patches():
    inst = np.zeros((2, 2, 2), np.int64)
    inst[1, 0, 1] = 2  # image 0: object 1 covers no patch; image 1: object 1 none, object 2 one patch
    truth = GridTruth(inst.copy(), inst, [np.array([0, 3]), np.array([0, 1, 5])])
    b, m = ap.example_object(truth)
    assert b == 1 and m.tolist() == [[False, True], [False, False]]
    with pytest.raises(ValueError, match="no object"):
        ap.example_object(GridTruth(inst[:1].copy(), inst[:1], [np.array([0, 3])]))
