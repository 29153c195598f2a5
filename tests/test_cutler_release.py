"""CutLER's released detectors: detectron2-layout checkpoints (random weights, numpy arrays in a pickled dict)
convert key by key onto the torchvision model, nothing left over or missing, every tensor where it belongs,
and a forward runs; the files are read without running code from them; `cutler predict` takes them."""

import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch

from nbsupport.models import checkpoints
from nbsupport.training import cutler as C
from nbsupport.training.cutler import d2format, release

torch.set_num_threads(1)

SMALL = dict(min_size_test=64, max_size=96, detections_per_img=5, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return release.write_release_fixtures(cache, seed=0)


@pytest.fixture(scope="module")
def states(files):
    return {n: d2format.model_state(d2format.read_detectron2(p)) for n, p in files.items()}


def test_fixture_is_the_release_layout(files, states):
    raw = pickle.loads(files["cutler_cascade_final"].read_bytes())  # what detectron2's loader would see
    assert isinstance(raw["model"]["backbone.bottom_up.stem.conv1.weight"], np.ndarray)
    assert raw["model"]["roi_heads.box_head.2.fc1.weight"].shape == (1024, 256 * 7 * 7)
    casc, mrcnn = states["cutler_cascade_final"], states["cutler_mrcnn_final"]
    assert len(casc) - len(mrcnn) == 2 * 8  # two more box heads (fc1, fc2) and predictors (cls_score, bbox_pred)
    assert casc["roi_heads.box_predictor.1.bbox_pred.weight"].shape == (4, 1024)  # class-agnostic
    assert mrcnn["roi_heads.box_predictor.cls_score.weight"].shape == (2, 1024)  # fg, then background
    n = sum(v.numel() for v in casc.values())
    assert 70e6 < n < 80e6  # Cascade Mask R-CNN R50-FPN: ~77 M numbers
    marker = checkpoints.fixture_marker(files["cutler_cascade_final"])
    assert marker["kind"] == "fixture" and marker["name"] == "cutler_cascade_final"
    again = release.write_release_fixture(files["cutler_mrcnn_final"], "cutler_mrcnn_final")  # reused, unchanged
    assert checkpoints.sha256(again) == checkpoints.sidecar(again).read_text().strip()


@pytest.mark.parametrize("name", ["cutler_cascade_final", "cutler_mrcnn_final"])
def test_every_key_converts(name, states):
    state = states[name]
    kw = release.release_kwargs(state, **SMALL)
    assert kw["head"] == ("cascade" if "cascade" in name else "mask_rcnn") and kw["fpn_norm"] and kw["aligned_roi"]
    target = C.build_model(**kw).state_dict()
    sd, rep = d2format.convert(state, target)
    assert rep["unexpected"] == [] and rep["missing"] == [] and rep["shape"] == [] and rep["filled"] == []
    assert set(sd) == set(target) and len(sd) == len(state)  # one file tensor per model tensor
    assert rep["input_format"] == "RGB"
    # spot checks: each tensor lands where it belongs
    same = {
        "backbone.bottom_up.stem.conv1.weight": "backbone.body.conv1.weight",  # RGB: not flipped
        "backbone.bottom_up.stem.conv1.norm.running_var": "backbone.body.bn1.running_var",
        "backbone.bottom_up.res4.5.conv2.weight": "backbone.body.layer3.5.conv2.weight",
        "backbone.bottom_up.res3.0.shortcut.norm.bias": "backbone.body.layer2.0.downsample.1.bias",
        "backbone.bottom_up.res5.2.conv3.norm.weight": "backbone.body.layer4.2.bn3.weight",
        "backbone.fpn_lateral3.weight": "backbone.fpn.inner_blocks.1.0.weight",
        "backbone.fpn_lateral3.norm.running_mean": "backbone.fpn.inner_blocks.1.1.running_mean",
        "backbone.fpn_output5.norm.weight": "backbone.fpn.layer_blocks.3.1.weight",
        "proposal_generator.rpn_head.conv.weight": "rpn.head.conv.0.0.weight",
        "proposal_generator.rpn_head.anchor_deltas.bias": "rpn.head.bbox_pred.bias",
        "proposal_generator.rpn_head.objectness_logits.weight": "rpn.head.cls_logits.weight",
        "roi_heads.mask_head.mask_fcn3.weight": "roi_heads.mask_head.2.0.weight",
        "roi_heads.mask_head.deconv.bias": "roi_heads.mask_predictor.conv5_mask.bias",
    }
    if "cascade" in name:
        same["roi_heads.box_head.2.fc2.weight"] = "roi_heads.box_head.2.fc7.weight"
        same["roi_heads.box_head.0.fc1.bias"] = "roi_heads.box_head.0.fc6.bias"
        same["roi_heads.box_predictor.1.bbox_pred.weight"] = "roi_heads.box_predictor.1.bbox_pred.weight"
        cls = "roi_heads.box_predictor.2.cls_score.weight"
    else:
        same["roi_heads.box_head.fc2.weight"] = "roi_heads.box_head.fc7.weight"
        cls = "roi_heads.box_predictor.cls_score.weight"
        bp = sd["roi_heads.box_predictor.bbox_pred.weight"]  # torchvision: 4 background rows, then class 1
        assert bp.shape == (8, 1024) and bp[:4].abs().sum() == 0
        assert torch.equal(bp[4:], state["roi_heads.box_predictor.bbox_pred.weight"])
    for d2, tv in same.items():
        assert torch.equal(sd[tv], state[d2]), (d2, tv)
    # detectron2: [foreground, background]; torchvision: [background, foreground]
    assert torch.equal(sd[cls][0], state[cls][1]) and torch.equal(sd[cls][1], state[cls][0])
    ml = sd["roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert ml.shape == (2, 256, 1, 1) and ml[0].abs().sum() == 0
    assert torch.equal(ml[1], state["roi_heads.mask_head.predictor.weight"][0])
    assert sd["backbone.body.bn1.num_batches_tracked"].dtype == torch.int64


def test_bgr_files_flip_the_first_conv(states):
    state = states["cutler_mrcnn_final"]
    target = C.build_model(**release.release_kwargs(state, **SMALL)).state_dict()
    w = state["backbone.bottom_up.stem.conv1.weight"]
    sd, rep = d2format.convert(state, target, input_format="BGR")
    assert rep["input_format"] == "BGR" and torch.equal(sd["backbone.body.conv1.weight"], w[:, [2, 1, 0]])
    # a file that stores detectron2's BGR pixel mean says so itself; an RGB mean keeps the channels
    bgr = dict(state, pixel_mean=torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1))
    assert torch.equal(d2format.convert(bgr, target)[0]["backbone.body.conv1.weight"], w.flip(1))
    rgb = dict(state, pixel_mean=torch.tensor(d2format.RGB_MEAN).view(3, 1, 1), pixel_std=torch.ones(3, 1, 1))
    sd, rep = d2format.convert(rgb, target)
    assert torch.equal(sd["backbone.body.conv1.weight"], w) and rep["unexpected"] == []


def test_released_cascade_loads_and_detects(files):
    model = release.load_release(files["cutler_cascade_final"], **SMALL)
    assert isinstance(model.roi_heads, C.CascadeRoIHeads) and model.roi_heads.num_stages == 3
    assert model.nbs_info["description"].endswith("(random weights, fixture)") and model.nbs_info["converted"] == 408
    assert not model.training
    state = d2format.model_state(d2format.read_detectron2(files["cutler_cascade_final"]))
    got = model.state_dict()["roi_heads.box_head.1.fc6.weight"]
    assert torch.equal(got, state["roi_heads.box_head.1.fc1.weight"])  # loaded, not just converted
    with torch.no_grad():
        out = model([torch.rand(3, 60, 80)])[0]
    assert len(out["boxes"]) == 5 and out["masks"].shape == (5, 1, 60, 80)
    assert torch.isfinite(out["boxes"]).all() and torch.isfinite(out["scores"]).all()


def test_a_key_left_over_or_missing_is_named(tmp_path, states):
    state = dict(states["cutler_mrcnn_final"])
    del state["backbone.bottom_up.res2.1.conv2.norm.running_mean"]
    state["roi_heads.keypoint_head.conv_fcn1.weight"] = torch.zeros(1)
    p = tmp_path / "broken.pth"
    p.write_bytes(pickle.dumps({"model": {k: v.numpy() for k, v in state.items()}}, protocol=4))
    with pytest.raises(checkpoints.CheckpointError) as e:
        release.load_release(p, **SMALL)
    msg = str(e.value)
    assert "roi_heads.keypoint_head.conv_fcn1.weight (no place in the model)" in msg
    assert "backbone.body.layer1.1.bn2.running_mean (not in the file)" in msg
    c2 = tmp_path / "c2.pkl"
    c2.write_bytes(pickle.dumps({"blobs": {"res2_0_branch2a_w": np.zeros(2), "conv1_w": np.zeros(2)}}))
    with pytest.raises(checkpoints.CheckpointError, match="Caffe2"):
        release.load_release(c2)


# ------------------------------------------------------------------------------------------------ reading


def _torch_save(obj, path):
    torch.save(obj, path)
    assert zipfile.is_zipfile(path)


@pytest.mark.parametrize("fmt", ["pickle2", "pickle4", "pickle5", "torch_numpy", "torch_tensors"])
def test_read_every_release_format(tmp_path, fmt):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(7, np.int64)}
    p = tmp_path / f"{fmt}.pth"
    obj = {"model": arrays, "__author__": "x", "iteration": np.int64(5)}
    if fmt.startswith("pickle"):
        p.write_bytes(pickle.dumps(obj, protocol=int(fmt[-1])))
    elif fmt == "torch_numpy":
        _torch_save(obj, p)  # torch.save of numpy arrays: pickled inline (protocol 2, _codecs.encode)
    else:
        _torch_save({"model": {k: torch.from_numpy(v) for k, v in arrays.items()}}, p)
    sd = d2format.model_state(d2format.read_detectron2(p))
    assert sd["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and sd["a"].dtype == torch.float32
    assert sd["n"].shape == () and int(sd["n"]) == 7


def test_reading_runs_no_code(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return os.system, (f"touch {tmp_path / 'pwned'}",)

    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"model": {"a": np.zeros(2, np.float32)}, "x": Evil()}, protocol=2))
    obj = d2format.read_detectron2(p)
    assert not (tmp_path / "pwned").exists() and type(obj["x"]).__name__ == "_Placeholder"
    buf = io.BytesIO()
    pickle.dump({"model": {"a": 1}}, buf)
    with pytest.raises(checkpoints.CheckpointError, match="is a int, not an array"):
        d2format.model_state(pickle.loads(buf.getvalue()))


