"""GroupViT's zero-shot evaluation at dataset scale (nbsupport.analysis.segmentation_eval, thesis 5.3):
hand-checked confusion matrices from planted predictions on the VOC / COCO-Object / ADE20K fixtures, ignore
pixels never counted, the sliding window against one pass, mmcv's rescale rule, per-dataset thresholds and
references, kill-and-resume equality, corrupt images recorded, the command line, a 2-process torchrun."""

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from nbsupport.analysis import segmentation_eval as se
from nbsupport.analysis import segmentation_eval_cli as cli
from nbsupport.analysis import zero_shot_protocol as zp
from nbsupport.data.datasets import ade20k, coco_object, segmentation_dataset, voc
from nbsupport.models import groupvit as gv
from nbsupport.models.groupvit import inference

FAST = zp.EvalSettings(short_side=48, window=32, stride=16)  # the protocol's code paths at a CPU-test size


@pytest.fixture(scope="module")
def model():
    return gv.build("small", seed=0).eval()


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("fixtures")
    return {"voc": voc.write_fixture(base), "coco": coco_object.write_fixture(base), "ade": ade20k.write_fixture(base)}


def _voc(trees):
    return segmentation_dataset("voc", trees["voc"]["root"]["voc"], "val")


def _key(image: torch.Tensor) -> str:
    return hashlib.sha256(image.detach().cpu().numpy().tobytes()).hexdigest()


def _planted(ds, rule, calls=None):
    """A stand-in for ``segment`` that returns ``rule(gt)`` for the image it is given (recognised by its bytes,
    normalised exactly as the evaluator normalises them)."""
    table = {}
    for i in range(len(ds)):
        img, mask = ds[i]
        pixels = torch.from_numpy(np.asarray(img, np.uint8).copy()).permute(2, 0, 1)
        table[_key(se._normalise(pixels))] = torch.from_numpy(rule(mask.astype(np.int64)))

    def fake_segment(model, image, text_embeds=None, **kw):
        if calls is not None:
            calls.append((tuple(image.shape), tuple(text_embeds.shape), kw))
        return table[_key(image)].clone()

    return fake_segment


# ---------------------------------------------------------------------------------------------- by hand
def test_image_confusion_by_hand_skips_ignore_pixels():
    gt = torch.tensor([[0, 1, 255], [2, 2, 255]])
    pred = torch.tensor([[0, 2, 1], [2, 0, 2]])
    flat = se.image_confusion(pred, gt, 3)
    conf = flat.reshape(3, 3).numpy()
    want = np.zeros((3, 3), np.int64)
    want[0, 0] = want[1, 2] = want[2, 2] = want[2, 0] = 1  # the two 255 pixels (predicted 1 and 2) never count
    np.testing.assert_array_equal(conf, want)
    sp = se.to_sparse(flat.numpy())
    assert sp == {"cells": [0, 5, 6, 8], "counts": [1, 1, 1, 1]}
    np.testing.assert_array_equal(se.from_sparse(sp, 3), want)


def test_scores_by_hand():
    conf = np.array([[6, 2, 0], [1, 3, 0], [0, 0, 0]])  # class 2 never seen: no IoU, not in the mean
    r = se.scores(conf)
    iou0, iou1 = 6 / (8 + 7 - 6), 3 / (4 + 5 - 3)
    assert r["iou"][0] == pytest.approx(100 * iou0) and r["iou"][1] == pytest.approx(100 * iou1)
    assert r["iou"][2] is None and r["accuracy"][2] is None
    assert r["miou"] == pytest.approx(100 * (iou0 + iou1) / 2)
    assert r["pixel_accuracy"] == pytest.approx(100 * 9 / 12)
    assert r["mean_accuracy"] == pytest.approx(100 * (6 / 8 + 3 / 4) / 2)


def test_mmcv_rescale_rule_and_sliding_window_origins():
    assert inference.protocol_size(375, 500, 448) == (448, 597)  # a VOC landscape image
    assert inference.protocol_size(500, 375, 448, 2048) == (597, 448)
    assert inference.protocol_size(100, 1000, 448, 2048) == (205, 2048)  # the long side caps the scale
    assert inference.protocol_size(100, 1000, 448) == (448, 4480)
    assert inference.protocol_size(48, 64, None) == (48, 64)
    assert inference.window_origins(597, 448, 224) == [0, 149]
    assert inference.window_origins(448, 448, 224) == [0]
    assert inference.window_origins(1000, 448, 224) == [0, 224, 448, 552]
    assert inference.window_origins(300, 448, 224) == [0]


