"""The Cascade Mask R-CNN head: stage targets at IoU 0.5 / 0.6 / 0.7 on hand-made boxes, the stages' own
proposals and box coders, DropLoss in every stage, one stage = the plain head (losses, gradients and
detections on the same inputs and weights), detectron2's ROIAlignV2 pooler, training and inference end to end."""

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import roi_align

from nbsupport.training import cutler as C
from nbsupport.training.cutler import heads

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ stage targets

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
# proposals with IoU 1, 0.65, 0.55, 0.75, 0 against GT (same width, shorter heights)
PROPS = torch.tensor(
    [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 6.5], [0.0, 0.0, 10.0, 5.5], [0.0, 0.0, 10.0, 7.5], [20, 20, 30, 30.0]]
)


@pytest.mark.parametrize("iou, want", [(0.5, [1, 1, 1, 1, 0]), (0.6, [1, 1, 0, 1, 0]), (0.7, [1, 0, 0, 1, 0])])
def test_stage_targets_at_the_stage_iou(iou, want):
    targets = [{"boxes": GT, "labels": torch.ones(1, dtype=torch.int64)}]
    labels, matched, regs = C.stage_targets([PROPS], targets, iou, BoxCoder((20.0, 20.0, 10.0, 10.0)))
    assert labels[0].tolist() == want and matched[0].tolist() == [0] * 5
    # proposal [0, 0, 10, 5.5] -> GT under weights (20, 20, 10, 10): dy = 20 * (5 - 2.75) / 5.5, dh = 10 log(10 / 5.5)
    assert regs[0][2].tolist() == pytest.approx([0.0, 20 * 2.25 / 5.5, 0.0, 10 * math.log(10 / 5.5)], rel=1e-5)


def test_stage_targets_exact_threshold_and_empty_image():
    targets = [{"boxes": GT, "labels": torch.ones(1, dtype=torch.int64)}]
    labels, _, _ = C.stage_targets([PROPS[1:2]], targets, 0.65, BoxCoder((10.0, 10.0, 5.0, 5.0)))
    assert labels[0].tolist() == [1]  # IoU == threshold is foreground (detectron2's Matcher: >=)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    labels, _, regs = C.stage_targets([PROPS], empty, 0.5, BoxCoder((10.0, 10.0, 5.0, 5.0)))
    assert labels[0].tolist() == [0] * 5 and regs[0].abs().sum() == 0


# ------------------------------------------------------------------------------------------------ models


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(
        min_size=(64,), max_size=64, min_size_test=64, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
        rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=30, box_batch_size_per_image=32,
        representation_size=64, detections_per_img=10,
    )  # fmt: skip
    args.update(kw)
    return C.build_model("resnet18", **args)


