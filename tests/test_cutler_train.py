"""CutLER engine: exact resume after a kill, atomic checkpoints, NaN skip, self-training labels, thesis
experiment sets, overlap evaluation splits (pycocotools)."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mu

from nbsupport.data.synthetic import make_dataset
from nbsupport.training import cutler as C
from nbsupport.training.common import read_metrics
from nbsupport.training.cutler import loop as cutler_loop

torch.set_num_threads(1)

TINY = {
    "arch": "resnet18",
    "min_size": [64],
    "max_size": 64,
    "min_size_test": 64,
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 32,
    "representation_size": 256,
    "batch_size": 2,
    "max_iter": 4,
    "steps": [3],
    "warmup_iters": 2,
    "checkpoint_period": 2,
    "log_period": 1,
    "num_workers": 0,
    "device": "cpu",
    "lr": 0.005,
}


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("syn"), 5, seed=2, size=64, split="train")
    return root / "instances_train.json"


def _losses(out):
    return [(r["iter"], r["loss"], r["loss_classifier"], r["loss_mask"]) for r in read_metrics(out)]


@pytest.mark.slow
def test_resume_after_kill_is_exact(syn, tmp_path):
    cfg = C.load_config("smoke", dict(TINY, train_json=str(syn)))
    full = C.train(cfg, tmp_path / "a", progress=False)
    assert full["iteration"] == 4 and full["nan_skipped"] == 0
    # killed after iteration 3 (last checkpoint at 2), with a half-written checkpoint left behind
    r = C.train(cfg, tmp_path / "b", stop_after=3, progress=False)
    assert r["stopped"] and len(read_metrics(tmp_path / "b")) == 3
    (tmp_path / "b" / "checkpoint_last.pth.tmp").write_bytes(b"torn write")
    ck = torch.load(tmp_path / "b" / "checkpoint_last.pth", weights_only=True)
    assert ck["iteration"] == 2
    C.train(cfg, tmp_path / "b", resume=True, progress=False)
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [x[0] for x in lb] == [1, 2, 3, 4]  # the log was cut back to the checkpoint, no duplicates
    assert la == lb  # same data order, same RNG streams
    wa = torch.load(tmp_path / "a" / "model_final.pth", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "model_final.pth", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    lr = [r["lr"] for r in read_metrics(tmp_path / "a")]
    assert lr == pytest.approx(
        [0.005 * 0.001, 0.005 * 0.5005, 0.005, 0.005 * 0.1]
    )  # warmup, then step (gamma 0.1) at 3
    # a different seed gives a different run (the test above can fail)
    C.train(dataclasses.replace(cfg, seed=1, max_iter=1), tmp_path / "c", progress=False)
    assert _losses(tmp_path / "c")[0][1] != la[0][1]


def test_nan_loss_is_skipped_and_counted(syn, tmp_path, monkeypatch):
    real = C.build_model
    calls = {"n": 0}

    def poisoned(**kw):
        m = real(**kw)
        fwd = m.roi_heads.forward

        def forward(*a, **k):
            res, losses = fwd(*a, **k)
            calls["n"] += 1
            if calls["n"] == 2:
                losses["loss_classifier_stage1"] = losses["loss_classifier_stage1"] * float("nan")
            return res, losses

        m.roi_heads.forward = forward
        return m

    monkeypatch.setattr(cutler_loop, "build_model", poisoned)
    cfg = C.load_config("smoke", dict(TINY, train_json=str(syn), max_iter=3))
    s = C.train(cfg, tmp_path, progress=False)
    assert s["nan_skipped"] == 1 and s["iteration"] == 3
    log = read_metrics(tmp_path)
    assert [r["iter"] for r in log] == [1, 3] and log[-1]["nan_skipped"] == 1
    w = torch.load(tmp_path / "model_final.pth", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())


def test_config_rejects_unknown_keys():
    with pytest.raises(KeyError, match="unknown CutLER config key 'lerning_rate'"):
        C.load_config("smoke", {"lerning_rate": 1})
    paper = C.load_config("paper")
    assert paper.max_iter == 160000 and paper.steps == [80000] and paper.gamma == 0.02
    assert paper.rpn_post_nms_top_n_train == 4000 and paper.rpn_nms_thresh == 0.65
    assert paper.selftrain.score_thresh == [0.7, 0.65] and paper.selftrain.drop_loss is False
    # the defaults are the reference schedule: the paper recipe changes nothing, smoke only what it lists
    assert paper == C.CutlerConfig()
    smoke = C.load_config("smoke")
    assert (smoke.arch, smoke.max_iter, smoke.selftrain.max_iter, smoke.selftrain.lr) == ("resnet18", 4, 2, 0.0025)
    assert smoke.selftrain.score_thresh == [0.7, 0.65] and smoke.rpn_nms_thresh == 0.65  # defaults kept
    st = C.selftrain_config(smoke, train_json="x.json")
    assert (st.max_iter, st.steps, st.lr, st.warmup_iters, st.drop_loss, st.copy_paste_scale, st.train_json) == (
        2,
        [],
        0.0025,
        1,
        False,
        [0.5, 1.0],
        "x.json",
    )
    assert st.batch_size == smoke.batch_size and st.gamma == smoke.gamma  # the rest is the training config


# ------------------------------------------------------------------------------------------------ labels


def _rle(m):
    r = mu.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}


def _square(y0, x0, y1, x1, H=40, W=40):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def _coco(masks_per_image):
    images, anns = [], []
    for iid, masks in enumerate(masks_per_image, start=1):
        images.append({"id": iid, "file_name": f"{iid}.png", "height": 40, "width": 40})
        for m in masks:
            r = _rle(m)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": iid,
                    "category_id": 1,
                    "segmentation": r,
                    "iscrowd": 0,
                    "area": float(m.sum()),
                    "bbox": [float(v) for v in mu.toBbox(dict(r, counts=r["counts"].encode()))],
                }
            )
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "fg"}]}


def test_selftrain_annotations():
    A, B = _square(0, 0, 10, 10), _square(20, 20, 30, 30)
    prev = _coco([[A, B]])
    P = _square(0, 0, 10, 11)  # IoU(A, P) = 100/110 >= 0.5
    Q = _square(30, 0, 40, 10)
    preds = [
        {"image_id": 1, "score": 0.9, "segmentation": _rle(P)},
        {"image_id": 1, "score": 0.69, "segmentation": _rle(Q)},
    ]  # below 0.7: dropped in round 1
    nxt = C.selftrain_annotations(prev, preds, score_thresh=0.7)
    got = [
        mu.decode(dict(a["segmentation"], counts=a["segmentation"]["counts"].encode())).astype(bool)
        for a in nxt["annotations"]
    ]
    assert len(got) == 2 and np.array_equal(got[0], P) and np.array_equal(got[1], B)  # A replaced by P, B kept
    assert nxt["annotations"][0]["score"] == 0.9 and [a["id"] for a in nxt["annotations"]] == [1, 2]
    nxt2 = C.selftrain_annotations(prev, preds, score_thresh=0.65)  # round 2 keeps Q too
    assert len(nxt2["annotations"]) == 3


def test_overlap_sets_and_maskcut_filter():
    # image 1: two separated instances; image 2: two instances whose boxes intersect (an L and a square)
    L = _square(0, 0, 20, 5) | _square(15, 0, 20, 20)
    S = _square(5, 8, 12, 15)  # inside L's box, disjoint pixels
    gt = _coco([[_square(0, 0, 10, 10), _square(20, 20, 30, 30)], [L, S]])
    flags = C.overlap_flags(gt)
    assert flags == {1: False, 2: False, 3: True, 4: True}
    assert C.overlap_flags(gt, by="mask") == {1: False, 2: False, 3: False, 4: False}
    no_img = C.build_training_set(gt, "no-overlap", drop="images")
    assert [im["id"] for im in no_img["images"]] == [1] and len(no_img["annotations"]) == 2
    no_inst = C.build_training_set(gt, "no-overlap", drop="instances")
    assert len(no_inst["images"]) == 2 and len(no_inst["annotations"]) == 2
    assert len(C.build_training_set(gt, "all")["annotations"]) == 4
    preds = [
        {"image_id": 2, "score": 0.95, "segmentation": _rle(S)},
        {"image_id": 1, "score": 0.3, "segmentation": _rle(_square(0, 0, 10, 10))},
    ]
    filt = C.build_training_set(gt, "maskcut-filter", predictions=preds)
    assert [a["image_id"] for a in filt["annotations"]] == [2]  # only S is confirmed by a confident prediction
    with pytest.raises(ValueError, match="needs predictions"):
        C.build_training_set(gt, "maskcut-filter")
    splits = C.split_by_overlap(gt)
    assert [im["id"] for im in splits["without_overlap"]["images"]] == [1]
    assert [im["id"] for im in splits["only_overlap"]["images"]] == [2]


def test_evaluate_splits_against_pycocotools():
    L = _square(0, 0, 20, 5) | _square(15, 0, 20, 20)
    S = _square(5, 8, 12, 15)
    gt = _coco([[_square(0, 0, 10, 10), _square(20, 20, 30, 30)], [L, S]])
    perfect = [
        {"image_id": a["image_id"], "score": 1.0, "segmentation": a["segmentation"], "bbox": a["bbox"]}
        for a in gt["annotations"]
    ]
    t = C.evaluate_splits(gt, perfect).set_index("split")
    assert (t[["box AP", "segm AP", "box AP50", "segm AP50"]] == 100).all().all()
    # only image 1 detected: the "without" split stays perfect, "only overlapping" gets 0, "all" in between
    half = [d for d in perfect if d["image_id"] == 1]
    t = C.evaluate_splits(gt, half).set_index("split")
    assert t.loc["without_overlap", "segm AP"] == 100 and t.loc["only_overlap", "segm AP"] == 0
    assert 0 < t.loc["all", "segm AP50"] < 100 and t.loc["all", "images"] == 2
    r = C.evaluate({**gt, "annotations": []}, perfect)
    assert math.isnan(r["box"]["AP"])


def _mixed_orientation_set(root):
    """6 images, 3 landscape (64x48) and 3 portrait (48x64), each with one rectangle instance."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for k in range(6):
        w, h = (64, 48) if k % 2 == 0 else (48, 64)
        arr = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        m = np.zeros((h, w), np.uint8)
        m[8:30, 10:34] = 1
        arr[m.astype(bool)] = 200
        Image.fromarray(arr).save(root / "images" / f"{k}.png")
        images.append({"id": k + 1, "file_name": f"{k}.png", "width": w, "height": h})
        r = mu.encode(np.asfortranarray(m))
        anns.append(
            {
                "id": k + 1,
                "image_id": k + 1,
                "category_id": 1,
                "iscrowd": 0,
                "area": int(m.sum()),
                "bbox": [10, 8, 24, 22],
                "segmentation": {"size": [h, w], "counts": r["counts"].decode()},
            }
        )
    p = root / "train.json"
    p.write_text(
        __import__("json").dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "fg"}]})
    )
    return p