def test_backbone_in_detectron2_format(tmp_path, states):
    """CutLER's init `dino_RN50_pretrain_d2_format.pkl`: the backbone alone, prefix-less names, numpy arrays."""
    state = states["cutler_cascade_final"]
    pre = "backbone.bottom_up."
    back = {k[len(pre) :]: v.numpy() for k, v in state.items() if k.startswith(pre)}
    p = tmp_path / "dino_RN50_pretrain_d2_format.pkl"
    p.write_bytes(pickle.dumps({"model": back, "__author__": "MOCO", "matching_heuristics": True}))
    model = C.build_model("resnet50", weights=p, head="mask_rcnn", representation_size=64)
    assert model.nbs_weights["loaded"] == len(back) and model.nbs_weights["unexpected"] == []
    assert torch.equal(model.backbone.body.layer4[1].conv2.weight, state[pre + "res5.1.conv2.weight"])


# ------------------------------------------------------------------------------------------------ command line


def test_predict_cli_on_a_released_file(files, tmp_path, monkeypatch):
    from PIL import Image

    from nbsupport.__main__ import main as nbmain

    (tmp_path / "images").mkdir()
    Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)).save(
        tmp_path / "images/a.png"
    )
    gt = {"images": [{"id": 1, "file_name": "a.png", "height": 48, "width": 64}], "annotations": [], "categories": []}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "pred.json"
    args = ["cutler", "predict", "--checkpoint", str(files["cutler_cascade_final"]), "--json", str(tmp_path / "gt.json"),
            "--out", str(out), "--detections", "3", "--test-size", "48", "--device", "cpu"]  # fmt: skip
    assert nbmain(args) == 0
    preds = json.loads(out.read_text())
    assert len(preds) == 3 and all(p["segmentation"]["size"] == [48, 64] for p in preds)
    # by release name, from the weight cache
    monkeypatch.setenv("NBSUPPORT_CACHE", str(files["cutler_cascade_final"].parent.parent))
    monkeypatch.setenv("NBSUPPORT_OFFLINE", "1")
    assert release.resolve_checkpoint("cutler_cascade_final") == files["cutler_cascade_final"]
    with pytest.raises(checkpoints.WeightsUnavailableError, match="cutler_cascade_r1.pth"):
        release.resolve_checkpoint("cutler_cascade_r1")
