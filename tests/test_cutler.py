"""CutLER core: DropLoss on hand-made boxes, parity with torchvision's RoIHeads, copy-paste invariants,
mask boxes, pseudo-mask dataset bad input, resumable sampler."""

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mu
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss

from nbsupport.training import cutler as C

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ boxes


def test_masks_to_boxes_pixel_edges():
    m = torch.zeros(3, 8, 10, dtype=torch.uint8)
    m[0, 2:5, 3:7] = 1
    m[1, 7, 9] = 1  # one pixel in the corner: box 9..10 x 7..8, width 1 (not 0)
    boxes = C.masks_to_boxes(m)
    assert boxes.tolist() == [[3, 2, 7, 5], [9, 7, 10, 8], [0, 0, 0, 0]]


# ------------------------------------------------------------------------------------------------ DropLoss


def _droploss_case():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    props0 = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU 1                       -> kept
            [9.9, 9.9, 19.9, 19.9],  # IoU 0.01^2/199.99 ~ 5e-5     -> dropped
            [8.0, 8.0, 18.0, 18.0],  # IoU 4/196 = 0.0204 > 0.01    -> kept
            [30.0, 30.0, 40.0, 40.0],  # disjoint, zero deltas        -> dropped
            [30.0, 30.0, 40.0, 40.0],  # disjoint proposal, but deltas move the *predicted* box onto GT -> kept
        ]
    )
    props1 = torch.tensor([[0.0, 0.0, 10.0, 10.0]])  # image without GT: always dropped
    reg = torch.zeros(6, 8)
    reg[4, 4:8] = torch.tensor([-30.0, -30.0, 0.0, 0.0])  # class-1 deltas: centre 35 -> 5 (w = 10, weight 10)
    logits = torch.tensor([[0.2, 1.0], [1.5, -0.5], [0.3, 0.1], [2.0, 0.0], [-1.0, 0.5], [0.0, 0.7]])
    labels = [torch.tensor([1, 0, 0, 0, 0]), torch.tensor([0])]
    targets_reg = [torch.zeros(5, 4), torch.zeros(1, 4)]
    return coder, gt, [props0, props1], reg, logits, labels, targets_reg


def test_droploss_hand_made_boxes():
    coder, gt, props, reg, logits, labels, treg = _droploss_case()
    loss_cls, loss_box, keep = C.droploss_fastrcnn_loss(
        logits, reg, labels, treg, props, [gt, torch.zeros(0, 4)], coder
    )
    assert keep.tolist() == [True, False, True, False, True, False]
    ce = F.cross_entropy(logits, torch.cat(labels), reduction="none")
    expected = (ce[0] + ce[2] + ce[4]) / 6  # mean over ALL six RoIs, not over the kept three
    assert loss_cls.item() == pytest.approx(expected.item(), rel=1e-6)
    # box loss is torchvision's, unchanged; switching DropLoss off gives torchvision's CE exactly
    ref_cls, ref_box = fastrcnn_loss(logits, reg, labels, treg)
    assert loss_box.item() == pytest.approx(ref_box.item())
    off_cls, off_box, off_keep = C.droploss_fastrcnn_loss(
        logits, reg, labels, treg, props, [gt, torch.zeros(0, 4)], coder, enabled=False
    )
    assert off_keep is None and off_cls.item() == pytest.approx(ce.mean().item()) and off_cls.item() == ref_cls.item()


def test_droploss_threshold_is_strict():
    coder, gt, props, reg, logits, labels, treg = _droploss_case()
    _, _, keep = C.droploss_fastrcnn_loss(
        logits, reg, labels, treg, props, [gt, torch.zeros(0, 4)], coder, drop_iou=4 / 196
    )  # exactly the third RoI's IoU: now dropped
    assert keep.tolist() == [True, False, False, False, True, False]


def _tiny_model(**kw):
    torch.manual_seed(0)
    return C.build_model(
        "resnet18",
        min_size=(64,),
        max_size=64,
        min_size_test=64,
        rpn_pre_nms_top_n_train=100,
        rpn_post_nms_top_n_train=50,
        box_batch_size_per_image=32,
        representation_size=256,
        **kw,
    )