def test_aspect_grouping_batches_and_resume(tmp_path, monkeypatch):
    ann = _mixed_orientation_set(tmp_path / "data")
    shapes = []
    real = C.augment_batch

    def spy(images, targets, *a, **k):
        shapes.append({tuple(im.shape[-2:]) for im in images})
        return real(images, targets, *a, **k)

    monkeypatch.setattr(cutler_loop, "augment_batch", spy)
    cfg = C.load_config("smoke", dict(TINY, train_json=str(ann), aspect_grouping=True))
    C.train(cfg, tmp_path / "a", progress=False)
    assert len(shapes) == 4 and all(len(s) == 1 for s in shapes)  # one orientation per batch
    assert {next(iter(s)) for s in shapes} == {(48, 64), (64, 48)}  # both groups are used
    C.train(cfg, tmp_path / "b", stop_after=3, progress=False)
    C.train(cfg, tmp_path / "b", resume=True, progress=False)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")  # resume replays the grouped order
    shapes.clear()
    C.train(dataclasses.replace(cfg, aspect_grouping=False, max_iter=4), tmp_path / "c", progress=False)
    assert any(len(s) == 2 for s in shapes)  # without grouping, batches mix


def _notebook_06_config(profile: str, overrides: dict | None = None):
    """The CutLER config notebook 06 builds under a runner profile: its parameters cell, the profile's values
    and ``overrides`` (``-p``) on top (as the runner injects them), then the notebook's
    ``cfg = cutler.load_config(...)`` statement."""
    import ast
    import json
    from pathlib import Path

    from nbsupport.notebook.runner import load_profiles, resolve_parameters

    path = Path(__file__).resolve().parent.parent / "notebooks" / "06_cutler_training.ipynb"
    cells = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    ns: dict = {}
    exec(cells[0], ns)  # the parameters cell
    declared = {k: None for k in ns if not k.startswith("__")}
    ns.update(resolve_parameters(path, profile, load_profiles(), overrides or {}, declared=declared))
    src = next(c for c in cells if c.startswith("cfg = cutler.load_config("))
    ns["cutler"] = C
    exec(compile(ast.Module(body=[ast.parse(src).body[0]], type_ignores=[]), path.name, "exec"), ns)
    return ns["cfg"]


