"""Notebook 06's real path on fixtures in the official layouts: ImageNet train with CutLER's released
pseudo-label file (swapped sizes) or MaskCut on the folder, COCO val2017 as class-agnostic ground truth
(crowd regions overlap nothing), training, evaluation and a self-training round from CutLER's file; and the
notebook's fixture / paper profiles."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nbsupport.data.datasets import coco_object, imagenet
from nbsupport.data.datasets.base import DatasetLayoutError
from nbsupport.maskcut import pipeline
from nbsupport.models import backbones
from nbsupport.training import cutler as C
from nbsupport.training.cutler.data import evaluation_set, sample_indices, training_labels
from nbsupport.training.cutler.experiments import maskcut_detections

torch.set_num_threads(1)

TINY = {
    "arch": "resnet18",
    "min_size": [48],
    "max_size": 64,
    "min_size_test": 48,
    "rpn_pre_nms_top_n_train": 50,
    "rpn_post_nms_top_n_train": 20,
    "rpn_pre_nms_top_n_test": 50,
    "rpn_post_nms_top_n_test": 20,
    "box_batch_size_per_image": 16,
    "detections_per_img": 5,
    "representation_size": 64,
    "batch_size": 2,
    "max_iter": 2,
    "steps": [],
    "warmup_iters": 1,
    "checkpoint_period": 2,
    "log_period": 1,
    "num_workers": 0,
    "device": "cpu",
    "keep_checkpoint": False,
    "selftrain.max_iter": 1,
    "selftrain.warmup_iters": 1,
    "selftrain.detections": 5,
}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    base = tmp_path_factory.mktemp("fx")
    return {"imagenet": imagenet.write_fixture(base), "coco": coco_object.write_fixture(base), "base": base}


@pytest.fixture(scope="module")
def vit():
    return backbones.load("random_tiny8")


# -- training labels


def test_released_pseudo_labels_sizes_fixed(fx, tmp_path):
    inet = fx["imagenet"]
    with pytest.warns(RuntimeWarning, match=r"swapped width/height back in 3 of 4 image records"):
        labels = training_labels("imagenet", inet["root"], "cutler", tmp_path)
    assert labels.path == inet["json"] and labels.image_root == inet["root"] / "train"
    assert labels.source == (
        "CutLER's released pseudo-labels (imagenet_train_fixsize480_tau0.15_N3.json) on ImageNet train (4 images)"
    )
    recs = {im["file_name"]: (im["height"], im["width"]) for im in labels.data["images"]}
    assert recs == inet["sizes"]  # every record as the file is, the portrait (36, 24) included
    assert len(labels.data["annotations"]) == 5  # 2 masks on the first image, 1 on each other
    for a in labels.data["annotations"]:
        im = next(r for r in labels.data["images"] if r["id"] == a["image_id"])
        assert a["segmentation"]["size"] == [im["height"], im["width"]]
    assert labels.images is None and labels.score is None and not list(tmp_path.iterdir())  # nothing rewritten


def test_released_pseudo_labels_seeded_subset(fx, tmp_path):
    assert sample_indices(4, 2, seed=0) == sorted(np.random.default_rng(0).choice(4, 2, replace=False).tolist())
    assert sample_indices(4, None) == sample_indices(4, 9) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="n_images must be >= 1"):
        sample_indices(4, 0)
    with pytest.warns(RuntimeWarning, match="swapped"):
        labels = training_labels("imagenet", fx["imagenet"]["root"], "cutler", tmp_path, n_images=2, seed=0)
    want = {i + 1 for i in sample_indices(4, 2, 0)}  # the file's ids are 1..4
    assert {im["id"] for im in labels.data["images"]} == want
    assert {a["image_id"] for a in labels.data["annotations"]} == want
    assert labels.path == tmp_path / "pseudo_labels_train.json"
    assert json.loads(labels.path.read_text())["images"] == labels.data["images"]  # the fixed sizes, written
    assert labels.source.endswith("on ImageNet train (2 images)")


def test_maskcut_on_the_imagenet_folder(fx, vit, tmp_path):
    inet = fx["imagenet"]
    labels = training_labels("imagenet", inet["root"], None, tmp_path, vit, n_images=3, seed=1, maskcut_size=32)
    idx = sample_indices(4, 3, seed=1)
    assert [im["id"] for im in labels.data["images"]] == [i + 1 for i in idx]  # ids: folder position + 1
    assert [im["file_name"] for im in labels.data["images"]] == [inet["files"][i] for i in idx]
    assert all((im["height"], im["width"]) == inet["sizes"][im["file_name"]] for im in labels.data["images"])
    assert labels.path == tmp_path / "maskcut_train.json"
    assert json.loads(labels.path.read_text()) == labels.data
    assert labels.source == f"MaskCut by {backbones.describe(vit)} on ImageNet train (3 images)"
    # the same masks as the one pipeline makes on these images
    folder = imagenet.ImageNetFolder(inet["root"])
    masks = pipeline.image_masks(vit, [folder[i][0] for i in idx], 32, 3, "auto")
    want = [int(m.reshape(3, -1).any(1).sum()) for m in masks]
    got = [sum(a["image_id"] == i + 1 for a in labels.data["annotations"]) for i in idx]
    assert got == want and sum(want) > 0
    for a in labels.data["annotations"]:
        im = next(r for r in labels.data["images"] if r["id"] == a["image_id"])
        assert a["segmentation"]["size"] == [im["height"], im["width"]] and a["area"] > 0


def test_training_labels_bad_requests(fx, vit, tmp_path):
    root = fx["imagenet"]["root"]
    with pytest.raises(ValueError, match=r"'cutler' is CutLER's released ImageNet file: it needs dataset='imagenet'"):
        training_labels(None, None, "cutler", tmp_path, vit)
    with pytest.raises(ValueError, match=r"dataset 'imagenet' needs dataset_root \(layout: imagenet/train/<wnid>"):
        training_labels("imagenet", None, "cutler", tmp_path)
    with pytest.raises(ValueError, match=r"training dataset 'coco': one of \['imagenet'\] or None"):
        training_labels("coco", root, "cutler", tmp_path)
    with pytest.raises(ValueError, match="dataset_root .* is set but dataset is None"):
        training_labels(None, root, None, tmp_path, vit)
    with pytest.raises(ValueError, match="needs a backbone"):
        training_labels("imagenet", root, None, tmp_path)
    with pytest.raises(DatasetLayoutError, match="ImageNet: folder .*/nowhere/train not found"):
        training_labels("imagenet", tmp_path / "nowhere", "cutler", tmp_path)
    with pytest.raises(DatasetLayoutError, match=r"pseudo-labels: .*/missing.json not found"):
        training_labels("imagenet", root, tmp_path / "missing.json", tmp_path)


def test_released_file_missing_names_its_place(tmp_path):
    fix = imagenet.write_fixture(tmp_path / "a")
    fix["json"].unlink()
    with pytest.raises(DatasetLayoutError, match=r"CutLER's released imagenet_train_fixsize480_tau0.15_N3.json in "):
        training_labels("imagenet", fix["root"], "cutler", tmp_path)


# -- evaluation set and overlap splits


def test_coco_evaluation_set(fx):
    val = evaluation_set("coco", fx["coco"]["root"], "val")
    assert val.name == "COCO val2017 (4 images)"
    assert val.images.image_ids == [139, 285, 632, 724] == fx["coco"]["val_ids"]
    assert sorted(val.dataset.image_ids()) == [139, 285, 632, 724]  # 724 (no object) kept for prediction
    assert len(val.dataset.data["annotations"]) == 5  # the crowd region stays in the ground truth
    first = evaluation_set("coco", fx["coco"]["root"], "val", n_images=2)
    assert first.images.image_ids == [139, 285] and first.name == "COCO val2017 (2 images)"
    assert {a["image_id"] for a in first.dataset.data["annotations"]} == {139, 285}
    with pytest.raises(ValueError, match="eval_root .* is set but eval_dataset is None"):
        evaluation_set(None, fx["coco"]["root"])
    with pytest.raises(ValueError, match=r"evaluation dataset 'ade20k': one of \['coco', 'voc'\]"):
        evaluation_set("ade20k", fx["coco"]["root"])


def test_crowd_regions_overlap_nothing():
    box = lambda i, x, crowd=0: {"id": i, "image_id": 1, "bbox": [x, 0, 10, 10], "iscrowd": crowd}
    data = {"images": [{"id": 1}], "annotations": [box(1, 0), box(2, 5, crowd=1), box(3, 30), box(4, 35)]}
    assert C.overlap_flags(data) == {1: False, 2: False, 3: True, 4: True}
    data["annotations"][2]["iscrowd"] = 1  # the pair 3-4 is gone: 4 overlaps only a crowd region
    assert C.overlap_flags(data) == {1: False, 2: False, 3: False, 4: False}


def test_coco_overlap_splits(fx):
    """Image 139: a toothbrush inside a person (overlap); 285: a dog over a crowd region (no overlap)."""
    val = evaluation_set("coco", fx["coco"]["root"], "val")
    splits = C.split_by_overlap(val.dataset.data)
    assert [im["id"] for im in splits["only_overlap"]["images"]] == [139]
    assert sorted(im["id"] for im in splits["without_overlap"]["images"]) == [285, 632, 724]
    # the ground truth scores itself 100 (class-agnostic: every COCO category is one class)
    gt = [dict(a, score=1.0) for a in val.dataset.data["annotations"] if not a["iscrowd"]]
    for a in gt:
        if isinstance(a["segmentation"], list):  # polygons as RLE, as predictions come
            from pycocotools import mask as mu

            info = val.images.image_info(a["image_id"])
            r = mu.merge(mu.frPyObjects(a["segmentation"], info["height"], info["width"]))
            a["segmentation"] = {"size": r["size"], "counts": r["counts"].decode("ascii")}
    table = C.evaluate_splits(val.dataset.data, gt)
    assert table["images"].tolist() == [4, 3, 1]
    assert np.allclose(table["segm AP"].tolist(), [100.0, 100.0, 100.0])


def test_maskcut_detections_are_the_pipeline_masks(fx, vit):
    val = evaluation_set("coco", fx["coco"]["root"], "val")
    dets = maskcut_detections(vit, val.images, None, 32, 3, "auto", batch_size=2)
    masks = pipeline.dataset_masks(vit, val.images, size=32, n_masks=3, batch_size=2)
    want = pipeline.to_coco(val.images, masks)["annotations"]
    assert dets == want and [d["id"] for d in dets] == list(range(1, len(dets) + 1)) and dets
    sizes = {i: [val.images.image_info(i)["height"], val.images.image_info(i)["width"]] for i in val.images.image_ids}
    assert all(d["segmentation"]["size"] == sizes[d["image_id"]] and d["score"] == 1.0 for d in dets)


# -- the flow on CutLER's file and COCO val


def test_train_evaluate_selftrain_on_cutler_file(fx, tmp_path):
    with pytest.warns(RuntimeWarning, match="swapped"):
        labels = training_labels("imagenet", fx["imagenet"]["root"], "cutler", tmp_path)
    cfg = C.load_config("paper", TINY)
    runs = C.train_experiments(cfg, labels.data, labels.image_root, tmp_path, ["all"], device="cpu", progress=False)
    assert runs["all"]["summary"]["iteration"] == 2 and runs["all"]["summary"]["problems"] == {}  # no size mismatch
    val = evaluation_set("coco", fx["coco"]["root"], "val")
    table, preds = C.evaluate_models({"all": runs["all"]["model"]}, val.dataset, "cpu")
    assert table["split"].tolist() == ["all", "without_overlap", "only_overlap"]
    assert table["images"].tolist() == [4, 3, 1]
    sizes = {i: [val.images.image_info(i)["height"], val.images.image_info(i)["width"]] for i in val.images.image_ids}
    assert preds["all"] and {p["image_id"] for p in preds["all"]} <= set(sizes)
    assert all(p["segmentation"]["size"] == sizes[p["image_id"]] for p in preds["all"])  # the original frame
    assert all(len([p for p in preds["all"] if p["image_id"] == i]) <= 5 for i in sizes)  # detections_per_img
    # a self-training round relabels CutLER's file (swapped records) on its true image sizes
    with pytest.warns(RuntimeWarning, match="swapped"):
        (res,) = C.selftrain_rounds(cfg, labels.path, labels.image_root, runs["all"]["model"], tmp_path / "st", 1)
    new = json.loads(Path(res["pseudo_labels"]).read_text())
    assert {im["file_name"]: (im["height"], im["width"]) for im in new["images"]} == fx["imagenet"]["sizes"]
    assert res["iteration"] == 1 and res["pseudo_masks"] == len(new["annotations"]) >= 5  # the old masks stay


# -- the notebook's profiles


def _nb06_params(profile, overrides=None):
    from nbsupport.notebook import runner

    path = Path(__file__).resolve().parent.parent / "notebooks" / "06_cutler_training.ipynb"
    return runner.resolve_parameters(path, profile, runner.load_profiles(), overrides or {})


def test_paper_profile_requires_the_roots():
    from nbsupport.notebook.runner import RunError

    with pytest.raises(
        RunError,
        match=r"06_cutler_training needs -p dataset_root=\.\.\. \(imagenet: an ImageNet root in CutLER's layout imagenet/\{train/<wnid>",
    ):
        _nb06_params("paper")
    with pytest.raises(
        RunError, match=r"needs -p eval_root=\.\.\. \(coco: a COCO 2017 root coco/\{annotations/instances_val2017\.json"
    ):
        _nb06_params("paper", {"dataset_root": "/d/imagenet"})
    with pytest.raises(RunError, match=r"needs -p weights=\.\.\. \(the DINO ResNet-50 backbone"):
        _nb06_params("paper", {"dataset_root": "/d/imagenet", "eval_root": "/d/coco"})
    p = _nb06_params("paper", {"dataset_root": "/d/imagenet", "eval_root": "/d/coco", "weights": "/w/r50.pth"})
    assert (p["dataset"], p["pseudo_labels"], p["eval_dataset"], p["eval_split"]) == (
        "imagenet",
        "cutler",
        "coco",
        "val",
    )
    assert (p["backbone"], p["maskcut_size"], p["tau"], p["crf"], p["detector"]) == (
        "dino_vitb8",
        480,
        0.15,
        True,
        "resnet50",
    )


def test_fixture_profile_is_the_paper_path_on_the_fixtures():
    from nbsupport.notebook.runner import fixtures_root

    fx, paper = _nb06_params("fixture"), _nb06_params("paper", {"dataset_root": "a", "eval_root": "b", "weights": "c"})
    root = str(fixtures_root())
    assert fx["dataset_root"] == f"{root}/imagenet" and fx["eval_root"] == f"{root}/coco"
    same = ("backbone", "dataset", "pseudo_labels", "eval_dataset", "eval_split", "tau", "crf", "config", "detector")
    assert {k: fx[k] for k in same} == {k: paper[k] for k in same}
    assert fx["experiments"] == paper["experiments"] and fx["weights"] is None and fx["device"] == "cpu"
