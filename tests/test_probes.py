"""Dense probes on frozen features (analysis.probes): Hungarian matching by counts and by IoU, the cluster
probe with learned centres and k-means, the linear probe and its recipes, the fp16 feature cache and the
tables with the published numbers."""

import itertools

import numpy as np
import pytest
import torch

from nbsupport.analysis.probes import cache as fcache
from nbsupport.analysis.probes import cluster, linear, matching, tables
from nbsupport.analysis.probes.protocol import ProbeReport


def planted(n=6, h=4, w=4, k=5, d=16, noise=0.1, seed=0, rows=False):
    """Features whose clusters are a permutation of the classes: class c sits at a random mean (``rows``:
    one class per row of patches)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g) * 3
    labels = torch.randint(0, k, (n, h, 1 if rows else w), generator=g).expand(n, h, w).contiguous()
    return means[labels] + noise * torch.randn(n, h, w, d, generator=g), labels


# ------------------------------------------------------------------------------------------------ matching
def test_confusion_counts_pairs_and_skips_ignore():
    target = torch.tensor([[0, 0, 1], [1, 255, 2]])
    pred = torch.tensor([[1, 1, 0], [2, 0, 2]])
    conf = matching.confusion(pred, target, n_pred=3, n_classes=3)
    assert conf.tolist() == [[0, 2, 0], [1, 0, 1], [0, 0, 1]]  # the 255 pixel (pred 0) is not counted
    with pytest.raises(ValueError, match="targets outside"):
        matching.confusion(pred, torch.full((2, 3), 3), 3, 3)


def test_the_two_criteria_disagree_on_a_hand_made_confusion():
    # rows: classes, columns: clusters. Class sizes 2 and 7, cluster sizes 2 and 7.
    conf = np.array([[0, 2], [2, 5]])
    # counts: identity keeps 0 + 5 = 5 pixels, the swap 2 + 2 = 4 -> identity.
    s_count, m_count = matching.match_and_score(conf, "count")
    assert m_count.tolist() == [0, 1]
    assert s_count.accuracy == pytest.approx(100 * 5 / 9)
    # IoUs under identity: 0/(2+2) = 0 and 5/(7+7-5) = 5/9, mean 5/18.
    assert s_count.miou == pytest.approx(100 * 5 / 18)
    # IoU criterion: identity sums 0 + 5/9 = 0.556, the swap 2/(2+7-2) + 2/(7+2-2) = 4/7 = 0.571 -> swap.
    s_iou, m_iou = matching.match_and_score(conf, "iou")
    assert m_iou.tolist() == [1, 0]
    assert s_iou.accuracy == pytest.approx(100 * 4 / 9)
    assert s_iou.miou == pytest.approx(100 * 2 / 7)
    # each criterion wins on its own measure
    assert s_count.accuracy > s_iou.accuracy and s_iou.miou > s_count.miou


def test_hungarian_agrees_with_exhaustive_search_and_scipy():
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(0)
    for _ in range(5):
        conf = rng.integers(0, 50, size=(5, 5))
        for crit in matching.CRITERIA:
            gain = conf if crit == "count" else matching.pair_iou(conf)
            best = max(itertools.permutations(range(5)), key=lambda p: sum(gain[g, p[g]] for g in range(5)))
            match = matching.hungarian_match(conf, crit)
            assert sum(gain[g, match[g]] for g in range(5)) == pytest.approx(sum(gain[g, best[g]] for g in range(5)))
            r, c = linear_sum_assignment(-np.asarray(gain, dtype=float))
            assert gain[r, c].sum() == pytest.approx(gain[np.arange(5), match].sum())


def test_matched_confusion_and_scores_by_hand():
    conf = np.array([[5, 0, 1], [0, 0, 4]])  # 2 classes, 3 clusters: cluster 0 -> class 0, 2 -> class 1
    sc, match = matching.match_and_score(conf, "count")
    assert match.tolist() == [0, 2]
    mc = matching.matched_confusion(conf, match)
    assert mc.tolist() == [[5, 1, 0], [0, 4, 0]]
    assert sc.accuracy == pytest.approx(90.0) and sc.n_pixels == 10
    assert sc.iou.tolist() == pytest.approx([5 / 6, 4 / 5])
    # fewer clusters than classes: the unmatched class gets IoU 0 (it has pixels) and its pixels are misses
    sc2, m2 = matching.match_and_score(np.array([[3], [2]]), "count")
    assert m2.tolist() == [0, -1] and sc2.accuracy == pytest.approx(60.0)
    assert sc2.iou.tolist() == pytest.approx([0.6, 0.0])


# ------------------------------------------------------------------------------------------------ cluster
@pytest.mark.parametrize("estimator", cluster.ESTIMATORS)
def test_planted_clusters_give_100_at_patch_and_pixel_level(estimator):
    feats, labels = planted()
    opts = {"learned": {"epochs": 5, "batch_size": 64, "init": "kmeans++"}}
    res = cluster.cluster_probe(feats, labels, 5, [estimator], seeds=(0, 1), options=opts, n_keep=2)
    assert all(r["accuracy"] == 100.0 and r["miou"] == 100.0 for r in res.rows)
    assert {(r["criterion"], r["seed"]) for r in res.rows} == {("count", 0), ("iou", 0), ("count", 1), ("iou", 1)}
    # pixel labels at 4x the grid: scores are upsampled bilinearly, so a pixel near a corner mixes four
    # patches; with one class per row of patches every pixel's nearest patch still wins
    feats, labels = planted(rows=True)
    pix = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)
    pix[0, :3, :3] = 255
    res = cluster.cluster_probe(feats, pix, 5, [estimator], seeds=(0,), options=opts, n_keep=2)
    assert res.rows[0]["accuracy"] == 100.0 and res.rows[0]["miou"] == 100.0
    pred = res.predictions[(estimator, "count")]
    assert pred.shape == (2, 16, 16) and torch.equal(pred, pix[:2])  # renamed to classes, 255 kept
    summary = res.summary()
    assert summary.loc[0, "miou"] == 100.0 and summary.loc[0, "miou_std"] == 0.0


def test_kmeans_seeds_differ_and_summary_is_mean_and_std():
    feats, labels = planted(noise=3.0, seed=1)  # overlapping clusters: seeds give different partitions
    res = cluster.cluster_probe(feats, labels, 5, ["kmeans"], ["iou"], seeds=(0, 1, 2, 3))
    vals = [r["miou"] for r in res.rows]
    s = res.summary().iloc[0]
    assert s.seeds == 4 and s.miou == pytest.approx(np.mean(vals)) and s.miou_std == pytest.approx(np.std(vals))
    assert len(res.confusions) == 4 and res.confusions[("kmeans", 0)].sum() == labels.numel()


def test_kmeans_with_fewer_patches_than_classes_leaves_classes_unmatched():
    means = torch.eye(5)
    labels = torch.tensor([[[0, 3, 4]]])  # 3 patches of 3 of the 5 classes
    feats = means[labels]
    with pytest.warns(UserWarning, match="3 patches for 5 clusters"):
        centres = cluster.kmeans_centres(feats, 5)
    assert centres.shape == (3, 5)
    with pytest.warns(UserWarning):
        res = cluster.cluster_probe(feats, labels, 5, ["kmeans"], ["count"])
    assert res.rows[0]["accuracy"] == 100.0  # each patch is its own cluster, matched to its class
    assert res.rows[0]["miou"] == 100.0  # classes 1 and 2: neither in the labels nor predicted, not counted


def test_learned_centres_minimise_the_cosine_cluster_loss():
    feats, _ = planted(noise=0.5)
    x = torch.nn.functional.normalize(feats.reshape(-1, 16), dim=-1)

    def loss(c):
        return -(x @ torch.nn.functional.normalize(c, dim=-1).T).max(1).values.mean().item()

    start = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))  # the init of seed 3
    trained = cluster.learned_centres(feats, 5, seed=3, epochs=20, batch_size=32)
    assert loss(trained) < loss(start) - 0.05


# ------------------------------------------------------------------------------------------------ linear
def test_linear_probe_separates_planted_features_and_ignores_255():
    feats, labels = planted(n=8, k=4, d=8, noise=0.3)
    pix = labels.repeat_interleave(2, 1).repeat_interleave(2, 2).clone()
    pix[:, :2, :] = 255  # the top row of patches is unlabelled
    r = linear.recipe("default", epochs=60, batch_size=4, lr=5e-2)
    probe, losses = linear.train_linear(feats, pix, 4, r, seed=0)
    assert losses[-1] < losses[0] / 4
    sc, conf, pred = linear.evaluate_linear(probe, feats, pix, 4, n_keep=3)
    assert sc.miou > 99.0 and sc.accuracy > 99.0
    assert conf.sum() == (pix != 255).sum() and pred.shape == (3, 8, 8) and (pred[:, :2] == 255).all()
    # what lies under ignored pixels never counts: with patch rows 0-1 ignored (pixel rows 0-3, beyond the
    # reach of the bilinear upsampling from patch row 0), scrambling patch row 0 changes nothing
    pix[:, :4, :] = 255
    sc, conf, _ = linear.evaluate_linear(probe, feats, pix, 4)
    scrambled = feats.clone()
    scrambled[:, 0] = torch.randn_like(scrambled[:, 0]) * 10
    sc2, conf2, _ = linear.evaluate_linear(probe, scrambled, pix, 4)
    assert np.array_equal(conf, conf2) and conf.sum() == (pix != 255).sum()


def test_recipes_name_the_papers_settings():
    assert linear.recipe_diff(linear.RECIPES["croc_voc"]) == {"epochs": 45}
    assert linear.recipe_diff(linear.RECIPES["croc_coco"]) == {}  # 10 epochs, Adam 1e-3: the default
    assert linear.recipe_diff(linear.RECIPES["hp"]) == {"epochs": 3, "batch_size": 64}
    mmc = linear.recipe_diff(linear.RECIPES["mmc"])
    assert mmc == {
        "optimizer": "adamw",
        "lr": 1e-4,
        "weight_decay": 0.05,
        "iterations": 40_000,
        "warmup_iters": 1500,
        "schedule": "poly",
        "layers": (5, 7, 9, 11),
    }
    r = linear.RECIPES["mmc"]
    assert linear.lr_factor(r, 0, 40_000) == pytest.approx(1 / 1500)
    assert linear.lr_factor(r, 1500, 40_000) == pytest.approx(1.0)
    assert linear.lr_factor(r, 20_750, 40_000) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown recipe fields"):
        linear.recipe("hp", epoch=3)


# ------------------------------------------------------------------------------------------------ cache
def test_feature_cache_hit_runs_no_forward(tmp_path, monkeypatch):
    src = fcache.load_source("random_tiny8", "norm_token", (-1,))
    images = torch.randn(3, 3, 32, 32)
    calls = []
    real = fcache.features.extract_many
    monkeypatch.setattr(fcache.features, "extract_many", lambda *a, **k: calls.append(1) or real(*a, **k))
    key = {"dataset": "planted", "split": "val"}
    first = fcache.grids(src, images, key, batch_size=2, cache=tmp_path)
    assert len(calls) == 2 and first.dtype == torch.float16 and first.shape == (3, 4, 4, 96)
    (path,) = tmp_path.glob("*.safetensors")
    second = fcache.grids(src, images, key, batch_size=2, cache=tmp_path)
    assert len(calls) == 2 and torch.equal(first, second)  # read back, no forward pass
    assert fcache.cache_path({**key, "x": 1}, tmp_path) != path
    # another weight fingerprint (same name) is another file
    other = fcache.FeatureSource(**{**src.__dict__, "fingerprint": "0" * 16})
    fcache.grids(other, images, key, batch_size=3, cache=tmp_path)
    assert len(calls) == 3 and len(list(tmp_path.glob("*.safetensors"))) == 2
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path))["features"], first)


# ------------------------------------------------------------------------------------------------ tables
def _report():
    rep = ProbeReport()
    for ds, bb in (("cocostuff27", "dino_vits8_300ep"), ("synthetic", "random_tiny8")):
        for seed, acc in ((0, 30.0), (1, 32.0)):
            for est, crit in itertools.product(cluster.ESTIMATORS, matching.CRITERIA):
                rep.cluster.append(
                    {"dataset": ds, "backbone": bb, "estimator": est, "criterion": crit, "seed": seed}
                    | {"accuracy": acc, "miou": 10.0}
                )
        rep.linear.append({"dataset": ds, "backbone": bb, "accuracy": 70.0, "miou": 35.0})
        rep.sources[bb] = {"description": bb, "facet": "norm_token", "layers": [11], "checkpoint": f"{bb}.pth"}
    rep.settings = {"resolution": {"cocostuff27": 224, "synthetic": 64}, "crf": False, "recipe": "hp"}
    return rep


def test_paper_table_puts_published_numbers_and_settings_beside_ours():
    t = tables.paper_table(_report()).set_index("dataset")
    coco = t.loc["cocostuff27"]
    assert coco["Unsup Acc"] == "31.0 ± 1.0" and coco["Unsup Acc (paper)"] == "28.7"
    assert coco["Unsup mIoU (paper)"] == "11.3" and coco["Linear Acc (paper)"] == "68.6"
    assert coco["Linear mIoU"] == "35.0" and coco["Linear mIoU (paper)"] == "33.9"
    assert "224 px" in coco["ours"] and "CRF off" in coco["ours"] and "learned/count" in coco["ours"]
    assert "320 px" in coco["paper"] and "dino_deitsmall8_300ep_pretrain.pth" in coco["paper"]
    assert "CRF on" in coco["paper"]
    assert t.loc["synthetic", "Unsup Acc (paper)"] == "/" and t.loc["synthetic", "paper"] == "/"
    wide = tables.cluster_table(_report())
    assert {"kmeans/iou mIoU", "learned/count Acc"} <= set(wide.columns) and wide.loc[0, "seeds"] == 2
    assert tables.published("cityscapes27", "dino_vitb8").unsup_acc == 43.6
    assert tables.published("potsdam3", "dino_vitb8").unsup_acc == 53.0
    assert tables.published("cocostuff27", "random_tiny8") is None
