"""CutLER's detector on torchvision: class-agnostic Mask R-CNN R50-FPN with the reference settings and
DropLoss (CutLER eq. 2).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REFERENCE_MIN_SIZES = (240, 320, 480, 640, 672, 704, 736, 768, 800, 1024)


ARCHS = ("resnet50", "resnet50_v2", "resnet18", "resnet34")


# --------------------------------------------------------------------------------------------------
# Boxes


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes ``[N, 4]`` (x0, y0, x1, y1) of masks ``[N, H, W]`` in the pixel-edge convention (a one-pixel
    mask at column x spans x..x+1, so no box has zero width). Empty masks give all-zero boxes."""
    n = masks.shape[0]
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    m = masks.bool()
    rows, cols = m.any(2), m.any(1)  # [N, H], [N, W]
    H, W = m.shape[1:]
    ar_h = torch.arange(H, device=m.device)
    ar_w = torch.arange(W, device=m.device)
    y0 = torch.where(rows, ar_h, H).min(1).values
    y1 = torch.where(rows, ar_h, -1).max(1).values + 1
    x0 = torch.where(cols, ar_w, W).min(1).values
    x1 = torch.where(cols, ar_w, -1).max(1).values + 1
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    boxes[~rows.any(1)] = 0
    return boxes


# --------------------------------------------------------------------------------------------------
# DropLoss


def droploss_fastrcnn_loss(
    class_logits,
    box_regression,
    labels,
    regression_targets,
    proposals,
    gt_boxes,
    box_coder,
    drop_iou: float = 0.01,
    enabled: bool = True,
):
    """Fast R-CNN losses with DropLoss (CutLER eq. 2).

    ``class_logits`` ``[R, C]``, ``box_regression`` ``[R, 4C]`` for all sampled RoIs of the batch;
    ``labels`` / ``regression_targets`` / ``proposals`` per image (lists, ``[R_i]``, ``[R_i, 4]``,
    ``[R_i, 4]``); ``gt_boxes`` per image ``[G_i, 4]``. The predicted box of a RoI is its proposal decoded
    with the deltas of its highest-scoring foreground class (class 1 when class-agnostic). Weight
    ``w = max IoU(pred, GT) > drop_iou``; ``loss_cls = sum(w * CE) / R``. The box loss is torchvision's.
    Returns ``(loss_cls, loss_box, keep bool [R] or None)``.
    """
    from torchvision.models.detection.roi_heads import fastrcnn_loss
    from torchvision.ops import box_iou

    loss_cls, loss_box = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
    if not enabled:
        return loss_cls, loss_box, None
    R, C = class_logits.shape
    with torch.no_grad():
        reg = box_regression.reshape(R, -1, 4).float()
        if reg.shape[1] == 1:
            deltas = reg[:, 0]
        else:
            cls = (
                class_logits[:, 1:].float().argmax(1) + 1
                if C > 2
                else torch.ones(R, dtype=torch.long, device=reg.device)
            )
            deltas = reg[torch.arange(R, device=reg.device), cls]
        pred = box_coder.decode(deltas, [p.float() for p in proposals]).reshape(R, 4)
        keep = torch.zeros(R, dtype=torch.bool, device=reg.device)
        start = 0
        for p, g in zip(proposals, gt_boxes):
            n = p.shape[0]
            if n and g.numel():
                keep[start : start + n] = box_iou(pred[start : start + n], g.float()).max(1).values > drop_iou
            start += n
    ce = F.cross_entropy(class_logits, torch.cat(labels), reduction="none")
    loss_cls = (ce * keep.to(ce.dtype)).sum() / max(R, 1)
    return loss_cls, loss_box, keep


def _roi_heads_base():
    from torchvision.models.detection.roi_heads import RoIHeads

    return RoIHeads