def _toy_batch(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(n):
        img = torch.rand(3, size, size, generator=g)
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        masks[0, 5:30, 8:28] = 1
        masks[1, 35 - i : 60, 30:58] = 1
        images.append(img)
        targets.append({"masks": masks, "boxes": C.masks_to_boxes(masks), "labels": torch.ones(2, dtype=torch.int64)})
    return images, targets


def test_roi_heads_parity_with_torchvision_when_off():
    model = _tiny_model(drop_loss=False, head="mask_rcnn").train()
    images, targets = _toy_batch()
    il, tg = model.transform(images, [dict(t) for t in targets])
    feats = model.backbone(il.tensors)
    torch.manual_seed(1)
    props, _ = model.rpn(il, feats, tg)
    props = [p.detach() for p in props]
    rh = model.roi_heads
    assert isinstance(rh, C.DropLossRoIHeads) and rh.score_thresh == 0.0 and rh.detections_per_img == 100
    torch.manual_seed(2)
    _, ours = rh(feats, props, il.image_sizes, tg)
    torch.manual_seed(2)
    _, ref = RoIHeads.forward(rh, feats, props, il.image_sizes, tg)
    assert set(ours) == set(ref) == {"loss_classifier", "loss_box_reg", "loss_mask"}
    for k in ref:
        assert ours[k].item() == pytest.approx(ref[k].item(), rel=1e-6), k
    rh.drop_loss = True
    torch.manual_seed(2)
    _, on = rh(feats, props, il.image_sizes, tg)
    keep = rh.last_keep
    assert keep.dtype == torch.bool and 0 < keep.sum() < keep.numel()  # some random RoIs miss every GT
    assert on["loss_classifier"].item() < ref["loss_classifier"].item()
    assert on["loss_box_reg"].item() == pytest.approx(ref["loss_box_reg"].item(), rel=1e-6)


def test_build_model_reference_settings_and_weights(tmp_path):
    model = _tiny_model()
    assert model.rpn.nms_thresh == 0.65
    assert isinstance(model.roi_heads, C.CascadeRoIHeads) and model.roi_heads.stage_ious == [0.5, 0.6, 0.7]
    assert [c.weights for c in model.roi_heads.stage_coders] == [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]
    assert [p.cls_score.out_features for p in model.roi_heads.box_predictor] == [2, 2, 2]
    assert [p.bbox_pred.out_features for p in model.roi_heads.box_predictor] == [4, 4, 4]  # class-agnostic
    assert isinstance(model.roi_heads.box_roi_pool, C.RoIAlignV2Pooler)  # detectron2's ROIAlignV2
    assert isinstance(model.backbone.fpn.inner_blocks[0][1], torch.nn.BatchNorm2d)  # FPN NORM (Sync)BN
    plain = _tiny_model(head="mask_rcnn", fpn_norm=False, aligned_roi=False)
    assert plain.roi_heads.box_predictor.cls_score.out_features == 2
    assert (
        type(plain.roi_heads.box_roi_pool).__name__ == "MultiScaleRoIAlign"
        and len(plain.backbone.fpn.inner_blocks[0]) == 1
    )
    assert all(p.requires_grad for p in model.backbone.body.parameters())  # trainable layers 5
    assert model.transform.min_size == (64,) and model.transform.min_size_test == 64
    big = C.build_model("resnet18")
    assert big.rpn._post_nms_top_n["training"] == 4000 and big.transform.min_size == C.REFERENCE_MIN_SIZES
    # backbone weights from a path (weights_only load), with a "module." prefix and an fc layer to ignore
    import torchvision

    src = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        src.conv1.weight.fill_(0.25)
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save(sd, tmp_path / "r18.pth")
    m2 = C.build_model("resnet18", weights=tmp_path / "r18.pth")
    assert torch.all(m2.backbone.body.conv1.weight == 0.25)
    assert m2.nbs_weights["loaded"] > 50 and not m2.nbs_weights["missing"]
    torch.save({"foo": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="no tensor matches"):
        C.build_model("resnet18", weights=tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="arch must be"):
        C.build_model("vgg")
    # a misspelt keyword is an error, not a setting silently left at its default
    with pytest.raises(TypeError, match="rpn_nms_tresh"):
        C.build_model("resnet18", rpn_nms_tresh=0.5)
    frozen = C.build_model("resnet18", trainable_layers=3)
    names = {n for n, p in frozen.backbone.body.named_parameters() if not p.requires_grad}
    assert any(n.startswith("layer1") for n in names) and not any(n.startswith("layer2") for n in names)


# ------------------------------------------------------------------------------------------------ copy-paste


def _instances(size=32):
    """Target image 0: square A and small C; donor image 1 (reversed batch): B1, B2 (C lies inside B2)."""
    img0 = torch.zeros(3, size, size)
    img1 = torch.ones(3, size, size)
    m0 = torch.zeros(2, size, size, dtype=torch.uint8)
    m0[0, 0:10, 0:10] = 1  # A
    m0[1, 22:26, 22:26] = 1  # C
    m1 = torch.zeros(2, size, size, dtype=torch.uint8)
    m1[0, 5:15, 5:15] = 1  # B1 overlaps A
    m1[1, 20:30, 20:30] = 1  # B2 covers C
    t0 = {"masks": m0, "boxes": C.masks_to_boxes(m0), "labels": torch.ones(2, dtype=torch.int64), "image_id": 0}
    t1 = {"masks": m1, "boxes": C.masks_to_boxes(m1), "labels": torch.ones(2, dtype=torch.int64), "image_id": 1}
    return [img0, img1], [t0, t1]


def test_copy_paste_same_place_occlusion():
    images, targets = _instances()
    seen = set()
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        imgs, tgts = C.copy_paste(images, targets, scale=(1.0, 1.0), generator=g)
        out, t = imgs[0], tgts[0]
        # n = 2 donor instances -> exactly 1 pasted (1..n-1); scale 1 and equal sizes -> offset 0
        pasted = t["masks"][-1].bool()
        donor = targets[1]["masks"].bool()
        which = 0 if torch.equal(pasted, donor[0]) else 1
        seen.add(which)
        if which == 0:
            assert torch.equal(out[:, pasted], images[1][:, pasted]) and torch.equal(
                out[:, ~pasted], images[0][:, ~pasted]
            )
        if which == 0:  # B1 pasted: A loses the 5x5 overlap, C untouched
            assert len(t["masks"]) == 3
            assert int(t["masks"][0].sum()) == 100 - 25 and torch.equal(t["masks"][1], targets[0]["masks"][1])
        else:  # B2 picked: it would hide all of C (>= 50%) -> not pasted, image unchanged (reference)
            assert len(t["masks"]) == 2 and torch.equal(t["masks"], targets[0]["masks"])
            assert torch.equal(out, images[0])
        assert torch.equal(t["boxes"], C.masks_to_boxes(t["masks"]))
        assert t["labels"].tolist() == [1] * len(t["masks"]) and t["image_id"] == 0
    assert seen == {0, 1}
    assert targets[0]["masks"].sum() == 116 and images[0].sum() == 0  # inputs untouched


def test_copy_paste_without_cover_rule_occludes_and_drops():
    """max_cover=None pastes whatever is drawn: B2 hides C completely, so C is dropped from the target."""
    images, targets = _instances()
    seen = set()
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        imgs, tgts = C.copy_paste(images, targets, scale=(1.0, 1.0), generator=g, max_cover=None)
        t, donor = tgts[0], targets[1]["masks"]
        which = 0 if torch.equal(t["masks"][-1], donor[0]) else 1
        assert torch.equal(t["masks"][-1], donor[which])
        seen.add(which)
        if which == 1:
            assert len(t["masks"]) == 2 and torch.equal(t["masks"][0], targets[0]["masks"][0])
            assert torch.equal(imgs[0][:, donor[1].bool()], images[1][:, donor[1].bool()])
    assert seen == {0, 1}


def test_copy_paste_cover_threshold_hand_case():
    """A pasted 10x10 square over a 10x20 existing instance covers exactly half of it: 0.5 is dropped
    (>= max_cover, as the reference's `< 0.5` keep rule), 0.51 keeps it."""
    size = 32
    m0 = torch.zeros(1, size, size, dtype=torch.uint8)
    m0[0, 0:10, 0:20] = 1
    m1 = torch.zeros(1, size, size, dtype=torch.uint8)
    m1[0, 0:10, 0:10] = 1
    t0 = {"masks": m0, "boxes": C.masks_to_boxes(m0), "labels": torch.ones(1, dtype=torch.int64)}
    t1 = {"masks": m1, "boxes": C.masks_to_boxes(m1), "labels": torch.ones(1, dtype=torch.int64)}
    images = [torch.zeros(3, size, size), torch.ones(3, size, size)]
    _, tg = C.copy_paste(images, [t0, t1], scale=(1.0, 1.0), generator=torch.Generator().manual_seed(0), max_cover=0.5)
    assert len(tg[0]["masks"]) == 1 and torch.equal(tg[0]["masks"], m0)
    _, tg = C.copy_paste(images, [t0, t1], scale=(1.0, 1.0), generator=torch.Generator().manual_seed(0), max_cover=0.51)
    assert len(tg[0]["masks"]) == 2 and int(tg[0]["masks"][0].sum()) == 100


def test_copy_paste_rescale_offset_and_invariants():
    g = torch.Generator().manual_seed(0)
    images, targets = _toy_batch(n=3, size=64, seed=3)
    donor_area = {j: t["masks"].flatten(1).sum(1) for j, t in enumerate(targets)}
    for _trial in range(10):
        imgs, tgts = C.copy_paste(images, targets, scale=(0.3, 1.0), generator=g)
        for i, t in enumerate(tgts):
            m = t["masks"].bool()
            assert m.flatten(1).any(1).all()  # no empty instance survives
            assert torch.equal(t["boxes"], C.masks_to_boxes(t["masks"]))
            assert (m.sum(0) <= 1).all()  # old masks lose pasted pixels
            n_old = len(targets[i]["masks"])
            assert len(m) >= 1
            assert len(m) - n_old <= 1  # donors have 2 instances -> 1 pasted
    # exact scale: s = 0.5 on a 64 px donor -> a 32 px copy; pasted area ~ area / 4
    g = torch.Generator().manual_seed(5)
    imgs, tgts = C.copy_paste(images[:1], targets[:1], scale=(0.5, 0.5), generator=g)
    a = tgts[0]["masks"][-1].sum().item()
    assert (
        a in {(donor_area[0][k] / 4).round().item() for k in range(2)}
        or min(abs(a - donor_area[0][k].item() / 4) for k in range(2)) <= 0.15 * a
    )


# ------------------------------------------------------------------------------------------------ dataset


def _rle(m):
    r = mu.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}


@pytest.fixture()
def bad_coco(tmp_path):
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for name in ("ok.png", "noann.png"):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "images" / name)
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n not really")
    m = np.zeros((40, 48), bool)
    m[5:15, 10:30] = True
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": _rle(m), "bbox": [10, 5, 20, 10], "iscrowd": 0},
        {
            "id": 2,
            "image_id": 1,
            "category_id": 1,
            "segmentation": _rle(m[:, ::-1].copy()),
            "bbox": [18, 5, 0, 10],
        },  # zero width
        {
            "id": 3,
            "image_id": 1,
            "category_id": 1,
            "segmentation": [[100, 100, 120, 100, 120, 120]],
            "bbox": [100, 100, 20, 20],
        },  # outside
        {
            "id": 4,
            "image_id": 1,
            "category_id": 1,
            "segmentation": _rle(np.ones((10, 10), bool)),
            "bbox": [0, 0, 10, 10],
        },  # wrong size
        {"id": 5, "image_id": 3, "category_id": 1, "segmentation": _rle(m), "bbox": [10, 5, 20, 10]},
    ]
    data = {
        "images": [
            {"id": 1, "file_name": "ok.png", "height": 40, "width": 48},
            {"id": 2, "file_name": "noann.png", "height": 40, "width": 48},
            {"id": 3, "file_name": "corrupt.png", "height": 40, "width": 48},
        ],
        "annotations": anns,
        "categories": [{"id": 1, "name": "fg"}],
    }
    p = tmp_path / "pseudo.json"
    p.write_text(json.dumps(data))
    return p