def test_notebook_06_profiles_are_config_overrides():
    """No branch on the profile's name: the paper profile's parameters ARE the thesis recipe (CutLER's
    reference at 90K iterations), and the demo profile's give the schedule the notebook used to derive from
    `iterations` and `train_size`."""
    required = {"dataset_root": "/data/imagenet", "eval_root": "/data/coco", "weights": "/w/dino_resnet50_pretrain.pth"}
    paper = _notebook_06_config("paper", required)
    assert paper.weights == "/w/dino_resnet50_pretrain.pth"  # the DINO ResNet-50 init, required by the profile
    thesis = C.load_config("thesis")
    assert dataclasses.replace(paper, device="auto", weights=None) == thesis  # the profile = the thesis recipe
    assert dataclasses.replace(thesis, max_iter=160000) == C.CutlerConfig()  # = CutLER's reference but 90K
    assert paper.max_iter == 90000 and paper.steps == [80000] and paper.gamma == 0.02 and paper.head == "cascade"
    assert paper.batch_size == 16 and paper.min_size == list(C.REFERENCE_MIN_SIZES)
    demo = _notebook_06_config("demo")
    iterations, train_size = 30, 128  # the old derivation, by hand
    want = C.load_config(
        "smoke",
        dict(
            device="cpu",
            seed=0,
            arch="resnet18",
            weights=None,
            max_iter=iterations,
            steps=[int(iterations * 0.8)],
            warmup_iters=max(1, iterations // 10),
            min_size=[int(train_size * 0.75), train_size],
            max_size=int(train_size * 1.34),
            min_size_test=train_size,
            batch_size=2,
            lr=0.01,
            checkpoint_period=max(2, iterations // 2),
            log_period=1,
            num_workers=0,
            keep_checkpoint=False,
        ),
    )
    assert dataclasses.replace(demo, selftrain=want.selftrain) == want
    smoke = _notebook_06_config("smoke")
    assert (smoke.max_iter, smoke.steps, smoke.warmup_iters, smoke.min_size, smoke.max_size) == (
        3,
        [2],
        1,
        [48, 64],
        85,
    )
    st = C.selftrain_config(smoke)  # the old notebook: the training schedule at half the LR, DropLoss off
    assert (st.max_iter, st.steps, st.warmup_iters, st.lr, st.drop_loss) == (3, [2], 1, 0.005, False)


@pytest.mark.parametrize("profile", ["smoke", "demo", "fixture", "paper"])
def test_notebook_06_honours_iterations_in_every_profile(profile):
    from pathlib import Path

    from nbsupport.notebook.runner import load_profiles, resolve_parameters

    required = {"dataset_root": "/d/imagenet", "eval_root": "/d/coco", "weights": "/w/r50.pth"}
    extra = required if profile == "paper" else {}
    path = Path(__file__).resolve().parent.parent / "notebooks" / "06_cutler_training.ipynb"
    params = resolve_parameters(path, profile, load_profiles(), extra)
    cfg = _notebook_06_config(profile, extra)
    assert cfg.max_iter == params["iterations"] and cfg.steps == params["lr_steps"]
    assert cfg.selftrain.max_iter == params["selftrain_iterations"] and cfg.head == params.get("head", "cascade")
    changed = _notebook_06_config(profile, {**extra, "iterations": 7, "head": "mask_rcnn"})
    assert changed.max_iter == 7 and changed.head == "mask_rcnn"