def _batch(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(n):
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        masks[0, 5:30, 8:28] = 1
        masks[1, 35 - i : 60, 30:58] = 1
        images.append(torch.rand(3, size, size, generator=g))
        targets.append({"masks": masks, "boxes": C.masks_to_boxes(masks), "labels": torch.ones(2, dtype=torch.int64)})
    return images, targets


def _rpn_inputs(model, images, targets):
    il, tg = model.transform(images, [dict(t) for t in targets])
    feats = model.backbone(il.tensors)
    torch.manual_seed(1)
    props, _ = model.rpn(il, feats, tg)
    return il, tg, {k: v.detach() for k, v in feats.items()}, [p.detach() for p in props]


def _one_stage_pair(drop_loss):
    """A plain head and a one-stage cascade with the same weights (the cascade's agnostic deltas are the plain
    head's class-1 deltas)."""
    plain = _model(head="mask_rcnn", drop_loss=drop_loss)
    casc = _model(cascade_ious=[0.5], cascade_weights=[[10, 10, 5, 5]], drop_loss=drop_loss)
    sd = plain.state_dict()
    own = casc.state_dict()
    for k in own:
        src = k.replace("box_head.0.", "box_head.").replace("box_predictor.0.", "box_predictor.")
        v = sd[src]
        own[k] = v[4:8] if k.startswith("roi_heads.box_predictor.0.bbox_pred") else v
    casc.load_state_dict(own)
    return plain, casc


@pytest.mark.parametrize("drop_loss", [True, False])
def test_one_stage_cascade_equals_the_plain_head(drop_loss):
    plain, casc = _one_stage_pair(drop_loss)
    plain.train(), casc.train()
    images, targets = _batch()
    il, tg, feats, props = _rpn_inputs(plain, images, targets)
    torch.manual_seed(2)
    _, ref = plain.roi_heads(feats, props, il.image_sizes, tg)
    torch.manual_seed(2)
    _, got = casc.roi_heads(feats, props, il.image_sizes, tg)
    assert set(got) == {"loss_classifier_stage0", "loss_box_reg_stage0", "loss_mask"}
    for k in ("loss_classifier", "loss_box_reg"):
        assert got[f"{k}_stage0"].item() == pytest.approx(ref[k].item(), rel=1e-6), k
    assert got["loss_mask"].item() == pytest.approx(ref["loss_mask"].item(), rel=1e-6)
    if drop_loss:
        assert torch.equal(casc.roi_heads.last_keep[0], plain.roi_heads.last_keep)
        assert 0 < plain.roi_heads.last_keep.sum() < plain.roi_heads.last_keep.numel()
    # same gradients on the box head (a single stage scales nothing)
    sum(ref.values()).backward()
    sum(got.values()).backward()
    g_ref, g_got = plain.roi_heads.box_head.fc6.weight.grad, casc.roi_heads.box_head[0].fc6.weight.grad
    assert torch.allclose(g_got, g_ref, rtol=1e-4, atol=1e-8)


def test_one_stage_cascade_detects_as_the_plain_head():
    plain, casc = _one_stage_pair(True)
    plain.eval(), casc.eval()
    images, _ = _batch(n=1)
    with torch.no_grad():
        ref, got = plain(images), casc(images)
    assert len(ref[0]["boxes"]) == len(got[0]["boxes"]) == 10
    for k in ("boxes", "scores", "labels", "masks"):
        assert torch.allclose(got[0][k].float(), ref[0][k].float(), atol=1e-5), k


def test_later_stages_train_on_the_previous_stage_boxes(monkeypatch):
    model = _model().train()
    rh = model.roi_heads
    images, targets = _batch()
    il, tg, feats, props = _rpn_inputs(model, images, targets)
    calls = []
    orig = heads.stage_targets

    def spy(proposals, targets, iou, coder):
        calls.append(([p.clone() for p in proposals], iou, coder.weights))
        return orig(proposals, targets, iou, coder)

    monkeypatch.setattr(heads, "stage_targets", spy)
    decoded = []
    orig_boxes = rh._stage_boxes

    def boxes_spy(k, deltas, proposals, image_shapes, drop_empty):
        out = orig_boxes(k, deltas, proposals, image_shapes, drop_empty)
        # stage k's boxes: its proposals decoded with its OWN coder, clipped, empty ones dropped in training
        ref = rh.stage_coders[k].decode(deltas.detach().float(), proposals).reshape(-1, 4)
        ref = [b.clamp(min=0, max=64) for b in ref.split([len(p) for p in proposals])]
        assert all(torch.allclose(o, r[(r[:, 2] > r[:, 0]) & (r[:, 3] > r[:, 1])]) for o, r in zip(out, ref))
        decoded.append(out)
        return out

    monkeypatch.setattr(rh, "_stage_boxes", boxes_spy)
    _, losses = rh(feats, props, il.image_sizes, tg)
    assert [c[1] for c in calls] == [0.6, 0.7] and [c[2] for c in calls] == [(20, 20, 10, 10), (30, 30, 15, 15)]
    for (p_used, _, _), p_made in zip(calls, decoded):
        assert all(torch.equal(a, b) for a, b in zip(p_used, p_made))
    keys = {f"loss_{n}_stage{k}" for n in ("classifier", "box_reg") for k in range(3)} | {"loss_mask"}
    assert set(losses) == keys and all(torch.isfinite(v) for v in losses.values())
    assert len(rh.last_keep) == 3 and all(k.dtype == torch.bool for k in rh.last_keep)


def test_droploss_in_every_stage():
    model = _model().train()
    images, targets = _batch()
    il, tg, feats, props = _rpn_inputs(model, images, targets)
    torch.manual_seed(2)
    _, on = model.roi_heads(feats, props, il.image_sizes, tg)
    keeps = model.roi_heads.last_keep
    C.set_drop_loss(model, False)
    torch.manual_seed(2)
    _, off = model.roi_heads(feats, props, il.image_sizes, tg)
    assert model.roi_heads.last_keep == [None, None, None]
    assert any(not bool(k.all()) for k in keeps)  # random boxes miss the ground truth somewhere
    for k, keep in enumerate(keeps):
        on_cls, off_cls = on[f"loss_classifier_stage{k}"].item(), off[f"loss_classifier_stage{k}"].item()
        assert on_cls <= off_cls + 1e-7 and (on_cls < off_cls) == (not bool(keep.all()))
        assert on[f"loss_box_reg_stage{k}"].item() == pytest.approx(off[f"loss_box_reg_stage{k}"].item(), rel=1e-6)


def test_gradient_to_the_features_is_scaled_by_one_over_stages():
    x = torch.ones(3, requires_grad=True)
    (heads._ScaleGradient.apply(x, 1 / 3) * 2).sum().backward()
    assert x.grad.tolist() == pytest.approx([2 / 3] * 3)


def test_cascade_trains_and_detects_end_to_end():
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    images, targets = _batch()
    model.train()
    for _ in range(2):
        losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    grads = [p.grad for p in model.roi_heads.box_head[2].parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        out = model(images[:1])
    o = out[0]
    assert 0 < len(o["boxes"]) <= 10 and o["masks"].shape[1:] == (1, 64, 64)
    assert torch.all(o["scores"][:-1] >= o["scores"][1:]) and torch.all((o["scores"] >= 0) & (o["scores"] <= 1))
    assert torch.all(o["labels"] == 1) and torch.all(o["boxes"][:, 2:] <= 64)


def test_cascade_scores_are_the_stage_average(monkeypatch):
    """Inference: stage k rescores stage k-1's boxes; the reported score is the mean fg probability."""
    model = _model(score_thresh=-1.0, detections_per_img=1000).eval()
    rh = model.roi_heads
    rh.nms_thresh = 1.0  # keep everything: detections line up with the proposals
    for k, p in enumerate(rh.box_predictor):
        torch.nn.init.zeros_(p.cls_score.weight)
        torch.nn.init.zeros_(p.bbox_pred.weight)
        torch.nn.init.zeros_(p.bbox_pred.bias)
        p.cls_score.bias.data = torch.tensor([0.0, float(k)])  # fg probability sigmoid(k) at stage k
    feats = {n: torch.rand(1, 256, 64 // s, 64 // s) for n, s in zip(("0", "1", "2", "3"), (4, 8, 16, 32))}
    props = [torch.tensor([[2.0, 2.0, 30.0, 30.0], [10.0, 12.0, 50.0, 60.0]])]
    res = rh._inference(feats, props, [(64, 64)])[0]
    want = sum(torch.sigmoid(torch.tensor(float(k))) for k in range(3)) / 3
    assert res["scores"].tolist() == pytest.approx([want.item()] * 2, rel=1e-5)
    assert sorted(res["boxes"].tolist()) == sorted(props[0].tolist())  # zero deltas keep the boxes


# ------------------------------------------------------------------------------------------------ pooler


def test_roialign_v2_levels_and_values():
    pool = C.RoIAlignV2Pooler(output_size=2)
    sizes = [20, 56, 111, 113, 224, 447, 449, 2000]
    boxes = torch.tensor([[0.0, 0.0, s, s] for s in sizes])
    # floor(4 + log2(s / 224)) clamped to 2..5, minus 2
    assert pool.levels(boxes).tolist() == [0, 0, 0, 1, 2, 2, 3, 3]
    feats = {str(k): torch.full((1, 3, 256 // s, 256 // s), float(k)) for k, s in enumerate((4, 8, 16, 32))}
    out = pool(feats, [boxes[:4].clamp(max=250)], [(256, 256)])
    assert out[:, 0, 0, 0].tolist() == [0.0, 0.0, 0.0, 1.0]  # each box pooled from its own level
    f = torch.rand(1, 2, 16, 16)
    box = torch.tensor([[3.0, 5.0, 40.0, 50.0]])
    got = pool({"0": f, "1": f, "2": f, "3": f}, [box], [(64, 64)])
    ref = roi_align(f, [box], (2, 2), 1 / 4, 0, aligned=True)  # level 0 (stride 4), half-pixel aligned
    assert torch.allclose(got, ref)
    assert not torch.allclose(got, roi_align(f, [box], (2, 2), 1 / 4, 2, aligned=False))


def test_logged_record_sums_the_stages():
    from nbsupport.training.cutler.loop import loss_record

    losses = {f"loss_classifier_stage{k}": torch.tensor(0.1 * (k + 1)) for k in range(3)}
    losses.update(loss_box_reg_stage0=torch.tensor(0.5), loss_mask=torch.tensor(0.25))
    rec = loss_record(torch.tensor(1.35), losses, torch.tensor(2.0))
    assert rec["loss_classifier"] == pytest.approx(0.6) and rec["loss_box_reg"] == pytest.approx(0.5)
    assert rec["loss_mask"] == 0.25 and rec["grad_norm"] == 2.0 and rec["loss"] == pytest.approx(1.35)