class DropLossRoIHeads(_roi_heads_base()):
    """torchvision ``RoIHeads`` whose training forward uses :func:`droploss_fastrcnn_loss`.

    ``drop_loss`` (bool) switches DropLoss (off in self-training); ``drop_iou`` is the threshold (0.01).
    The last batch's keep mask is stored in ``last_keep`` (for tests and logging). Inference is
    torchvision's unchanged.
    """

    drop_loss: bool = True
    drop_iou: float = 0.01

    @classmethod
    def from_roi_heads(cls, rh, drop_loss: bool = True, drop_iou: float = 0.01) -> "DropLossRoIHeads":
        new = cls(
            rh.box_roi_pool,
            rh.box_head,
            rh.box_predictor,
            rh.proposal_matcher.high_threshold,
            rh.proposal_matcher.low_threshold,
            rh.fg_bg_sampler.batch_size_per_image,
            rh.fg_bg_sampler.positive_fraction,
            rh.box_coder.weights,
            rh.score_thresh,
            rh.nms_thresh,
            rh.detections_per_img,
            rh.mask_roi_pool,
            rh.mask_head,
            rh.mask_predictor,
        )
        new.drop_loss, new.drop_iou = bool(drop_loss), float(drop_iou)
        new.last_keep = None
        return new

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        from torchvision.models.detection.roi_heads import maskrcnn_loss

        if targets is None:
            raise ValueError("targets are required in training mode")
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_cls, loss_box, keep = droploss_fastrcnn_loss(
            class_logits,
            box_regression,
            labels,
            regression_targets,
            proposals,
            [t["boxes"] for t in targets],
            self.box_coder,
            self.drop_iou,
            self.drop_loss,
        )
        self.last_keep = keep
        losses = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        if self.has_mask():
            mask_proposals, pos_idx = [], []
            for p, lab, mi in zip(proposals, labels, matched_idxs):
                pos = torch.where(lab > 0)[0]
                mask_proposals.append(p[pos])
                pos_idx.append(mi[pos])
            mask_logits = self.mask_predictor(
                self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
            )
            losses["loss_mask"] = maskrcnn_loss(
                mask_logits, mask_proposals, [t["masks"] for t in targets], [t["labels"] for t in targets], pos_idx
            )
        return [], losses


# --------------------------------------------------------------------------------------------------
# Model


def _transform_cls():
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class MultiScaleTransform(GeneralizedRCNNTransform):
        """Random short side from ``min_size`` in training (as torchvision), ``min_size_test`` at inference
        (torchvision would use the last training size)."""

        def __init__(self, min_size, max_size, mean, std, min_size_test):
            super().__init__(min_size, max_size, mean, std)
            self.min_size_test = int(min_size_test)

        def resize(self, image, target=None):
            if self.training:
                return super().resize(image, target)
            saved = self.min_size
            self.min_size = (self.min_size_test,)
            try:
                return super().resize(image, target)
            finally:
                self.min_size = saved

    return MultiScaleTransform


