"""The feature-affinity pipelines of notebooks 01 and 07: parity with direct feature extraction and an
independent re-draw of the patch sample, planted features with known scores, a hand-computed contrast."""

import numpy as np
import pandas as pd
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


# ---------------------------------------------------------------- Fig 8 over images


def test_image_classes_and_image_descriptors(coco):
    from nbsupport.data.instances import semantic_labels

    ids = coco.image_ids
    classes = ap.image_classes(coco, ids)
    for i, c in zip(ids, classes):
        sem = semantic_labels(coco, i, ignore=-1)
        vals, counts = np.unique(sem[sem > 0], return_counts=True)
        assert c == dict(zip(vals.tolist(), counts.tolist())) and c
    model = backbones.load("random_tiny8")
    images, truth = ap.study_inputs(coco, ids, 64, 8)
    requests = [("key", 1), ("token", 2)]
    for pool in ("mean", "max", "cls"):
        s = ap.summarise_features({"m": model}, images, truth, requests, ("key", 1), 4, 2, image_pool=pool)["m"]
        assert s.image_pool == pool
        for facet, layer in requests:
            grid, cls = features.extract(model, images, facet, layer, include_cls=True)
            want = {"mean": grid.mean((1, 2)), "max": grid.amax((1, 2)), "cls": cls}[pool]
            torch.testing.assert_close(s.images[(facet, layer)], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="image_pool"):
        ap.summarise_features({"m": model}, images, truth, requests, ("key", 1), image_pool="median")


def test_image_separability_and_fig8_pairs_on_planted_images():
    """Eight images, the planted case of test_affinity (AUC 7/12 at image level); objects as before."""
    s, _ = planted_summary()
    e0, e1 = torch.eye(2)
    s.images = {("key", 0): torch.stack([e0] * 4 + [e1] * 2 + [e0] * 2)}
    classes = [{1: 9}] * 4 + [{2: 9}] * 4
    table = ap.image_separability({"model": s, "floor": s}, classes, "dominant", ["cosine"], 100, 0)
    assert table.model.tolist() == ["model", "floor"] and table.auc.tolist() == pytest.approx([7 / 12] * 2)
    assert table.n_same.tolist() == [12, 12] and table.n_diff.tolist() == [16, 16]
    same, diff = ap.fig8_pairs(s, ("key", 0), "cosine", "image", classes)
    assert len(same) == 12 and len(diff) == 16
    same, diff = ap.fig8_pairs(s, ("key", 0), "cosine", "object")  # objects [1, 1, 2, 2]: 2 same, 4 different
    assert len(same) == 2 and len(diff) == 4 and same.min() > 0.99 and diff.max() < 0.1
    with pytest.raises(ValueError, match="classes"):
        ap.fig8_pairs(s, ("key", 0), "cosine", "image")
    with pytest.raises(ValueError, match="level"):
        ap.fig8_pairs(s, ("key", 0), "cosine", "patch", classes)


# ---------------------------------------------------------------- the prompt-patch sweep in MMC's setting


def test_normalised_tokens_are_the_vit_output():
    model = backbones.load("random_tiny8")
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.forward_features(x)[:, 1:].reshape(2, 4, 6, -1)  # timm: blocks, then the final norm
    got = ap.sweep_features(model, x, "token_norm", -1)
    torch.testing.assert_close(got, out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, features.extract(model, x, "token", -1), atol=1e-2)
    torch.testing.assert_close(ap.sweep_features(model, x, "key", 1), features.extract(model, x, "key", 1))
    with pytest.raises(ValueError, match="facet"):
        ap.sweep_features(model, x, "attn")


def test_mmc_sweep_on_patches_equals_the_thesis_sweep(coco):
    model = backbones.load("random_tiny8")
    models = {"model": model, "floor": backbones.random_like(model, seed=3)}
    ids = coco.image_ids
    images, truth = ap.study_inputs(coco, ids, 64, 8)
    summ = ap.summarise_features(models, images, truth, [("key", 1)], ("key", 1), 4, 2)
    ts = [0.1, 0.3, 0.5]
    want = ap.prompt_sweep(summ, truth, ts)
    got, per = ap.mmc_prompt_sweep(models, coco, ids, 64, ts, facet="key", layer=1, iou="patch", batch_size=2)
    pd.testing.assert_frame_equal(got, want, atol=1e-6)
    assert sorted(per["model"].image.unique().tolist()) == list(range(len(ids)))
    with pytest.raises(ValueError, match="iou"):
        ap.mmc_prompt_sweep(models, coco, ids, 64, ts, iou="box")