def test_sliding_window_averages_to_the_one_pass_of_a_pixelwise_model(model, monkeypatch):
    """With window logits that depend only on each pixel's own values, every window gives a pixel the same
    logits, so the overlap average (any window batch) must equal one pass over the whole image."""
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))

    def pixelwise(model, images, text_embeds, topk=5, bg_thresh=None):
        return torch.einsum("kc,bchw->bkhw", w, images)

    monkeypatch.setattr(inference, "segment_logits", pixelwise)
    img = torch.randn(3, 45, 70, generator=torch.Generator().manual_seed(1))
    te = torch.zeros(4, 8)
    one = inference.segment(model, img, text_embeds=te, short_side=None, window=None, return_logits=True)[1]
    for wb in (1, 3, 16):
        pred, slid = inference.segment(
            model, img, text_embeds=te, short_side=None, window=32, stride=16, return_logits=True, window_batch=wb
        )
        torch.testing.assert_close(slid, one, rtol=1e-5, atol=1e-5)
        assert torch.equal(pred, one.argmax(0))


def test_windows_slide_over_the_unpadded_image_as_mmseg(model, monkeypatch):
    """Crops start where mmseg's slide_inference starts them on the 40 x 70 image itself (the last one flush
    with its edge, not with a padded copy), and reach the model padded to a multiple of the patch."""
    seen = []

    def record(model, images, text_embeds, topk=5, bg_thresh=None):
        seen.extend((int(c[1, 0, 0]), int(c[2, 0, 0]), tuple(c.shape[-2:])) for c in images)
        return torch.zeros(len(images), 2, *images.shape[-2:])

    monkeypatch.setattr(inference, "segment_logits", record)
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(70.0), indexing="ij")
    img = torch.stack([torch.zeros_like(yy), yy, xx])
    inference.segment(model, img, text_embeds=torch.zeros(1, 8), short_side=None, window=32, stride=16, window_batch=3)
    assert [(y, x) for y, x, _ in seen] == [(y, x) for y in (0, 8) for x in (0, 16, 32, 38)]
    assert {s for *_, s in seen} == {(32, 32)}
    seen.clear()
    inference.segment(model, img[:, :20], text_embeds=torch.zeros(1, 8), short_side=None, window=32, stride=16)
    assert [(y, x) for y, x, _ in seen] == [(0, 0), (0, 16), (0, 32), (0, 38)]
    p = model.cfg.patch_size
    assert {s for *_, s in seen} == {(-(-20 // p) * p, 32)}  # 20 x 32 crops, padded to the patch


def test_one_window_covering_the_image_is_the_whole_image_pass(model, trees):
    """The evaluator with a window that covers the resized image equals ``window=None`` exactly."""
    ds = _voc(trees)
    a = se.evaluate_zero_shot(model, ds, None, zp.EvalSettings(short_side=32, window=64, stride=32), progress=False)
    b = se.evaluate_zero_shot(model, ds, None, zp.EvalSettings(short_side=32, window=None), progress=False)
    assert a["confusion"] == b["confusion"] and a["n_images"] == 4


# ---------------------------------------------------------------------------------------------- protocol
def test_thresholds_follow_groupvits_configs():
    r = {n: zp.resolve(n, segmentation_dataset_classes(n)) for n in ("voc", "context", "coco_object", "ade20k")}
    assert [r[n].bg_thresh for n in ("voc", "context", "coco_object")] == [0.95, 0.35, 0.95]
    assert r["ade20k"].with_background is False and r["ade20k"].bg_thresh is None  # 150 classes, no background
    assert "pascal_voc12.py" in r["voc"].bg_source and "coco.py" in r["coco_object"].bg_source
    assert inference.BG_THRESH["coco_object"] == inference.BG_THRESH["coco"] == 0.95
    diffs = zp.differences(r["coco_object"], "coco_object", "val", 5000)
    assert diffs == ["thesis 5.3 states bg_thresh 0.9 for coco_object"]  # printed beside the table
    assert zp.differences(r["voc"], "voc", "val", 1449) == []
    mine = zp.resolve("voc", voc.VOC_CLASSES, zp.EvalSettings(bg_thresh=0.99))
    assert mine.bg_thresh == 0.99 and "bg_thresh 0.99 (GroupViT config 0.95)" in zp.differences(
        mine, "voc", "val", 1449
    )
    with pytest.raises(ValueError, match="no known background threshold"):
        zp.resolve("my_set", ("background", "cat"))
    with pytest.raises(ValueError, match="stride"):
        zp.EvalSettings(window=32, stride=64)


def segmentation_dataset_classes(name):
    return {
        "voc": voc.VOC_CLASSES,
        "context": voc.CONTEXT_CLASSES,
        "coco_object": coco_object.COCO_OBJECT_CLASSES,
        "ade20k": ade20k.ADE20K_CLASSES,
    }[name]


def test_references_of_the_official_releases():
    refs = zp.references("group_vit_gcc_yfcc_30e", "voc")
    assert [(r["miou"], r["source"]) for r in refs] == [(52.3, "GroupViT README"), (52.29, "thesis Table 5 (Original)")]
    assert [r["miou"] for r in zp.references("group_vit_gcc_redcap_30e-3dd09a76.pth", "coco_object")] == [27.5]
    assert [r["miou"] for r in zp.references("nvidia/groupvit-gcc-yfcc", "context")] == [22.4, 22.39]
    assert zp.references("group_vit_gcc_yfcc_30e", "ade20k")[0]["source"].startswith("thesis")
    assert zp.references("small", "voc") == []
    per_class = zp.class_references("group_vit_gcc_yfcc_30e", "voc")
    assert len(per_class) == 21 and np.mean(per_class) == pytest.approx(52.29, abs=0.01)  # issue #32's table


# ---------------------------------------------------------------------------------------------- planted
@pytest.mark.parametrize("name", ["voc", "coco_object", "ade20k"])
def test_planted_oracle_scores_100_and_ignore_pixels_never_count(name, trees, model, monkeypatch):
    """A prediction equal to the ground truth, with an absent class written on every 255 pixel: mIoU is
    exactly 100, that class gets no IoU, and the matrix holds exactly the labelled pixels."""
    root = {"voc": trees["voc"]["root"]["voc"], "coco_object": trees["coco"]["root"], "ade20k": trees["ade"]["root"]}
    ds = segmentation_dataset(name, root[name], "val")
    present = set()
    for i in range(len(ds)):
        present |= set(np.unique(ds[i][1]).tolist()) - {255}
    filler = max(set(range(len(ds.classes))) - present)
    calls = []
    monkeypatch.setattr(se.gv, "segment", _planted(ds, lambda m: np.where(m == 255, filler, m), calls))
    r = se.evaluate_zero_shot(model, ds, None, progress=False)
    conf = np.asarray(r["confusion"])
    labelled = sum(int((ds[i][1] != 255).sum()) for i in range(len(ds)))
    assert conf.sum() == labelled and np.count_nonzero(conf - np.diag(np.diag(conf))) == 0
    assert r["miou"] == 100.0 and r["iou"][ds.classes[filler]] is None
    has_bg = name != "ade20k"
    assert calls[0][1][0] == len(ds.classes) - has_bg  # prompts: every class but background
    assert calls[0][2]["bg_thresh"] == (0.95 if has_bg else None)
    assert {k: calls[0][2][k] for k in ("short_side", "window", "stride", "max_long")} == {
        "short_side": 448,
        "window": 448,
        "stride": 224,
        "max_long": 2048,
    }
    assert [c[0][1:] for c in calls] == [ds[i][1].shape for i in range(len(ds))]  # full resolution


def test_planted_swap_matches_a_hand_built_matrix(trees, model, monkeypatch):
    """Objects predicted as background and background as class 1: the matrix built by hand from the planted
    VOC masks, every IoU 0 except class 1 where it is really present."""
    ds = _voc(trees)
    monkeypatch.setattr(se.gv, "segment", _planted(ds, lambda m: np.where(m == 0, 1, 0)))
    r = se.evaluate_zero_shot(model, ds, None, progress=False)
    want = np.zeros((21, 21), np.int64)
    for image_id in trees["voc"]["splits"]["voc"]["val"]:
        m = trees["voc"]["masks"]["voc"][image_id]
        want[0, 1] += int((m == 0).sum())
        for c in np.unique(m[(m != 0) & (m != 255)]):
            want[c, 0] += int((m == c).sum())
    np.testing.assert_array_equal(np.asarray(r["confusion"]), want)
    assert r["iou"]["background"] == 0.0 and r["pixel_accuracy"] == 0.0
    assert r["miou"] == 0.0


@pytest.mark.slow
def test_official_layout_random_groupvit_equals_segment_image_by_image(trees, tmp_path, monkeypatch):
    """The official-layout random-weight gcc_yfcc release at the full protocol on 2 VOC images: the written
    results equal ``segment`` + a confusion matrix computed here, with the README reference beside them and
    the fixture flagged."""
    from nbsupport.models import fixtures as fx

    fx.write_official_weights(tmp_path / "cache", names=["group_vit_gcc_yfcc_30e"])
    monkeypatch.setenv("NBSUPPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NBSUPPORT_OFFLINE", "1")
    m = gv.load("group_vit_gcc_yfcc_30e")
    ds = _voc(trees)
    r = se.evaluate_zero_shot(m, ds, tmp_path / "out", n_images=2, progress=False)
    te = gv.text_embeddings(m, voc.VOC_CLASSES[1:])
    want = np.zeros((21, 21), np.int64)
    for i in range(2):
        img, mask = ds[i]
        x = (torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1) - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]  # fmt: skip
        pred = gv.segment(m, x, text_embeds=te, max_long=2048).numpy()
        keep = mask != 255
        np.add.at(want, (mask[keep], pred[keep]), 1)
    np.testing.assert_array_equal(np.asarray(r["confusion"]), want)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["confusion"] == want.tolist() and saved["n_images"] == 2 and saved["model"]["fixture"] is True
    assert saved["model"]["weights_sha256"] == se.weights_sha256(m)
    assert saved["reference"][0]["miou"] == 52.3 and saved["reference"][0]["delta"] == round(r["miou"] - 52.3, 2)
    assert any("random-weight fixture" in d for d in saved["differences"])
    assert "2 of the 1449 images of val" in saved["differences"]
    rows = (tmp_path / "out" / "per_class_iou.csv").read_text().splitlines()
    assert rows[0].endswith("reference_iou") and rows[1].startswith("0,background,") and rows[1].endswith(",80.63")


# ---------------------------------------------------------------------------------------------- long runs
class _Killed(Exception):
    pass


def _kill_after(k):
    seen = []

    def hook(rec):
        seen.append(rec["i"])
        if len(seen) >= k:
            raise _Killed

    return hook


def test_kill_and_resume_gives_the_uninterrupted_numbers(trees, model, tmp_path):
    ds = _voc(trees)
    whole = se.evaluate_zero_shot(model, ds, tmp_path / "whole", FAST, progress=False)
    with pytest.raises(_Killed):
        se.evaluate_zero_shot(model, ds, tmp_path / "run", FAST, progress=False, on_image=_kill_after(2))
    part = tmp_path / "run" / "parts" / "rank0.jsonl"
    assert len(part.read_text().splitlines()) == 2 and not (tmp_path / "run" / "results.json").exists()
    with open(part, "a") as f:
        f.write('{"i": 2, "id": "2007_0')  # a record torn by the kill
    again = se.evaluate_zero_shot(model, ds, tmp_path / "run", FAST, progress=False)
    assert again["confusion"] == whole["confusion"] and again["miou"] == whole["miou"]
    assert again["run"]["new_images"] == 2 and again["run"]["resumed_images"] == 2
    assert [json.loads(x)["i"] for x in part.read_text().splitlines()] == [0, 1, 2, 3]
    # another setting refuses the old records; fresh discards them
    with pytest.raises(se.ResumeMismatch, match="settings"):
        se.evaluate_zero_shot(model, ds, tmp_path / "run", zp.EvalSettings(short_side=48, window=32, stride=32))
    other = se.evaluate_zero_shot(
        model, ds, tmp_path / "run", zp.EvalSettings(short_side=48, window=32, stride=32), fresh=True, progress=False
    )
    assert other["run"]["new_images"] == 4


def test_a_corrupt_image_is_recorded_and_the_run_goes_on(trees, model, tmp_path):
    root = tmp_path / "VOC2012"
    shutil.copytree(trees["voc"]["root"]["voc"], root)
    ids = trees["voc"]["splits"]["voc"]["val"]
    (root / "JPEGImages" / f"{ids[1]}.jpg").write_bytes(b"not a jpeg at all")
    ds = segmentation_dataset("voc", root, "val")
    r = se.evaluate_zero_shot(model, ds, tmp_path / "out", FAST, progress=False, workers=1)  # read in a worker
    assert r["n_failed"] == 1 and r["n_images"] == 3
    assert (
        r["failed"][0]["index"] == 1 and r["failed"][0]["id"] == ids[1] and f"{ids[1]}.jpg" in r["failed"][0]["error"]
    )
    labelled = sum(int((trees["voc"]["masks"]["voc"][i] != 255).sum()) for i in ids if i != ids[1])
    assert np.asarray(r["confusion"]).sum() == labelled
    assert f"failed: image 1 ({ids[1]})" in se.format_report(r)
    # the image repaired, a rerun tries it again and counts it: the numbers of a clean run
    shutil.copy(trees["voc"]["root"]["voc"] / "JPEGImages" / f"{ids[1]}.jpg", root / "JPEGImages" / f"{ids[1]}.jpg")
    again = se.evaluate_zero_shot(model, ds, tmp_path / "out", FAST, progress=False)
    clean = se.evaluate_zero_shot(model, _voc(trees), None, FAST, progress=False)
    assert again["n_failed"] == 0 and again["run"]["new_images"] == 1 and again["confusion"] == clean["confusion"]


def test_validate_is_the_in_memory_evaluation_and_restores_the_mode(trees, model):
    ds = _voc(trees)
    m = gv.build("small", seed=0).train()
    v = se.validate(m, ds, n_images=3, settings=FAST)
    assert m.training and v["n_images"] == 3
    ref = se.evaluate_zero_shot(model, ds, None, FAST, n_images=3, progress=False)
    assert v["miou"] == ref["miou"] and v["confusion"] == ref["confusion"]
    too_many = se.validate(model, ds, n_images=50, settings=FAST)  # more than the split: all of it
    assert too_many["n_images"] == 4 and too_many["n_requested"] == 50


# ---------------------------------------------------------------------------------------------- command line
def _argv(root, out, *extra):
    return [
        "groupvit-eval", "--model", "small", "--dataset", "voc", "--root", str(root), "--out", str(out),
        "--device", "cpu", "--workers", "0", "--short-side", "48", "--window", "32", "--stride", "16", "--quiet",
        *extra,
    ]  # fmt: skip


def test_cli_resumes_after_a_simulated_crash(trees, tmp_path, monkeypatch, capsys):
    root = trees["voc"]["root"]["voc"]
    assert cli.main(_argv(root, tmp_path / "whole")) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    monkeypatch.setenv(cli.STOP_ENV, "3")
    with pytest.raises(SystemExit, match="simulated crash after 3"):
        cli.main(_argv(root, tmp_path / "run"))
    monkeypatch.delenv(cli.STOP_ENV)
    assert cli.main(_argv(root, tmp_path / "run")) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["confusion"] == whole["confusion"] and res["run"]["new_images"] == 1
    assert res["settings"]["window"] == 32 and res["settings"]["bg_thresh"] == 0.95
    out = capsys.readouterr().out
    assert "mIoU" in out and "short_side 48 (protocol 448)" in out
    assert cli.main(_argv(tmp_path / "nowhere", tmp_path / "x")) == 2  # a root that is not there: one message
    assert "not a folder" in capsys.readouterr().err


_RUN = "import sys; from nbsupport.analysis.segmentation_eval_cli import main; sys.exit(main())"


@pytest.mark.slow
def test_torchrun_two_processes_give_the_one_process_numbers(trees, tmp_path):
    root = trees["voc"]["root"]["voc"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run(
        [sys.executable, "-c", _RUN, *_argv(root, tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    port = str(29500 + random.Random(os.getpid() + 7).randint(4001, 6000))
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
         "-m", "nbsupport.analysis.segmentation_eval_cli", *_argv(root, tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert b["run"]["world_size"] == 2 and a["run"]["world_size"] == 1
    assert b["confusion"] == a["confusion"] and b["miou"] == a["miou"] and b["n_images"] == 4
    parts = {r: [json.loads(x)["i"] for x in (tmp_path / "two" / "parts" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}  # fmt: skip
    assert parts == {0: [0, 2], 1: [1, 3]}