def _strip(sd: dict) -> dict:
    for key in ("state_dict", "model", "teacher", "student"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        for pre in ("module.", "backbone.body.", "backbone.", "body."):
            if k.startswith(pre):
                k = k[len(pre) :]
        if not k.startswith("fc."):
            out[k] = v
    return out


def load_backbone_weights(model, path) -> dict:
    """Load ResNet weights (e.g. DINO ResNet-50 ``dino_resnet50_pretrain.pth`` or a torchvision ResNet state
    dict) into ``model.backbone.body`` with ``torch.load(weights_only=True)``. Prefixes ``module.``,
    ``backbone.`` and wrappers ``state_dict``/``model``/``teacher`` are stripped, ``fc.*`` ignored.
    Raises when no tensor matches (wrong file). Returns ``{"loaded", "missing", "unexpected"}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights {path} not found (give a ResNet state dict, e.g. DINO "
            "ResNet-50 dino_resnet50_pretrain.pth, or weights=None for random init)"
        )
    sd = _strip(torch.load(path, map_location="cpu", weights_only=True))
    body = model.backbone.body
    own = body.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"backbone weights {path}: no tensor matches the ResNet body (first keys: {list(sd)[:5]})")
    missing, unexpected = body.load_state_dict(usable, strict=False)
    bad = sorted(set(sd) - set(usable))
    return {"loaded": len(usable), "missing": list(missing), "unexpected": bad + list(unexpected)}


def build_model(
    arch: str = "resnet50",
    weights=None,
    num_classes: int = 2,
    min_size=REFERENCE_MIN_SIZES,
    max_size: int = 1333,
    min_size_test: int = 800,
    drop_loss: bool = True,
    drop_iou: float = 0.01,
    score_thresh: float = 0.0,
    detections_per_img: int = 100,
    rpn_post_nms_top_n_train: int = 4000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_nms_thresh: float = 0.65,
    box_batch_size_per_image: int = 512,
    trainable_layers: int = 5,
    representation_size: int = 1024,
) -> nn.Module:
    """Class-agnostic Mask R-CNN with the CutLER settings (see module docstring).

    ``arch``: ``resnet50`` (torchvision ``maskrcnn_resnet50_fpn``), ``resnet50_v2`` (``..._fpn_v2``),
    ``resnet18`` / ``resnet34`` (small FPN models for tests). ``weights``: path of ResNet backbone weights
    or ``None`` (random init; nothing is downloaded). BatchNorm layers are trainable ``nn.BatchNorm2d``
    (the reference trains SyncBN with FREEZE_AT 0); ``trainable_layers`` 0..5 freezes early stages.
    ``representation_size``: width of the two-FC box head (1024 as torchvision and detectron2; smaller only
    for fast CPU tests; ``resnet50_v2`` keeps its own conv head). A misspelt keyword is a ``TypeError`` (it
    would otherwise leave a setting silently at its default).
    """
    import torchvision.models.detection as D
    from torchvision.models import resnet
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if not 0 <= int(trainable_layers) <= 5:
        raise ValueError(f"trainable_layers must be 0..5, got {trainable_layers}")
    min_size = tuple(int(s) for s in (min_size if isinstance(min_size, (list, tuple)) else [min_size]))
    kw = dict(
        num_classes=num_classes,
        min_size=min_size,
        max_size=int(max_size),
        box_score_thresh=score_thresh,
        box_detections_per_img=int(detections_per_img),
        rpn_post_nms_top_n_train=int(rpn_post_nms_top_n_train),
        rpn_post_nms_top_n_test=int(rpn_post_nms_top_n_test),
        rpn_pre_nms_top_n_train=int(rpn_pre_nms_top_n_train),
        rpn_pre_nms_top_n_test=int(rpn_pre_nms_top_n_test),
        rpn_nms_thresh=float(rpn_nms_thresh),
        box_batch_size_per_image=int(box_batch_size_per_image),
    )
    if arch == "resnet50":
        model = D.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kw)
    elif arch == "resnet50_v2":
        model = D.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **kw)
    else:
        body = getattr(resnet, arch)(weights=None, norm_layer=nn.BatchNorm2d)
        backbone = _resnet_fpn_extractor(body, 5)
        model = D.MaskRCNN(backbone, **kw)
    if arch != "resnet50_v2" and int(representation_size) != 1024:
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

        model.roi_heads.box_head = TwoMLPHead(model.backbone.out_channels * 7 * 7, int(representation_size))
        model.roi_heads.box_predictor = FastRCNNPredictor(int(representation_size), num_classes)
    if weights is not None:
        model.nbs_weights = load_backbone_weights(model, weights)
    # freeze early stages when asked (torchvision's rule: train the last `trainable_layers` of layer4..conv1;
    # the stem's bn1 trains only with all 5)
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][: int(trainable_layers)]
    if int(trainable_layers) < 5:
        for name, p in model.backbone.body.named_parameters():
            if not any(name.startswith(s) for s in stages):
                p.requires_grad_(False)
    model.transform = _transform_cls()(
        min_size, int(max_size), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], min_size_test
    )
    model.roi_heads = DropLossRoIHeads.from_roi_heads(model.roi_heads, drop_loss, drop_iou)
    model.nbs_arch = arch
    return model


def set_drop_loss(model, enabled: bool) -> None:
    """Switch DropLoss on a (possibly DDP-wrapped) model."""
    getattr(model, "module", model).roi_heads.drop_loss = bool(enabled)