def test_mmc_pixel_sweep_with_a_constant_map_scores_object_areas(coco):
    """A model whose final LayerNorm maps every token to the same vector: the similarity map is 1
    everywhere, so at every t < 1 the prediction is the whole judged image and IoU = object / image."""
    import copy

    from nbsupport.data.instances import instance_map

    model = copy.deepcopy(backbones.load("random_tiny8"))
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.bias.fill_(1.0)
    ids = coco.image_ids
    summary, per = ap.mmc_prompt_sweep({"flat": model}, coco, ids, 48, [0.2, 0.9], batch_size=2)
    want = []
    for i in ids:
        ids_map, classes = instance_map(coco, i)
        want += [(ids_map == k).sum() / (ids_map >= 0).sum() for k in range(1, len(classes)) if (ids_map == k).any()]
    np.testing.assert_allclose(per["flat"][0.2].to_numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(per["flat"][0.9].to_numpy(), want, rtol=1e-6)
    assert summary.loc["flat", "opt"] == pytest.approx(np.mean(want))


def test_sweep_comparison_and_settings_table():
    thesis = pd.DataFrame({0.1: [0.5], 0.2: [0.25], "opt": [0.5]}, index=["model"])
    mmc = pd.DataFrame({0.1: [0.3, 0.1], 0.2: [0.36, 0.2], "opt": [0.36, 0.2]}, index=["model", "floor"])
    table = ap.sweep_comparison({"thesis setting": thesis, "MMC setting": mmc}, [0.1, 0.2])
    assert table.index.tolist() == [
        "thesis setting: model",
        "MMC setting: model",
        "MMC setting: floor",
        "MMC Table 1: DINO ViT-B/16",
        "MMC Table 1: random init ViT-B/16",
    ]
    assert table.loc["MMC setting: model"].tolist() == pytest.approx([30.0, 36.0, 36.0])
    assert table.loc["MMC Table 1: DINO ViT-B/16"].tolist() == [33.3, 35.1, 35.1]
    thesis[0.5] = 0.1
    wide = ap.sweep_comparison({"x": thesis}, [0.1, 0.5])  # MMC reports no t = 0.5
    assert wide.loc["x: model", 0.5] == pytest.approx(10.0)
    assert np.isnan(wide.loc["MMC Table 1: DINO ViT-B/16", 0.5]) and wide.loc["MMC Table 1: DINO ViT-B/16", 0.1] == 33.3
    model = backbones.load("random_tiny8")  # 4 blocks, patch 8
    run = ap.sweep_setting(model, 240, "token_norm", -1, "pixel", "coco val2017")
    assert run["token grid"] == "30 x 30" and run["features"] == "tokens after the final LayerNorm, last block"
    other = ap.sweep_setting(model, 64, "key", 1, "patch", "synthetic val (seed 0)")
    assert other["features"] == "keys, block 1 of 4" and other["token grid"] == "8 x 8"
    st = ap.settings_table({"MMC setting": run, "thesis setting": other})
    assert st.loc["token grid", "MMC setting vs MMC"] == "same" and st.loc["input", "MMC setting vs MMC"] == "differs"
    assert st.loc["features", "MMC setting vs MMC"] == "same" and st.loc["IoU", "MMC setting vs MMC"] == "same"
    assert st.loc["data", "MMC setting vs MMC"] == "same" and st.loc["backbone", "MMC setting vs MMC"] == "differs"
    assert st.loc["prompt patch", "thesis setting vs MMC"] == "not stated"
    assert (st.loc[["input", "token grid", "features", "IoU", "data"], "thesis setting vs MMC"] == "differs").all()