def test_dataset_bad_input_warns_and_skips(bad_coco):
    with pytest.warns(RuntimeWarning, match="without annotations"):
        ds = C.PseudoMaskDataset(bad_coco)
    assert len(ds) == 2 and ds.image_ids() == [1, 3]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        img, t = ds[0]
        assert ds[1] is None  # corrupt image -> None, not an exception
    msgs = " | ".join(str(x.message) for x in w)
    for needle in ("degenerate box", "empty mask", "RLE size", "corrupt.png"):
        assert needle in msgs, needle
    assert img.shape == (3, 40, 48) and 0 <= img.min() and img.max() <= 1
    assert t["masks"].shape == (2, 40, 48)  # annotations 1 and 2 kept
    assert t["boxes"].tolist() == [[10, 5, 30, 15], [18, 5, 38, 15]]  # zero-width box fixed from the mask
    images, targets = C.collate([ds[1], ds[0], None])
    assert len(images) == 1 and targets[0]["image_id"] == 1
    assert ds.problems["unreadable image"] == 2
    # prediction mode keeps images without annotations
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(C.PseudoMaskDataset(bad_coco, train=False)) == 3


def test_dataset_empty_files(tmp_path):
    p = tmp_path / "empty.json"
    p.write_text("")
    with pytest.raises(ValueError, match="empty.json is empty"):
        C.PseudoMaskDataset(p)
    p.write_text(
        json.dumps(
            {"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}], "annotations": [], "categories": []}
        )
    )
    with (
        pytest.warns(RuntimeWarning, match="no annotations"),
        pytest.raises(ValueError, match="no image with annotations"),
    ):
        C.PseudoMaskDataset(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        C.PseudoMaskDataset(p)


def test_stream_sampler_resume_and_shards():
    s = C.StreamSampler(10, seed=3)
    it = iter(s)
    stream = [next(it) for _ in range(35)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new permutation per epoch
    it = iter(C.StreamSampler(10, seed=3, start=17))
    assert [next(it) for _ in range(18)] == stream[17:35]  # resume mid-epoch: same order
    r0, r1 = iter(C.StreamSampler(10, 3, 0, 2)), iter(C.StreamSampler(10, 3, 1, 2))
    a, b = [next(r0) for _ in range(5)], [next(r1) for _ in range(5)]
    assert sorted(a + b) == list(range(10))  # DDP shards partition an epoch


# ------------------------------------------------------------------------------------------------ aspect grouping


def test_grouped_stream_batches_one_orientation_and_resume():
    n = 23
    groups = [int(i % 3 == 0) for i in range(n)]  # 8 portrait, 15 landscape
    stream = C.StreamSampler(n, seed=4)
    full = C.GroupedStreamBatchSampler(stream, groups, 4)
    it = iter(full)
    batches = [next(it) for _ in range(30)]
    for b in batches:
        assert len(b) == 4 and len({groups[i] for i in b}) == 1
    # in stream order: concatenating the batches of a group gives that group's indices as the stream yields them
    s_it = iter(stream)
    seq = [next(s_it) for _ in range(200)]
    for g in (0, 1):
        got = [i for b in batches if groups[b[0]] == g for i in b]
        want = [i for i in seq if groups[i] == g][: len(got)]
        assert got == want
    # resume at batch 11: the same batches as the uninterrupted run
    it2 = iter(C.GroupedStreamBatchSampler(C.StreamSampler(n, seed=4), groups, 4, skip=11))
    assert [next(it2) for _ in range(19)] == batches[11:]


def test_aspect_groups_from_coco_sizes():
    class D:
        records = [({"width": 64, "height": 48}, []), ({"width": 48, "height": 64}, []), ({"id": 3}, [])]

    assert C.aspect_groups(D()) == [0, 1, 0]
